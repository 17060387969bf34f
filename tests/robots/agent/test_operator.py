"""The simulated operator gate: takes over a stalled policy, hands back, leaves a working policy alone."""

from __future__ import annotations

import numpy as np
import pytest

from robots import episode_file
from robots.agent.agents import Agent, Decision, ScriptedExpertAgent
from robots.agent.environment import Environment, MetaWorldEnvironment, StepResult
from robots.agent.operator import SIM_OPERATOR, GatedProvider, SimulatedOperatorGate, TakeoverRule
from robots.agent.recorder import EpisodeRecorder, SpoolWriter
from robots.agent.runtime import FixedAgent, Runtime, Subscriber
from robots.agent.spool import Spool
from robots.protocol import ControlSource, Outcome, TaskAssigned

from .conftest import Collector, assignment

GOAL = np.array([0.3, 0.0, 0.0])


class ReachingEnvironment(Environment):
    """A point hand in Meta-World's state layout (hand 0:3, object 4:7, goal 36:39) that moves 1 cm per unit of
    action; solved within 2 cm of the goal. The object sits at the goal, so every distance the gate reads shrinks
    as the hand approaches."""

    env_id = "fake-reach-v0"
    camera = "fake-cam"

    def reset(self):
        self.hand = np.zeros(3)
        return self._observation()

    def step(self, action):
        self.hand = self.hand + 0.01 * np.clip(np.asarray(action[:3], dtype=np.float64), -1, 1)
        solved = bool(np.linalg.norm(self.hand - GOAL) < 0.02)
        return StepResult(self._observation(), reward=0.0, success=solved)

    def _observation(self):
        state = np.zeros(39, dtype=np.float32)
        state[0:3], state[4:7], state[36:39] = self.hand, GOAL, GOAL
        return {"image": np.zeros((8, 8, 3), dtype=np.uint8), "state": state}


class TowardsGoal(Agent):
    """The operator's expert (and a policy that works): full speed towards the goal."""

    name = "towards-goal"

    def reset(self, env_id, prompt):
        pass

    def act(self, observation):
        delta = (GOAL - observation["state"][0:3]) * 100.0
        return Decision(np.append(np.clip(delta, -1, 1), 0.0).astype(np.float32))


class Stalled(Agent):
    """A policy that has stopped: zero actions, no progress at all."""

    name = "v7"
    policy_version = 7

    def reset(self, env_id, prompt):
        pass

    def act(self, observation):
        return Decision(np.zeros(4, dtype=np.float32))


class HumanDriven(Stalled):
    """An inner agent whose steps are already a human operator's."""

    def act(self, observation):
        return Decision(np.zeros(4, dtype=np.float32), ControlSource.OPERATOR, "alice", "console takeover")


def run_gated(inner, rule, tmp_path, max_steps=100, env=None, subscribers=()):
    gate = SimulatedOperatorGate(inner, TowardsGoal(), rule)
    writer = SpoolWriter(Spool(tmp_path / "spool")).start()
    collector = Collector()
    env = env or ReachingEnvironment()
    runtime = Runtime(lambda env_id: env, GatedProvider(FixedAgent(inner), gate),
                      [collector, EpisodeRecorder(writer), gate, *subscribers], control_hz=1000.0)
    result = runtime.run_episode(assignment(env_id=env.env_id, max_steps=max_steps))
    writer.close()
    (path,) = (tmp_path / "spool").glob("*.h5")
    with episode_file.EpisodeReader(path) as reader:
        recorded = reader.meta
    return result, collector, recorded, runtime


def sources(collector):
    return [ControlSource(s.decision.source) for s in collector.steps]


def test_the_gate_takes_over_a_stalled_policy_hands_back_and_finishes_after_the_second_stall(tmp_path):
    rule = TakeoverRule(patience=5, takeover_steps=4, handbacks=1, late_fraction=0.0)
    result, collector, recorded, _ = run_gated(Stalled(), rule, tmp_path)

    assert result.outcome == Outcome.SUCCESS
    driven = sources(collector)
    policy, operator = ControlSource.POLICY, ControlSource.SIM_OPERATOR
    # 5 stalled steps -> 4 operator steps -> handed back: 5 more stalled steps -> the operator finishes the episode.
    assert driven[:14] == [policy] * 5 + [operator] * 4 + [policy] * 5
    assert set(driven[14:]) == {operator}
    segments = recorded["segments"]
    assert [(s.start, s.end, s.source, s.operator) for s in segments] == [
        (5, 9, "sim_operator", SIM_OPERATOR), (14, result.steps, "sim_operator", SIM_OPERATOR)]
    assert segments[0].reason == "no progress for 5 steps"
    assert segments[1].reason == "no progress for 5 steps: finishing the episode"
    # The episode belongs to the policy; the operator's steps are marked per step.
    assert (recorded["policy"], recorded["policy_version"]) == ("v7", 7)
    assert list(recorded["segments"]) and collector.started[0].policy == "v7"


def test_the_gate_leaves_a_policy_that_makes_progress_alone(tmp_path):
    result, collector, recorded, _ = run_gated(TowardsGoal(), TakeoverRule(patience=3), tmp_path)
    assert result.outcome == Outcome.SUCCESS and result.steps <= 29  # 0.3 m at 1 cm a step, solved within 2 cm
    assert set(sources(collector)) == {ControlSource.POLICY} and recorded["segments"] == []


class Contrary(Agent):
    """A busy policy heading the wrong way (the expert's motion reversed) for its first ``for_steps`` acts, then a
    working one. Its hand keeps moving, so the progress rule alone calls that progress."""

    name = "contrary"

    def __init__(self, for_steps=10_000):
        self.for_steps = for_steps
        self.acts = 0

    def reset(self, env_id, prompt):
        self.acts = 0

    def act(self, observation):
        self.acts += 1
        decision = TowardsGoal().act(observation)
        if self.acts <= self.for_steps:
            return Decision(np.append(-decision.action[:3], 0.0).astype(np.float32))
        return decision


def test_persistent_divergence_from_the_expert_makes_the_operator_take_over_a_busy_policy(tmp_path):
    # patience 10: moving 1 cm a step, the hand's net motion over the window (10 cm) counts as progress, so only
    # divergence can fire; the operator then keeps driving while the policy would still head the wrong way.
    rule = TakeoverRule(patience=10, takeover_steps=4, handbacks=5, late_fraction=0.0, divergence=1.6)
    result, collector, recorded, _ = run_gated(Contrary(), rule, tmp_path)

    assert result.outcome == Outcome.SUCCESS
    driven = sources(collector)
    assert driven[:9] == [ControlSource.POLICY] * 9  # the window of 10 gaps (2.0 each) is full at step 9
    assert set(driven[9:]) == {ControlSource.SIM_OPERATOR}  # never handed back: the policy never agreed
    (segment,) = recorded["segments"]
    assert (segment.start, segment.end) == (9, result.steps)
    assert segment.reason == "heading away from what the expert would do for 10 steps"


def test_without_the_divergence_rule_a_busy_policy_heading_away_is_never_taken_over(tmp_path):
    rule = TakeoverRule(patience=10, takeover_steps=4, late_fraction=0.0, divergence=0.0)
    result, collector, recorded, _ = run_gated(Contrary(), rule, tmp_path, max_steps=60)
    assert result.outcome == Outcome.TIMEOUT and recorded["segments"] == []


def test_the_operator_hands_back_once_the_policy_would_do_what_the_expert_does(tmp_path):
    rule = TakeoverRule(patience=5, takeover_steps=2, handbacks=5, late_fraction=0.0, divergence=1.6)
    result, collector, recorded, _ = run_gated(Contrary(for_steps=12), rule, tmp_path)

    assert result.outcome == Outcome.SUCCESS
    (segment,) = recorded["segments"]
    assert segment.start == 4  # 5 gaps of 2.0
    # takeover_steps (2) alone would hand back at step 6; the policy still heads away until its 12th act (step 11)
    # and the mean over the last 5 gaps has to fall to 1.6 first.
    assert 12 <= segment.end <= 14
    assert set(sources(collector)[segment.end:]) == {ControlSource.POLICY}


def test_late_in_the_episode_a_short_stall_makes_the_operator_finish_it_within_max_steps(tmp_path):
    rule = TakeoverRule(patience=1000, takeover_steps=4, late_fraction=0.5, late_patience=3)
    result, collector, recorded, _ = run_gated(Stalled(), rule, tmp_path, max_steps=60)

    driven = sources(collector)
    assert driven[:30] == [ControlSource.POLICY] * 30  # patience 1000: only the late rule can fire
    assert set(driven[30:]) == {ControlSource.SIM_OPERATOR}
    assert result.outcome == Outcome.SUCCESS and result.steps <= 60
    assert recorded["segments"][0].reason.startswith("no progress for 30 steps late in the episode")


def test_the_gate_never_acts_over_an_operator_who_already_drives(tmp_path):
    result, collector, recorded, _ = run_gated(HumanDriven(), TakeoverRule(patience=2), tmp_path, max_steps=20)
    assert result.outcome == Outcome.TIMEOUT and result.steps == 20  # the gate never exceeds max_steps either
    assert {(s.decision.source, s.decision.operator) for s in collector.steps} == {(ControlSource.OPERATOR, "alice")}
    assert [(s.source, s.operator) for s in recorded["segments"]] == [("operator", "alice")]


def test_status_says_sim_operator_while_the_gate_drives(tmp_path):
    seen = []

    class Watch(Subscriber):
        def on_step(self, episode, step):
            seen.append(runtime.snapshot().control_source)  # what a status sent now says: the previous step's driver

    rule = TakeoverRule(patience=5, takeover_steps=4, late_fraction=0.0)
    gate = SimulatedOperatorGate(Stalled(), TowardsGoal(), rule)
    env = ReachingEnvironment()
    runtime = Runtime(lambda env_id: env, GatedProvider(FixedAgent(Stalled()), gate), [gate, Watch()],
                      control_hz=1000.0)
    runtime.run_episode(assignment(env_id=env.env_id, max_steps=100))

    assert seen[6] == ControlSource.SIM_OPERATOR and seen[1] == ControlSource.POLICY
    assert runtime.snapshot().control_source == ControlSource.POLICY  # after the episode
    assert runtime.snapshot().policy == "v7" and runtime.snapshot().policy_version == 7


def test_an_environment_without_metaworld_state_is_refused(tmp_path):
    from .conftest import FakeEnvironment

    with pytest.raises(ValueError, match="39-d state"):
        run_gated(Stalled(), TakeoverRule(), tmp_path, env=FakeEnvironment(state_dim=7))


@pytest.fixture(scope="module")
def reach():
    env = MetaWorldEnvironment("reach-v3", image_size=16, seed=3)
    yield env
    env.close()


def metaworld_episode(env, inner):
    gate = SimulatedOperatorGate(inner, ScriptedExpertAgent(seed=0), TakeoverRule())
    collector = Collector()
    runtime = Runtime(lambda env_id: env, gate, [collector, gate], control_hz=1000.0)
    task = TaskAssigned(task="reach", env_id="reach-v3", prompt="reach", max_steps=150)
    return runtime.run_episode(task), collector, gate


def test_on_metaworld_the_gate_leaves_the_scripted_expert_alone(reach):
    for _ in range(2):
        result, collector, gate = metaworld_episode(reach, ScriptedExpertAgent(seed=1))
        assert result.outcome == Outcome.SUCCESS and gate.takeovers == 0


def test_on_metaworld_the_gate_rescues_a_stalled_policy(reach):
    result, collector, gate = metaworld_episode(reach, Stalled())
    assert result.outcome == Outcome.SUCCESS and gate.takeovers >= 1
    first = next(i for i, s in enumerate(collector.steps) if s.decision.source == ControlSource.SIM_OPERATOR)
    assert first == TakeoverRule().patience  # no progress from the first step on
