"""Bad input gets a clear 4xx, never a 5xx: strict JSON, bounded digits, exact patterns, no open redirect.

Each case here was a 500 (or a redirect off the site) before; through Django's test client, the ASGI-level limits are
in tests/security/test_body_limits.py.
"""

from __future__ import annotations

import hashlib
import json
import uuid

import pytest
from django.test import Client
from django.urls import reverse

from learner.models import TrainingRun
from robots.models import Episode
from robots.pages import video_path
from robots.roles import ADMIN, set_role

pytestmark = pytest.mark.django_db

EPISODES = "/api/robot/episodes/"


@pytest.fixture
def robot_client(robot):
    return Client(HTTP_AUTHORIZATION=f"Bearer {robot[1]}")


def announcement(**overrides) -> dict:
    body = {"id": str(uuid.uuid4()), "task": "drawer-open", "split": "online", "started_at": 1764085000.5,
            "size": 10, "sha256": hashlib.sha256(b"0123456789").hexdigest()}
    body.update(overrides)
    return body


def post_json(client, url, raw: bytes, content_type="application/json"):
    return client.generic("POST", url, raw, content_type=content_type)


# ---------------------------------------------------------------- 1. strict JSON


@pytest.mark.parametrize("name, raw", [
    ("nested 100k deep", b"[" * 100_000 + b"]" * 100_000),
    ("nested 33 deep in a field", json.dumps(announcement()).encode()[:-1] + b', "x": ' + b"[" * 33 + b"]" * 33 + b"}"),
    ("lone surrogate in a value", json.dumps(announcement(prompt="\ud800")).encode()),
    ("lone surrogate in a key", b'{"\\udc00": 1}'),
    ("NaN", json.dumps(announcement(started_at=float("nan"))).encode()),
    ("Infinity", json.dumps(announcement(control_hz=float("inf"))).encode()),
    ("a float out of range", json.dumps(announcement()).encode().replace(b"1764085000.5", b"1e999")),
    ("an int of 5000 digits", json.dumps(announcement()).encode().replace(b'"size": 10', b'"size": ' + b"9" * 5000)),
    ("not UTF-8", b'{"task": "\xff\xfe"}'),
    ("not JSON", b"{"),
])
def test_a_bad_json_body_is_a_400_parse_error(robot_client, task, name, raw):
    reply = post_json(robot_client, EPISODES, raw)
    assert (reply.status_code, reply.json()["code"]) == (400, "parse_error"), (name, reply.content[:300])
    assert set(reply.json()) == {"code", "detail"}
    assert not Episode.objects.exists()


def test_a_json_body_over_the_request_limit_is_refused_by_the_parser(robot_client, task, settings):
    settings.SOP_MAX_REQUEST_BYTES = 1000
    reply = post_json(robot_client, EPISODES, json.dumps(announcement(prompt="p" * 2000)).encode())
    assert (reply.status_code, reply.json()["code"]) == (400, "parse_error")
    assert "over 1000 bytes" in reply.json()["detail"]


def test_a_good_announcement_still_parses_with_nesting_and_unicode(robot_client, task):
    body = announcement(prompt="öffne die Schublade 🤖", interventions=[{"start": 0, "end": 2, "source": "operator"}])
    reply = robot_client.post(EPISODES, body, content_type="application/json")
    assert reply.status_code == 201, reply.content
    assert Episode.objects.get().prompt == "öffne die Schublade 🤖"


def test_the_strict_parser_is_the_default_for_operator_endpoints_too(admin_user):
    client = Client()
    client.force_login(admin_user)
    reply = post_json(client, "/api/runs/", b'{"algorithm": "bc", "tasks": ["\\ud800"]}')
    assert (reply.status_code, reply.json()["code"]) == (400, "parse_error")
    form = client.post("/api/runs/", {"algorithm": "bc", "tasks": "reach"})  # a form body: JSON only here
    assert (form.status_code, form.json()["code"]) == (415, "unsupported_media_type")
    huge = client.post("/api/runs/", {"algorithm": "bc", "tasks": ["reach"], "steps": 2**63},
                       content_type="application/json")
    assert (huge.status_code, huge.json()["code"]) == (400, "invalid")  # steps beyond the database's integer


# ---------------------------------------------------------------- 2. digits and patterns


@pytest.fixture
def announced(robot_client, task):
    body = announcement()
    assert robot_client.post(EPISODES, body, content_type="application/json").status_code == 201
    return body


@pytest.mark.parametrize("offset", ["9" * 5000, "1" * 20, "-1", "1e3", "0x10", " 1", "1\n", "٣", ""])
def test_an_upload_offset_that_is_not_1_to_19_digits_is_a_400(robot_client, announced, offset):
    reply = robot_client.put(f"{EPISODES}{announced['id']}/payload", b"0123",
                             content_type="application/octet-stream", HTTP_UPLOAD_OFFSET=offset)
    assert (reply.status_code, reply.json()["code"]) == (400, "invalid"), offset
    assert Episode.objects.get().received_bytes == 0


def test_an_upload_offset_of_19_digits_is_read_and_answered_with_the_real_offset(robot_client, announced):
    reply = robot_client.put(f"{EPISODES}{announced['id']}/payload", b"0123",
                             content_type="application/octet-stream", HTTP_UPLOAD_OFFSET="9" * 19)
    assert (reply.status_code, reply.json()["code"], reply.json()["offset"]) == (409, "offset_mismatch", 0)


@pytest.mark.parametrize("sha256", ["a" * 64 + "\n", "a" * 64 + " ", " " + "a" * 64, "A" * 64, "a" * 63, "a" * 65])
def test_a_sha256_must_be_exactly_64_lowercase_hex_characters(robot_client, task, sha256):
    reply = robot_client.post(EPISODES, announcement(sha256=sha256), content_type="application/json")
    assert (reply.status_code, reply.json()["code"]) == (400, "invalid"), repr(sha256)
    assert "sha256: must be 64 lowercase hex" in reply.json()["detail"]


@pytest.fixture
def video(settings, tmp_path, robot, task, operator):
    """A verified episode whose MP4 is already cached: the video view serves it with ranges."""
    settings.DATA_DIR = tmp_path
    settings.PAYLOAD_DIR = tmp_path / "payloads"
    episode = Episode.objects.create(robot=robot[0], task=task, status=Episode.Status.VERIFIED, payload_path="x.h5",
                                     payload_sha256="ab" * 32, started_at="2026-01-01T00:00:00Z")
    path = video_path(episode)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(range(256)) * 4)  # 1024 bytes
    client = Client()
    client.force_login(operator)
    return client, reverse("episode_video", args=[episode.pk])


@pytest.mark.parametrize("header", ["bytes=" + "9" * 5000 + "-", "bytes=0-" + "9" * 5000, "bytes=-" + "9" * 5000,
                                    "bytes=" + "1" * 20 + "-", "bytes=0-1,5-6", "bytes=-", "bytes=abc",
                                    "items=0-1", "bytes=5-2", "bytes=1024-"])
def test_a_malformed_or_unsatisfiable_range_is_a_416(video, header):
    client, url = video
    reply = client.get(url, HTTP_RANGE=header)
    assert reply.status_code == 416, header
    assert reply["Content-Range"] == "bytes */1024"


def test_good_ranges_still_work(video):
    client, url = video
    whole = client.get(url)
    assert whole.status_code == 200 and len(b"".join(whole.streaming_content)) == 1024
    part = client.get(url, HTTP_RANGE="bytes=10-19")
    assert (part.status_code, part["Content-Range"], part.content) == (206, "bytes 10-19/1024", bytes(range(10, 20)))
    big_end = client.get(url, HTTP_RANGE="bytes=1000-" + "9" * 19)  # 19 digits: clamped to the end
    assert (big_end.status_code, big_end["Content-Range"]) == (206, "bytes 1000-1023/1024")
    tail = client.get(url, HTTP_RANGE="bytes=-4")
    assert (tail.status_code, tail.content) == (206, bytes(range(252, 256)))


# ---------------------------------------------------------------- 4. no open redirect


OFF_SITE = ["/\\evil.example", "//evil.example", "/\t/evil.example", "https://evil.example", "http://evil.example/x",
            "\\\\evil.example", "/\\/evil.example", "///evil.example", " //evil.example", "\x01//evil.example",
            "javascript:alert(1)", "https:evil.example"]


@pytest.fixture
def admin_client(operator):
    set_role(operator, ADMIN)
    client = Client()
    client.force_login(operator)
    return client


@pytest.mark.parametrize("target", OFF_SITE)
def test_next_never_leaves_the_site(admin_client, target):
    run = TrainingRun.objects.create(algorithm="bc")
    reply = admin_client.post(reverse("training_stop", args=[run.pk]), {"next": target})
    assert reply.status_code == 302
    assert reply["Location"] == reverse("training_run", args=[run.pk]), (target, reply["Location"])


@pytest.mark.parametrize("target", ["/training/", "/%5Cevil.example", "/episodes/?task=reach"])
def test_next_on_this_site_is_followed(admin_client, target):
    run = TrainingRun.objects.create(algorithm="bc")
    reply = admin_client.post(reverse("training_stop", args=[run.pk]), {"next": target})
    assert (reply.status_code, reply["Location"]) == (302, target)
