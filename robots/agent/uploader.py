"""Uploads spooled episodes to the server in the background: resumable, idempotent, deletes only what is verified.

One attempt at an entry (``Uploader.upload``):
  1. ``POST /api/robot/episodes/`` with the sidecar metadata -> ``{"status", "offset", "upload_url"}``
     (``verified``: the server already has it).
  2. ``PUT <upload_url>`` with ``Upload-Offset: <offset>`` and the next chunk, until the reply says ``verified``.
     409 ``offset_mismatch`` -> continue from the server's offset; 422 ``checksum_mismatch`` -> re-hash the local file,
     fix the sidecar if it was wrong, retry later; 413 -> move the entry to ``rejected/`` (on a PUT, first halve the
     chunk size: that 413 is the per-request limit); 422 ``invalid_payload`` and a POST's 409 ``conflict`` (verified
     with another sha256) -> ``rejected/`` too: retrying cannot help; 401/403/5xx/network/anything else -> retry later
     with backoff.
     The entry is deleted ONLY after a ``verified`` reply; a rejected entry keeps its data.
"""

from __future__ import annotations

import collections
import enum
import logging
import threading
from typing import Callable, Optional

import httpx

from .backoff import Backoff
from .spool import Spool, sha256_of

log = logging.getLogger(__name__)

EPISODES_PATH = "/api/robot/episodes/"
MAX_OFFSET_CORRECTIONS = 5  # 409s in a row within one attempt before backing off
MIN_CHUNK_BYTES = 64 * 1024  # a 413 on a PUT halves the chunk size down to this, then rejects the entry


class Result(enum.Enum):
    VERIFIED = "verified"  # the server has it; the entry is deleted
    REJECTED = "rejected"  # refused for good (413); the entry is in rejected/
    RETRY = "retry"  # try again later; the entry is untouched
    GONE = "gone"  # the entry vanished from the spool (removed by hand); nothing to do


class Uploader:
    """A daemon thread that uploads spool entries oldest first. ``enqueue`` is thread-safe."""

    def __init__(
        self,
        spool: Spool,
        server_url: str,
        token: str,
        *,
        chunk_bytes: int = 4 * 1024 * 1024,
        timeout_s: float = 30.0,
        backoff: Optional[Backoff] = None,
        on_verified: Callable[[str], None] = lambda episode_id: None,
        transport: Optional[httpx.BaseTransport] = None,
    ):
        self.spool = spool
        self.chunk_bytes = chunk_bytes
        self.backoff = backoff or Backoff()
        self.on_verified = on_verified
        self.verified: set[str] = set()  # ids verified by this process
        self.rejected: set[str] = set()
        self._client = httpx.Client(
            base_url=server_url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout_s,
            transport=transport,
        )
        self._queue: collections.deque[str] = collections.deque()
        self._known: set[str] = set()  # queued or in flight
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="uploader", daemon=True)

    # ------------------------------------------------------------ any thread

    def enqueue(self, episode_id: str) -> None:
        with self._cond:
            if episode_id not in self._known:
                self._known.add(episode_id)
                self._queue.append(episode_id)
                self._cond.notify()

    @property
    def pending(self) -> int:
        """Entries not yet acknowledged by the server (queued or in flight)."""
        with self._cond:
            return len(self._known)

    def start(self) -> "Uploader":
        """Queue every complete entry already in the spool (an agent restarted after a crash uploads what it still
        holds), oldest first, then start the thread."""
        for episode_id in self.spool.complete_entries():
            self.enqueue(episode_id)
        self._thread.start()
        return self

    def stop(self, timeout: Optional[float] = None) -> None:
        """Let the request in flight finish, then stop. Unfinished entries stay in the spool for the next start."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._client.close()

    # ------------------------------------------------------------ uploader thread

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                while not self._queue and not self._stop.is_set():
                    self._cond.wait(1.0)
                if self._stop.is_set():
                    return
                episode_id = self._queue[0]
            try:
                result = self.upload(episode_id)
            except Exception:  # a bug or an unreadable file: keep the entry, never spin
                log.exception("upload of %s failed unexpectedly", episode_id)
                result = Result.RETRY
            with self._cond:
                self._queue.popleft()
                if result is Result.RETRY:
                    self._queue.append(episode_id)  # to the back: one bad entry must not block the others
                else:
                    self._known.discard(episode_id)
            if result is Result.RETRY and not self._stop.is_set():
                delay = self.backoff.next_delay()
                log.info("retrying uploads in %.1f s (%d pending)", delay, self.pending)
                self._stop.wait(delay)
            else:
                self.backoff.reset()

    def upload(self, episode_id: str) -> Result:
        """One attempt at one entry, following the server's answers until verified or a reason to stop."""
        path, sidecar = self.spool.payload(episode_id), self.spool.sidecar(episode_id)
        if not (path.exists() and sidecar.exists()):
            log.warning("spool entry %s disappeared", episode_id)
            return Result.GONE
        metadata = self.spool.read_sidecar(episode_id)
        size = int(metadata["size"])

        reply = self._request("POST", EPISODES_PATH, episode_id, json=metadata)
        if reply is None:
            return Result.RETRY
        if reply.status_code == 413:
            return self._reject(episode_id, reply)
        if reply.status_code == 409 and _json(reply).get("code") == "conflict":
            return self._reject(episode_id, reply)  # the server holds a different file under this id: a human decides
        if reply.status_code not in (200, 201):
            self._log_refusal(episode_id, reply)
            return Result.RETRY
        body = _json(reply)
        if body.get("status") == "verified":
            return self._verified(episode_id)
        try:
            offset, upload_url = int(body["offset"]), str(body["upload_url"])
        except (KeyError, TypeError, ValueError):
            log.error("malformed reply to POST for %s: %s", episode_id, reply.text[:200])
            return Result.RETRY

        corrections = 0
        with open(path, "rb") as fh:
            while True:
                if self._stop.is_set():
                    return Result.RETRY
                if not 0 <= offset < size:
                    log.warning("server is at offset %d of %d for %s but has not verified it", offset, size, episode_id)
                    return Result.RETRY
                fh.seek(offset)
                chunk = fh.read(self.chunk_bytes)
                headers = {"Upload-Offset": str(offset), "Content-Type": "application/octet-stream"}
                reply = self._request("PUT", upload_url, episode_id, content=chunk, headers=headers)
                if reply is None:
                    return Result.RETRY
                body = _json(reply)
                if reply.status_code == 200:
                    if body.get("status") == "verified":
                        return self._verified(episode_id)
                    new_offset = int(body.get("offset", -1))
                    if new_offset <= offset:
                        log.warning("upload of %s made no progress (offset %d -> %d)", episode_id, offset, new_offset)
                        return Result.RETRY
                    offset = new_offset
                elif reply.status_code == 409 and body.get("code") == "offset_mismatch":
                    corrections += 1
                    if corrections > MAX_OFFSET_CORRECTIONS:
                        return Result.RETRY
                    offset = int(body.get("offset", 0))
                    log.info("server has %d bytes of %s; continuing from there", offset, episode_id)
                elif reply.status_code == 422 and body.get("code") == "checksum_mismatch":
                    self._recheck(episode_id, metadata)
                    return Result.RETRY
                elif reply.status_code == 422 and body.get("code") == "invalid_payload":
                    return self._reject(episode_id, reply)  # the bytes arrived intact and will never be valid
                elif reply.status_code == 413 and len(chunk) > MIN_CHUNK_BYTES:
                    # The episode's size was accepted at POST, so this is the server's per-request limit.
                    self.chunk_bytes = max(MIN_CHUNK_BYTES, len(chunk) // 2)
                    log.warning("server refused a %d-byte chunk; sending %d-byte chunks", len(chunk), self.chunk_bytes)
                elif reply.status_code == 413:
                    return self._reject(episode_id, reply)
                else:
                    self._log_refusal(episode_id, reply)
                    return Result.RETRY

    def _request(self, method: str, url: str, episode_id: str, **kwargs) -> Optional[httpx.Response]:
        try:
            return self._client.request(method, url, **kwargs)
        except httpx.HTTPError as exc:
            log.warning("%s %s for %s failed: %s", method, url, episode_id, exc)
            return None

    def _verified(self, episode_id: str) -> Result:
        self.spool.remove(episode_id)
        self.verified.add(episode_id)
        log.info("episode %s verified by the server; removed from the spool", episode_id)
        self.on_verified(episode_id)
        return Result.VERIFIED

    def _reject(self, episode_id: str, reply: httpx.Response) -> Result:
        where = self.spool.reject(episode_id)
        self.rejected.add(episode_id)
        log.error("server refused episode %s for good (%s); kept at %s", episode_id, _describe(reply), where)
        return Result.REJECTED

    def _recheck(self, episode_id: str, metadata: dict) -> None:
        """The server's hash of the bytes differs from the sidecar's: find out which side is wrong."""
        path = self.spool.payload(episode_id)
        actual = {"size": path.stat().st_size, "sha256": sha256_of(path)}
        if {k: metadata[k] for k in actual} != actual:
            log.warning("sidecar of %s had a stale size/sha256; rewrote it", episode_id)
            self.spool.write_sidecar(episode_id, {**metadata, **actual})
        else:
            log.error("server's checksum of %s differs from the local file's; will upload it again", episode_id)

    def _log_refusal(self, episode_id: str, reply: httpx.Response) -> None:
        if reply.status_code in (401, 403):
            log.error("server refused the robot token uploading %s (%s); will retry", episode_id, _describe(reply))
        elif reply.status_code >= 500:
            log.warning("server error uploading %s (%s); will retry", episode_id, _describe(reply))
        else:
            log.error("unexpected reply uploading %s (%s); will retry", episode_id, _describe(reply))


def _json(reply: httpx.Response) -> dict:
    try:
        body = reply.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _describe(reply: httpx.Response) -> str:
    body = _json(reply)
    detail = " ".join(str(body[k]) for k in ("code", "detail") if k in body)
    return f"HTTP {reply.status_code}{': ' + detail if detail else ''}"
