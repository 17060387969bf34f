"""The policy sees what a real robot has: camera, proprioception, the prompt, and a target only where the task states it.

Meta-World's 39-d state also holds object poses (4:18, and their previous-frame copy 22:36) and a goal (36:39) that,
for door/drawer/window/button tasks, is the object's position plus an offset. None of that may reach the policy (or
RECAP's value function, which shares its inputs): these tests change every privileged entry and require the networks'
inputs and outputs to stay bit-identical.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from learner.config import GOAL, OBJECT_STATE, PRESETS, PROPRIO_ONLY, TARGET_TASK_ENVS, PolicyConfig, from_dict
from learner.policy import Normalization, build_policy, policy_state_width
from learner.value import ValueFunction
from robots.agent.learned import PolicyAgent
from robots.catalog import MT10

NO_TARGET_ENVS = [spec.env_id for spec in MT10 if spec.env_id not in TARGET_TASK_ENVS]


def _fitted(config, embedder, seed=0):
    policy = build_policy(config, embedder, seed=seed)
    rng = np.random.default_rng(seed)
    states = rng.uniform(-1, 1, (200, 39))
    env_ids = ["reach-v3", "door-open-v3"] * 100
    policy.set_normalization(Normalization.fit(config, states, rng.uniform(-1, 1, (200, 4)), env_ids))
    return policy


def _perturbed(state: np.ndarray, indices, rng) -> np.ndarray:
    out = state.copy()
    out[list(indices)] = rng.uniform(-50, 50, len(indices))
    return out


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_no_preset_feeds_object_state_or_a_goal_outside_target_tasks(name):
    policy = PRESETS[name].policy
    assert not set(policy.state_indices) & set(OBJECT_STATE)
    assert not set(policy.task_input_indices) & set(OBJECT_STATE)
    assert set(policy.state_indices) <= set(PROPRIO_ONLY)
    assert set(policy.task_input_indices) <= set(GOAL)
    assert set(policy.task_input_envs) <= set(TARGET_TASK_ENVS)


def test_only_user_given_targets_are_task_inputs():
    # reach / push / pick-place: the user says where; door, drawer, window, button, peg: the goal is object state
    assert set(TARGET_TASK_ENVS) == {"reach-v3", "push-v3", "pick-place-v3"}
    assert {spec.env_id for spec in MT10} >= set(TARGET_TASK_ENVS)


@pytest.mark.parametrize("env_id", NO_TARGET_ENVS + [None, ""])
def test_object_state_and_the_goal_never_change_what_the_policy_does(env_id, tiny_policy_config, fake_embedder):
    policy = _fitted(tiny_policy_config, fake_embedder)
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
    state = rng.uniform(-1, 1, 39).astype(np.float32)
    reference = policy.act({"image": image, "state": state}, "open the door", env_id=env_id)
    for _ in range(5):
        changed = _perturbed(state, OBJECT_STATE + GOAL, rng).astype(np.float32)
        np.testing.assert_array_equal(policy.act({"image": image, "state": changed}, "open the door", env_id=env_id),
                                      reference)
    changed = state.copy()
    changed[list(OBJECT_STATE + GOAL)] = np.nan  # not even a NaN gets through
    np.testing.assert_array_equal(policy.act({"image": image, "state": changed}, "open the door", env_id=env_id),
                                  reference)


def test_the_target_reaches_the_policy_only_where_the_task_states_it(tiny_policy_config, fake_embedder):
    policy = _fitted(tiny_policy_config, fake_embedder)
    rng = np.random.default_rng(2)
    image = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
    state = rng.uniform(-1, 1, 39).astype(np.float32)
    other_goal = _perturbed(state, GOAL, rng).astype(np.float32)
    reach = [policy.act({"image": image, "state": s}, "reach the goal", env_id="reach-v3") for s in (state, other_goal)]
    assert not np.array_equal(*reach), "reach's target is a task input: a different target must change the action"
    object_moved = _perturbed(state, OBJECT_STATE, rng).astype(np.float32)
    np.testing.assert_array_equal(
        policy.act({"image": image, "state": object_moved}, "reach the goal", env_id="reach-v3"), reach[0])


def test_training_inputs_and_the_value_function_ignore_object_state(tiny_policy_config, fake_embedder):
    policy = _fitted(tiny_policy_config, fake_embedder)
    value = ValueFunction.from_policy(policy, 11)
    rng = np.random.default_rng(3)
    b = 6
    env_ids = ["door-open-v3", "drawer-open-v3", "reach-v3", "window-open-v3", "button-press-topdown-v3", "reach-v3"]
    states = torch.from_numpy(rng.uniform(-1, 1, (b, 39)).astype(np.float32))
    changed = states.clone()
    changed[:, list(OBJECT_STATE)] = torch.from_numpy(rng.uniform(-50, 50, (b, len(OBJECT_STATE))).astype(np.float32))
    for k, env_id in enumerate(env_ids):
        if env_id != "reach-v3":
            changed[k, list(GOAL)] = 123.0
    assert policy._states(states, env_ids).shape == (b, policy_state_width(tiny_policy_config))
    torch.testing.assert_close(policy._states(changed, env_ids), policy._states(states, env_ids), rtol=0, atol=0)
    batch = {"image": torch.from_numpy(rng.integers(0, 255, (b, 16, 16, 3), dtype=np.uint8)),
             "prompt": ["p"] * b, "env_id": env_ids}
    torch.testing.assert_close(value.logits({**batch, "state": changed}), value.logits({**batch, "state": states}),
                               rtol=0, atol=0)
    h = tiny_policy_config.horizon
    batch.update(action=torch.zeros(b, h, 4), action_mask=torch.ones(b, h, dtype=torch.bool))
    torch.testing.assert_close(policy.loss({**batch, "state": changed})["per_sample"],
                               policy.loss({**batch, "state": states})["per_sample"], rtol=0, atol=0)


def test_normalisation_fits_the_target_on_target_tasks_only(tiny_policy_config):
    states = np.zeros((4, 39))
    states[:, 36] = [10.0, 10.0, -99.0, -99.0]  # the door's "goal" must not shift reach's target statistics
    norm = Normalization.fit(tiny_policy_config, states, np.zeros((4, 4)),
                             ["reach-v3", "reach-v3", "door-open-v3", "door-open-v3"])
    assert norm.state_mean[len(PROPRIO_ONLY)] == pytest.approx(10.0)


def test_a_checkpoint_config_from_before_task_inputs_builds_the_network_it_was_trained_as(tiny_policy_config):
    legacy = {k: v for k, v in _as_dict(tiny_policy_config).items() if not k.startswith("task_input")}
    legacy["state_indices"] = [0, 1, 2, 3, 36, 37, 38]
    config = from_dict(PolicyConfig, legacy)
    assert config.task_input_indices == () and policy_state_width(config) == 7


def _as_dict(config):
    from learner.config import to_dict

    return to_dict(config)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("env_id", ["door-open-v3", "drawer-open-v3"])
def test_in_the_simulator_moving_the_objects_state_changes_nothing_the_robot_does(env_id, tiny_policy_config,
                                                                                 fake_embedder):
    """The robot's own PolicyAgent on real Meta-World observations: replacing every privileged entry of the state
    (what the simulator knows about the door or drawer) leaves each action identical."""
    from robots.agent.environment import MetaWorldEnvironment

    policy = _fitted(tiny_policy_config, fake_embedder)
    env = MetaWorldEnvironment(env_id, image_size=16, seed=4)
    rng = np.random.default_rng(4)
    try:
        honest, lied_to = PolicyAgent(policy, 1), PolicyAgent(policy, 1)
        honest.reset(env_id, "open it")
        lied_to.reset(env_id, "open it")
        obs = env.reset()
        for _ in range(5):
            fake = {"image": obs["image"], "state": _perturbed(obs["state"], OBJECT_STATE + GOAL, rng)}
            action = honest.act(obs).action
            np.testing.assert_array_equal(lied_to.act(fake).action, action)
            obs = env.step(action).observation
    finally:
        env.close()
