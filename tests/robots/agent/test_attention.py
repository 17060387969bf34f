"""The robot's help detectors (robots/agent/attention.py): a stalled hand or a policy that keeps changing its mind asks
for an operator, a working policy never does, a takeover answers the request."""

from __future__ import annotations

import json

import numpy as np

from robots import protocol
from robots.agent.agents import Agent, Decision, HoldAgent
from robots.agent.attention import HelpMonitor, HelpRule, LastStep
from robots.agent.learned import PolicyAgent, replan_disagreement
from robots.agent.runtime import Runtime
from robots.protocol import MAX_HELP_TRACE, ControlSource

from .conftest import assignment
from .test_operator import ReachingEnvironment, TowardsGoal


class Seen:
    """Records what the monitor reported after each step (what the next heartbeat would carry)."""

    def __init__(self, monitor):
        self.monitor, self.reports = monitor, []

    def on_environment(self, env):
        pass

    def on_episode_start(self, episode):
        pass

    def on_step(self, episode, step):
        self.reports.append(self.monitor.current())

    def on_episode_end(self, episode, result):
        pass


def run(agent, rule=HelpRule(stall_steps=10), max_steps=40):
    changes = []
    monitor = HelpMonitor(rule, on_change=lambda: changes.append(monitor.current()))
    seen = Seen(monitor)
    runtime = Runtime(lambda env_id: ReachingEnvironment(), agent, [monitor, seen], control_hz=1000.0)
    runtime.run_episode(assignment(env_id="fake-reach-v0", max_steps=max_steps))
    return monitor, seen.reports, changes


def test_a_stalled_hand_asks_for_help_once_with_its_last_steps_and_the_request_ends_with_the_episode():
    monitor, reports, changes = run(HoldAgent())
    first = next(i for i, r in enumerate(reports) if r is not None)
    assert first == 9  # after stall_steps steps of a still hand, not before
    request = reports[first]
    assert request["kind"] == "stall" and "0.0 cm in the last 10 steps" in request["reason"]
    assert all(r is request for r in reports[first:])  # the same request (same id) in every heartbeat after
    assert len(request["trace"]) == 10 and request["trace"][-1]["t"] == 0.0
    assert all(s["driver"] == "policy" for s in request["trace"])
    protocol.Status(state="running", help=request)  # what the heartbeat carries is a valid protocol value
    assert monitor.current() is None and changes == [request, None]  # the episode ended: no longer asking
    assert monitor.raised == 1


def test_the_trace_keeps_the_last_max_help_trace_steps():
    _, reports, _ = run(HoldAgent(), HelpRule(stall_steps=60), max_steps=70)
    request = next(r for r in reports if r is not None)
    times = [s["t"] for s in request["trace"]]
    assert len(times) == MAX_HELP_TRACE and request["step"] == 59
    # seconds before the request, in order (1 ms steps here, rounded to ms: neighbours may be equal)
    assert times[-1] == 0.0 and times[0] < 0 and all(a <= b for a, b in zip(times, times[1:]))


def test_a_policy_that_makes_progress_never_asks():
    monitor, reports, _ = run(TowardsGoal(), max_steps=25)
    assert reports and all(r is None for r in reports) and monitor.raised == 0


class StallThenMove(Agent):
    name = "stall-then-move"

    def __init__(self, still):
        self.still, self.t = still, 0

    def reset(self, env_id, prompt):
        self.t = 0

    def act(self, observation):
        self.t += 1
        return Decision(np.array([0, 0, 0, 0] if self.t <= self.still else [1, 0, 0, 0], dtype=np.float32))


def test_a_stall_that_resolves_itself_is_withdrawn_and_not_raised_again_in_the_episode():
    monitor, reports, changes = run(StallThenMove(still=12), max_steps=40)
    raised = [i for i, r in enumerate(reports) if r is not None]
    assert raised and raised[0] == 9 and raised[-1] < 20  # withdrawn once the hand moved 2 x still_m
    assert reports[-1] is None and monitor.raised == 1
    assert changes[0]["kind"] == "stall" and changes[1] is None


class HumanTakesOver(Agent):
    """Holds still, then (from step 15 on) a human drives: the takeover answers the request."""

    name = "hold"

    def __init__(self):
        self.t = 0

    def reset(self, env_id, prompt):
        self.t = 0

    def act(self, observation):
        self.t += 1
        if self.t > 15:
            return Decision(np.array([1, 0, 0, 0], np.float32), ControlSource.OPERATOR, "alice", "help", lease=3)
        return Decision(np.zeros(4, np.float32))


def test_a_takeover_answers_the_request_and_the_robot_does_not_ask_again_in_that_episode():
    monitor, reports, _ = run(HumanTakesOver(), max_steps=40)
    assert reports[10] is not None
    assert all(r is None for r in reports[15:])
    assert monitor.raised == 1


class Wavering:
    """A 'policy' whose every re-plan contradicts the last: chunks of alternating direction."""

    def __init__(self):
        self.sign = 1.0

    def act(self, observation, prompt, env_id=None):
        self.sign = -self.sign
        chunk = np.zeros((4, 4), dtype=np.float32)
        chunk[:, 0] = self.sign
        return chunk


def test_replan_disagreement_measures_how_far_a_new_chunk_departs_from_the_rest_of_the_old_one():
    old = np.array([[0, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0]], dtype=np.float32)
    assert replan_disagreement(None, 0, old) is None
    assert replan_disagreement(old, 1, old[1:]) == 0.0  # the plan goes on as planned
    assert replan_disagreement(old, 1, -old[1:]) == 2.0  # reversed on both shared steps
    assert replan_disagreement(old, 3, old) is None  # nothing left of the old plan to compare


def test_a_policy_whose_replans_keep_contradicting_each_other_asks_for_help_when_the_rule_is_on():
    agent = PolicyAgent(Wavering(), version=3)
    _, reports, _ = run(agent, HelpRule(stall=False, stall_steps=10, uncertainty=1.0), max_steps=30)
    request = next(r for r in reports if r is not None)
    assert request["kind"] == "uncertainty" and "disagree by 2.00" in request["reason"]
    _, reports, _ = run(PolicyAgent(Wavering(), version=3), HelpRule(stall=False, stall_steps=10), max_steps=30)
    assert all(r is None for r in reports)  # off by default


def test_the_last_step_feeds_the_consoles_live_plot():
    last = LastStep()
    assert last.hud() == {}
    runtime = Runtime(lambda env_id: ReachingEnvironment(), TowardsGoal(), [last], control_hz=1000.0)
    runtime.run_episode(assignment(env_id="fake-reach-v0", max_steps=3))
    hud = last.hud()
    assert hud["driver"] == "policy" and len(hud["hand"]) == 3 and hud["hand"][0] > 0 and len(hud["action"]) == 4
    from robots.console_protocol import DATA_CHANNEL, ChannelHud
    frame = {"type": "hud", "deadman": False, "lease": None, "operator": "", "estopped": False, "estopped_by": "",
             "last_command_age_ms": None, "applied_seq": None, "applied_t": None, "accepted_seq": None,
             "accepted_t": None, "deadman_reaction_ms": None, "dropped": {"stale": 0, "replayed": 0}, "step": 3,
             "video_fps": 0.0, **hud}
    assert isinstance(DATA_CHANNEL.decode(json.dumps(frame)), ChannelHud)  # within the schema
