"""The Meta-World simulator behind the Environment interface, and the agents that drive it (kept few and fast)."""

import numpy as np
import pytest

from robots.agent.agents import RandomAgent, ScriptedExpertAgent, make_agent
from robots.agent.environment import MetaWorldEnvironment
from robots.agent.runtime import Runtime
from robots.protocol import Outcome

from .conftest import assignment

# Meta-World's experts warn whenever their gain saturates; agents.py silences it in the agent, pytest resets filters.
pytestmark = pytest.mark.filterwarnings("ignore:Constant:UserWarning")


@pytest.fixture(scope="module")
def reach():
    """One reach-v3 simulator for the module: creating it costs ~0.5 s."""
    env = MetaWorldEnvironment("reach-v3", camera="corner3", image_size=64, seed=7)
    yield env
    env.close()


def test_metaworld_environment_returns_images_and_states_of_the_promised_shapes(reach):
    first = reach.reset()
    result = reach.step(np.zeros(4, dtype=np.float32))

    for obs in (first, result.observation):
        assert obs["image"].shape == (64, 64, 3) and obs["image"].dtype == np.uint8
        assert obs["state"].shape == (39,) and obs["state"].dtype == np.float32
    assert first["image"].std() > 10  # a rendered scene, not a blank frame
    assert isinstance(result.reward, float) and isinstance(result.success, bool)


def test_every_reset_draws_a_new_goal(reach):
    goals = [reach.reset()["state"][36:39] for _ in range(3)]
    assert not np.allclose(goals[0], goals[1]) and not np.allclose(goals[1], goals[2])


def test_the_same_seed_gives_the_same_sequence_of_goals():
    a = MetaWorldEnvironment("reach-v3", image_size=16, seed=3)
    b = MetaWorldEnvironment("reach-v3", image_size=16, seed=3)
    try:
        for _ in range(2):
            np.testing.assert_array_equal(a.reset()["state"], b.reset()["state"])
    finally:
        a.close()
        b.close()


def test_an_unknown_env_id_is_refused():
    with pytest.raises(ValueError, match="unknown Meta-World"):
        MetaWorldEnvironment("teleport-v3")


def test_the_scripted_expert_solves_reach_within_max_steps(reach, collector):
    runtime = Runtime(lambda env_id: reach, ScriptedExpertAgent(seed=0), [collector], control_hz=500.0)

    result = runtime.run_episode(assignment(task="reach", env_id="reach-v3", max_steps=150))

    assert result.outcome == Outcome.SUCCESS and result.steps < 150
    actions = np.stack([s.decision.action for s in collector.steps])
    assert actions.dtype == np.float32 and np.abs(actions).max() <= 1.0


def test_expert_noise_is_gaussian_and_clipped(reach):
    obs = reach.reset()
    clean = ScriptedExpertAgent(seed=0)
    noisy = ScriptedExpertAgent(noise=5.0, seed=0)
    for agent in (clean, noisy):
        agent.reset("reach-v3", "")
    actions = np.stack([noisy.act(obs).action for _ in range(50)])
    assert np.abs(actions).max() <= 1.0 and (np.abs(actions) == 1.0).any()
    assert not np.allclose(actions, clean.act(obs).action)


def test_the_random_agent_acts_uniformly_in_the_unit_box():
    agent = make_agent("random", seed=0)
    assert isinstance(agent, RandomAgent) and agent.name == "random"
    actions = np.stack([agent.act({}).action for _ in range(500)])
    assert actions.shape == (500, 4) and actions.dtype == np.float32
    assert actions.min() >= -1.0 and actions.max() <= 1.0 and actions.min() < -0.9 and actions.max() > 0.9
