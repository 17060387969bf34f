"""Records episodes: a subscriber that buffers every step, and a writer thread that spools finished episodes."""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable, Optional

import numpy as np

from robots import episode_file
from robots.protocol import CONTROL_SOURCE_CODES, ControlSource

from .runtime import Episode, EpisodeResult, Step, Subscriber
from .spool import Spool

log = logging.getLogger(__name__)


INITIAL_ROWS = 1024  # preallocated steps per episode; Meta-World episodes (<= 500 steps) never grow

_COLUMNS = ("images", "states", "actions", "control_source", "rewards", "successes", "timestamps")


class _Buffers:
    """Preallocated arrays for one episode, sized at its first step. Rows are only copied into (no per-step
    allocation); an episode longer than the preallocation doubles them, once per doubling."""

    def __init__(self, rows: int, step: Step, primary: str):
        image, state, action = step.observation["image"], step.observation["state"], step.decision.action
        self.images = np.empty((rows, *image.shape), dtype=np.uint8)
        self.cameras = {name: np.empty((rows, *frame.shape), dtype=np.uint8)
                        for name, frame in step.observation.get("cameras", {}).items() if name != primary}
        self.states = np.empty((rows, state.shape[0]), dtype=np.float32)
        self.actions = np.empty((rows, action.shape[0]), dtype=np.float32)
        self.control_source = np.empty(rows, dtype=np.uint8)
        self.rewards = np.empty(rows, dtype=np.float32)
        self.successes = np.empty(rows, dtype=bool)
        self.timestamps = np.empty(rows, dtype=np.float64)

    @property
    def rows(self) -> int:
        return self.actions.shape[0]

    def grow(self, rows: int) -> None:
        for name in _COLUMNS:
            old = getattr(self, name)
            new = np.empty((rows, *old.shape[1:]), dtype=old.dtype)
            new[: old.shape[0]] = old
            setattr(self, name, new)
        for name, old in self.cameras.items():
            self.cameras[name] = np.empty((rows, *old.shape[1:]), dtype=old.dtype)
            self.cameras[name][: old.shape[0]] = old


class EpisodeRecorder(Subscriber):
    """Buffers each step (a copy: the control thread's arrays may be reused) and, at the end, hands the episode to
    the spool writer. Runs of steps not driven by the policy become ``Segment``s (interventions)."""

    def __init__(self, writer: "SpoolWriter"):
        self.writer = writer
        self._buf: Optional[_Buffers] = None
        self._steps = 0
        self._segments: list[episode_file.Segment] = []

    def on_episode_start(self, episode: Episode) -> None:
        self._buf, self._steps, self._segments = None, 0, []

    def on_step(self, episode: Episode, step: Step) -> None:
        if self._buf is None:
            self._buf = _Buffers(max(1, min(episode.max_steps, INITIAL_ROWS)), step, episode.camera)
        t, b, decision = self._steps, self._buf, step.decision
        if t == b.rows:
            b.grow(min(2 * b.rows, max(episode.max_steps, 2 * b.rows)))
        b.images[t] = step.observation["image"]
        if b.cameras:
            frames = step.observation["cameras"]
            for name, column in b.cameras.items():
                column[t] = frames[name]
        b.states[t] = step.observation["state"]
        b.actions[t] = decision.action
        b.control_source[t] = CONTROL_SOURCE_CODES[ControlSource(decision.source)]
        b.rewards[t] = step.reward
        b.successes[t] = step.success
        b.timestamps[t] = step.timestamp
        self._steps = t + 1
        if decision.source != ControlSource.POLICY:
            last = self._segments[-1] if self._segments else None
            source = ControlSource(decision.source).value
            if (last is not None and last.end == t and last.source == source and last.operator == decision.operator
                    and last.lease == decision.lease):
                last.end = t + 1
            else:
                self._segments.append(episode_file.Segment(t, t + 1, source, decision.operator, decision.reason,
                                                           decision.lease))

    def on_episode_end(self, episode: Episode, result: EpisodeResult) -> None:
        if self._buf is None or self._steps == 0:
            log.info("episode %s ended before its first step: nothing to record", episode.id)
            return
        t, b = self._steps, self._buf
        self._buf = None  # the writer owns these arrays now
        data = episode_file.EpisodeData(
            meta={
                "episode_id": episode.id,
                "robot": episode.robot,
                "task": episode.task,
                "env_id": episode.env_id,
                "prompt": episode.prompt,
                "policy": episode.policy,
                "policy_version": -1 if episode.policy_version is None else episode.policy_version,
                "split": episode.split,
                "outcome": result.outcome.value,
                "outcome_source": result.outcome_source,
                "outcome_by": result.outcome_by,
                "success": result.success,
                "started_at": episode.started_at,
                "ended_at": result.ended_at,
                "control_hz": episode.control_hz,
                "camera": episode.camera,
            },
            images=b.images[:t],
            states=b.states[:t],
            actions=b.actions[:t],
            control_source=b.control_source[:t],
            rewards=b.rewards[:t],
            successes=b.successes[:t],
            timestamps=b.timestamps[:t],
            segments=list(self._segments),
            cameras={name: column[:t] for name, column in b.cameras.items()},
        )
        self.writer.submit(data)


class SpoolWriter:
    """A thread that writes finished episodes to the spool (payload, then sidecar) and announces each one.

    ``submit`` is called from the control thread at an episode boundary; it only blocks if ``max_backlog`` episodes
    are already waiting (a disk far too slow for the robot), which it logs, rather than dropping an episode.
    """

    def __init__(self, spool: Spool, on_spooled: Callable[[str], None] = lambda episode_id: None, max_backlog: int = 4):
        self.spool = spool
        self.on_spooled = on_spooled
        self._queue: queue.Queue[Optional[episode_file.EpisodeData]] = queue.Queue(maxsize=max_backlog)
        self._busy = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="spool-writer", daemon=True)

    def start(self) -> "SpoolWriter":
        self._thread.start()
        return self

    @property
    def backlog(self) -> int:
        """Episodes handed over but not yet complete in the spool."""
        with self._lock:
            return self._busy

    def submit(self, data: episode_file.EpisodeData) -> None:
        with self._lock:
            self._busy += 1
        try:
            self._queue.put_nowait(data)
        except queue.Full:
            log.warning("spool writer is %d episodes behind; the control loop waits for it", self._queue.maxsize)
            self._queue.put(data)

    def close(self, timeout: Optional[float] = None) -> None:
        """Write everything submitted so far, then stop the thread."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout)

    def _run(self) -> None:
        while (data := self._queue.get()) is not None:
            episode_id = data.meta["episode_id"]
            try:
                started = time.monotonic()
                episode_file.write_episode(self.spool.payload(episode_id), data)
                metadata = self.spool.seal(episode_id)
                log.info(
                    "spooled episode %s: %d steps, %.1f MB in %.2f s",
                    episode_id, data.steps, metadata["size"] / 1e6, time.monotonic() - started,
                )
            except Exception:
                log.exception("could not spool episode %s; it is lost", episode_id)
            else:
                self.on_spooled(episode_id)  # before the backlog drops, so spool_pending never undercounts
            finally:
                with self._lock:
                    self._busy -= 1
