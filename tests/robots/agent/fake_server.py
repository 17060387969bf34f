"""A stand-in for the SOP server's robot-facing contract, for testing the agent without Django.

``EpisodeStore`` implements the upload contract (POST announce, resumable PUT, sha256 verification, error codes) with
failure injection. Two doors onto it: ``serve_http`` (a real threaded HTTP server, in-process) for the uploader tests,
and ``app`` (a pure ASGI app with the /ws/robots/ websocket too) that the process tests run under daphne, configured
through FAKE_SOP_* environment variables and inspected through ``GET /_fake/state``. ``CheckpointFiles`` plays the
checkpoint download (``GET /api/checkpoints/<v>/file`` with the robot token), with ``serve_files`` in-process.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Optional

EPISODES = "/api/robot/episodes/"
PAYLOAD = re.compile(r"^/api/robot/episodes/([0-9a-f-]{36})/payload$")


class EpisodeStore:
    """The server side of the upload contract. Thread-safe. ``inject`` queues canned replies for the next requests
    of a method (``"POST"`` / ``"PUT"``), answered instead of the real handling."""

    def __init__(self, token: str, max_size: int = 1 << 30, verify: bool = True):
        self.token = token
        self.max_size = max_size
        self.verify = verify  # False: accept bytes but never say "verified" (a server that cannot finish)
        self.episodes: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str, Optional[int]]] = []  # (method, path, Upload-Offset)
        self._injected: list[tuple[str, int, dict]] = []
        self._lock = threading.Lock()

    def inject(self, method: str, status: int, body: Optional[dict] = None) -> None:
        with self._lock:
            self._injected.append((method, status, body or {"code": "injected", "detail": "injected failure"}))

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict]:
        with self._lock:
            offset = headers.get("upload-offset")
            self.requests.append((method, path, int(offset) if offset is not None else None))
            for i, (m, status, reply) in enumerate(self._injected):
                if m == method:
                    del self._injected[i]
                    return status, reply
            if headers.get("authorization") != f"Bearer {self.token}":
                return 401, {"code": "not_authenticated", "detail": "bad token"}
            if method == "POST" and path == EPISODES:
                return self._announce(json.loads(body))
            match = PAYLOAD.match(path)
            if method == "PUT" and match:
                return self._append(match.group(1), int(offset), body)
            return 404, {"code": "not_found", "detail": path}

    def _announce(self, meta: dict) -> tuple[int, dict]:
        if meta["size"] > self.max_size:
            return 413, {"code": "too_large", "detail": "episode too large"}
        ep = self.episodes.get(meta["id"])
        created = ep is None
        if ep is None or ep["status"] != "verified" and (ep["size"], ep["sha256"]) != (meta["size"], meta["sha256"]):
            ep = self.episodes[meta["id"]] = {
                "meta": meta, "size": meta["size"], "sha256": meta["sha256"], "data": bytearray(), "status": "uploading"
            }
        return (201 if created else 200), self._reply(meta["id"], ep)

    def _append(self, episode_id: str, offset: int, chunk: bytes) -> tuple[int, dict]:
        ep = self.episodes.get(episode_id)
        if ep is None:
            return 404, {"code": "not_found", "detail": "announce first"}
        if ep["status"] == "verified":
            return 200, self._reply(episode_id, ep)
        if offset != len(ep["data"]):
            return 409, {"code": "offset_mismatch", "detail": "wrong offset", "offset": len(ep["data"])}
        if offset + len(chunk) > ep["size"]:
            return 413, {"code": "too_large", "detail": "past the announced size"}
        ep["data"] += chunk
        if len(ep["data"]) == ep["size"] and self.verify:
            if hashlib.sha256(ep["data"]).hexdigest() != ep["sha256"]:
                ep["data"] = bytearray()
                return 422, {"code": "checksum_mismatch", "detail": "sha256 differs", "offset": 0}
            ep["status"] = "verified"
        return 200, self._reply(episode_id, ep)

    @staticmethod
    def _reply(episode_id: str, ep: dict) -> dict:
        return {
            "id": episode_id,
            "status": ep["status"],
            "offset": len(ep["data"]) if ep["status"] != "verified" else ep["size"],
            "upload_url": f"/api/robot/episodes/{episode_id}/payload",
        }

    def summary(self) -> dict:
        with self._lock:
            return {
                "episodes": {
                    i: {"status": e["status"], "size": e["size"], "received": len(e["data"]), "meta": e["meta"]}
                    for i, e in self.episodes.items()
                },
                "requests": list(self.requests),
            }


# ---------------------------------------------------------------- a real HTTP server, in-process


def serve_http(store: EpisodeStore) -> http.server.ThreadingHTTPServer:
    """Start a threaded HTTP server on a free loopback port; ``server.server_address`` says where."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # else every reply waits ~40 ms for a delayed ACK

        def _handle(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, reply = store.handle(self.command, self.path, headers, body)
            raw = json.dumps(reply).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        do_POST = do_PUT = do_GET = _handle

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.05,), name="fake-http", daemon=True).start()
    return server


# ---------------------------------------------------------------- checkpoint downloads


class CheckpointFiles:
    """Files served by GET path with the robot's bearer token. Thread-safe. ``fail(n)`` answers the next n requests
    with a 500; ``delay_s`` holds every reply back (a slow link, so that a newer announcement can overtake it)."""

    def __init__(self, token: str, delay_s: float = 0.0):
        self.token = token
        self.delay_s = delay_s
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, Optional[str]]] = []  # (path, authorization header)
        self._failures = 0
        self._lock = threading.Lock()

    def put(self, path: str, data: bytes) -> None:
        with self._lock:
            self.files[path] = data

    def fail(self, times: int) -> None:
        with self._lock:
            self._failures += times

    def get(self, path: str, authorization: Optional[str]) -> tuple[int, bytes]:
        with self._lock:
            self.requests.append((path, authorization))
            if authorization != f"Bearer {self.token}":
                return 401, b'{"code": "not_authenticated"}'
            if self._failures:
                self._failures -= 1
                return 500, b'{"code": "injected"}'
            data = self.files.get(path)
        if self.delay_s:
            time.sleep(self.delay_s)
        return (200, data) if data is not None else (404, b'{"code": "not_found"}')

    def paths_requested(self) -> list[str]:
        with self._lock:
            return [path for path, _ in self.requests]


def serve_files(files: CheckpointFiles) -> http.server.ThreadingHTTPServer:
    """A threaded HTTP server on a free loopback port serving ``files``."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def do_GET(self):
            status, body = files.get(self.path, self.headers.get("Authorization"))
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up on a superseded download
                pass

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.05,), name="fake-files", daemon=True).start()
    return server


# ---------------------------------------------------------------- an ASGI app (HTTP + /ws/robots/) for daphne


def _store_from_env() -> EpisodeStore:
    return EpisodeStore(
        token=os.environ.get("FAKE_SOP_TOKEN", "sop_test"),
        verify=os.environ.get("FAKE_SOP_VERIFY", "1") == "1",
    )


STORE = _store_from_env()
MESSAGES: list[dict] = []  # every websocket frame received from robots, decoded
ASSIGNMENT = json.loads(os.environ.get("FAKE_SOP_ASSIGNMENT", "null"))  # the task.assigned body sent after welcome
POLICY = json.loads(os.environ.get("FAKE_SOP_POLICY", "null"))  # a policy.updated body sent after the assignment
FILES = json.loads(os.environ.get("FAKE_SOP_FILES", "{}"))  # GET path -> local file served to the robot token


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            event = await receive()
            if event["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif event["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    elif scope["type"] == "http":
        await _http(scope, receive, send)
    elif scope["type"] == "websocket":
        await _websocket(scope, receive, send)


async def _http(scope, receive, send):
    body = b""
    while True:
        event = await receive()
        body += event.get("body", b"")
        if not event.get("more_body"):
            break
    if scope["path"] == "/_fake/state":
        status, reply = 200, {**STORE.summary(), "messages": list(MESSAGES)}
    elif scope["method"] == "GET" and scope["path"] in FILES:
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        ok = headers.get("authorization") == f"Bearer {STORE.token}"
        raw = Path(FILES[scope["path"]]).read_bytes() if ok else b'{"code": "not_authenticated"}'
        await send({"type": "http.response.start", "status": 200 if ok else 401,
                    "headers": [(b"content-type", b"application/octet-stream")]})
        await send({"type": "http.response.body", "body": raw})
        return
    else:
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        status, reply = STORE.handle(scope["method"], scope["path"], headers, body)
    raw = json.dumps(reply).encode()
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": raw})


async def _websocket(scope, receive, send):
    await receive()  # websocket.connect
    headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
    if scope["path"] != "/ws/robots/" or headers.get("authorization") != f"Bearer {STORE.token}":
        await send({"type": "websocket.close", "code": 4401})  # before accept: the handshake gets HTTP 403
        return
    await send({"type": "websocket.accept"})
    while True:
        event = await receive()
        if event["type"] == "websocket.disconnect":
            return
        message = json.loads(event.get("text") or event.get("bytes"))
        MESSAGES.append(message)
        if message["type"] == "hello":
            await send({"type": "websocket.send", "text": json.dumps(
                {"v": 1, "type": "welcome", "robot": "fake-robot", "heartbeat_s": 0.5, "server_time": 0.0}
            )})
            if ASSIGNMENT is not None:
                assigned = {"v": 1, "type": "task.assigned", **ASSIGNMENT}
                await send({"type": "websocket.send", "text": json.dumps(assigned)})
            if POLICY is not None and message.get("policy_version") != POLICY["version"]:
                published = {"v": 1, "type": "policy.updated", **POLICY}
                await send({"type": "websocket.send", "text": json.dumps(published)})
