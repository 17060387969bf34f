"""A human operator driving the robot from the console (docs/console.md, "The robot side").

``OperatorControl`` is the shared state: the asyncio thread writes it (takeover, release, e-stop latch, commands from
the websocket fallback and from the WebRTC data channel), the control thread reads one consistent ``ControlView`` per
step. Every method holds one lock for a few attribute assignments, so the control thread never waits on the network.

``OperatorGate`` is the OUTERMOST agent: it wraps whatever the provider chose (a fixed policy, a checkpoint, the
simulated operator's gate) like ``GatedProvider`` does for the simulated operator. While a lease is held it drives
with the operator's commands and never asks the inner agent (the human's action is executed; asking the policy would
only cost its inference time every step and let the simulated operator judge, and "take over", a robot a human is
driving). When the lease ends, the inner agent is told how many steps it missed (``Agent.skipped``): a learned policy
drops its queued action chunk and re-plans from the current observation, the simulated operator restarts its
progress window. A human takeover therefore overrides the simulated operator.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from typing import Callable, Optional

import numpy as np

from robots.protocol import DEADMAN_S, STALE_COMMAND_S, ControlSource

from .agents import Agent, Decision
from .environment import Observation
from .operator import GatedProvider

log = logging.getLogger(__name__)

ACCEPTED = "accepted"
DROP_REASONS = ("stale", "replayed", "not_holder")
TRACE_LEN = 1024  # accepted commands whose timing a "trace" request can ask for
DEFAULT_GRIP = -1.0  # before the first step of an episode: Meta-World's gripper starts open
DEADMAN_MARGIN_S = 0.001  # the deadman trips strictly after DEADMAN_S: wake this much later so the step sees it


@dataclasses.dataclass(frozen=True)
class ControlView:
    """What the control thread needs for one step, read under the lock at once."""

    lease: Optional[int]  # None: nobody holds the robot, the policy drives
    operator: str
    reason: str
    xyz: Optional[np.ndarray]  # the latest fresh motion command, None when there is none (hold still)
    grip: Optional[float]  # the operator's gripper setting, None until the operator sets it in this lease
    seq: Optional[int]  # seq of the command ``xyz`` comes from
    deadman: bool  # under a lease, and no accepted command or keepalive for DEADMAN_S
    estopped: bool
    silent_s: float = 0.0  # under a lease: seconds since the last accepted command or keepalive (or the takeover)


class OperatorControl:
    """Thread-safe operator state. ``clock`` is monotonic seconds (deadman, ages), ``wall`` unix seconds (the ``t`` of
    commands is the robot's unix milliseconds, so the staleness check needs the wall clock)."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 deadman_s: float = DEADMAN_S, stale_s: float = STALE_COMMAND_S):
        self._clock = clock
        self._wall = wall
        self.deadman_s = deadman_s
        self.stale_s = stale_s
        self._lock = threading.Lock()
        self._lease: Optional[int] = None
        self._operator = ""
        self._reason = ""
        self._since = 0.0  # monotonic time of the takeover: the deadman runs from here until the first command
        self._alive = 0.0  # monotonic time of the last accepted command or keepalive
        self._moved = 0.0  # monotonic time of the last accepted command with an action
        self._xyz: Optional[np.ndarray] = None
        self._grip: Optional[float] = None
        self._seq = -1  # last accepted seq of this lease
        self._xyz_seq: Optional[int] = None
        self.applied_seq: Optional[int] = None  # seq of the command the last executed step used (control thread)
        # Latency instrumentation (benchmarks/console_latency.py), robot unix ms: when the newest command was accepted
        # and when a control step first executed it; how long after the last command the deadman last held still.
        self.accepted_seq: Optional[int] = None
        self.accepted_t: Optional[float] = None
        self.applied_t: Optional[float] = None
        self.deadman_reaction_ms: Optional[float] = None
        self._trace: collections.OrderedDict[int, float] = collections.OrderedDict()  # seq -> accepted_t
        self._applied: collections.deque[tuple[int, float]] = collections.deque(maxlen=TRACE_LEN)  # (seq, first step t)
        self._estopped = False
        self._estopped_by = ""
        self._estop_seq: Optional[int] = None  # seq of the last server control.estop applied
        self._estop_local = False  # latched here (data channel) and not yet acknowledged by the server
        self.dropped = {reason: 0 for reason in DROP_REASONS}  # since start, by reason
        self.accepted = 0
        # Called after a lease starts (any thread, must return at once): the agent sets it to ``Runtime.wake`` so the
        # control loop, asleep until its next tick, re-plans its wait around the new lease's deadman.
        self.on_lease: Callable[[], None] = lambda: None

    # ------------------------------------------------------------ asyncio thread (or any)

    def takeover(self, lease: int, operator: str, reason: str = "") -> None:
        """Start obeying ``lease``. The same lease again (the server re-sends it after a reconnect) keeps its state."""
        with self._lock:
            if lease == self._lease:
                self._operator, self._reason = operator, reason
                return
            now = self._clock()
            self._lease, self._operator, self._reason = lease, operator, reason
            self._since = self._alive = now
            self._moved = float("-inf")
            self._xyz, self._grip, self._seq, self._xyz_seq = None, None, -1, None
        log.info("operator %s takes over (lease %d): %s", operator, lease, reason or "no reason given")
        self.on_lease()

    def release(self, lease: Optional[int] = None, reason: str = "") -> bool:
        """End ``lease`` (None: whatever lease is held). A release of another lease is ignored (False)."""
        with self._lock:
            if self._lease is None or (lease is not None and lease != self._lease):
                return False
            old, operator = self._lease, self._operator
            self._lease, self._operator, self._reason = None, "", ""
            self._xyz, self._grip, self._xyz_seq = None, None, None
        log.info("lease %d of %s ended (%s): the policy drives again", old, operator, reason or "released")
        return True

    def estop(self, engaged: bool, by: str = "") -> None:
        """Set the latch unconditionally (tests, and the runtime's own view)."""
        with self._lock:
            self._estopped, self._estopped_by = bool(engaged), (by if engaged else "")

    def estop_from_server(self, engaged: bool, by: str, seq: int) -> bool:
        """Apply a server ``control.estop``; returns whether the latch is now as it says.

        An engage always latches (and acknowledges a local latch). A clear is ignored when it is older than the last
        change applied (a re-send that crossed a newer one), and while the latch is local: the operator who hit the
        e-stop on this robot's data channel did so after any clear the server could have sent, so only a clear of
        the server's own, acknowledged, latch counts. Fail safe: when in doubt, stay stopped."""
        with self._lock:
            if engaged:
                self._estopped, self._estopped_by = True, by or self._estopped_by
                self._estop_local = False
                self._estop_seq = max(seq, self._estop_seq or 0)
                return True
            if self._estop_local or (self._estop_seq is not None and seq < self._estop_seq):
                return False
            self._estopped, self._estopped_by, self._estop_seq = False, "", seq
            return True

    def estop_local(self, by: str) -> None:
        """Latch from the robot side (a data channel e-stop): reported as local until the server acknowledges it."""
        with self._lock:
            if not self._estopped:
                self._estop_local = True
            self._estopped, self._estopped_by = True, by

    def estop_report(self) -> tuple[bool, Optional[int], bool, str]:
        """(latched, seq of the last server change applied, latched locally, by) for the status heartbeat."""
        with self._lock:
            return self._estopped, self._estop_seq, self._estop_local, self._estopped_by

    def command(self, seq: int, t_ms: float, action: Optional[list[float]] = None, grip: Optional[float] = None, *,
                via: str = "ws", session_user: Optional[str] = None, lease: Optional[int] = None) -> str:
        """One teleop command (``action`` None: a keepalive). Returns ``"accepted"`` or the drop reason.

        Accepted only under a lease, from the lease holder: the data channel passes ``session_user`` (the console user
        the server authenticated for the WebRTC session), the websocket fallback passes the ``lease`` id. Dropped: not
        from the holder (``not_holder``), ``seq`` not above the last accepted one of this lease (``replayed``: replay
        or out of order), ``t`` (robot unix ms) older than ``STALE_COMMAND_S`` (``stale``)."""
        now, wall_ms = self._clock(), self._wall() * 1000.0
        with self._lock:
            if self._lease is None or (session_user is not None and session_user != self._operator) or (
                    session_user is None and lease != self._lease):
                return self._drop("not_holder")
            if seq <= self._seq:
                return self._drop("replayed")
            if wall_ms - t_ms > self.stale_s * 1000.0:
                return self._drop("stale")
            self._seq = seq
            self._alive = now
            self.accepted_seq, self.accepted_t = seq, wall_ms
            self._trace[seq] = round(wall_ms, 2)
            if len(self._trace) > TRACE_LEN:
                self._trace.popitem(last=False)
            if action is not None:
                self._xyz = np.clip(np.asarray(action, dtype=np.float32)[:3], -1.0, 1.0)
                self._moved, self._xyz_seq = now, seq
            if grip is not None:
                self._grip = float(np.clip(grip, -1.0, 1.0))
            self.accepted += 1
        return ACCEPTED

    def traced(self, seq: int) -> tuple[Optional[float], Optional[float]]:
        """Robot unix ms when command ``seq`` (one of the last TRACE_LEN) was accepted, and when a control step first
        executed it or a newer command (at 20 Hz of commands and 10 Hz of control, half are superseded unexecuted)."""
        with self._lock:
            applied = next((t for s, t in self._applied if s >= seq), None)
            return self._trace.get(seq), applied

    def mark_applied(self, seq: int, wall_ms: float) -> None:
        with self._lock:
            self._applied.append((seq, round(wall_ms, 2)))

    def _drop(self, reason: str) -> str:
        self.dropped[reason] += 1
        return reason

    # ------------------------------------------------------------ control thread (or any)

    def view(self) -> ControlView:
        now = self._clock()
        with self._lock:
            if self._lease is None:
                return ControlView(None, "", "", None, None, None, False, self._estopped)
            silent = now - self._alive
            deadman = silent > self.deadman_s
            # A motion command lives DEADMAN_S: keepalives keep the deadman off but never stretch an old motion (the
            # data channel does not retransmit, so a lost "stop" must not leave the robot moving).
            fresh = self._xyz is not None and now - self._moved <= self.deadman_s and not deadman
            return ControlView(
                self._lease, self._operator, self._reason, self._xyz.copy() if fresh else None, self._grip,
                self._xyz_seq if fresh else None, deadman, self._estopped, silent,
            )

    def deadman_due_in(self) -> Optional[float]:
        """Under a lease: seconds until the deadman trips (<= 0 once it has), None without a lease. The runtime wakes
        the control loop then (``OperatorGate.due_in``) instead of at its next tick, so the robot holds still
        ~DEADMAN_S after the last command at any control rate (at 10 Hz a tick-bound deadman reacts after up to
        DEADMAN_S + 100 ms)."""
        now = self._clock()
        with self._lock:
            if self._lease is None:
                return None
            return self._alive + self.deadman_s - now + DEADMAN_MARGIN_S

    @property
    def lease(self) -> Optional[int]:
        return self._lease

    @property
    def operator(self) -> str:
        return self._operator

    @property
    def estopped(self) -> bool:
        return self._estopped

    def deadman(self) -> bool:
        return self.view().deadman

    def last_command_age_ms(self) -> Optional[float]:
        """Age of the last accepted command or keepalive under the current lease; None without a lease or command."""
        now = self._clock()
        with self._lock:
            if self._lease is None or self._seq < 0:
                return None
            return round((now - self._alive) * 1000.0, 1)

    def hud(self) -> dict:
        """The data channel's ``hud`` message without ``step`` and ``video_fps`` (webrtc.py adds those)."""
        view = self.view()
        with self._lock:
            dropped = {"stale": self.dropped["stale"], "replayed": self.dropped["replayed"]}
            estopped_by = self._estopped_by
        return {
            "type": "hud",
            "deadman": view.deadman,
            "lease": view.lease,
            "operator": view.operator,
            "estopped": view.estopped,
            "estopped_by": estopped_by,
            "last_command_age_ms": self.last_command_age_ms(),
            "applied_seq": self.applied_seq,
            "applied_t": self.applied_t,
            "accepted_seq": self.accepted_seq,
            "accepted_t": self.accepted_t,
            "deadman_reaction_ms": self.deadman_reaction_ms,
            "dropped": dropped,
        }


class OperatorGate(Agent):
    """The outermost agent: the human operator's commands while a lease is held, else the inner agent.

    Under a lease every step is ``Decision([dx, dy, dz, grip], OPERATOR, operator, reason)``: xyz from the latest fresh
    command (zeros before the first one, and once the deadman trips), grip at the last executed gripper value until
    the operator sets one (Meta-World actions are hand velocities and the gripper a position target: no jump)."""

    def __init__(self, inner: Optional[Agent], control: OperatorControl, action_dim: int = 4):
        self.inner = inner
        self.control = control
        self.action_dim = action_dim
        self._last_grip = DEFAULT_GRIP
        self._driven = 0  # steps driven by the operator since the inner agent last acted
        self.operated_steps = 0  # in the current episode
        self._was_deadman = False

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.inner.name if self.inner is not None else ""

    @property
    def policy_version(self) -> Optional[int]:  # type: ignore[override]
        return self.inner.policy_version if self.inner is not None else None

    def reset(self, env_id: str, prompt: str) -> None:
        if self.inner is None:
            raise RuntimeError("the operator gate has no inner agent (OperatorProvider sets it before each episode)")
        self.inner.reset(env_id, prompt)
        self._last_grip = DEFAULT_GRIP
        self._driven = 0
        self.operated_steps = 0

    def due_in(self) -> Optional[float]:
        """A step is due when the deadman trips (once per silence: the step that holds still), else whatever the
        inner agent says."""
        due = self.control.deadman_due_in()
        if due is None:
            return self.inner.due_in() if self.inner is not None else None
        if due <= 0 and self._was_deadman:
            return None  # already holding still: the normal schedule goes on
        return due

    def act(self, observation: Observation) -> Decision:
        view = self.control.view()
        if view.lease is None:
            self._was_deadman = False
            if self._driven:
                self.inner.skipped(self._driven)
                self._driven = 0
            decision = self.inner.act(observation)
        else:
            action = np.zeros(self.action_dim, dtype=np.float32)
            if view.xyz is not None:
                action[:3] = view.xyz
            action[3] = view.grip if view.grip is not None else self._last_grip
            if view.seq is not None and view.seq != self.control.applied_seq:
                self.control.applied_t = time.time() * 1000.0
                self.control.mark_applied(view.seq, self.control.applied_t)
            self.control.applied_seq = view.seq
            if view.deadman and not self._was_deadman:
                self.control.deadman_reaction_ms = round(view.silent_s * 1000.0, 1)
            self._was_deadman = view.deadman
            self._driven += 1
            self.operated_steps += 1
            decision = Decision(action, ControlSource.OPERATOR, view.operator, view.reason, view.lease)
        if len(decision.action) > 3:
            self._last_grip = float(decision.action[3])
        return decision


# The human operator's gate goes in front of the provider's choice exactly like the simulated operator's.
OperatorProvider = GatedProvider
