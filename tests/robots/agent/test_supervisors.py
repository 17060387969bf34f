"""Supervisors that recover (supervisors.py): the simulated operator's expert must get out of the policy's states."""

from __future__ import annotations

import numpy as np
import pytest

from robots.agent.agents import ScriptedExpertAgent
from robots.agent.environment import MetaWorldEnvironment
from robots.agent.supervisors import DoorOpenSupervisor

DOOR = "door-open-v3"
# Hand offsets from the door handle, at its height, where a trained policy ends up: in front of the handle and/or
# beside its front edge. Meta-World's expert pushes straight at the handle from there and stalls.
STUCK_OFFSETS = [(-0.10, -0.05), (-0.05, -0.06), (0.0, -0.06), (0.02, -0.10),
                 (-0.08, -0.01), (0.10, -0.09), (-0.06, -0.12), (0.05, -0.11)]


def hand_action(state, target, gain=25.0):
    return np.append(np.clip((target - state[0:3]) * gain, -1, 1), 1.0).astype(np.float32)


def drive_to(env, observation, target, steps=40):
    for _ in range(steps):
        observation = env.step(hand_action(observation["state"], target)).observation
        if np.linalg.norm(observation["state"][0:3] - target) < 0.01:
            break
    return observation


def from_stuck_states(expert: ScriptedExpertAgent, max_steps: int = 150) -> list[int | None]:
    """Per offset: the steps the expert took to open the door from there, None if it did not within max_steps."""
    env = MetaWorldEnvironment(DOOR, image_size=16, seed=11)
    results = []
    try:
        for dx, dy in STUCK_OFFSETS:
            observation = env.reset()
            handle = observation["state"][4:7].astype(np.float64)
            observation = drive_to(env, observation, handle + [dx, dy, 0.15])  # from above, so nothing is moved yet
            observation = drive_to(env, observation, handle + [dx, dy, 0.01])
            expert.reset(DOOR, "open the door")
            results.append(None)
            for step in range(1, max_steps + 1):
                result = env.step(expert.act(observation).action)
                observation = result.observation
                if result.success:
                    results[-1] = step
                    break
    finally:
        env.close()
    return results


def test_the_door_supervisor_opens_the_door_from_where_metaworlds_expert_stalls():
    metaworld = from_stuck_states(ScriptedExpertAgent(recover=False))
    supervisor = from_stuck_states(ScriptedExpertAgent(recover=True))
    assert sum(s is None for s in metaworld) >= 5, metaworld  # these states are hard for Meta-World's expert ...
    assert all(s is not None for s in supervisor), supervisor  # ... and the supervisor gets out of every one


def test_the_door_supervisor_opens_the_door_from_a_reset_within_the_episode_limit():
    env = MetaWorldEnvironment(DOOR, image_size=16, seed=4)
    expert = ScriptedExpertAgent(recover=True)
    try:
        for _ in range(4):
            observation = env.reset()
            expert.reset(DOOR, "open the door")
            for step in range(1, 151):
                result = env.step(expert.act(observation).action)
                observation = result.observation
                if result.success:
                    break
            assert result.success, f"not open after {step} steps"
            assert step <= 110
    finally:
        env.close()


def state(hand, handle):
    s = np.zeros(39)
    s[0:3], s[4:7] = hand, handle
    return s


HANDLE = np.array([0.0, 0.7, 0.15])


def test_a_low_hand_off_the_handle_goes_straight_up_first():
    sup = DoorOpenSupervisor()
    hand = HANDLE + [0.0, -0.07, 0.0]  # level with the handle, in front of it
    target = sup.target(state(hand, HANDLE))
    np.testing.assert_allclose(target, [hand[0], hand[1], HANDLE[2] + sup.clearance])


def test_a_high_hand_travels_over_the_front_edge_then_descends_onto_it_then_pulls():
    sup = DoorOpenSupervisor()
    pocket = HANDLE + DoorOpenSupervisor.POCKET
    high = HANDLE + [0.1, -0.2, 0.3]
    np.testing.assert_allclose(sup.target(state(high, HANDLE)), pocket + [0, 0, sup.clearance])
    over = pocket + [0.005, 0.0, 0.08]
    np.testing.assert_allclose(sup.target(state(over, HANDLE)), pocket)
    assert not sup.engaged
    np.testing.assert_allclose(sup.target(state(pocket + [0.0, 0.0, 0.005], HANDLE)), HANDLE + DoorOpenSupervisor.PULL)
    assert sup.engaged
    # the pull goes on while the hand moves with the handle, and stops once the handle is lost
    np.testing.assert_allclose(sup.target(state(pocket + [0.03, 0.0, 0.03], HANDLE)), HANDLE + DoorOpenSupervisor.PULL)
    lost = HANDLE + [0.2, 0.0, 0.0]
    np.testing.assert_allclose(sup.target(state(lost, HANDLE)), [lost[0], lost[1], HANDLE[2] + sup.clearance])
    assert not sup.engaged


def test_reset_forgets_the_engagement_and_actions_are_meta_world_shaped():
    sup = DoorOpenSupervisor()
    sup.target(state(HANDLE + DoorOpenSupervisor.POCKET, HANDLE))
    assert sup.engaged
    sup.reset()
    assert not sup.engaged
    action = sup.get_action(state(HANDLE + [0.0, -0.07, 0.0], HANDLE))
    assert action.shape == (4,) and action[3] == 1.0 and action[2] > 0


@pytest.mark.parametrize("kwargs", [{"clearance": 0.01}, {"align": 0.0}, {"gain": -1.0}])
def test_bad_supervisor_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        DoorOpenSupervisor(**kwargs)


def test_recover_picks_the_supervisor_only_where_one_exists_and_a_new_episode_starts_afresh():
    expert = ScriptedExpertAgent(recover=True)
    expert.reset(DOOR, "open the door")
    assert isinstance(expert._policy, DoorOpenSupervisor)
    expert._policy.engaged = True
    expert.reset(DOOR, "open the door")
    assert not expert._policy.engaged
    expert.reset("reach-v3", "reach")
    assert type(expert._policy).__name__ == "SawyerReachV3Policy"
    plain = ScriptedExpertAgent()
    plain.reset(DOOR, "open the door")
    assert type(plain._policy).__name__ == "SawyerDoorOpenV3Policy"


def test_the_agent_cli_gives_the_simulated_operator_the_recovering_expert_unless_told_otherwise(tmp_path):
    from robots.agent.__main__ import config_from_args, parse_args
    from robots.agent.config import AgentConfig

    base = ["--server", "http://127.0.0.1:1", "--token", "sop_x", "--spool", str(tmp_path), "--sim-operator"]
    assert config_from_args(parse_args(base)).sim_expert == "recovering"
    assert config_from_args(parse_args([*base, "--sim-expert", "metaworld"])).sim_expert == "metaworld"
    with pytest.raises(SystemExit):
        parse_args([*base, "--sim-expert", "human"])
    with pytest.raises(ValueError, match="sim_expert"):
        AgentConfig(server="http://h:1", token="sop_x", spool_dir=tmp_path, sim_expert="human")
