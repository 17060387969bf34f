"""robots/hotsql.py: the plain SQL of the upload path reads and writes exactly what the ORM would, on SQLite and on
PostgreSQL alike (CI runs this suite on both). A converter or a preparation missed shows here as a value that differs:
a naive datetime, a JSON column left as text, a UUID stored in another format, an enum stored by name."""

import datetime as dt
import uuid

from django.db import connection
from django.utils import timezone

from robots import hotsql, ingest
from robots.auth import authenticate_token
from robots.models import Episode, Robot


def _fields(instance) -> dict:
    return {f.attname: getattr(instance, f.attname) for f in type(instance)._meta.concrete_fields}


def _stored(model, pk, column: str):
    """A column as the database holds it (SQLite: the text the ORM wrote), not as any Python layer converts it."""
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {column} FROM {model._meta.db_table} WHERE id = %s",
                       [model._meta.pk.get_db_prep_value(pk, connection)])
        return cursor.fetchone()[0]


def test_a_robot_read_by_its_token_equals_the_orms(robot):
    instance, token = robot
    Robot.objects.filter(pk=instance.pk).update(last_seen=timezone.now(), current_episode=uuid.uuid4(),
                                                loop_hz=9.5, estopped=True)
    found = authenticate_token(token)
    assert found is not None and not found._state.adding and found._state.db == "default"
    assert _fields(found) == _fields(Robot.objects.get(pk=instance.pk))
    assert found.last_seen.tzinfo is not None and isinstance(found.current_episode, uuid.UUID)
    Robot.objects.filter(pk=instance.pk).update(revoked_at=timezone.now())
    assert authenticate_token(token) is None
    assert authenticate_token(token + "x") is None


def test_an_upload_row_equals_the_orms_and_carries_its_task_name_without_a_query(robot, task,
                                                                                   django_assert_num_queries):
    instance, _ = robot
    now = timezone.now()
    episode = Episode.objects.create(
        robot=instance, task=task, status=Episode.Status.UPLOADING, started_at=now - dt.timedelta(seconds=20),
        ended_at=now, image_shape=[96, 96, 3], cameras=["corner3", "gripper"], success=True, control_hz=10.0,
        upload_locked_until=now, upload_token="t" * 32, payload_size=123, received_bytes=7)
    with django_assert_num_queries(1):
        row = ingest._upload_row(episode.pk)
        assert row.task.name == task.name
    assert _fields(row) == _fields(Episode.objects.get(pk=episode.pk))
    assert row.image_shape == [96, 96, 3] and row.cameras == ["corner3", "gripper"]


def test_an_update_stores_what_the_orms_update_stores(robot, task):
    instance, _ = robot
    started = timezone.now()
    by_orm, by_sql = (Episode.objects.create(robot=instance, task=task, status=Episode.Status.RECORDING,
                                             started_at=started) for _ in range(2))
    values = dict(status=Episode.Status.VERIFIED, upload_locked_until=timezone.now(), image_shape=[64, 64, 3],
                  cameras=["corner3"], success=False, outcome_by=None, task=task, payload_sha256="ab" * 32,
                  received_bytes=2**40, control_hz=12.5)
    Episode.objects.filter(pk=by_orm.pk).update(**values)
    assert hotsql.update(Episode, values, "id = %s", [ingest._pk(by_sql.pk)]) == 1
    assert hotsql.update(Episode, values, "id = %s", [ingest._pk(uuid.uuid4())]) == 0
    orm, sql = Episode.objects.get(pk=by_orm.pk), Episode.objects.get(pk=by_sql.pk)
    assert {k: v for k, v in _fields(orm).items() if k not in ("id", "created_at")} == {
        k: v for k, v in _fields(sql).items() if k not in ("id", "created_at")}
    for column in ("status", "upload_locked_until", "image_shape", "cameras", "success", "received_bytes"):
        assert _stored(Episode, by_orm.pk, column) == _stored(Episode, by_sql.pk, column), column


def test_an_insert_stores_what_save_stores_and_a_conflict_is_skipped_without_an_error(robot, task):
    from robots.models import MediaJob

    instance, _ = robot
    started = timezone.now()
    saved = Episode.objects.create(robot=instance, task=task, status=Episode.Status.UPLOADING, started_at=started,
                                   image_shape=[96, 96, 3], payload_size=5)
    mine = Episode(robot=instance, task=task, status=Episode.Status.UPLOADING, started_at=started,
                   image_shape=[96, 96, 3], payload_size=5)
    assert hotsql.insert(mine, ignore_conflicts=True) and not mine._state.adding
    ignore = ("id", "created_at")
    stored = Episode.objects.get(pk=mine.pk)
    assert {k: v for k, v in _fields(stored).items() if k not in ignore} == {
        k: v for k, v in _fields(saved).items() if k not in ignore}
    assert stored.created_at is not None and stored.created_at >= started
    # the same id again: nothing inserted, nothing raised, the row untouched (PostgreSQL logs no unique violation)
    again = Episode(id=mine.pk, robot=instance, task=task, status=Episode.Status.REJECTED, started_at=started)
    assert not hotsql.insert(again, ignore_conflicts=True)
    assert Episode.objects.get(pk=mine.pk).status == Episode.Status.UPLOADING
    # an auto-increment pk is left to the database
    assert hotsql.insert(MediaJob(episode_id=mine.pk, kind=MediaJob.Kind.VIDEO, key="k"), ignore_conflicts=True)
    assert not hotsql.insert(MediaJob(episode_id=mine.pk, kind=MediaJob.Kind.VIDEO, key="k"), ignore_conflicts=True)
    assert list(MediaJob.objects.filter(episode_id=mine.pk).values_list("kind", "key", "state")) == [
        ("video", "k", "queued")]


def test_rows_read_in_new_threads_reuse_the_converters(transactional_db, robot):
    """A server makes threads without end (one per request on Django's own path): what is cached must not grow."""
    import threading

    instance, token = robot
    assert authenticate_token(token).pk == instance.pk
    size = hotsql._converters.cache_info().currsize
    found = []

    def read():
        found.append(authenticate_token(token))
        connection.close()

    for _ in range(4):
        thread = threading.Thread(target=read)
        thread.start()
        thread.join()
    assert [robot.pk for robot in found] == [instance.pk] * 4
    assert hotsql._converters.cache_info().currsize == size
