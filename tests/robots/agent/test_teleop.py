"""A human operator in the console: command drop rules, the deadman, the gripper hold, the operator gate in a real
runtime (recorded as operator steps), the e-stop and operator labels (docs/console.md, "The robot side")."""

import threading
import time

import numpy as np
import pytest

from robots import episode_file
from robots.agent.agents import Agent, Decision, RandomAgent
from robots.agent.recorder import EpisodeRecorder, SpoolWriter
from robots.agent.runtime import FixedAgent, Runtime, Subscriber
from robots.agent.spool import Spool
from robots.agent.teleop import ACCEPTED, OperatorControl, OperatorGate, OperatorProvider
from robots.protocol import ControlSource, Outcome, RobotState

from .conftest import Collector, FakeEnvironment, assignment


class Clocks:
    """A monotonic clock and a wall clock that tests move by hand."""

    def __init__(self):
        self.mono = 100.0
        self.unix = 1_700_000_000.0

    def advance(self, seconds: float):
        self.mono += seconds
        self.unix += seconds

    @property
    def ms(self) -> float:
        return self.unix * 1000.0


@pytest.fixture
def clocks():
    return Clocks()


@pytest.fixture
def control(clocks):
    return OperatorControl(clock=lambda: clocks.mono, wall=lambda: clocks.unix)


def test_commands_count_only_from_the_lease_holder(control, clocks):
    assert control.command(1, clocks.ms, [0.1, 0, 0], session_user="alice") == "not_holder"  # nobody holds it
    control.takeover(7, "alice", "stuck at the drawer")
    assert control.command(1, clocks.ms, [0.1, 0, 0], session_user="bob") == "not_holder"
    assert control.command(1, clocks.ms, [0.1, 0, 0], lease=6) == "not_holder"  # websocket path: an old lease id
    assert control.command(1, clocks.ms, [0.1, 0, 0], lease=7) == ACCEPTED
    assert control.command(2, clocks.ms, [0.2, 0, 0], session_user="alice") == ACCEPTED
    assert control.dropped["not_holder"] == 3 and control.accepted == 2
    np.testing.assert_allclose(control.view().xyz, [0.2, 0, 0])


def test_replayed_out_of_order_and_stale_commands_are_dropped(control, clocks):
    control.takeover(1, "alice")
    assert control.command(5, clocks.ms, [0.5, 0, 0], session_user="alice") == ACCEPTED
    assert control.command(5, clocks.ms, [0.9, 0, 0], session_user="alice") == "replayed"  # the same seq again
    assert control.command(3, clocks.ms, [0.9, 0, 0], session_user="alice") == "replayed"  # out of order
    assert control.command(6, clocks.ms - 501, [0.9, 0, 0], session_user="alice") == "stale"  # older than 0.5 s
    assert control.command(7, clocks.ms - 400, [0.1, 0, 0], session_user="alice") == ACCEPTED  # late but fresh
    assert control.dropped == {"stale": 1, "replayed": 2, "not_holder": 0}
    np.testing.assert_allclose(control.view().xyz, [0.1, 0, 0])
    assert control.view().seq == 7


def test_a_new_lease_starts_a_new_sequence_but_the_same_lease_again_keeps_it(control, clocks):
    control.takeover(1, "alice")
    assert control.command(10, clocks.ms, [0.5, 0, 0], session_user="alice") == ACCEPTED
    control.takeover(1, "alice")  # the server re-sends the takeover after a reconnect
    assert control.command(10, clocks.ms, [0.5, 0, 0], session_user="alice") == "replayed"
    assert control.release(2) is False and control.lease == 1  # a release of another lease is ignored
    control.takeover(2, "bob")  # a forced takeover: bob's commands start at any seq
    assert control.command(1, clocks.ms, [0, 0.5, 0], session_user="bob") == ACCEPTED
    assert control.command(11, clocks.ms, [0, 0.5, 0], session_user="alice") == "not_holder"
    assert control.release(2) is True and control.lease is None and control.view().lease is None


def test_the_deadman_holds_still_after_250_ms_and_lets_go_when_commands_resume(control, clocks):
    control.takeover(1, "alice")
    view = control.view()
    assert view.xyz is None and not view.deadman  # holding still until the first command
    clocks.advance(0.26)
    assert control.view().deadman  # no command since the takeover
    assert control.command(1, clocks.ms, [0.3, -0.3, 0.1], session_user="alice") == ACCEPTED
    view = control.view()
    assert not view.deadman and view.xyz is not None
    clocks.advance(0.2)
    assert not control.view().deadman and control.view().xyz is not None
    clocks.advance(0.06)  # 260 ms after the last command
    view = control.view()
    assert view.deadman and view.xyz is None
    assert control.last_command_age_ms() == pytest.approx(260, abs=1)
    assert control.command(2, clocks.ms, [0.3, 0, 0], session_user="alice") == ACCEPTED
    view = control.view()
    assert not view.deadman
    np.testing.assert_allclose(view.xyz, [0.3, 0, 0])


def test_keepalives_keep_the_deadman_off_but_never_stretch_a_motion(control, clocks):
    control.takeover(1, "alice")
    control.command(1, clocks.ms, [1.0, 0, 0], session_user="alice")
    for seq in range(2, 6):
        clocks.advance(0.1)
        assert control.command(seq, clocks.ms, None, session_user="alice") == ACCEPTED  # keepalive
    view = control.view()
    # 400 ms after the motion command: a lost "stop" on the unreliable channel must not leave the robot moving.
    assert not view.deadman and view.xyz is None


class GripAgent(Agent):
    """A policy whose gripper setting is known, and which remembers being skipped."""

    name = "grip-policy"

    def __init__(self, grip=0.7):
        self.grip = grip
        self.acts = 0
        self.skips = []

    def reset(self, env_id, prompt):
        pass

    def act(self, observation):
        self.acts += 1
        return Decision(np.array([0.5, 0.5, 0.5, self.grip], dtype=np.float32))

    def skipped(self, steps):
        self.skips.append(steps)


def test_the_gate_drives_under_a_lease_holds_the_grip_and_hands_back(control, clocks):
    policy = GripAgent(grip=0.7)
    gate = OperatorGate(policy, control)
    gate.reset("fake-v0", "")
    obs = {"state": np.zeros(39, np.float32)}

    assert gate.act(obs).source == ControlSource.POLICY
    control.takeover(3, "alice", "drawer stuck")
    d = gate.act(obs)  # before the first command: hold still, keep the policy's grip
    assert (d.source, d.operator, d.reason) == (ControlSource.OPERATOR, "alice", "drawer stuck")
    np.testing.assert_allclose(d.action, [0, 0, 0, 0.7])
    control.command(1, clocks.ms, [0.2, -0.4, 1.0], session_user="alice")
    np.testing.assert_allclose(gate.act(obs).action, [0.2, -0.4, 1.0, 0.7])  # grip held at the last executed value
    control.command(2, clocks.ms, [0.2, 0, 0], grip=-1.0, session_user="alice")
    np.testing.assert_allclose(gate.act(obs).action, [0.2, 0, 0, -1.0])
    control.command(3, clocks.ms, [0, 0, 0.1], session_user="alice")  # no grip: the operator's setting stays
    np.testing.assert_allclose(gate.act(obs).action, [0, 0, 0.1, -1.0])
    assert control.applied_seq == 3
    assert policy.acts == 1  # never asked while the human drove
    control.release(3)
    assert gate.act(obs).source == ControlSource.POLICY
    assert policy.skips == [4] and policy.acts == 2


class At(Subscriber):
    """Runs ``actions[step]`` on the control thread right after that step (a console message arriving then)."""

    def __init__(self, actions):
        self.actions = actions

    def on_step(self, episode, step):
        if step.index in self.actions:
            self.actions[step.index]()


def test_operator_steps_are_recorded_as_operator_interventions(tmp_path):
    control = OperatorControl()
    env = FakeEnvironment()
    writer = SpoolWriter(Spool(tmp_path / "spool")).start()
    collector = Collector()
    now_ms = lambda: time.time() * 1000.0  # noqa: E731
    script = At({
        4: lambda: control.takeover(1, "alice", "policy stalled"),
        5: lambda: control.command(1, now_ms(), [0.1, 0.2, 0.3], grip=1.0, session_user="alice"),
        9: lambda: control.release(1, "released"),
    })
    provider = OperatorProvider(FixedAgent(RandomAgent(seed=0)), OperatorGate(None, control))
    runtime = Runtime(lambda env_id: env, provider, [collector, script, EpisodeRecorder(writer)], control_hz=1000.0)
    runtime.run_episode(assignment(max_steps=14))
    writer.close()

    driven = [(ControlSource(s.decision.source), s.decision.operator) for s in collector.steps]
    assert driven == [(ControlSource.POLICY, "")] * 5 + [(ControlSource.OPERATOR, "alice")] * 5 + [
        (ControlSource.POLICY, "")] * 4
    np.testing.assert_allclose(env.actions[6], [0.1, 0.2, 0.3, 1.0])
    (path,) = (tmp_path / "spool").glob("*.h5")
    with episode_file.EpisodeReader(path) as reader:
        segments = reader.meta["segments"]
        sources = reader.column("control_source")
        assert reader.meta["policy"] == "random"
    assert [(s.start, s.end, s.source, s.operator, s.reason) for s in segments] == [
        (5, 10, "operator", "alice", "policy stalled")]
    assert list(sources[5:10]) == [1] * 5


def run_in_thread(runtime):
    thread = threading.Thread(target=runtime.run, daemon=True)
    thread.start()
    return thread


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.002)
    return False


def test_the_estop_ends_the_episode_as_aborted_at_once_and_blocks_new_ones_until_cleared(collector):
    env = FakeEnvironment()
    # Long period and idle poll, so "at once" is told apart from "at the next tick" even on a loaded machine.
    runtime = Runtime(lambda env_id: env, RandomAgent(seed=0), [collector], control_hz=0.5, idle_poll_s=3.0)
    runtime.assign(assignment(max_steps=100))
    thread = run_in_thread(runtime)
    try:
        assert wait_for(lambda: len(collector.steps) >= 1)  # the first step runs at once; the next in 2 s
        started = time.monotonic()
        runtime.estop(True, "alice")
        assert wait_for(lambda: len(collector.ended) == 1, timeout=4.0)
        assert time.monotonic() - started < 1.0  # woke at once, not after the 2 s period
        episode, result = collector.ended[0]
        assert result.outcome == Outcome.ABORTED and result.steps == 1 and len(env.actions) == 1  # nothing moved
        snap = runtime.snapshot()
        assert snap.state == RobotState.ESTOPPED and snap.estopped and snap.estopped_by == "alice"
        time.sleep(3.5)  # longer than the idle poll: still no new episode
        assert len(collector.started) == 1 and runtime.snapshot().state == RobotState.ESTOPPED
        cleared = time.monotonic()
        runtime.estop(False, "alice")
        assert wait_for(lambda: len(collector.started) == 2, timeout=4.0)
        assert time.monotonic() - cleared < 1.5  # the idle wait (3 s) wakes at once too
        assert runtime.snapshot().state == RobotState.RUNNING and not runtime.snapshot().estopped
    finally:
        runtime.stop()
        thread.join(5)
    assert not thread.is_alive()


def test_the_deadman_wakes_the_control_loop_instead_of_waiting_for_the_next_tick(collector):
    """At 1 Hz a tick-bound deadman would hold still only at the next tick, 0.75-1 s after the last command; the
    control loop wakes when the deadman trips (~250 ms), takes that step early and keeps a period between steps."""
    env = FakeEnvironment()
    control = OperatorControl()
    gate = OperatorGate(GripAgent(), control)
    runtime = Runtime(lambda env_id: env, gate, [collector], control_hz=1.0)
    control.on_lease = runtime.wake
    runtime.assign(assignment(max_steps=100))
    thread = run_in_thread(runtime)
    try:
        assert wait_for(lambda: len(collector.steps) >= 1)  # the first step runs at once: the next is due in 1 s
        control.takeover(1, "alice")  # between ticks
        last = time.monotonic()
        assert control.command(1, time.time() * 1000.0, [1.0, 0, 0], session_user="alice") == ACCEPTED
        assert wait_for(lambda: len(collector.steps) >= 2, timeout=3.0)
        held = time.monotonic()
        step = collector.steps[1]
        assert step.decision.source == ControlSource.OPERATOR
        np.testing.assert_allclose(step.decision.action[:3], 0.0)  # the deadman's step: holding still
        assert held - last < 0.75  # woke with the deadman, not at the 1 Hz tick ~0.9 s after the command
        assert control.deadman_reaction_ms is not None and control.deadman_reaction_ms >= 250.0
        assert wait_for(lambda: len(collector.steps) >= 3, timeout=3.0)
        assert collector.steps[2].timestamp - collector.steps[1].timestamp >= 0.99  # re-anchored: no burst after the early tick
        assert gate.due_in() is None  # already holding still: no more early ticks
    finally:
        runtime.stop()
        thread.join(5)
    assert not thread.is_alive()


def test_a_label_ends_the_episode_with_the_operators_outcome(tmp_path, collector):
    env = FakeEnvironment()
    writer = SpoolWriter(Spool(tmp_path / "spool")).start()
    runtime = Runtime(lambda env_id: env, RandomAgent(seed=0), [collector, EpisodeRecorder(writer)], control_hz=0.5)
    runtime.assign(assignment(max_steps=100))
    thread = run_in_thread(runtime)
    try:
        assert wait_for(lambda: len(collector.steps) >= 1)
        episode = collector.started[0]
        assert runtime.label("failure", "bob", "00000000-0000-4000-8000-000000000000") is False  # another episode
        started = time.monotonic()
        assert runtime.label("success", "alice", episode.id) is True
        assert wait_for(lambda: len(collector.ended) >= 1, timeout=4.0)
        assert time.monotonic() - started < 1.0  # at once, not after the 2 s period
    finally:
        runtime.stop()
        thread.join(5)
    writer.close()
    _, result = collector.ended[0]
    assert (result.outcome, result.outcome_source, result.outcome_by) == (Outcome.SUCCESS, "operator", "alice")
    assert result.steps == 1 and not result.success  # the operator's verdict, not the environment's flag
    with episode_file.EpisodeReader(tmp_path / "spool" / f"{episode.id}.h5") as reader:
        meta = reader.meta
    assert (meta["outcome"], meta["outcome_source"], meta["outcome_by"]) == ("success", "operator", "alice")


def test_labels_are_only_success_or_failure_and_need_a_running_episode():
    runtime = Runtime(lambda env_id: FakeEnvironment(), RandomAgent(seed=0), [], control_hz=10.0)
    with pytest.raises(ValueError):
        runtime.label("timeout", "alice")
    assert runtime.label("success", "alice") is False  # nothing runs
