"""The fixed-rate episode loop, driven with a fake environment that satisfies the real interface."""

import threading
import time

import numpy as np
import pytest

from robots.agent.agents import RandomAgent
from robots.agent.runtime import Runtime
from robots.protocol import Outcome, RobotState, TaskAssigned

from .conftest import FakeEnvironment, assignment


def make_runtime(env_factory, subscribers=(), hz=50.0, **kwargs):
    return Runtime(env_factory, RandomAgent(seed=0), list(subscribers), control_hz=hz, idle_poll_s=0.01, **kwargs)


def test_loop_holds_its_rate_and_records_measured_timestamps(collector):
    env = FakeEnvironment(step_s=0.001)
    runtime = make_runtime(lambda env_id: env, [collector], hz=20.0)

    result = runtime.run_episode(assignment(max_steps=20))

    assert result.outcome == Outcome.TIMEOUT and result.steps == 20
    stamps = np.array([s.timestamp for s in collector.steps])
    grid = np.arange(20) * 0.05
    assert np.all(stamps >= grid - 0.002), stamps - grid  # never ahead of schedule
    assert abs(np.diff(stamps).mean() - 0.05) < 0.005, stamps  # a late wake-up does not shift the later deadlines
    assert not np.array_equal(stamps, grid)  # measured, not nominal
    hz, p99_ms, overruns = runtime.stats.snapshot()
    assert overruns == 0
    assert 18.0 < hz < 21.0
    assert 49.0 < p99_ms < 150.0


def test_loop_reports_overruns_instead_of_hiding_them(collector):
    env = FakeEnvironment(step_s=0.001, slow_steps={3: 0.045, 4: 0.045, 5: 0.045})  # period is 20 ms
    runtime = make_runtime(lambda env_id: env, [collector], hz=50.0)

    runtime.run_episode(assignment(max_steps=12))

    _, p99_ms, overruns = runtime.stats.snapshot()
    assert overruns >= 3  # the three slow steps at least; a loaded CI machine may add its own
    assert p99_ms >= 40.0
    stamps = np.array([s.timestamp for s in collector.steps])
    periods = np.diff(stamps)
    # The steps after the slow ones started late, and the timestamps say so ...
    assert np.all(periods[3:6] >= 0.044), periods
    # ... and the schedule re-anchored instead of bursting through the missed ticks to catch up: a burst would
    # run steps 1 ms apart until back on the old grid, so the 12th step would start at ~0.20 s; re-anchored, the
    # remaining steps keep their full period and the 12th starts at ~0.295 s.
    assert stamps[-1] > 0.27, stamps


def test_the_episode_ends_at_success_or_max_steps(collector):
    solving = FakeEnvironment(solve_at=5)
    runtime = make_runtime(lambda env_id: solving, [collector], hz=1000.0)

    assert runtime.run_episode(assignment(max_steps=50)).outcome == Outcome.SUCCESS
    assert collector.ended[-1][1].steps == 5 and collector.ended[-1][1].success
    assert collector.steps[-1].success and not collector.steps[-2].success

    solving.solve_at = None
    result = runtime.run_episode(assignment(max_steps=7))
    assert (result.outcome, result.steps, result.success) == (Outcome.TIMEOUT, 7, False)


def test_subscribers_see_the_observation_the_action_was_chosen_from(collector):
    env = FakeEnvironment()
    make_runtime(lambda env_id: env, [collector], hz=1000.0).run_episode(assignment(max_steps=3))

    assert [int(s.observation["image"][0, 0, 0]) for s in collector.steps] == [0, 1, 2]
    assert [s.reward for s in collector.steps] == [1.0, 2.0, 3.0]
    for step, executed in zip(collector.steps, env.actions):
        np.testing.assert_array_equal(step.decision.action, executed)


def test_the_environment_is_recreated_only_when_the_env_id_changes():
    made = []

    def factory(env_id):
        made.append(FakeEnvironment(env_id))
        return made[-1]

    runtime = make_runtime(factory, hz=1000.0)
    runtime.run_episode(assignment(env_id="a-v0", max_steps=2))
    runtime.run_episode(assignment(task="other-prompt", env_id="a-v0", max_steps=2))
    assert [e.env_id for e in made] == ["a-v0"] and made[0].resets == 2

    runtime.run_episode(assignment(env_id="b-v0", max_steps=2))
    assert [e.env_id for e in made] == ["a-v0", "b-v0"]
    assert made[0].closed and not made[1].closed


def test_a_new_assignment_applies_from_the_next_episode_and_none_means_idle(collector):
    runtime = make_runtime(lambda env_id: FakeEnvironment(env_id, solve_at=3), [collector], hz=500.0)
    thread = threading.Thread(target=runtime.run)
    thread.start()
    try:
        time.sleep(0.1)
        assert collector.started == [] and runtime.snapshot().state == RobotState.IDLE  # nothing assigned yet

        runtime.assign(assignment(task="first"))
        _wait(lambda: len(collector.ended) >= 2)
        runtime.assign(assignment(task="second"))
        _wait(lambda: any(e.task == "second" for e, _ in collector.ended))
        tasks = [e.task for e in collector.started]
        assert tasks[0] == "first" and "first" not in tasks[tasks.index("second"):]

        runtime.assign(TaskAssigned(task=None))
        _wait(lambda: runtime.snapshot().state == RobotState.IDLE)
        count = len(collector.started)
        time.sleep(0.1)
        assert len(collector.started) == count
    finally:
        runtime.stop()
        thread.join(5)
    assert not thread.is_alive()


def test_stop_mid_episode_ends_it_as_aborted_after_the_current_step(collector):
    runtime = make_runtime(lambda env_id: FakeEnvironment(env_id), [collector], hz=50.0)
    runtime.assign(assignment(max_steps=10_000))
    thread = threading.Thread(target=runtime.run)
    thread.start()
    _wait(lambda: len(collector.steps) >= 5)
    assert runtime.snapshot().state == RobotState.RUNNING

    runtime.stop()
    thread.join(2)

    assert not thread.is_alive()
    episode, result = collector.ended[-1]
    assert result.outcome == Outcome.ABORTED and result.steps == len(collector.steps)
    assert runtime.ended_ids == [episode.id]


def test_a_task_that_cannot_start_does_not_kill_the_loop(collector):
    def factory(env_id):
        if env_id == "broken-v0":
            raise ValueError("no such simulator")
        return FakeEnvironment(env_id, solve_at=2)

    runtime = make_runtime(factory, [collector], hz=500.0)
    runtime.assign(assignment(env_id="broken-v0"))
    thread = threading.Thread(target=runtime.run)
    thread.start()
    try:
        time.sleep(0.1)
        assert thread.is_alive() and collector.started == []
        runtime.assign(assignment(env_id="fine-v0"))
        _wait(lambda: len(collector.ended) >= 1)
    finally:
        runtime.stop()
        thread.join(2)


def test_run_returns_after_max_episodes(collector):
    runtime = make_runtime(lambda env_id: FakeEnvironment(env_id, solve_at=2), [collector], hz=500.0, max_episodes=3)
    runtime.assign(assignment())
    thread = threading.Thread(target=runtime.run)
    thread.start()
    thread.join(5)
    assert not thread.is_alive()
    assert len(runtime.ended_ids) == 3 == len(collector.ended)


def test_status_snapshot_names_the_running_episode(collector):
    runtime = make_runtime(lambda env_id: FakeEnvironment(env_id), [collector], hz=100.0)
    runtime.assign(assignment(task="reach", max_steps=10_000))
    thread = threading.Thread(target=runtime.run)
    thread.start()
    try:
        _wait(lambda: len(collector.steps) >= 3)
        snap = runtime.snapshot()
        assert snap.state == RobotState.RUNNING and snap.task == "reach"
        assert snap.episode_id == collector.started[0].id and snap.step >= 3
    finally:
        runtime.stop()
        thread.join(2)


def _wait(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail("condition not met in time")
        time.sleep(0.005)
