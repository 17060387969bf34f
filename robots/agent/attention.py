"""Asking for help: the robot's own detectors decide when an operator should look (docs/console.md, "Help queue").

``HelpMonitor`` watches the episode loop (a ``Subscriber``, so it costs the control thread a few array operations a
step) and raises a help request when, while the policy drives,
- **stall**: the hand has moved less than ``still_m`` net over the last ``stall_steps`` steps (proprioception only:
  what a real robot's joint encoders give; never the simulator's object state), or
- **uncertainty**: the policy's own re-plans disagree with each other (``Decision.uncertainty``: the mean distance
  between a new action chunk and the one it replaces, over the steps they share) by more than ``uncertainty`` on
  average over ``stall_steps`` steps; off unless set (``--help-uncertainty``).
The request (``protocol.HelpSignal``) carries the robot's last ``MAX_HELP_TRACE`` steps (hand, gripper, action,
driver) so the operator sees how it got there, and is repeated in every heartbeat until an operator takes over (the
takeover answers it), the episode ends, or the robot no longer needs it (a stall: the hand moves again). One request
per episode at most: after an operator has answered, the robot does not ask again in the same episode.

A physical help button talks to the server directly (``python -m robots.agent.help``, the robot API), not through this.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
import uuid
from typing import Any, Callable, Optional

import numpy as np

from robots.protocol import MAX_HELP_TRACE, ControlSource

from .runtime import Episode, EpisodeResult, Step, Subscriber

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class HelpRule:
    stall: bool = True  # the stall detector (uncertainty has its own switch: a threshold above 0)
    # The window: 1.5 s at 10 Hz. Measured on a base policy (benchmarks/results/help_detector.json, 100 episodes, 58
    # failures): 15 steps fired in 42 episodes, all of which then failed (precision 1.0, recall 0.72, a median 57 steps
    # before the end); 30 steps: precision 1.0, recall 0.34.
    stall_steps: int = 15
    still_m: float = 0.01  # net hand motion over the window below this (metres) is a stall
    uncertainty: float = 0.0  # mean re-plan disagreement over the window above this asks for help; 0: off
    urgency: int = 2

    def __post_init__(self):
        if self.stall_steps < 2 or self.still_m < 0 or self.uncertainty < 0 or not 1 <= self.urgency <= 3:
            raise ValueError("stall_steps must be >= 2, still_m and uncertainty >= 0, urgency 1..3")


class HelpMonitor(Subscriber):
    """See the module. ``current()`` (any thread) is the request to put in the next heartbeat, or None."""

    def __init__(self, rule: HelpRule = HelpRule(), clock: Callable[[], float] = time.time,
                 on_change: Callable[[], None] = lambda: None):
        self.rule = rule
        self.clock = clock
        self.on_change = on_change  # called (on the control thread) when the request appears or goes: send a status
        self._lock = threading.Lock()
        self._signal: Optional[dict[str, Any]] = None
        self.raised = 0  # requests since start
        self._reset()

    def _reset(self) -> None:
        self._hands: collections.deque[np.ndarray] = collections.deque(maxlen=self.rule.stall_steps)
        self._doubts: collections.deque[float] = collections.deque(maxlen=self.rule.stall_steps)
        self._trace: collections.deque[tuple] = collections.deque(maxlen=MAX_HELP_TRACE)
        self._asked = False  # this episode: one request at most
        self._answered = False

    def current(self) -> Optional[dict[str, Any]]:
        with self._lock:
            return self._signal

    def _set(self, signal: Optional[dict[str, Any]]) -> None:
        with self._lock:
            changed, self._signal = self._signal is not signal, signal
        if changed:
            self.on_change()

    def on_episode_start(self, episode: Episode) -> None:
        self._reset()
        self._set(None)

    def on_episode_end(self, episode: Episode, result: EpisodeResult) -> None:
        self._set(None)

    def on_step(self, episode: Episode, step: Step) -> None:
        state = np.asarray(step.observation["state"], dtype=np.float64)
        hand, grip = state[0:3], float(state[3]) if state.shape[0] > 3 else 0.0
        source = ControlSource(step.decision.source)
        action = np.asarray(step.decision.action, dtype=np.float64)
        self._trace.append((step.timestamp, hand.copy(), grip, action[:8].copy(), source.value))
        if source != ControlSource.POLICY:
            # Someone else drives. A human's takeover answers the request (the server linked it to the lease).
            if source == ControlSource.OPERATOR and self._signal is not None:
                self._answered = True
                self._set(None)
            self._hands.clear()
            self._doubts.clear()
            return
        self._hands.append(hand.copy())
        doubt = getattr(step.decision, "uncertainty", None)
        if doubt is not None:
            self._doubts.append(float(doubt))
        full = len(self._hands) == self._hands.maxlen
        moved = float(np.linalg.norm(self._hands[-1] - self._hands[0])) if full else float("inf")
        if self._signal is not None:
            if self._signal["kind"] == "stall" and moved >= self.rule.still_m * 2:
                log.info("the hand moves again (%.3f m): help request withdrawn", moved)
                self._set(None)
            return
        if self._asked or self._answered:
            return
        if self.rule.stall and full and moved < self.rule.still_m:
            self._raise(step, "stall", f"hand moved {moved * 100:.1f} cm in the last {len(self._hands)} steps "
                                       f"while the policy drove")
        elif (self.rule.uncertainty > 0 and len(self._doubts) == self._doubts.maxlen
              and float(np.mean(self._doubts)) > self.rule.uncertainty):
            self._raise(step, "uncertainty", f"the policy's re-plans disagree by {np.mean(self._doubts):.2f} on "
                                             f"average over {len(self._doubts)} steps")

    def _raise(self, step: Step, kind: str, reason: str) -> None:
        self._asked = True
        self.raised += 1
        now = step.timestamp
        trace = [{"t": round(min(t - now, 0.0), 3), "hand": [round(float(v), 4) for v in h],
                  "grip": round(float(g), 4), "action": [round(float(v), 3) for v in a], "driver": d}
                 for t, h, g, a, d in self._trace if now - t <= 600]
        signal = {"id": str(uuid.uuid4()), "kind": kind, "reason": reason[:200], "urgency": self.rule.urgency,
                  "since": round(self.clock(), 3), "step": step.index, "trace": trace}
        log.warning("asking for help at step %d: %s", step.index, reason)
        self._set(signal)


class LastStep(Subscriber):
    """The last control step's proprioception, action and driver, for the console's live plot (the data channel's
    hud, every 100 ms). One tuple assignment per step: the asyncio thread reads a consistent one."""

    def __init__(self):
        self._last: Optional[tuple] = None

    def on_step(self, episode: Episode, step: Step) -> None:
        state = step.observation["state"]
        self._last = (state[0:3], state[3] if len(state) > 3 else 0.0, step.decision.action,
                      ControlSource(step.decision.source).value)

    def hud(self) -> dict[str, Any]:
        last = self._last
        if last is None:
            return {}
        hand, grip, action, driver = last
        return {"hand": [round(float(v), 4) for v in hand], "grip": round(float(grip), 4),
                "action": [round(float(v), 3) for v in list(action)[:8]], "driver": driver}
