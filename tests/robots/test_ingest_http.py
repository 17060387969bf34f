"""The ingest route (robots/ingest_http.py) answers as the DRF views it stands in front of.

Every request here is sent twice with the same scope: to the whole ASGI application (the route serves it) and to
Django alone (the DRF view serves it). Status, JSON body and security headers must be the same. The happy paths and
the faults of the upload are in test_ingest.py, which goes through the whole application, i.e. through the route.
"""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
from channels.db import database_sync_to_async

from robots import fleet, metrics
from robots.models import Episode, Robot
from sop_web.asgi import application, django_http

from .factories import announcement, episode_bytes, episode_data

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("payload_dir")]

EPISODES = "/api/robot/episodes/"
COMPARED_HEADERS = ("content-type", "www-authenticate", "x-content-type-options", "referrer-policy",
                    "cross-origin-opener-policy", "x-frame-options", "strict-transport-security")


async def call(app, method: str, path: str, headers=(), body: bytes = b"", scheme: str = "http"):
    """One request straight into an ASGI app: (status, {header: value}, body)."""
    sent = []
    headers = [(b"host", b"testserver"), *((k.lower().encode(), v.encode()) for k, v in headers)]
    if body:
        headers.append((b"content-length", str(len(body)).encode()))
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": scheme,
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": headers,
             "client": ("127.0.0.1", 5000), "server": ("testserver", 80)}
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        if messages:
            return messages.pop(0)
        await asyncio.Event().wait()  # the client stays: Django aborts a request whose client went away

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    out = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode().lower(): v.decode() for k, v in start["headers"]}, out


async def both(method, path, headers=(), body=b"", scheme="http"):
    """The same request through the route and through Django alone; asserts the answers agree, returns the route's
    (status, body as JSON)."""
    route = await call(application, method, path, headers, body, scheme)
    django = await call(django_http, method, path, headers, body, scheme)
    assert route[0] == django[0], (route, django)
    assert json.loads(route[2]) == json.loads(django[2]), (route[2], django[2])
    for name in COMPARED_HEADERS:
        assert route[1].get(name) == django[1].get(name), (name, route[1], django[1])
    return route[0], json.loads(route[2])


@pytest.fixture
def cast(db, task, tmp_path):
    """Two robots, an episode of the first announced (payload and its bytes) and one of the second."""
    (mine, token), (_, other_token) = fleet.register_robot("sim-01"), fleet.register_robot("sim-02")
    data = episode_data()
    payload = episode_bytes(tmp_path, data)
    theirs = episode_data(robot="sim-02")
    return {"token": token, "other_token": other_token, "data": data, "payload": payload,
            "body": announcement(data, payload), "theirs": announcement(theirs, episode_bytes(tmp_path, theirs))}


def auth(token, *rest):
    return [("Authorization", f"Bearer {token}"), *rest]


JSON = ("Content-Type", "application/json")


@pytest.mark.parametrize("headers", [
    [],
    [("Authorization", "Token abc")],
    [("Authorization", "Bearer sop_not-a-real-token")],
    [("Authorization", "Bearer sopu_a-persons-token")],
    [("Authorization", "Bearer")],
    [("Authorization", "")],
])
async def test_requests_without_a_robot_token_are_refused_alike(cast, headers):
    body = json.dumps(cast["body"]).encode()
    assert (await both("POST", EPISODES, [*headers, JSON], body))[0] == 401
    payload_path = f"{EPISODES}{cast['body']['id']}/payload"
    status, error = await both("PUT", payload_path, [*headers, ("Upload-Offset", "0")], cast["payload"])
    assert status == 401 and error["code"] in ("not_authenticated", "authentication_failed")


async def test_two_authorization_headers_are_refused_alike(cast):
    headers = [("Authorization", f"Bearer {cast['token']}"), ("Authorization", f"Bearer {cast['token']}"), JSON]
    assert (await both("POST", EPISODES, headers, json.dumps(cast["body"]).encode()))[0] == 401


async def test_a_revoked_token_is_refused_alike(cast):
    await database_sync_to_async(lambda: fleet.revoke_robot(Robot.objects.get(name="sim-01")))()
    assert (await both("POST", EPISODES, auth(cast["token"], JSON), json.dumps(cast["body"]).encode()))[0] == 401


@pytest.mark.parametrize("content_type, body, code", [
    ("text/plain", b'{"a": 1}', "unsupported_media_type"),
    ("application/json", b'{"id": ', "parse_error"),
    ("application/json", b"[" * 100 + b"]" * 100, "parse_error"),
    ("application/json", b'{"size": NaN}', "parse_error"),
    ("application/json; charset=bogus", b"{}", "invalid"),  # an unknown charset: utf-8, as Django reads it
    ("application/json; charset=utf-16", b'{"id": 1}', "parse_error"),
    ("application/json", b'"\\ud800"', "parse_error"),
    ("application/json", b"", "invalid"),
    (None, b'{"id": "x"}', "unsupported_media_type"),
    (None, b"", "invalid"),
    ("application/json", b'{"id": "not-a-uuid", "size": -1}', "invalid"),
    ("APPLICATION/JSON; charset=utf-8", b"[]", "invalid"),
])
async def test_bad_announcements_are_refused_alike(cast, content_type, body, code):
    headers = auth(cast["token"], *([("Content-Type", content_type)] if content_type else []))
    status, error = await both("POST", EPISODES, headers, body)
    assert status in (400, 415) and error["code"] == code, error


async def test_an_unknown_task_and_another_robots_episode_are_refused_alike(cast):
    unknown = dict(cast["body"], task="fly")
    assert (await both("POST", EPISODES, auth(cast["token"], JSON), json.dumps(unknown).encode()))[1]["code"] == \
        "unknown_task"
    theirs = json.dumps(cast["theirs"]).encode()
    status, _, _ = await call(application, "POST", EPISODES, auth(cast["other_token"], JSON), theirs)
    assert status == 201
    status, error = await both("POST", EPISODES, auth(cast["token"], JSON), theirs)
    assert (status, error["code"]) == (403, "forbidden")
    put = await both("PUT", f"{EPISODES}{cast['theirs']['id']}/payload", auth(cast["token"], ("Upload-Offset", "0")),
                     b"x")
    assert put == (403, put[1]) and put[1]["code"] == "forbidden"


@pytest.mark.parametrize("offset", [None, "", "1\n", "-1", "+0", "0x10", "9" * 20, "٣"])
async def test_a_bad_upload_offset_is_refused_alike(cast, offset):
    await call(application, "POST", EPISODES, auth(cast["token"], JSON), json.dumps(cast["body"]).encode())
    headers = auth(cast["token"], *([("Upload-Offset", offset)] if offset is not None else []))
    status, error = await both("PUT", f"{EPISODES}{cast['body']['id']}/payload", headers, b"x")
    assert (status, error["code"]) == (400, "invalid")


async def test_upload_errors_are_answered_alike(cast):
    path = f"{EPISODES}{cast['body']['id']}/payload"
    assert (await both("PUT", path, auth(cast["token"], ("Upload-Offset", "0")), b"x"))[0] == 404  # not announced
    await call(application, "POST", EPISODES, auth(cast["token"], JSON), json.dumps(cast["body"]).encode())
    status, error = await both("PUT", path, auth(cast["token"], ("Upload-Offset", "2"), ("Upload-Offset", "2")),
                               b"x")  # two headers are joined ("2,2"), as Django joins them: not an offset
    assert status == 400
    status, error = await both("PUT", path, auth(cast["token"], ("Upload-Offset", "7")), b"x")
    assert (status, error["code"], error["offset"]) == (409, "offset_mismatch", 0)
    status, error = await both("PUT", path, auth(cast["token"], ("Upload-Offset", "0")), cast["payload"] + b"x")
    assert (status, error["code"]) == (413, "too_large")
    wrong = bytearray(cast["payload"])
    wrong[-1] ^= 0xFF
    status, error = await both("PUT", path, auth(cast["token"], ("Upload-Offset", "0")), bytes(wrong))
    assert (status, error["code"], error["offset"]) == (422, "checksum_mismatch", 0)


async def test_a_whole_upload_through_the_route_then_both_paths_agree_on_it(cast):
    body, path = json.dumps(cast["body"]).encode(), f"{EPISODES}{cast['body']['id']}/payload"
    status, _, opened = await call(application, "POST", EPISODES, auth(cast["token"], JSON), body)
    assert status == 201
    assert json.loads(opened) == {"id": cast["body"]["id"], "status": "uploading", "offset": 0,
                                  "size": len(cast["payload"]), "upload_url": path}
    assert await both("POST", EPISODES, auth(cast["token"], JSON), body) == (200, json.loads(opened))
    half = len(cast["payload"]) // 2
    status, _, first = await call(application, "PUT", path, auth(cast["token"], ("Upload-Offset", "0")),
                                  cast["payload"][:half])
    assert (status, json.loads(first)["offset"]) == (200, half)
    status, _, done = await call(application, "PUT", path, auth(cast["token"], ("Upload-Offset", str(half))),
                                 cast["payload"][half:])
    assert (status, json.loads(done)["status"]) == (200, "verified")
    episode = await database_sync_to_async(Episode.objects.get)(pk=cast["body"]["id"])
    assert (episode.status, episode.upload_token, episode.upload_locked_until) == ("verified", "", None)
    # a retried last chunk and a repeated announcement: the same answers from both paths
    assert await both("PUT", path, auth(cast["token"], ("Upload-Offset", str(half))), cast["payload"][half:]) == \
        (200, json.loads(done))
    assert await both("POST", EPISODES, auth(cast["token"], JSON), body) == (200, json.loads(done))


async def test_the_route_counts_its_responses_and_bytes():
    before = {c: metrics.value("sop_robot_upload_responses_total", code=c) for c in ("2xx", "4xx")}
    bytes_before = metrics.value("sop_ingest_bytes_total")
    _, token = await database_sync_to_async(fleet.register_robot)("sim-09")
    status, _, _ = await call(application, "PUT", f"{EPISODES}{uuid.uuid4()}/payload",
                              auth(token, ("Upload-Offset", "0")), b"abc")
    assert status == 404
    assert metrics.value("sop_robot_upload_responses_total", code="4xx") == before["4xx"] + 1
    assert metrics.value("sop_robot_upload_responses_total", code="2xx") == before["2xx"]
    assert metrics.value("sop_ingest_bytes_total") == bytes_before


async def test_behind_a_tls_proxy_the_route_redirects_plain_http_as_django_and_sends_hsts(cast, settings):
    from django.core.asgi import get_asgi_application

    from robots.ingest_http import IngestRoute

    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    settings.SECURE_SSL_REDIRECT = True
    settings.SECURE_HSTS_SECONDS = 3600
    django = get_asgi_application()  # Django's middleware reads these settings once, when it is built
    route = IngestRoute(django)
    body, https = json.dumps(cast["body"]).encode(), ("X-Forwarded-Proto", "https")
    status, headers, _ = await call(route, "POST", EPISODES, auth(cast["token"], JSON), body)
    assert status == 301 and headers["location"].startswith("https://")  # Django's answer: the route stood aside
    for app in (route, django):
        status, headers, error = await call(app, "POST", EPISODES, auth(cast["token"], JSON, https),
                                            json.dumps(dict(cast["body"], task="fly")).encode())
        assert (status, json.loads(error)["code"]) == (400, "unknown_task")
        assert headers["strict-transport-security"] == "max-age=3600"
    status, headers, _ = await call(route, "POST", EPISODES, auth(cast["token"], JSON, https), body)
    assert status == 201 and headers["strict-transport-security"] == "max-age=3600"


async def test_a_client_that_goes_away_mid_body_gets_nothing_and_changes_nothing(cast):
    await call(application, "POST", EPISODES, auth(cast["token"], JSON), json.dumps(cast["body"]).encode())
    sent = []
    messages = [{"type": "http.request", "body": cast["payload"][:100], "more_body": True},
                {"type": "http.disconnect"}]
    path = f"{EPISODES}{cast['body']['id']}/payload"
    scope = {"type": "http", "method": "PUT", "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": b"", "root_path": "", "headers": [(b"authorization", f"Bearer {cast['token']}".encode()),
                                                                (b"upload-offset", b"0")]}

    async def receive():
        return messages.pop(0)

    async def send(message):
        sent.append(message)

    await application(scope, receive, send)
    assert sent == []
    episode = await database_sync_to_async(Episode.objects.get)(pk=cast["body"]["id"])
    assert (episode.received_bytes, episode.upload_token) == (0, "")


@pytest.mark.parametrize("method, path, extra, taken", [
    ("POST", EPISODES, {}, True),
    ("PUT", f"{EPISODES}{uuid.UUID(int=1)}/payload", {}, True),
    ("GET", EPISODES, {}, False),
    ("PUT", EPISODES, {}, False),
    ("POST", f"{EPISODES}{uuid.UUID(int=1)}/payload", {}, False),
    ("PUT", f"{EPISODES}{str(uuid.UUID(int=2**128 - 1)).upper()}/payload", {}, False),  # Django's <uuid:> is lower case too
    ("PUT", f"{EPISODES}{uuid.UUID(int=1)}/payload/", {}, False),
    ("POST", "/api/robot/episodes", {}, False),
    ("POST", EPISODES, {"root_path": "/sop"}, False),  # under a URL prefix: Django's resolver decides
])
def test_the_route_takes_only_the_two_ingest_requests(method, path, extra, taken):
    from robots.ingest_http import IngestRoute

    scope = {"type": "http", "method": method, "path": path, "scheme": "http", "headers": [], **extra}
    assert (IngestRoute._handler(scope) is not None) == taken
