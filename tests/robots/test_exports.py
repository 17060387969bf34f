"""People's API tokens and dataset exports (robots/auth.py, robots/exports.py): a token made on the Data page reads the
console API with its owner's role and nothing more; an export runs in the background with progress and downloads as a
.tar holding a LeRobotDataset v3.0 that reads back frame by frame."""

from __future__ import annotations

import datetime as dt
import io
import re
import tarfile

import httpx
import numpy as np
import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from robots import exports, fleet, lerobot
from robots.episode_file import EpisodeReader
from robots.models import ApiToken, AuditEvent, DatasetExport, Episode, Task
from robots.roles import OPERATOR, set_role
from sop_web.asgi import application

from .factories import bearer, episode_data

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def data_dirs(settings, tmp_path):
    settings.PAYLOAD_DIR = tmp_path / "payloads"
    settings.DATA_DIR = tmp_path
    return tmp_path


@pytest.fixture
def stored(data_dirs):
    """Three verified reach episodes of sim-01 (policy v1, v1, v2) with real payload files."""
    from robots import episode_file

    task = Task.objects.create(name="reach", env_id="reach-v3", prompts=["reach the goal"], max_steps=20)
    robot, _ = fleet.register_robot("sim-01")
    rows = []
    for version in (1, 1, 2):
        data = episode_data(steps=6, task="reach")
        rel = f"episodes/{data.meta['episode_id']}.h5"
        path = data_dirs / "payloads" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        episode_file.write_episode(path, data)
        rows.append(Episode.objects.create(
            id=data.meta["episode_id"], robot=robot, task=task, prompt="reach the goal", policy_version=version,
            started_at=timezone.now() - dt.timedelta(minutes=10 - len(rows)), ended_at=timezone.now(), steps=6,
            outcome="success", success=True, status=Episode.Status.VERIFIED, payload_path=rel,
            payload_size=path.stat().st_size, control_hz=10.0))
    return rows


def make_token(client: Client, user, name="nightly", lifetime="90") -> str:
    client.force_login(user)
    page = client.post(reverse("token_create"), {"name": name, "lifetime": lifetime})
    assert page.status_code == 200 and page["Cache-Control"] == "no-store"
    match = re.search(r'data-testid="token-value">(sopu_[A-Za-z0-9_-]+)<', page.content.decode())
    assert match, "the new token is shown once"
    client.logout()
    return match.group(1)


async def api(method: str, path: str, token: str | None = None, **kwargs) -> httpx.Response:
    transport = httpx.ASGITransport(app=application)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        return await http.request(method, path, headers=bearer(token) if token else {}, **kwargs)


def test_a_token_reads_the_console_api_as_its_owner_and_is_stored_only_as_a_hash(client, operator, stored):
    set_role(operator, OPERATOR)
    raw = make_token(client, operator)
    token = ApiToken.objects.get()
    assert token.token_hash != raw and raw not in str(token.__dict__) and token.prefix == raw[:12]
    assert token.expires_at > timezone.now() + dt.timedelta(days=89)
    from asgiref.sync import async_to_sync

    listed = async_to_sync(api)("GET", "/api/episodes/", raw)
    assert listed.status_code == 200 and listed.json()["count"] == 3
    assert ApiToken.objects.get().last_used_at is not None
    assert AuditEvent.objects.filter(action="api_token.created", actor=operator).exists()
    # not on the robot endpoints, not with a robot's token on the console API
    _, robot_token = fleet.register_robot("sim-02")
    assert async_to_sync(api)("POST", "/api/robot/episodes/", raw, json={}).status_code in (401, 403)
    assert async_to_sync(api)("GET", "/api/episodes/", robot_token).status_code == 403
    # revoked: refused at once; someone else's token cannot be revoked by me
    client.force_login(operator)
    assert client.post(reverse("token_revoke", args=[token.pk])).status_code == 302
    assert async_to_sync(api)("GET", "/api/episodes/", raw).status_code == 403
    assert AuditEvent.objects.filter(action="api_token.revoked").count() == 1


def test_expired_unknown_and_malformed_tokens_are_refused(client, operator, other_operator, stored):
    from asgiref.sync import async_to_sync

    raw = make_token(client, operator)
    ApiToken.objects.update(expires_at=timezone.now() - dt.timedelta(seconds=1))
    for bad in (raw, "sopu_" + "x" * 43, "sopu_" + "x" * 300):
        reply = async_to_sync(api)("GET", "/api/robots/", bad)
        assert reply.status_code == 403 and "token" in reply.json()["detail"].lower(), bad
    mine = make_token(client, operator, "second")
    client.force_login(other_operator)
    assert client.post(reverse("token_revoke", args=[ApiToken.objects.get(name="second").pk])).status_code == 404
    assert async_to_sync(api)("GET", "/api/robots/", mine).status_code == 200
    operator.is_active = False  # a deactivated person's tokens stop working with them
    operator.save()
    assert async_to_sync(api)("GET", "/api/robots/", mine).status_code == 403


def test_an_export_runs_in_the_background_and_downloads_as_a_lerobot_dataset(client, operator, stored, data_dirs,
                                                                             viewer_user):
    from asgiref.sync import async_to_sync

    set_role(operator, OPERATOR)
    raw = make_token(client, operator)
    # validation: names that do not exist, a viewer, nothing selected
    bad = async_to_sync(api)("POST", "/api/exports/", raw, json={"tasks": ["nope"]})
    assert bad.status_code == 400 and "unknown task" in bad.json()["detail"]
    assert async_to_sync(api)("POST", "/api/exports/", raw, json={"versions": [7]}).status_code == 400
    viewer_token = make_token(client, viewer_user)
    assert async_to_sync(api)("POST", "/api/exports/", viewer_token, json={}).status_code == 403

    made = async_to_sync(api)("POST", "/api/exports/", raw, json={"versions": [1]})
    assert made.status_code == 202
    body = made.json()
    assert (body["state"], body["episodes"], body["download_url"]) == ("queued", 2, None)
    export = DatasetExport.objects.get(pk=body["id"])
    assert export.filters == {"tasks": None, "robots": None, "split": None, "versions": [1]}
    assert async_to_sync(api)("GET", f"/api/exports/{export.pk}/download", raw).status_code == 404  # not made yet

    done = exports.run_export(export.pk)  # what the Celery task runs
    assert (done.state, done.episodes, done.frames, done.error) == ("done", 2, 12, "")
    detail = async_to_sync(api)("GET", f"/api/exports/{export.pk}/", viewer_token).json()
    assert detail["state"] == "done" and detail["progress"] == 1.0 and detail["download_url"]
    reply = async_to_sync(api)("GET", detail["download_url"], viewer_token)  # any console user may download
    assert reply.status_code == 200 and reply.headers["content-type"] == "application/x-tar"
    assert f"sop-export-{export.pk}-lerobot-v3.tar" in reply.headers["content-disposition"]
    root = data_dirs / "unpacked"
    with tarfile.open(fileobj=io.BytesIO(reply.content)) as tar:
        assert all(not m.issym() and not m.islnk() and not m.name.startswith("/") for m in tar.getmembers())
        tar.extractall(root, filter="data")
    episodes = list(lerobot.read_dataset(root / f"sop-export-{export.pk}"))
    assert len(episodes) == 2
    source = {str(e.pk): e for e in stored[:2]}
    for episode in episodes:
        with EpisodeReader(data_dirs / "payloads" / source[episode.meta["sop/episode_id"]].payload_path) as reader:
            np.testing.assert_allclose(episode.columns["action"], reader.load().actions, atol=1e-6)
    assert not list((data_dirs / "exports").glob("export-*"))  # the work folder is gone; the .tar stays


def test_old_exports_lose_their_file_but_keep_their_row(operator, stored, data_dirs, settings):
    from asgiref.sync import async_to_sync

    set_role(operator, OPERATOR)
    export = exports.run_export(exports.request_export(operator, {}).pk)
    tar = data_dirs / "exports" / f"sop-export-{export.pk}.tar"
    assert tar.exists()
    assert exports.expire_old() == 0  # young: kept
    later = timezone.now() + dt.timedelta(days=settings.SOP_EXPORT_RETENTION_DAYS, seconds=1)
    assert exports.expire_old(now=later) == 1
    export.refresh_from_db()
    assert export.state == "expired" and not tar.exists()
    client = Client()
    client.force_login(operator)
    assert client.get(reverse("api-export-download", args=[export.pk])).status_code == 404
    assert async_to_sync(api)("GET", f"/api/exports/{export.pk}/", None).status_code == 403  # still needs a login


def test_each_person_runs_at_most_max_running_exports_at_once(operator, stored):
    set_role(operator, OPERATOR)
    for _ in range(exports.MAX_RUNNING):
        exports.request_export(operator, {})
    with pytest.raises(exports.TooManyExports):
        exports.request_export(operator, {})


def test_the_data_page_shows_exports_and_only_my_tokens(client, operator, other_operator, stored):
    set_role(operator, OPERATOR)
    make_token(client, other_operator, "token-of-bob")
    client.force_login(operator)
    page = client.get(reverse("data")).content.decode()
    assert "token-of-bob" not in page and 'data-testid="export"' in page
    response = client.post(reverse("data_export"), {"tasks": ["reach"], "versions": ["2"]})
    assert response.status_code == 302
    export = DatasetExport.objects.get()
    assert export.episodes == 1 and export.filters["tasks"] == ["reach"]
    assert f'data-export="{export.pk}"' in client.get(reverse("data")).content.decode()


@pytest.fixture
def viewer_user(django_user_model):
    return django_user_model.objects.create_user("dave", password="dave-password-1")
