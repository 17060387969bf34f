"""Checkpoint updates: download what the server publishes in the background, verify it, and swap it in between episodes.

    <spool>/policies/current.safetensors   the checkpoint the robot last ran (renamed here when it takes over)
    <spool>/policies/current.json          its version, size and sha256: a restarted agent starts with it
    <spool>/policies/v<N>-<sha>.safetensors a verified download waiting for the next episode boundary
    <spool>/policies/.v<N>.<pid>.part      a download in progress (removed on any failure)

Threads: the websocket thread calls ``PolicyUpdates.offer`` with every ``policy.updated``; the ``policy-download``
thread fetches ``{server}{url}`` with the robot's token, checks size and sha256 while streaming, then parses it with
``learner.checkpoints.load_checkpoint`` (which verifies again and never unpickles) and stages it; the control thread
takes the staged policy before the next episode (``LearnedPolicy.next_agent``), so an episode never mixes two versions.

Ordering: the server's LATEST message wins, whatever its version number. A newer message cancels the download in
flight and drops a staged policy it supersedes, so only the newest announcement is loaded; an older version announced
after a newer one is a rollback and is honoured. A download that fails (HTTP error, truncated, wrong checksum,
unparsable) is retried with backoff a few times, then given up: the file is removed, the old policy keeps running and
``error`` says why (reported in ``status.policy_error``). The same announcement again (a reconnect) retries it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import httpx

from robots.protocol import PolicyUpdated

from .agents import Agent
from .backoff import Backoff
from .learned import PolicyAgent
from .runtime import AgentProvider

log = logging.getLogger(__name__)

CURRENT = "current.safetensors"
CURRENT_META = "current.json"
MAX_ERROR_CHARS = 300  # status.policy_error stays a short line


class DownloadError(Exception):
    """This attempt at a checkpoint failed; another attempt may succeed."""


class _Superseded(Exception):
    """A newer announcement (or shutdown) made the download in flight pointless."""


@dataclasses.dataclass(frozen=True)
class LoadedPolicy:
    """A verified, parsed checkpoint."""

    version: int
    sha256: str
    size: int
    policy: Any  # learner.policy.Policy
    path: Path


def _default_loader(path, *, expected_sha256, expected_size, embedder):
    # Imported here: torch and the learner load only in agents that run checkpoints (--policy learned).
    from learner.checkpoints import load_checkpoint
    from learner.policy import use_inference_threads

    use_inference_threads(1)  # the control thread acts on one observation at a time: never an OpenMP team
    return load_checkpoint(path, expected_sha256=expected_sha256, expected_size=expected_size, embedder=embedder)


def _same(message: PolicyUpdated, version: int, sha256: str) -> bool:
    return message.version == version and message.sha256 == sha256


class PolicyUpdates:
    """The downloader: ``offer`` from any thread, ``take`` on the control thread, ``restore`` once at start-up."""

    def __init__(
        self,
        directory: str | os.PathLike,
        server_url: str,
        token: str,
        *,
        timeout_s: float = 30.0,
        attempts: int = 4,
        backoff: Optional[Backoff] = None,
        chunk_bytes: int = 1024 * 1024,
        embedder: Any = None,
        warm_prompts: Callable[[], Iterable[str]] = lambda: (),
        loader: Callable[..., Any] = _default_loader,
        transport: Optional[httpx.BaseTransport] = None,
        cameras: Optional[Iterable[str]] = None,
    ):
        self.directory = Path(directory)
        self.cameras = None if cameras is None else frozenset(cameras)  # what this robot records; None: unchecked
        self.directory.mkdir(parents=True, exist_ok=True)
        self.attempts = max(1, attempts)
        self.backoff = backoff or Backoff(1.0, 30.0)
        self.chunk_bytes = chunk_bytes
        self.embedder = embedder  # None: MiniLM, loaded only for a prompt the checkpoint does not carry
        self.warm_prompts = warm_prompts  # prompts to embed after loading, here rather than in the control loop
        self.loader = loader
        self.loaded_versions: list[int] = []  # every version parsed by this process, in order (tests, logs)
        self._transport = transport
        self._client = httpx.Client(
            base_url=server_url.rstrip("/"),
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout_s,
            transport=transport,
        )
        self._cond = threading.Condition()
        self._stopping = False
        self._seq = 0  # announcements received; the highest is the one that counts
        self._wanted: Optional[tuple[int, PolicyUpdated]] = None
        self._failed_seq = 0  # the announcement whose download was given up (a repeat of it retries)
        self._staged: Optional[LoadedPolicy] = None  # verified, waiting for the next episode boundary
        self._active: Optional[tuple[int, str]] = None  # (version, sha256) the control thread runs
        self._discard: list[Path] = []  # staged files superseded before they ran
        self._error: Optional[str] = None
        self._thread = threading.Thread(target=self._run, name="policy-download", daemon=True)

    # ------------------------------------------------------------ any thread

    def offer(self, message: PolicyUpdated) -> None:
        """The server announced ``message``: make it the policy of the next episode boundary that finds it ready."""
        with self._cond:
            if self._wanted is not None and self._wanted[1] == message and self._wanted[0] != self._failed_seq:
                return  # a repeat (reconnect) of what is already being fetched, staged or running
            self._seq += 1
            self._wanted = (self._seq, message)
            staged = self._staged
            if staged is not None and not _same(message, staged.version, staged.sha256):
                log.info("policy v%d superseded before it ran (the server now announces v%d)", staged.version,
                         message.version)
                self._staged = None
                self._discard.append(staged.path)
            self._cond.notify_all()

    @property
    def error(self) -> Optional[str]:
        """Why the latest announcement could not be loaded; None once a checkpoint is staged."""
        with self._cond:
            return self._error

    @property
    def staged_version(self) -> Optional[int]:
        with self._cond:
            return self._staged.version if self._staged else None

    # ------------------------------------------------------------ control thread

    def take(self) -> Optional[LoadedPolicy]:
        """The verified policy waiting for this episode boundary, once; None if there is none. It becomes the active
        policy and is kept on disk as ``current`` for the next start."""
        with self._cond:
            loaded, self._staged = self._staged, None
            if loaded is None:
                return None
            self._active = (loaded.version, loaded.sha256)
        current = self.directory / CURRENT
        try:  # a rename and a tiny file: cheap enough for an episode boundary
            os.replace(loaded.path, current)
            _write_json(self.directory / CURRENT_META,
                        {"version": loaded.version, "sha256": loaded.sha256, "size": loaded.size})
            loaded = dataclasses.replace(loaded, path=current)
        except OSError as exc:
            log.warning("could not keep policy v%d as %s: %s", loaded.version, current, exc)
        return loaded

    def restore(self) -> Optional[LoadedPolicy]:
        """At start-up, before ``start()``: the checkpoint the robot ran last, verified again; None if there is none
        or it is damaged (then it is removed)."""
        meta_path, path = self.directory / CURRENT_META, self.directory / CURRENT
        if not meta_path.exists() or not path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            version, sha256, size = int(meta["version"]), str(meta["sha256"]), int(meta["size"])
            checkpoint = self.loader(path, expected_sha256=sha256, expected_size=size, embedder=self.embedder)
            self._check_cameras(checkpoint.policy)
        except Exception as exc:  # CheckpointError, a damaged json, anything: start without it
            log.warning("not restoring the last policy from %s: %s", path, exc)
            for stale in (meta_path, path):
                stale.unlink(missing_ok=True)
            return None
        with self._cond:
            self._active = (version, sha256)
        self.loaded_versions.append(version)
        log.info("restored policy v%d from %s", version, path)
        return LoadedPolicy(version, sha256, size, checkpoint.policy, path)

    # ------------------------------------------------------------ lifecycle

    def start(self) -> "PolicyUpdates":
        # Left by an earlier run: downloads a crash interrupted, verified checkpoints that never got to run.
        for stale in [*self.directory.glob(".*.part"), *self.directory.glob("v*-*.safetensors")]:
            stale.unlink(missing_ok=True)
        self._thread.start()
        return self

    def stop(self, timeout: Optional[float] = None) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._client.close()

    # ------------------------------------------------------------ download thread

    def _run(self) -> None:
        handled = 0
        while True:
            with self._cond:
                while not (self._stopping or self._discard or self._new_since(handled)):
                    self._cond.wait()
                if self._stopping:
                    return
                discard, self._discard = self._discard, []
                job = None
                if self._new_since(handled):
                    seq, message = self._wanted
                    handled = seq
                    if self._active is not None and _same(message, *self._active):
                        log.info("policy v%d announced again: already running it", message.version)
                        self._error = None
                    else:
                        job = (seq, message)
            for path in discard:
                path.unlink(missing_ok=True)
            if job is not None:
                try:
                    self._fetch_and_stage(*job)
                except Exception:  # a bug must not end the thread: the next announcement gets a fresh try
                    log.exception("checkpoint download of v%d failed unexpectedly", job[1].version)

    def _new_since(self, handled: int) -> bool:
        return self._wanted is not None and self._wanted[0] != handled

    def _superseded(self, seq: int) -> bool:
        with self._cond:
            return self._stopping or self._wanted is None or self._wanted[0] != seq

    def _fetch_and_stage(self, seq: int, message: PolicyUpdated) -> None:
        self.backoff.reset()
        error = ""
        for attempt in range(1, self.attempts + 1):
            if self._superseded(seq):
                return
            try:
                loaded = self._fetch(seq, message)
            except _Superseded:
                log.info("download of policy v%d abandoned: superseded by a newer announcement, or shutting down",
                         message.version)
                return
            except DownloadError as exc:
                error = str(exc)
                log.warning("policy v%d: attempt %d of %d failed: %s", message.version, attempt, self.attempts, exc)
            else:
                with self._cond:
                    if self._stopping or self._wanted is None or self._wanted[0] != seq:
                        loaded.path.unlink(missing_ok=True)
                        return
                    self._staged, self._error = loaded, None
                log.info("policy v%d verified and loaded: it takes over at the next episode", message.version)
                return
            if attempt < self.attempts:
                delay = self.backoff.next_delay()
                with self._cond:
                    self._cond.wait_for(lambda: self._superseded_locked(seq), timeout=delay)
        with self._cond:
            if self._wanted is not None and self._wanted[0] == seq:
                self._failed_seq = seq
                self._error = f"v{message.version}: {error}"[:MAX_ERROR_CHARS]
        running = f"v{self._active[0]}" if self._active else "the current policy"
        log.error("policy v%d rejected after %d attempts (%s); keeping %s", message.version, self.attempts, error,
                  running)

    def _superseded_locked(self, seq: int) -> bool:
        return self._stopping or self._wanted is None or self._wanted[0] != seq

    def _fetch(self, seq: int, message: PolicyUpdated) -> LoadedPolicy:
        """One attempt: stream to a temp file while hashing, check size and sha256, parse. Cleans up on failure."""
        if not message.url.startswith("/") or message.url.startswith("//"):
            # The token goes only to our own server: an absolute URL could send it anywhere.
            raise DownloadError(f"checkpoint url {message.url!r} is not a path on the server")
        part = self.directory / f".v{message.version}.{os.getpid()}.part"
        final = self.directory / f"v{message.version}-{message.sha256[:12]}.safetensors"
        try:
            digest, received = hashlib.sha256(), 0
            with self._open(message.url) as response:
                with open(part, "wb") as fh:
                    for chunk in response.iter_bytes(self.chunk_bytes):
                        if self._superseded(seq):
                            raise _Superseded()
                        received += len(chunk)
                        if received > message.size:
                            raise DownloadError(f"more than the announced {message.size} bytes")
                        digest.update(chunk)
                        fh.write(chunk)
                    fh.flush()
                    os.fsync(fh.fileno())
            if received != message.size:
                raise DownloadError(f"truncated: {received} of {message.size} bytes")
            if digest.hexdigest() != message.sha256:
                raise DownloadError(f"sha256 {digest.hexdigest()} differs from the announced {message.sha256}")
            os.replace(part, final)
            try:
                checkpoint = self.loader(final, expected_sha256=message.sha256, expected_size=message.size,
                                         embedder=self.embedder)
            except Exception as exc:  # learner.checkpoints.CheckpointError and anything a broken file provokes
                raise DownloadError(f"not a loadable checkpoint: {exc}") from None
            if int(checkpoint.version) != message.version:
                raise DownloadError(f"the file holds v{checkpoint.version}, the server announced v{message.version}")
            self._check_cameras(checkpoint.policy)
            self.loaded_versions.append(message.version)
            self._warm(checkpoint.policy)
            return LoadedPolicy(message.version, message.sha256, message.size, checkpoint.policy, final)
        except httpx.HTTPError as exc:
            part.unlink(missing_ok=True)
            raise DownloadError(f"GET {message.url}: {type(exc).__name__}: {exc}") from None
        except BaseException:
            part.unlink(missing_ok=True)
            final.unlink(missing_ok=True)
            raise

    @contextlib.contextmanager
    def _open(self, url: str):
        """GET the checkpoint from our server; a redirect (object storage: a signed URL the bucket serves) is followed
        once, with a client that carries no token: the bytes are checked against the announced sha256 anyway, and
        the robot's credential never leaves for another host."""
        with self._client.stream("GET", url) as response:
            if response.status_code in (302, 303, 307) and "location" in response.headers:
                target = str(response.url.join(response.headers["location"]))
                if not target.startswith(("https://", "http://")):
                    raise DownloadError(f"GET {url}: redirected to {target!r}, not an http(s) URL")
                with httpx.Client(timeout=self._client.timeout, transport=self._transport) as plain:
                    with plain.stream("GET", target) as redirected:
                        if redirected.status_code != 200:
                            raise DownloadError(f"GET {url}: the storage answered HTTP {redirected.status_code}")
                        yield redirected
                return
            if response.status_code != 200:
                raise DownloadError(f"GET {url}: HTTP {response.status_code}")
            yield response

    def _check_cameras(self, policy) -> None:
        """A policy that reads a camera this robot does not record would fail at its first step: refuse it here, so
        the robot keeps what it runs and reports why (status.policy_error)."""
        wanted = tuple(getattr(getattr(policy, "config", None), "cameras", ()) or ())
        missing = [c for c in wanted if self.cameras is not None and c not in self.cameras]
        if missing:
            raise DownloadError(f"the policy reads cameras {list(wanted)}; this robot does not record {missing} "
                                f"(start it with --extra-cameras {','.join(missing)})")

    def _warm(self, policy) -> None:
        """Embed the assigned prompts now if the checkpoint lacks them: a miss would otherwise load the sentence
        encoder (seconds) inside the first control step of the next episode."""
        try:
            for prompt in self.warm_prompts():
                if prompt and prompt not in policy.prompts:
                    policy.prompts.get(prompt)
        except Exception as exc:
            log.warning("could not embed the assigned prompt ahead of time: %s", exc)


class LearnedPolicy(AgentProvider):
    """``--policy learned``: the newest verified checkpoint, swapped in only before an episode starts.

    Until the first checkpoint arrives the robot runs ``fallback`` (``--fallback expert``) or, with None, idles
    (``--fallback idle``, the honest default for a real robot).
    """

    def __init__(self, updates: PolicyUpdates, fallback: Optional[Agent] = None, execute_steps: int = 1):
        self.updates = updates
        self.fallback = fallback
        self.execute_steps = execute_steps
        self._agent: Optional[PolicyAgent] = None

    def restore(self) -> Optional[int]:
        """Start with the checkpoint kept from the last run, if any; returns its version."""
        loaded = self.updates.restore()
        if loaded is not None:
            self._agent = PolicyAgent(loaded.policy, loaded.version, self.execute_steps)
            return loaded.version
        return None

    def next_agent(self) -> Optional[Agent]:
        loaded = self.updates.take()
        if loaded is not None:
            previous = self._agent.name if self._agent else "nothing"
            self._agent = PolicyAgent(loaded.policy, loaded.version, self.execute_steps)
            log.info("policy v%d takes over from %s for this episode", loaded.version, previous)
        return self._agent if self._agent is not None else self.fallback

    @property
    def current(self) -> Optional[Agent]:
        return self._agent if self._agent is not None else self.fallback


def _write_json(path: Path, body: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(body))
    os.replace(tmp, path)
