"""Episodes: their records over the robot socket (``episode.started`` / ``episode.ended``) and the HTTP ingest of
their payloads (resumable, idempotent by episode UUID, verified by sha256 and by the payload checker before anything
reads it; docs/protocol.md "HTTP ingest").
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import functools
import hashlib
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import Q
from django.utils import timezone

from . import hotsql, payload_check, protocol, replay, tasking
from .episode_file import EpisodeFileError, Limits, Segment
from .exceptions import (
    ChecksumMismatch,
    EpisodeConflict,
    EpisodeNotFound,
    ForbiddenEpisode,
    InvalidPayload,
    OffsetMismatch,
    PayloadTooLarge,
    QuotaExceeded,
    SopError,
    StorageFull,
    StorageUnavailable,
    UnknownTask,
    UploadBusy,
    UploadNotOpen,
)
from .models import AuditEvent, ControlLease, Episode, HelpRequest, InterventionSegment, Robot, Task
from .protocol import ControlSource, Outcome, RobotState, Split
from .values import db_count, db_version, from_unix
from sop_web import storage
from sop_web.logformat import ids

log = logging.getLogger(__name__)

HASH_BLOCK = 1024 * 1024
UPLOAD_LOCK_S = 120.0  # one request's hold on an upload: a 16 MiB chunk, a sha256 and a payload check fit easily


# ---------------------------------------------------------------- episodes over the socket


def episode_started(robot: Robot, msg: protocol.EpisodeStarted) -> Episode:
    """Record an episode the robot began (status recording). Idempotent; another robot's id is refused."""
    task = Task.objects.filter(name=msg.task).first()
    if task is None:
        raise UnknownTask(f"unknown task {msg.task!r}")
    episode, _ = Episode.objects.get_or_create(  # get_or_create survives two robots racing on one id
        id=msg.episode_id,
        defaults=dict(
            robot=robot,
            task=task,
            prompt=msg.prompt[:500],
            policy_version=db_version(msg.policy_version),
            policy_name=msg.policy[:100],
            split=msg.split,
            started_at=from_unix(msg.started_at, "started_at"),
            status=Episode.Status.RECORDING,
        ),
    )
    if episode.robot_id != robot.pk:
        _refuse(robot, episode)
    Robot.objects.filter(pk=robot.pk).update(
        current_episode=msg.episode_id,
        current_task=task,
        current_prompt=msg.prompt[:500],
        current_step=0,
        state=RobotState.RUNNING.value,
        last_seen=timezone.now(),
    )
    return episode


def episode_ended(robot: Robot, msg: protocol.EpisodeEnded) -> protocol.TaskAssigned:
    """Record the end of an episode; returns the robot's next assignment."""
    with transaction.atomic():
        episode = Episode.objects.select_for_update().filter(pk=msg.episode_id).first()
        if episode is None:
            # Its episode.started was lost (e.g. sent while the server restarted): the upload will create it.
            log.info("robot %s ended episode %s, which was never announced", robot.name, msg.episode_id)
        elif episode.robot_id != robot.pk:
            _refuse(robot, episode)
        elif episode.status == Episode.Status.RECORDING:  # once an upload is open, the payload's metadata wins
            episode.ended_at = from_unix(msg.ended_at, "ended_at")
            episode.steps = db_count(msg.steps)
            episode.outcome = msg.outcome
            episode.success = msg.outcome == Outcome.SUCCESS.value
            episode.outcome_source = "robot"
            episode.intervention_count = db_count(msg.interventions)
            episode.intervention_steps = db_count(msg.intervention_steps)
            episode.save()
        Robot.objects.filter(pk=robot.pk).update(current_episode=None, current_step=0, last_seen=timezone.now())
        return tasking.assign(robot)


# ---------------------------------------------------------------- payload ingest (HTTP data plane)


def partial_path(episode_id) -> Path:
    return Path(settings.PAYLOAD_DIR) / "partial" / f"{episode_id}.part"


def stored_path(episode_id) -> Path:
    """Where a verified payload lives, relative to PAYLOAD_DIR (fanned out so no directory grows huge)."""
    return Path("episodes") / str(episode_id)[:2] / f"{episode_id}.h5"


payload_file = replay.payload_file  # every reader of verified bytes: the learner, pages, exports


def open_upload(robot: Robot, meta: dict[str, Any]) -> tuple[Episode, bool]:
    """Announce an episode payload (``meta`` as validated by serializers.EpisodeAnnouncementSerializer).

    Idempotent on the episode UUID. Returns the episode (its ``received_bytes`` is where the upload resumes) and
    whether it was created. Already verified with the same sha256: returned as is. Verified with another sha256:
    EpisodeConflict. Not verified and the size or sha256 changed: the upload starts again from 0.
    """
    size, sha256 = meta["size"], meta["sha256"]
    if size > settings.SOP_MAX_EPISODE_BYTES:
        raise PayloadTooLarge(f"episode of {size} bytes exceeds the limit of {settings.SOP_MAX_EPISODE_BYTES}")
    task_id = hotsql.scalar(_task_id_sql(), [meta["task"]])
    if task_id is None:
        raise UnknownTask(f"unknown task {meta['task']!r}")
    fields = _announced_fields(meta, task_id)
    opened = _open_quickly(robot, meta["id"], size, sha256, fields)
    if opened is not None:
        return opened
    with transaction.atomic():
        episode = Episode.objects.select_for_update().filter(pk=meta["id"]).first()
        if episode is None or episode.status != Episode.Status.UPLOADING:
            _check_open_uploads(robot, meta["id"])
        if episode is None:
            try:
                with transaction.atomic():
                    episode = Episode.objects.create(
                        id=meta["id"], robot=robot, status=Episode.Status.UPLOADING,
                        payload_size=size, payload_sha256=sha256, **fields,
                    )
                partial_path(episode.id).unlink(missing_ok=True)
                return episode, True
            except IntegrityError:  # a concurrent announcement created it between our SELECT and INSERT
                episode = Episode.objects.select_for_update().get(pk=meta["id"])
        if episode.robot_id != robot.pk:
            _refuse(robot, episode)
        if episode.status == Episode.Status.VERIFIED:
            if episode.payload_sha256 == sha256:
                return episode, False
            raise EpisodeConflict(f"episode {episode.id} is stored with sha256 {episode.payload_sha256}")
        if (episode.status, episode.payload_size, episode.payload_sha256) == (Episode.Status.UPLOADING, size, sha256):
            if episode.upload_token and episode.upload_locked_until and episode.upload_locked_until > timezone.now():
                return episode, False  # a request is writing it now: resume from what the row says
            episode.received_bytes = _partial_bytes(episode)
        else:
            # A retry after a rejected upload, new content, or an announcement racing another.
            partial_path(episode.id).unlink(missing_ok=True)
            episode.status = Episode.Status.UPLOADING
            episode.payload_size, episode.payload_sha256, episode.received_bytes = size, sha256, 0
            episode.error = ""
        for name, value in fields.items():
            setattr(episode, name, value)
        episode.save()
    if episode.status == Episode.Status.UPLOADING and episode.received_bytes == size:
        # Every byte arrived but the verification never ended (the web process died during it): finish it now, so
        # that a robot asking where to resume is not told "at the end" forever.
        return append_upload(robot, episode.id, size, b""), False
    return episode, False


# Where an announcement finds its episode on the quick path: recorded over the socket and not uploaded yet, or
# abandoned, or rejected (the robot sends it again from 0). The payload's fields replace what the row holds.
_FRESH = (Episode.Status.RECORDING, Episode.Status.ABANDONED, Episode.Status.REJECTED)


def _open_quickly(robot: Robot, episode_id, size: int, sha256: str,
                  fields: dict[str, Any]) -> Optional[tuple[Episode, bool]]:
    """The two common announcements in one statement each, no transaction: an episode the robot announced over the
    socket (or one to send again from 0) is opened by a conditional UPDATE, an unknown one by an INSERT. None: let
    the locking path decide (a resume, a verified episode, a conflict, another robot's id, a full upload quota).

    The quota is counted first and the quick path is taken only when there is room, so both paths refuse alike.
    """
    if _open_upload_count(robot, episode_id) >= settings.SOP_MAX_OPEN_UPLOADS:
        return None
    opened = dict(status=Episode.Status.UPLOADING, payload_size=size, payload_sha256=sha256, received_bytes=0,
                  error="", **fields)
    episode = Episode(id=episode_id, robot=robot, **opened)
    if hotsql.update(Episode, opened, "id = %s AND robot_id = %s AND status IN (%s, %s, %s)",
                     [_pk(episode_id), robot.pk, *(status.value for status in _FRESH)]):
        partial_path(episode_id).unlink(missing_ok=True)
        return episode, False
    try:
        # A statement of its own (autocommit; a savepoint inside a caller's transaction): an IntegrityError (a task
        # deleted this instant) aborts nothing else
        with transaction.atomic() if connection.in_atomic_block else contextlib.nullcontext():
            created = hotsql.insert(episode, ignore_conflicts=True)
    except IntegrityError:
        return None
    if not created:  # it exists in a state the locking path handles (or another request created it)
        return None
    partial_path(episode_id).unlink(missing_ok=True)
    return episode, True


def append_upload(robot: Robot, episode_id, offset: int, data: bytes) -> Episode:
    """Append one chunk at ``offset`` (which must equal the bytes received so far). The chunk that completes the
    payload triggers verification: sha256, then the payload checker (robots/payload_check.py, a sandboxed child
    process: structure, links, storage, sizes), then the file's claims are checked against the server's own records
    (robot, task, who drove, who labelled), and only then is the file moved into the store.

    One request at a time per episode holds the upload lock (a conditional UPDATE on the row, so it works across web
    processes and hosts); the bytes are written, hashed and checked OUTSIDE any database transaction, so that
    SQLite's single write lock is never held during file work (heartbeats, leases and e-stops would wait on it).
    A failed verification discards the partial bytes, marks the episode rejected and raises (ChecksumMismatch /
    InvalidPayload); the robot keeps its copy and uploads again from 0.
    """
    if len(data) > settings.SOP_MAX_UPLOAD_CHUNK_BYTES:
        raise PayloadTooLarge(f"chunk of {len(data)} bytes exceeds {settings.SOP_MAX_UPLOAD_CHUNK_BYTES}")
    token = _lock_upload(robot, episode_id)
    if token is None:  # why not: the one read the common path never needs
        episode = _own_episode(robot, episode_id)
        if episode.status == Episode.Status.VERIFIED:
            return episode  # a retried last chunk whose reply was lost: nothing left to do
        if episode.status in (Episode.Status.RECORDING, Episode.Status.ABANDONED):
            raise UploadNotOpen()
        raise UploadBusy()
    released = False
    try:
        episode = _upload_row(episode_id)
        received = _partial_bytes(episode)
        if offset != received:
            raise OffsetMismatch(f"Upload-Offset is {offset}, the server has {received} bytes", offset=received)
        end = offset + len(data)
        if end > episode.payload_size:
            raise PayloadTooLarge(f"chunk ends at byte {end}, past the announced size {episode.payload_size}")
        if data:
            _check_partial_quota(robot, episode, end)
            _write_chunk(partial_path(episode.id), offset, data)
        # Also resumes a rejected episode re-sent from 0.
        episode.status, episode.received_bytes, episode.error = Episode.Status.UPLOADING, end, ""
        if end == episode.payload_size:
            released = True  # whatever happens now, _finish's last statement releases the lock
            return _finish(robot, episode, token, whole=data if offset == 0 else None)
        # One statement records the bytes and releases the lock. Fenced by the lock: a request that outlived its
        # lock has written into a file that another request now reconciles (truncates); its bytes are not
        # acknowledged.
        released = True
        if not _fenced(episode.pk, token, status=Episode.Status.UPLOADING, received_bytes=end, error="",
                       upload_token="", upload_locked_until=None):
            raise UploadBusy("another request took over this upload; retry")
        return episode
    finally:
        if not released:
            _unlock(episode_id, token)


def cleanup_stale_uploads() -> int:
    """Delete partial uploads untouched for SOP_STALE_UPLOAD_HOURS (their episodes restart from 0) and mark episodes
    never uploaded within that time abandoned. Returns the number of partial files removed."""
    cutoff = time.time() - settings.SOP_STALE_UPLOAD_HOURS * 3600
    removed = 0
    for path in sorted((Path(settings.PAYLOAD_DIR) / "partial").glob("*.part")):
        if not _older_than(path, cutoff):
            continue
        try:
            episode_id = uuid.UUID(path.stem)
        except ValueError:
            path.unlink(missing_ok=True)  # not ours to keep
            removed += 1
            continue
        with transaction.atomic():
            episode = Episode.objects.select_for_update().filter(pk=episode_id).first()
            if not _older_than(path, cutoff):  # a PUT appended while we waited for the lock
                continue
            if episode is not None and episode.upload_locked_until and episode.upload_locked_until > timezone.now():
                continue  # a request is writing it right now
            path.unlink(missing_ok=True)
            removed += 1
            if episode is not None and episode.status == Episode.Status.UPLOADING:
                episode.received_bytes = 0
                episode.error = "upload abandoned: partial bytes discarded"
                episode.save(update_fields=["received_bytes", "error"])
    if removed:
        log.info("removed %d stale partial upload(s)", removed)
    abandoned = _abandon_stale_recordings()
    if abandoned:
        log.info("%d episode(s) announced but never uploaded marked abandoned", abandoned)
    return removed


def _abandon_stale_recordings() -> int:
    """Episodes announced (``episode.started``) longer than SOP_STALE_UPLOAD_HOURS ago whose payload never came, and
    that their robot is not running now, are marked abandoned: they stop showing as recording. A robot that still
    has one in its spool uploads it later as usual (any unverified episode can be uploaded again)."""
    cutoff = timezone.now() - dt.timedelta(hours=settings.SOP_STALE_UPLOAD_HOURS)
    running = Robot.objects.filter(current_episode__isnull=False).values("current_episode")
    return (Episode.objects.filter(status=Episode.Status.RECORDING, started_at__lt=cutoff, created_at__lt=cutoff)
            .exclude(pk__in=running)
            .update(status=Episode.Status.ABANDONED, error="announced but never uploaded"))



# ---------------------------------------------------------------- helpers


def _announced_fields(meta: dict[str, Any], task_id: int) -> dict[str, Any]:
    """Episode metadata as announced; verification replaces it with the payload's own."""
    segments = meta.get("interventions") or []
    return dict(
        task_id=task_id,
        prompt=meta.get("prompt", "")[:500],
        policy_name=meta.get("policy", "")[:100],
        policy_version=db_version(meta.get("policy_version")),
        split=meta["split"],
        started_at=from_unix(meta["started_at"], "started_at"),
        ended_at=from_unix(meta["ended_at"], "ended_at") if meta.get("ended_at") is not None else None,
        steps=db_count(meta.get("steps", 0)),
        outcome=meta.get("outcome", ""),
        success=meta.get("success"),
        outcome_source="robot",
        control_hz=meta.get("control_hz", 0.0),
        intervention_count=len(segments),
        intervention_steps=db_count(sum(s["end"] - s["start"] for s in segments)),
    )


def _pk(episode_id) -> Any:
    """An episode id as the database compares it (SQLite keeps UUIDs as 32 hex characters)."""
    return hotsql.prep(Episode, "id", episode_id)


@functools.cache
def _task_id_sql() -> str:
    return f"SELECT id FROM {Task._meta.db_table} WHERE name = %s"


@functools.cache
def _row_sql() -> str:
    return (f"SELECT {hotsql.columns(Episode, 'e')}, t.name FROM {Episode._meta.db_table} e "
            f"LEFT JOIN {Task._meta.db_table} t ON t.id = e.task_id WHERE e.id = %s")


def _upload_row(episode_id) -> Episode:
    """The episode an upload request holds the lock of, with its task's name (what verification compares the file
    with) and nothing else of the task loaded."""
    row = hotsql.fetchone(_row_sql(), [_pk(episode_id)])
    if row is None:
        raise EpisodeNotFound()
    episode, (task_name,) = hotsql.instance(Episode, row)
    if episode.task_id is not None:
        Episode.task.field.set_cached_value(episode, Task.from_db(connection.alias, ["id", "name"],
                                                                  [episode.task_id, task_name]))
    return episode


def _partial_bytes(episode: Episode) -> int:
    """How many bytes of the upload the server really has, reconciling the row with the partial file."""
    path = partial_path(episode.id)
    on_disk = path.stat().st_size if path.exists() else 0
    if on_disk == episode.received_bytes:
        return on_disk
    if on_disk > episode.received_bytes:
        # Bytes written by a PUT whose transaction did not commit: they were never acknowledged.
        os.truncate(path, episode.received_bytes)
        return episode.received_bytes
    # The partial file was cleaned up or lost: start again.
    path.unlink(missing_ok=True)
    return 0


def _write_chunk(path: Path, offset: int, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(path, "r+b" if path.exists() else "w+b") as fh:
            fh.seek(offset)
            fh.write(data)
            fh.truncate()
            fh.flush()
            os.fsync(fh.fileno())  # acknowledged bytes survive a crash
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        try:
            os.truncate(path, offset)  # nothing of this chunk is acknowledged; free what it took
        except OSError:
            pass
        log.error("payload store full: could not write %d bytes of %s", len(data), path.name)
        raise StorageFull() from None


def _own_episode(robot: Robot, episode_id) -> Episode:
    episode = Episode.objects.filter(pk=episode_id).first()
    if episode is None:
        raise EpisodeNotFound()
    if episode.robot_id != robot.pk:
        _refuse(robot, episode)
    return episode


def _lock_upload(robot: Robot, episode_id) -> Optional[str]:
    """Take the upload lock of one of ``robot``'s open uploads (uploading, or rejected and sent again): a conditional
    UPDATE that expires after UPLOAD_LOCK_S so a killed request cannot keep it. Returns the lock's token, or None
    when there is no such upload or another request holds it (the caller finds out which)."""
    token = uuid.uuid4().hex
    now = timezone.now()
    taken = hotsql.update(
        Episode, dict(upload_token=token, upload_locked_until=now + dt.timedelta(seconds=UPLOAD_LOCK_S)),
        "id = %s AND robot_id = %s AND status IN (%s, %s) "
        "AND (upload_locked_until IS NULL OR upload_locked_until < %s)",
        [_pk(episode_id), robot.pk, Episode.Status.UPLOADING.value, Episode.Status.REJECTED.value,
         hotsql.prep(Episode, "upload_locked_until", now)])
    return token if taken else None


def _fenced(episode_id, token: str, **values) -> int:
    """``UPDATE`` the episode only if ``token`` still holds its upload lock; returns the rows changed (0 or 1)."""
    return hotsql.update(Episode, values, "id = %s AND upload_token = %s", [_pk(episode_id), token])


def _unlock(episode_id, token: str) -> None:
    _fenced(episode_id, token, upload_token="", upload_locked_until=None)


def _check_open_uploads(robot: Robot, episode_id) -> None:
    """A robot may have at most SOP_MAX_OPEN_UPLOADS uploads with bytes on the server at once (its uploader sends
    one at a time; partial files of abandoned uploads are cleaned up after SOP_STALE_UPLOAD_HOURS)."""
    limit = settings.SOP_MAX_OPEN_UPLOADS
    open_count = _open_upload_count(robot, episode_id)
    if open_count >= limit:
        raise QuotaExceeded(f"robot {robot.name} has {open_count} unfinished uploads (at most {limit}); finish one")


def _open_upload_count(robot: Robot, episode_id) -> int:
    return hotsql.scalar(f"SELECT COUNT(*) FROM {Episode._meta.db_table} WHERE robot_id = %s AND status = %s "
                         "AND received_bytes > 0 AND id <> %s",
                         [robot.pk, Episode.Status.UPLOADING.value, _pk(episode_id)])


def _check_partial_quota(robot: Robot, episode: Episode, end: int) -> None:
    """Partial bytes a robot holds on the server, all its unfinished uploads together, stay within
    SOP_MAX_PARTIAL_BYTES_PER_ROBOT: one robot (or one stolen token) cannot fill the payload disk."""
    others = hotsql.scalar(f"SELECT SUM(received_bytes) FROM {Episode._meta.db_table} WHERE robot_id = %s "
                           "AND status = %s AND id <> %s",
                           [robot.pk, Episode.Status.UPLOADING.value, _pk(episode.pk)]) or 0
    limit = settings.SOP_MAX_PARTIAL_BYTES_PER_ROBOT
    if others + end > limit:
        raise QuotaExceeded(f"robot {robot.name} would hold {others + end} partial bytes (at most {limit}); "
                            "finish its other uploads first")


def _finish(robot: Robot, episode: Episode, token: str, whole: Optional[bytes] = None) -> Episode:
    """Verify a complete upload and store it; releases the upload lock in every case. The hashing and checking run
    outside any transaction; the result is one short transaction: the fenced UPDATE, the segments (if any) and the
    replay's job. ``whole``: the payload when one request carried all of it (hashed in memory, not read back)."""
    path = partial_path(episode.id)
    try:
        digest = hashlib.sha256(whole).hexdigest() if whole is not None else _sha256(path)
        if digest != episode.payload_sha256:
            _reject(episode, ChecksumMismatch(
                f"sha256 of the received bytes is {digest}, announced {episode.payload_sha256}: upload again from 0",
                offset=0))
        try:
            meta = payload_check.default_checker().check(path, payload_limits())
            fields = _payload_fields(meta, episode, robot)
        except (EpisodeFileError, ValueError, SopError) as exc:
            message = getattr(exc, "detail", None) or str(exc)
            _reject(episode, InvalidPayload(f"invalid episode file: {message}", offset=0))
        segments = fields.pop("segments")
        key = storage.episode_key(str(stored_path(episode.id)))
        # Object storage: the verified bytes go to the bucket first, outside any transaction (seconds for a large
        # file), under the episode's own key; the row below is what makes them count.
        try:
            storage.upload(key, path)
        except storage.StorageError as exc:
            log.error("episode %s verified but not stored: %s", episode.id, exc)
            raise StorageUnavailable() from None  # the partial file stays; the robot's retry finishes it
    except BaseException:
        # The row as this request leaves it (rejected, or every byte acknowledged: the retry resumes at the end)
        _fenced(episode.pk, token, status=episode.status, received_bytes=episode.received_bytes,
                error=episode.error, upload_token="", upload_locked_until=None)
        raise
    verified = dict(fields, payload_path=str(stored_path(episode.id)), status=Episode.Status.VERIFIED,
                    verified_at=timezone.now(), error="", received_bytes=episode.payload_size)
    try:
        dest = storage.place(key, path)  # atomic: the store (or this host's cache) never holds half a file
    except BaseException:
        _unlock(episode.id, token)
        raise
    try:
        with transaction.atomic():
            # the fence, the verification and the lock's release in one statement
            if not _fenced(episode.pk, token, **verified, upload_token="", upload_locked_until=None):
                raise UploadBusy("another request took over this upload; retry")
            for name, value in verified.items():
                setattr(episode, name, value)
            if segments:  # a verified episode is never uploaded again, so it has no segments to replace
                _store_segments(episode, segments)
            # its replay is made in the background now, so that nobody waits for an encoder later (robots/replay.py);
            # the job's row commits with the verification, its Celery task is sent after the commit
            replay.queue_replays(episode, new=True)
    except BaseException:
        os.replace(dest, path)  # the row did not change: the bytes go back to where the next attempt looks
        _unlock(episode.id, token)
        raise
    log.info("episode %s of robot %s verified (%d steps, %s)", episode.id, robot.name, episode.steps, episode.outcome,
             extra=ids(robot=robot.name, episode=episode.id))
    return episode


def payload_limits() -> Limits:
    return Limits(max_decoded_bytes=settings.SOP_MAX_EPISODE_DECODED_BYTES)


def _payload_fields(meta: dict[str, Any], episode: Episode, robot: Optional[Robot] = None) -> dict[str, Any]:
    """Episode fields from a payload's own metadata; raises ValueError when it contradicts the upload.

    What the file says about the world is the robot's word (steps, outcome, times); what it says about identities is
    checked against the server's own records: the robot and the task must be the ones the token and the announcement
    name; an operator label counts only if the server sent that label (its audit record), and an operator segment
    is attributed to the holder of the takeover lease the robot obeyed (the lease's record), never to a name alone.
    """
    if meta["episode_id"] != str(episode.id):
        raise ValueError(f"the file is episode {meta['episode_id']!r}, uploaded as {episode.id}")
    if robot is not None and meta["robot"] != robot.name:
        raise ValueError(f"the file says robot {meta['robot']!r}, the token is robot {robot.name!r}")
    if episode.task_id is not None and meta["task"] != episode.task.name:
        raise ValueError(f"the file says task {meta['task']!r}, the upload announced {episode.task.name!r}")
    if meta["outcome"] not in {o.value for o in Outcome}:
        raise ValueError(f"outcome {meta['outcome']!r} is not one of {[o.value for o in Outcome]}")
    if meta["split"] not in {s.value for s in Split}:
        raise ValueError(f"split {meta['split']!r} is not one of {[s.value for s in Split]}")
    segments = [s if isinstance(s, Segment) else Segment(**s) for s in meta["segments"]]
    sources = {ControlSource.OPERATOR.value, ControlSource.SIM_OPERATOR.value}
    for seg in segments:
        if seg.source not in sources:
            raise ValueError(f"intervention source {seg.source!r} is not one of {sorted(sources)}")
    started_at = from_unix(meta["started_at"], "started_at")
    ended_at = from_unix(meta["ended_at"], "ended_at")
    outcome_source, outcome_by = "robot", None
    if meta.get("outcome_source") == "operator":
        outcome_by = _label_author(episode, meta["outcome"], str(meta.get("outcome_by") or ""), started_at, ended_at)
        if outcome_by is not None:
            outcome_source = "operator"
        else:
            log.warning("episode %s claims an operator label by %r that the server never sent: stored as the "
                        "robot's outcome", episode.id, meta.get("outcome_by"))
    return dict(
        steps=db_count(meta["steps"]),
        outcome=meta["outcome"],
        success=bool(meta["success"]),
        outcome_source=outcome_source,
        outcome_by=outcome_by,
        image_shape=[int(n) for n in meta["image_shape"]],
        cameras=[meta["camera"], *meta.get("cameras", {})],
        control_hz=float(meta["control_hz"]),
        split=meta["split"],
        prompt=meta["prompt"][:500],
        policy_name=meta["policy"][:100],
        policy_version=db_version(meta["policy_version"]),
        started_at=started_at,
        ended_at=ended_at,
        intervention_count=len(segments),
        intervention_steps=sum(s.end - s.start for s in segments),
        segments=segments,
    )


ATTRIBUTION_SKEW = dt.timedelta(minutes=10)  # robot clocks may be off by this much against the server's


def _label_author(episode: Episode, outcome: str, name: str, started_at, ended_at):
    """The user whose console label (control.label_episode, audited as ``label``) ended this episode, or None."""
    labels = AuditEvent.objects.filter(action="label", robot_id=episode.robot_id, actor__isnull=False,
                                       detail__outcome=outcome).select_related("actor").order_by("-at")
    for event in labels.filter(Q(detail__episode_id=str(episode.id)))[:1]:
        return event.actor
    window = labels.filter(detail__episode_id=None, at__gte=started_at - ATTRIBUTION_SKEW,
                           at__lte=ended_at + ATTRIBUTION_SKEW)
    if name:
        window = window.filter(actor_name=name)
    event = window.first()
    return event.actor if event is not None else None


def _lease_of(episode: Episode, segment: Segment, started_at, verified: dict) -> Optional[ControlLease]:
    """The lease a human segment was driven under, if the server granted it to this robot while the episode ran."""
    if segment.lease is None:
        return None
    if segment.lease not in verified:
        lease = ControlLease.objects.filter(pk=segment.lease, robot_id=episode.robot_id).first()
        if lease is not None and not (lease.started_at <= timezone.now()
                                      and (lease.ended_at is None or lease.ended_at >= started_at - ATTRIBUTION_SKEW)):
            lease = None
        verified[segment.lease] = lease
    return verified[segment.lease]


def _store_segments(episode: Episode, segments: list[Segment]) -> None:
    leases: dict[int, Optional[ControlLease]] = {}
    rows = []
    for s in segments:
        lease = _lease_of(episode, s, episode.started_at, leases) if s.source == ControlSource.OPERATOR.value else None
        if s.source == ControlSource.OPERATOR.value and lease is None:
            log.warning("episode %s: operator segment [%d, %d) claims %r under lease %s, which the server did not "
                        "grant this robot: stored unattributed", episode.id, s.start, s.end, s.operator, s.lease)
        rows.append(InterventionSegment(
            episode=episode, start_step=s.start, end_step=s.end, source=s.source, lease=lease,
            operator=lease.operator if lease else None,
            # who drove: the lease's record for a human; the robot's label for the simulated operator
            operator_name=(lease.operator_name if lease else ("" if s.source == ControlSource.OPERATOR.value
                                                               else s.operator[:150])),
            claimed_operator=s.operator[:150] if s.source == ControlSource.OPERATOR.value else "",
            reason=str(s.reason)[:500],
        ))
    # The help request a takeover answered (helpqueue.lease_started linked it to the lease): the segment carries it.
    answered = dict(HelpRequest.objects.filter(lease_id__in=[r.lease_id for r in rows if r.lease_id])
                    .order_by("raised_at").values_list("lease_id", "pk"))
    for row in rows:
        row.help_request_id = answered.get(row.lease_id)
    InterventionSegment.objects.bulk_create(rows)


def _reject(episode: Episode, error: SopError):
    """Discard the partial bytes, mark ``episode`` rejected and raise ``error``; _finish stores the row (fenced by
    the upload lock, in the statement that releases it)."""
    partial_path(episode.id).unlink(missing_ok=True)
    episode.status, episode.received_bytes, episode.error = Episode.Status.REJECTED, 0, str(error.detail)[:500]
    log.warning("episode %s of robot %s rejected: %s", episode.id, episode.robot_id, error.detail,
                extra=ids(episode=episode.id))
    raise error


def _refuse(robot: Robot, episode: Episode):
    log.warning("robot %s (id %s) tried to use episode %s of robot id %s", robot.name, robot.pk, episode.pk,
                episode.robot_id)
    raise ForbiddenEpisode()




def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _older_than(path: Path, cutoff: float) -> bool:
    try:
        return path.stat().st_mtime <= cutoff
    except FileNotFoundError:
        return False
