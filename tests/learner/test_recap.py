"""RECAP: rewards and returns, advantages, thresholds, the indicator, guidance, checkpoints, and a trainer round."""

import dataclasses

import numpy as np
import pytest
import torch

from learner import recap_math
from learner.algorithms import NAMES, build_algorithm, get_algorithm
from learner.buffer import FrameIndex
from learner.checkpoints import load_checkpoint, policy_from_tensors, policy_to_tensors, save_checkpoint
from learner.config import TrainConfig
from learner.evaluation import evaluation_guidance_beta
from learner.policy import DROPPED, NEGATIVE, POSITIVE, Normalization, build_policy
from learner.trainer import Trainer
from learner.value import ValueFunction, load_value, save_value
from robots.agent.learned import PolicyAgent

from .conftest import SIM_OPERATOR, make_episode

torch.set_num_threads(1)


def _obs(seed=0, size=16):
    rng = np.random.default_rng(seed)
    return {"image": rng.integers(0, 255, (size, size, 3), dtype=np.uint8),
            "state": rng.uniform(-1, 1, 39).astype(np.float32)}


def _recap_config(base, **kw):
    return dataclasses.replace(base, algorithm="recap", **kw)


# -- rewards, returns, normalisation ------------------------------------------------------------------------------


def test_returns_are_normalised_by_the_tasks_max_length_and_the_failure_penalty():
    # M = 10, c_fail = 1 -> S = 20. Success: -1 per step, 0 at the last step.
    np.testing.assert_allclose(recap_math.episode_returns(5, "success", 10, 1.0),
                               [-4 / 20, -3 / 20, -2 / 20, -1 / 20, 0])
    # Failure and timeout: the last step costs c_fail * M = 10 more.
    for outcome in ("failure", "timeout"):
        np.testing.assert_allclose(recap_math.episode_returns(3, outcome, 10, 1.0), [-12 / 20, -11 / 20, -10 / 20])
    # Aborted (e-stop, shutdown) is not a failure of the policy: truncated, no value target.
    assert np.isnan(recap_math.episode_returns(4, "aborted", 10, 1.0)).all()
    # Any success > -0.5 >= any failure, and everything lies in [-1, 0] (clipped for an over-long episode).
    assert recap_math.episode_returns(10, "success", 10, 1.0).min() > -0.5
    assert recap_math.episode_returns(10, "timeout", 10, 1.0).max() <= -0.5
    assert recap_math.episode_returns(10, "timeout", 10, 1.0).min() > -1.0
    assert recap_math.episode_returns(50, "failure", 10, 1.0).min() == -1.0
    # The closed form used for batches agrees with the episode form.
    for outcome in ("success", "failure"):
        t = np.arange(7)
        np.testing.assert_allclose(
            recap_math.frame_returns(t, np.full(7, 7), np.full(7, recap_math.outcome_code(outcome)), np.full(7, 12), 0.5),
            recap_math.episode_returns(7, outcome, 12, 0.5))


def test_no_credit_crosses_a_takeover():
    """Policy frames whose N-step window reaches a takeover end there as failures; the rescue is not theirs."""
    values = np.full(10, -0.3)
    intervention = np.zeros(10, bool)
    intervention[6:8] = True  # the operator drove frames 6 and 7
    takeover = recap_math.next_takeover(intervention)
    assert takeover.tolist() == [6, 6, 6, 6, 6, 6, 6, 7, 10, 10]
    plain = recap_math.episode_advantages(values, "success", 10, 1.0, 3)
    cut = recap_math.episode_advantages(values, "success", 10, 1.0, 3, takeover=takeover)
    s = 20.0  # M (1 + c_fail)
    for t in (4, 5):  # windows [4, 7) and [5, 8) reach frame 6
        assert cut[t] == pytest.approx(-(6 - t) / s - 10 / s + 0.3)
        assert cut[t] < plain[t], "the frames before a takeover look worse than with the rescue's bootstrap"
    np.testing.assert_array_equal(cut[:4], plain[:4])  # [t, t+3) ends before the takeover: unchanged
    np.testing.assert_array_equal(cut[6:], plain[6:])  # the operator's frames and what follows the hand-back


def test_demonstrations_and_corrections_are_always_positive():
    advantages = np.array([-5.0, -5.0, 1.0, 0.0, np.nan])
    task = np.zeros(5, np.int64)
    expert = np.array([True, False, False, False, True])  # a demo frame with a terrible advantage; an unknown one
    eps = recap_math.task_thresholds(advantages, task, ~expert, 0.5, 1)
    assert recap_math.indicators(advantages, task, eps, expert).tolist() == [1, 0, 1, 0, 1]


def test_two_hot_targets_keep_the_expected_value():
    values = np.array([-1.0, -0.5, -0.123, -0.0001, 0.0])
    target = recap_math.two_hot(values, 201)
    np.testing.assert_allclose(target.sum(1), 1.0, atol=1e-6)
    np.testing.assert_allclose(target @ recap_math.bin_centers(201), values, atol=1e-6)


# -- advantages ---------------------------------------------------------------------------------------------------


def test_advantage_is_positive_for_success_and_negative_for_failure_from_the_same_states():
    # A value function that cannot tell the two apart (same observations): the mean of the two returns.
    steps, m, c_fail, n = 20, 20, 1.0, 5
    v = 0.5 * (recap_math.episode_returns(steps, "success", m, c_fail) +
               recap_math.episode_returns(steps, "failure", m, c_fail))
    success = recap_math.episode_advantages(v, "success", m, c_fail, n)
    failure = recap_math.episode_advantages(v, "failure", m, c_fail, n)
    near_end = np.arange(steps) + n >= steps
    assert (success[near_end] > 0).all() and (failure[near_end] < 0).all()
    np.testing.assert_allclose(success[~near_end], 0.0, atol=1e-12)  # consistent V: no information yet
    np.testing.assert_allclose(failure[~near_end], 0.0, atol=1e-12)
    # Beyond the last step there is no future: only rewards count. At t = T-1 of a success, A = 0 - V(o_{T-1}).
    assert success[-1] == pytest.approx(-v[-1])
    # A truncated episode bootstraps from V at its last frame: A_{T-1} = 0.
    aborted = recap_math.episode_advantages(v, "aborted", m, c_fail, n)
    assert aborted[-1] == 0.0 and np.isfinite(aborted).all()


def test_per_task_threshold_makes_the_configured_share_positive():
    rng = np.random.default_rng(0)
    task = np.repeat([0, 1], [1000, 400]).astype(np.int16)
    adv = np.concatenate([rng.normal(0, 1, 1000), rng.normal(-3, 0.1, 400)])
    eligible = np.ones(len(adv), bool)
    for share in (0.4, 0.1):
        eps = recap_math.task_thresholds(adv, task, eligible, share, 2)
        ind = recap_math.indicators(adv, task, eps, np.zeros(len(adv), bool))
        for m in (0, 1):
            assert (ind[task == m] == 1).mean() == pytest.approx(share, abs=0.005)


def test_interventions_are_always_positive():
    task = np.zeros(10, np.int16)
    adv = np.linspace(-1, 1, 10)
    intervention = np.zeros(10, bool)
    intervention[:3] = True  # the worst advantages
    eps = recap_math.task_thresholds(adv, task, ~intervention, 0.4, 1)
    ind = recap_math.indicators(adv, task, eps, intervention)
    assert (ind[:3] == 1).all()
    adv[5] = np.nan  # unknown advantage, not an intervention: unknown
    assert recap_math.indicators(adv, task, eps, intervention)[5] == -1


# -- the policy's indicator and guidance -------------------------------------------------------------------------


@pytest.fixture
def conditioned(tiny_policy_config, fake_embedder):
    policy = build_policy(dataclasses.replace(tiny_policy_config, advantage_conditioning=True), fake_embedder, seed=0)
    with torch.no_grad():
        policy.indicator.weight.normal_()  # a trained embedding: the rows differ
    return policy


def test_guidance_with_beta_one_is_the_conditional_prediction(conditioned):
    obs = _obs()
    with torch.no_grad():
        args = (conditioned._images(torch.from_numpy(obs["image"])[None]),
                torch.from_numpy(conditioned.prompts.get("reach the target"))[None],
                conditioned._states(torch.from_numpy(obs["state"])[None]))
        cond = conditioned.forward(*args, torch.tensor([POSITIVE]))[0]
        uncond = conditioned.forward(*args, torch.tensor([DROPPED]))[0]
        neg = conditioned.forward(*args, torch.tensor([NEGATIVE]))[0]
    assert not torch.allclose(cond, uncond) and not torch.allclose(cond, neg)
    scale = conditioned.action_scale
    expected = (cond * scale).clamp(-1, 1).numpy()
    np.testing.assert_allclose(conditioned.act(obs, "reach the target", guidance_beta=1.0), expected, atol=1e-6)
    np.testing.assert_allclose(conditioned.act(obs, "reach the target"), expected, atol=1e-6)  # config beta = 1
    guided = ((uncond + 2.0 * (cond - uncond)) * scale).clamp(-1, 1).numpy()
    np.testing.assert_allclose(conditioned.act(obs, "reach the target", guidance_beta=2.0), guided, atol=1e-5)
    np.testing.assert_allclose(conditioned.act(obs, "reach the target", guidance_beta=0.0),
                               (uncond * scale).clamp(-1, 1).numpy(), atol=1e-6)


def test_checkpoints_without_the_indicator_load_and_act_exactly_as_before(tmp_path, tiny_policy_config,
                                                                          fake_embedder):
    policy = build_policy(tiny_policy_config, fake_embedder, seed=3)
    assert policy.indicator is None and not any("indicator" in k for k in policy.state_dict())
    tensors, meta = policy_to_tensors(policy)
    for key in ("advantage_conditioning", "guidance_beta", "eval_guidance_beta"):  # as written before RECAP
        del meta["policy_config"][key]
    old = policy_from_tensors(tensors, meta, fake_embedder)
    assert old.indicator is None and old.config == policy.config
    obs = _obs(1)
    reference = policy.act(obs, "reach the target", env_id="reach-v3")
    np.testing.assert_array_equal(old.act(obs, "reach the target", env_id="reach-v3"), reference)
    agent = PolicyAgent(old, 1)
    agent.reset("reach-v3", "reach the target")
    np.testing.assert_array_equal(agent.act(obs).action, reference[0])
    assert evaluation_guidance_beta(old) is None
    # A RECAP run starting from it adds a zero embedding: every indicator and beta still give the base's actions.
    old.enable_advantage_conditioning(guidance_beta=1.0, eval_guidance_beta=2.0)
    for beta in (1.0, 2.0):
        np.testing.assert_allclose(old.act(obs, "reach the target", guidance_beta=beta, env_id="reach-v3"), reference,
                                   atol=1e-6)
    assert evaluation_guidance_beta(old) == 2.0


def test_the_indicator_is_dropped_at_the_configured_rate(tmp_path, episodes, tiny_policy_config, tiny_train_config,
                                                         fake_embedder):
    config = _recap_config(tiny_train_config, batch_size=64)
    index = FrameIndex(horizon=2)
    for path in episodes:
        index.add_episode(path)
    policy = build_policy(tiny_policy_config, fake_embedder, seed=0)
    trainer = Trainer(config, index, policy, build_algorithm(config))
    trainer.run(config.value_pretrain_steps + 1)  # value ready and every frame has an advantage
    algo = trainer.algorithm
    assert (algo.indicator >= 0).all()
    assert (algo.indicator[index.intervention] == 1).all()
    assert (algo.indicator[~index.online] == 1).all(), "demonstrations are expert data: always positive"
    seen = []
    original = policy.loss
    policy.loss = lambda batch, **kw: (seen.append(batch["indicator"].numpy().copy()), original(batch, **kw))[1]
    trainer.run(trainer.step + 30)
    seen = np.concatenate(seen)
    assert len(seen) == 30 * 64
    assert (seen == DROPPED).mean() == pytest.approx(0.3, abs=0.05)  # 3 sigma ~ 0.03
    assert set(np.unique(seen)) == {NEGATIVE, POSITIVE, DROPPED}


def test_a_conditioned_policy_prefers_the_good_actions(tiny_policy_config, fake_embedder):
    """Half the data is bad (the opposite action); the advantage indicator marks the good half positive."""
    torch.manual_seed(0)
    config = dataclasses.replace(tiny_policy_config, advantage_conditioning=True, loss="l1")
    policy = build_policy(config, fake_embedder, seed=0)
    policy.set_normalization(Normalization.identity(config))
    optimizer = torch.optim.Adam(policy.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    generator = torch.Generator().manual_seed(0)
    image = np.full((16, 16, 3), 128, np.uint8)

    def good(states):
        return 0.8 * np.tanh(2 * states[:, :4] + states[:, 36:37])

    for _ in range(300):
        states = rng.uniform(-1, 1, (64, 39)).astype(np.float32)
        is_good = rng.random(64) < 0.5
        actions = np.where(is_good[:, None], good(states), -good(states)).astype(np.float32)
        indicator = torch.from_numpy(np.where(is_good, POSITIVE, NEGATIVE))
        indicator[torch.rand(64, generator=generator) < 0.3] = DROPPED
        batch = {"image": torch.from_numpy(np.repeat(image[None], 64, 0)), "state": torch.from_numpy(states),
                 "action": torch.from_numpy(np.repeat(actions[:, None], 2, 1)),
                 "action_mask": torch.ones(64, 2, dtype=torch.bool), "prompt": ["reach the target"] * 64,
                 "env_id": ["reach-v3"] * 64, "indicator": indicator}
        loss = policy.loss(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    test_states = rng.uniform(-1, 1, (50, 39)).astype(np.float32)
    target = good(test_states)
    chosen = np.stack([policy.act({"image": image, "state": s}, "reach the target", env_id="reach-v3")[0]
                       for s in test_states])
    to_good, to_bad = np.abs(chosen - target).mean(), np.abs(chosen + target).mean()
    assert to_good < 0.5 * to_bad, (to_good, to_bad)
    assert np.mean(np.sign(chosen) == np.sign(target)) > 0.8


# -- the algorithm, the trainer, checkpoints, the robot ----------------------------------------------------------


def test_recap_is_registered_and_trains_on_all_frames(episodes):
    assert "recap" in NAMES and get_algorithm("recap").name == "recap"
    index = FrameIndex(horizon=2)
    for path in episodes:
        index.add_episode(path)
    assert build_algorithm(TrainConfig(algorithm="recap")).trainable_mask(index).all()


def test_values_are_cached_per_episode_and_computed_incrementally(tmp_path, episodes, tiny_policy_config,
                                                                   tiny_train_config, fake_embedder):
    config = _recap_config(tiny_train_config)
    index = FrameIndex(horizon=2)
    for path in episodes:
        index.add_episode(path)
    trainer = Trainer(config, index, build_policy(tiny_policy_config, fake_embedder, seed=0), build_algorithm(config))
    trainer.run(config.value_pretrain_steps + 1)
    algo = trainer.algorithm
    assert len(algo.cache) == len(index.episodes) and not np.isnan(algo.advantages).any()
    index.add_episode(make_episode(tmp_path / "new.h5", task="reach", split="online", seed=99, outcome="timeout",
                                   segments=((1, 2, SIM_OPERATOR),)))
    trainer.refresh()
    assert algo.advance(10_000) == 6  # only the new episode's frames
    assert len(algo.cache) == len(index.episodes) and not np.isnan(algo.advantages).any()
    metrics = trainer.metrics()["tasks"]
    assert 0 < metrics["reach"]["positive_share"] < 1 and metrics["push"]["advantage_threshold"] is not None


def test_a_recap_run_publishes_a_checkpoint_with_guidance_that_the_robot_runs(tmp_path, episodes, tiny_policy_config,
                                                                             tiny_train_config, fake_embedder):
    # Start from a BC base checkpoint without the indicator, as a run on the fleet does.
    base = build_policy(tiny_policy_config, fake_embedder, seed=0)
    saved = save_checkpoint(tmp_path / "ckpt", base, version=1, algorithm="bc")
    base = load_checkpoint(saved.path, embedder=fake_embedder).policy
    config = _recap_config(tiny_train_config, guidance_beta=1.0, eval_guidance_beta=2.0, value_mode="refresh")
    index = FrameIndex(horizon=2)
    for path in episodes:
        index.add_episode(path)
    published = []

    def on_checkpoint(step):
        published.append(save_checkpoint(tmp_path / "ckpt", trainer.policy, version=2 + len(published),
                                          parent=1, algorithm="recap", step=step))

    trainer = Trainer(config, index, base, build_algorithm(config), on_checkpoint=on_checkpoint)
    trainer.run(6)
    stats = trainer.last_stats
    assert stats["value_loss"] > 0 and set(stats["positive_share"]) == {"reach", "push"}
    assert trainer.algorithm.value_version > 1  # refreshed
    loaded = load_checkpoint(published[-1].path, embedder=fake_embedder)
    cfg = loaded.meta["policy_config"]
    assert cfg["advantage_conditioning"] and cfg["guidance_beta"] == 1.0 and cfg["eval_guidance_beta"] == 2.0
    assert loaded.policy.indicator is not None and evaluation_guidance_beta(loaded.policy) == 2.0
    agent = PolicyAgent(loaded.policy, loaded.version)
    agent.reset("reach-v3", "reach the target")
    action = agent.act(_obs(size=40)).action
    assert action.shape == (4,) and np.all(np.abs(action) <= 1)


def test_a_recap_run_resumes_exactly(tmp_path, episodes, tiny_policy_config, tiny_train_config, fake_embedder):
    config = _recap_config(tiny_train_config, value_mode="refresh")

    def fresh():
        index = FrameIndex(horizon=2)
        for path in episodes:
            index.add_episode(path)
        return Trainer(config, index, build_policy(tiny_policy_config, fake_embedder, seed=0), build_algorithm(config))

    straight = fresh()
    straight.run(7)
    first = fresh()
    first.run(4)
    first.save_state(tmp_path / "s.safetensors")
    index = FrameIndex(horizon=2)
    for path in reversed(episodes):
        index.add_episode(path)
    resumed = Trainer.resume(tmp_path / "s.safetensors", index, embedder=fake_embedder)
    assert len(resumed.algorithm.cache) == len(first.algorithm.cache)
    resumed.run(7)
    for (name, x), (_, y) in zip(straight.policy.state_dict().items(), resumed.policy.state_dict().items()):
        assert torch.equal(x, y), name
    for (name, x), (_, y) in zip(straight.algorithm.value.state_dict().items(),
                                 resumed.algorithm.value.state_dict().items()):
        assert torch.equal(x, y), name


def test_a_pretrained_value_file_is_loaded_and_frozen(tmp_path, episodes, tiny_policy_config, tiny_train_config,
                                                      fake_embedder):
    policy = build_policy(tiny_policy_config, fake_embedder, seed=0)
    value = ValueFunction.from_policy(policy, tiny_train_config.value_bins)
    path = save_value(tmp_path / "value.safetensors", value, {"c_fail": 1.0, "task_max_steps": {"reach": 6}})
    loaded, meta = load_value(path, fake_embedder)
    for (name, x), (_, y) in zip(value.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(x, y), name
    config = _recap_config(tiny_train_config, value_path=str(path), value_mode="frozen")
    index = FrameIndex(horizon=2)
    for p in episodes:
        index.add_episode(p)
    trainer = Trainer(config, index, policy, build_algorithm(config))
    assert trainer.algorithm.value_ready
    before = {k: v.clone() for k, v in trainer.algorithm.value.state_dict().items()}
    trainer.run(3)
    assert "value_loss" not in trainer.last_stats  # frozen
    for k, v in trainer.algorithm.value.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert trainer.algorithm.task_scales(index)["reach"] == 6


@pytest.mark.django_db
def test_pretrain_value_writes_a_value_file_a_run_can_load(tmp_path, settings, fake_embedder, monkeypatch):
    import uuid

    from django.core.management import call_command
    from django.utils import timezone

    from robots.models import Episode, Task
    from robots.episode_file import EpisodeReader

    settings.PAYLOAD_DIR = tmp_path / "payloads"
    settings.CHECKPOINT_DIR = tmp_path / "checkpoints"
    settings.PAYLOAD_DIR.mkdir()
    monkeypatch.setattr("learner.prompts.default_embedder", lambda: fake_embedder)
    task = Task.objects.create(name="reach", env_id="reach-v3", prompts=["reach the target"], max_steps=8)
    from robots import fleet

    robot = fleet.register_robot("sim-01")
    robot = robot[0] if isinstance(robot, tuple) else robot
    for i, (split, outcome) in enumerate([("offline", "success"), ("online", "timeout"), ("online", "aborted")]):
        path = make_episode(settings.PAYLOAD_DIR / f"ep{i}.h5", split=split, seed=i, outcome=outcome)
        with EpisodeReader(path) as reader:
            episode_id = reader.meta["episode_id"]
        Episode.objects.create(id=uuid.UUID(episode_id), robot=robot, task=task, split=split, started_at=timezone.now(),
                               verified_at=timezone.now(), status=Episode.Status.VERIFIED, outcome=outcome,
                               payload_path=path.name, steps=6)
    out = tmp_path / "value.safetensors"
    call_command("pretrain_value", "--tasks", "reach", "--steps", "3", "--preset", "debug", "--output", str(out))
    value, meta = load_value(out, fake_embedder)
    assert meta["task_max_steps"] == {"reach": 8} and meta["c_fail"] == 1.0 and meta["steps"] == 3
    assert value.bins == 21
