"""The episode upload (HTTP data plane) through the real ASGI app, so sop_web/limits.py is in the path."""

import asyncio
import hashlib
import uuid

import httpx
import pytest
from channels.db import database_sync_to_async
from django.test import Client

from robots import fleet, ingest
from robots.episode_file import EpisodeReader, Segment
from robots.models import Episode, InterventionSegment
from sop_web.asgi import application

from .factories import announcement, bearer, episode_bytes, episode_data

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("payload_dir")]

EPISODES = "/api/robot/episodes/"


@pytest.fixture
async def http():
    transport = httpx.ASGITransport(app=application)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client


@pytest.fixture
def upload(tmp_path):
    """A fresh 5-step episode: (EpisodeData, payload bytes, announcement body)."""

    def make(**kwargs):
        data = episode_data(**kwargs)
        payload = episode_bytes(tmp_path, data)
        return data, payload, announcement(data, payload)

    return make


async def put(http, token, episode_id, offset, chunk):
    headers = {**bearer(token), "Upload-Offset": str(offset), "Content-Type": "application/octet-stream"}
    return await http.put(f"{EPISODES}{episode_id}/payload", content=chunk, headers=headers)


async def upload_all(http, token, body, payload):
    opened = await http.post(EPISODES, json=body, headers=bearer(token))
    assert opened.status_code in (200, 201), opened.text
    return await put(http, token, body["id"], opened.json()["offset"], payload[opened.json()["offset"]:])


def get_episode(pk):
    return database_sync_to_async(Episode.objects.get)(pk=pk)


# ---------------------------------------------------------------- the happy paths


async def test_an_upload_cut_halfway_resumes_and_stores_identical_bytes(http, robot, task, upload, payload_dir):
    _, token = robot
    data, payload, body = upload()
    opened = await http.post(EPISODES, json=body, headers=bearer(token))
    assert opened.status_code == 201
    assert opened.json() == {"id": body["id"], "status": "uploading", "offset": 0, "size": len(payload),
                             "upload_url": f"/api/robot/episodes/{body['id']}/payload"}
    half = len(payload) // 2
    first = await put(http, token, body["id"], 0, payload[:half])
    assert first.json() == {**opened.json(), "offset": half}
    # ... the connection drops here. The robot asks where to resume:
    assert (await http.get(f"{EPISODES}{body['id']}", headers=bearer(token))).json()["offset"] == half
    again = await http.post(EPISODES, json=body, headers=bearer(token))
    assert (again.status_code, again.json()["offset"]) == (200, half)
    done = await put(http, token, body["id"], half, payload[half:])
    assert (done.status_code, done.json()["status"], done.json()["offset"]) == (200, "verified", len(payload))

    episode = await get_episode(body["id"])
    stored = payload_dir / episode.payload_path
    assert episode.payload_path == f"episodes/{body['id'][:2]}/{body['id']}.h5"
    assert stored.read_bytes() == payload
    assert not ingest.partial_path(body["id"]).exists()
    assert (episode.status, episode.steps, episode.outcome, episode.success) == ("verified", 5, "success", True)
    assert (episode.image_shape, episode.control_hz, episode.policy_version) == ([8, 8, 3], 10.0, 3)
    assert episode.verified_at is not None and episode.payload_sha256 == hashlib.sha256(payload).hexdigest()
    with EpisodeReader(stored) as reader:
        assert reader.meta["episode_id"] == body["id"]


async def test_the_same_uuid_twice_makes_one_episode(http, robot, task, upload):
    _, token = robot
    _, payload, body = upload()
    first = await http.post(EPISODES, json=body, headers=bearer(token))
    second = await http.post(EPISODES, json=body, headers=bearer(token))
    assert (first.status_code, second.status_code) == (201, 200)
    await put(http, token, body["id"], 0, payload)
    # The robot lost the reply and announces again: verified, nothing to send, it may delete its copy.
    third = await http.post(EPISODES, json=body, headers=bearer(token))
    assert (third.status_code, third.json()["status"], third.json()["offset"]) == (200, "verified", len(payload))
    replay = await put(http, token, body["id"], 0, payload)  # a retried last chunk is harmless too
    assert (replay.status_code, replay.json()["status"]) == (200, "verified")
    assert await database_sync_to_async(Episode.objects.count)() == 1


async def test_verified_segments_become_intervention_segment_rows(http, robot, task, upload, operator):
    _, token = robot
    segments = [Segment(0, 2, "operator", "alice", "drifting left"), Segment(3, 5, "sim_operator", "", "scripted")]
    _, payload, body = upload(segments=segments)
    assert (await upload_all(http, token, body, payload)).json()["status"] == "verified"

    def rows():
        return list(InterventionSegment.objects.filter(episode_id=body["id"]).values_list(
            "start_step", "end_step", "source", "operator__username", "operator_name", "reason"))

    assert await database_sync_to_async(rows)() == [
        (0, 2, "operator", "alice", "alice", "drifting left"), (3, 5, "sim_operator", None, "", "scripted")]
    episode = await get_episode(body["id"])
    assert (episode.intervention_count, episode.intervention_steps) == (2, 4)


async def test_an_announcement_with_new_content_restarts_the_upload(http, robot, task, upload):
    _, token = robot
    _, payload, body = upload()
    await http.post(EPISODES, json=body, headers=bearer(token))
    await put(http, token, body["id"], 0, payload[:100])
    changed = await http.post(EPISODES, json={**body, "size": len(payload) + 1, "sha256": "0" * 64},
                              headers=bearer(token))
    assert (changed.status_code, changed.json()["offset"]) == (200, 0)


async def test_concurrent_chunks_at_the_same_offset_are_appended_once(http, robot, task, upload):
    _, token = robot
    _, payload, body = upload()
    await http.post(EPISODES, json=body, headers=bearer(token))
    replies = await asyncio.gather(*(put(http, token, body["id"], 0, payload[:100]) for _ in range(3)))
    assert sorted(r.status_code for r in replies) == [200, 409, 409]
    assert (await get_episode(body["id"])).received_bytes == 100


# ---------------------------------------------------------------- verification failures


async def test_a_checksum_mismatch_is_rejected_and_a_correct_reupload_verifies(http, robot, task, upload):
    _, token = robot
    _, payload, body = upload()
    await http.post(EPISODES, json=body, headers=bearer(token))
    corrupted = payload[:-1] + bytes([payload[-1] ^ 0xFF])
    bad = await put(http, token, body["id"], 0, corrupted)
    assert (bad.status_code, bad.json()["code"], bad.json()["offset"]) == (422, "checksum_mismatch", 0)
    episode = await get_episode(body["id"])
    assert (episode.status, episode.received_bytes, episode.verified_at) == ("rejected", 0, None)
    assert not ingest.partial_path(body["id"]).exists()
    good = await upload_all(http, token, body, payload)
    assert (good.status_code, good.json()["status"]) == (200, "verified")


async def test_a_payload_that_is_not_an_episode_file_is_rejected(http, robot, task, upload):
    _, token = robot
    junk = b"\x89HDF-not-really" * 50
    _, _, body = upload()
    body = {**body, "size": len(junk), "sha256": hashlib.sha256(junk).hexdigest()}
    reply = await upload_all(http, token, body, junk)
    assert (reply.status_code, reply.json()["code"]) == (422, "invalid_payload")
    assert (await get_episode(body["id"])).status == "rejected"


async def test_a_payload_of_another_episode_is_rejected(http, robot, task, upload):
    _, token = robot
    _, payload, body = upload()
    body = {**body, "id": str(uuid.uuid4())}  # announced under another UUID than the file's
    reply = await upload_all(http, token, body, payload)
    assert (reply.status_code, reply.json()["code"]) == (422, "invalid_payload")
    assert "uploaded as" in reply.json()["detail"]


async def test_a_wrong_offset_is_answered_with_the_servers_offset(http, robot, task, upload):
    _, token = robot
    _, payload, body = upload()
    await http.post(EPISODES, json=body, headers=bearer(token))
    await put(http, token, body["id"], 0, payload[:10])
    reply = await put(http, token, body["id"], 50, payload[50:60])
    assert reply.status_code == 409 and reply.json()["code"] == "offset_mismatch" and reply.json()["offset"] == 10
    missing = await http.put(f"{EPISODES}{body['id']}/payload", content=b"x", headers=bearer(token))
    assert (missing.status_code, missing.json()["code"]) == (400, "invalid")


async def test_a_verified_episode_announced_with_other_content_is_a_conflict(http, robot, task, upload):
    _, token = robot
    _, payload, body = upload()
    await upload_all(http, token, body, payload)
    reply = await http.post(EPISODES, json={**body, "sha256": "1" * 64}, headers=bearer(token))
    assert (reply.status_code, reply.json()["code"]) == (409, "conflict")


# ---------------------------------------------------------------- limits


async def test_a_chunk_over_the_limit_is_refused_before_its_body_is_read(robot, task, settings):
    settings.SOP_MAX_UPLOAD_CHUNK_BYTES = 1024
    _, token = robot
    body_read, sent = False, []

    async def receive():
        nonlocal body_read
        body_read = True
        return {"type": "http.request", "body": b"x" * 2048, "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "PUT", "scheme": "http",
        "path": f"{EPISODES}{uuid.uuid4()}/payload", "raw_path": b"", "query_string": b"", "root_path": "",
        "headers": [(b"host", b"testserver"), (b"authorization", f"Bearer {token}".encode()),
                    (b"upload-offset", b"0"), (b"content-length", b"2048")],
        "client": ("127.0.0.1", 5000), "server": ("testserver", 80),
    }
    await application(scope, receive, send)
    assert sent[0]["status"] == 413 and b'"too_large"' in sent[1]["body"]
    assert not body_read


async def test_an_announced_size_over_the_limit_is_refused(http, robot, task, upload, settings):
    settings.SOP_MAX_EPISODE_BYTES = 1000
    _, payload, body = upload()
    reply = await http.post(EPISODES, json=body, headers=bearer(robot[1]))
    assert (reply.status_code, reply.json()["code"]) == (413, "too_large")
    assert await database_sync_to_async(Episode.objects.count)() == 0


async def test_invalid_announcements_are_refused_with_a_clear_message(http, robot, task, upload):
    _, _, body = upload()
    unknown = await http.post(EPISODES, json={**body, "task": "juggle"}, headers=bearer(robot[1]))
    assert (unknown.status_code, unknown.json()["code"]) == (400, "unknown_task")
    invalid = await http.post(EPISODES, json={**body, "size": -1, "split": "training", "sha256": "xyz"},
                              headers=bearer(robot[1]))
    assert (invalid.status_code, invalid.json()["code"]) == (400, "invalid")
    assert set(invalid.json()["fields"]) == {"size", "split", "sha256"}
    assert "size:" in invalid.json()["detail"] and "sha256: must be 64 lowercase hex" in invalid.json()["detail"]
    broken = await http.post(EPISODES, content=b"{", headers={**bearer(robot[1]), "Content-Type": "application/json"})
    assert (broken.status_code, broken.json()["code"]) == (400, "parse_error")


# ---------------------------------------------------------------- who may do what


async def test_another_robots_episode_is_forbidden(http, robot, other_robot, task, upload, caplog):
    _, payload, body = upload()
    await http.post(EPISODES, json=body, headers=bearer(robot[1]))
    thief = other_robot[1]
    replies = [
        await http.post(EPISODES, json=body, headers=bearer(thief)),
        await put(http, thief, body["id"], 0, payload[:10]),
        await http.get(f"{EPISODES}{body['id']}", headers=bearer(thief)),
    ]
    assert [(r.status_code, r.json()["code"]) for r in replies] == [(403, "forbidden")] * 3
    assert "sim-02" in caplog.text and body["id"] in caplog.text
    assert (await get_episode(body["id"])).received_bytes == 0


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer sop_wrong"}, {"Authorization": "Token abc"}])
async def test_robot_endpoints_need_a_valid_token(http, robot, task, upload, headers):
    _, _, body = upload()
    reply = await http.post(EPISODES, json=body, headers=headers)
    assert reply.status_code == 401 and set(reply.json()) == {"code", "detail"}
    assert reply.headers["WWW-Authenticate"].startswith("Bearer")


async def test_a_revoked_token_cannot_upload(http, robot, task, upload):
    await database_sync_to_async(fleet.revoke_robot)(robot[0])
    _, _, body = upload()
    assert (await http.post(EPISODES, json=body, headers=bearer(robot[1]))).status_code == 401


@pytest.fixture
def operator_cookies(operator):
    client = Client()
    client.force_login(operator)
    return {name: morsel.value for name, morsel in client.cookies.items()}


async def test_an_operator_session_cannot_use_robot_endpoints(http, robot, task, upload, operator_cookies):
    _, _, body = upload()
    http.cookies.update(operator_cookies)
    assert (await http.get("/api/robots/")).status_code == 200  # the session works where it belongs
    assert (await http.post(EPISODES, json=body)).status_code == 401
    assert (await http.get(f"{EPISODES}{body['id']}")).status_code == 401


async def test_a_robot_token_cannot_use_operator_endpoints(http, robot, task):
    for url in ("/api/robots/", "/api/tasks/", "/api/episodes/", f"/api/episodes/{uuid.uuid4()}/"):
        reply = await http.get(url, headers=bearer(robot[1]))
        assert reply.status_code in (401, 403) and reply.json()["code"] == "not_authenticated", url
