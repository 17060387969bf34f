"""Request body limits (sop_web/limits.py): a 413 before an oversized body is read, never a 500, under daphne too.

Through a real daphne with raw sockets (daphne buffers whole bodies before the ASGI app runs, so only its own request
object can refuse in time), and the ASGI middleware in-process for servers that stream bodies.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid

import httpx
import pytest

from robots.models import Episode
from sop_web.limits import LINGER_S
from tests.robots.factories import announcement, episode_bytes, episode_data

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

MiB = 1024 * 1024
EPISODES = "/api/robot/episodes/"


def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


class Exchange:
    """One raw HTTP/1.1 exchange: send the head, optionally a body from a thread, read until the server closes."""

    def __init__(self, url: str, head: bytes, body=None, timeout: float = 15.0):
        self.sock = socket.create_connection(_address(url), timeout=timeout)
        self.sock.sendall(head)
        self.send_error = None
        self.sender = None
        if body is not None:
            self.sender = threading.Thread(target=self._send, args=(body,), daemon=True)
            self.sender.start()

    def _send(self, body):
        try:
            for piece in body:
                self.sock.sendall(piece)
        except OSError as exc:  # the server closed after its 413: expected
            self.send_error = exc

    def read_all(self) -> bytes:
        data = b""
        try:
            while chunk := self.sock.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
        self.sock.close()
        return data


def _response(data: bytes) -> tuple[int, dict, bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)}
    return status, headers, body


def _head(method: str, path: str, token: str | None, *extra: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *extra]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _chunked(total: int, piece: int = MiB):
    sent = 0
    while sent < total:
        n = min(piece, total - sent)
        sent += n
        yield b"%x\r\n" % n + b"x" * n + b"\r\n"
    yield b"0\r\n\r\n"


def _healthy(url: str) -> bool:
    return httpx.get(f"{url}/healthz", timeout=5).status_code == 200


def _no_traceback(proc) -> None:
    log = proc.output()
    assert "Traceback" not in log and "Internal Server Error" not in log and '" 500 ' not in log, log[-3000:]


@pytest.fixture
def server(launcher, robot, task):
    proc, url = launcher.server()
    return proc, url, robot[1]


@pytest.fixture
def announced(server, tmp_path):
    """An announced 5-step episode: (episode id, payload bytes)."""
    _, url, token = server
    data = episode_data()
    payload = episode_bytes(tmp_path, data)
    reply = httpx.post(f"{url}{EPISODES}", json=announcement(data, payload),
                       headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert reply.status_code == 201, reply.text
    return data.meta["episode_id"], payload


# ---------------------------------------------------------------- through daphne


def test_a_declared_oversized_upload_gets_its_413_at_once_without_sending_a_body(server, announced):
    proc, url, token = server
    episode_id, _ = announced
    started = time.monotonic()
    exchange = Exchange(url, _head("PUT", f"{EPISODES}{episode_id}/payload", token, "Upload-Offset: 0",
                                   f"Content-Length: {17 * MiB}", "Content-Type: application/octet-stream",
                                   "Expect: 100-continue"))
    data = exchange.read_all()  # the server answers and closes; no body byte was sent
    assert time.monotonic() - started < LINGER_S + 2
    assert not data.startswith(b"HTTP/1.1 100"), data[:200]  # no "100 Continue" to a refused request
    status, headers, body = _response(data)
    assert (status, headers["connection"], headers["content-type"]) == (413, "close", "application/json")
    assert json.loads(body)["code"] == "too_large" and str(16 * MiB) in json.loads(body)["detail"]
    assert Episode.objects.get(pk=episode_id).received_bytes == 0
    assert _healthy(url)
    _no_traceback(proc)


def test_a_chunked_17_mib_upload_gets_a_413_and_the_server_stays_healthy(server, announced):
    proc, url, token = server
    episode_id, _ = announced
    exchange = Exchange(url, _head("PUT", f"{EPISODES}{episode_id}/payload", token, "Upload-Offset: 0",
                                   "Transfer-Encoding: chunked", "Content-Type: application/octet-stream"),
                        body=_chunked(17 * MiB))
    status, headers, body = _response(exchange.read_all())
    assert (status, headers["connection"], json.loads(body)["code"]) == (413, "close", "too_large")
    episode = Episode.objects.get(pk=episode_id)
    assert (episode.received_bytes, episode.status) == (0, Episode.Status.UPLOADING)  # the app never saw it
    assert _healthy(url)
    _no_traceback(proc)


def test_json_and_form_bodies_have_the_small_limit(server):
    proc, url, token = server
    declared = Exchange(url, _head("POST", EPISODES, token, "Content-Type: application/json",
                                   f"Content-Length: {2 * MiB}"))
    assert _response(declared.read_all())[0] == 413
    chunked = Exchange(url, _head("POST", EPISODES, token, "Content-Type: application/json",
                                  "Transfer-Encoding: chunked"), body=_chunked(2 * MiB, piece=256 * 1024))
    status, _, body = _response(chunked.read_all())
    assert (status, json.loads(body)["code"]) == (413, "too_large")
    login = Exchange(url, _head("POST", "/login/", None, "Content-Type: application/x-www-form-urlencoded",
                                f"Content-Length: {2 * MiB}"))
    assert _response(login.read_all())[0] == 413
    assert _healthy(url)
    _no_traceback(proc)


@pytest.mark.parametrize("length", ["9" * 5000, "1" * 20])
def test_a_content_length_of_too_many_digits_is_a_400(server, length):
    proc, url, token = server
    exchange = Exchange(url, _head("POST", EPISODES, token, "Content-Type: application/json",
                                   f"Content-Length: {length}"))
    assert _response(exchange.read_all())[0] == 400
    assert _healthy(url)
    _no_traceback(proc)


def test_uploads_under_the_limit_still_work_also_chunked(server, announced):
    proc, url, token = server
    episode_id, payload = announced
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"}
    first = httpx.put(f"{url}{EPISODES}{episode_id}/payload", content=payload[:100],
                      headers={**headers, "Upload-Offset": "0"}, timeout=10)
    assert (first.status_code, first.json()["offset"]) == (200, 100)
    rest = payload[100:]
    chunked = httpx.put(f"{url}{EPISODES}{episode_id}/payload", content=iter([rest[:500], rest[500:]]),
                        headers={**headers, "Upload-Offset": "100"}, timeout=10)  # an iterator: sent chunked
    assert chunked.status_code == 200, chunked.text
    assert chunked.json()["status"] == "verified"
    _no_traceback(proc)


def test_bad_json_through_daphne_is_a_400_not_a_500(server, task):
    proc, url, token = server
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    for raw in (b"[" * 100_000 + b"]" * 100_000, b'{"id": "\\ud800"}', b'{"size": NaN}'):
        reply = httpx.post(f"{url}{EPISODES}", content=raw, headers=headers, timeout=10)
        assert (reply.status_code, reply.json()["code"]) == (400, "parse_error")
    offset = httpx.put(f"{url}{EPISODES}{uuid.uuid4()}/payload", content=b"x",
                       headers={**headers, "Upload-Offset": "9" * 5000}, timeout=10)
    assert (offset.status_code, offset.json()["code"]) == (400, "invalid")
    _no_traceback(proc)
