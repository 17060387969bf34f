"""flow_vla, the second policy family: a flow-matching action head over SmallVLA's encoders (learner/policy.py).

What a regression head cannot do and a flow head must: when the same observation was answered by two different
actions, sample one of them instead of their average. And everything the fleet needs from any policy: the act/loss
contract, resumable randomness, checkpoints, RECAP's guided sampling."""

import dataclasses

import numpy as np
import pytest
import torch

from learner.checkpoints import policy_from_tensors, policy_to_tensors
from learner.policy import DROPPED, POSITIVE, FlowVLA, SmallVLA, available_policies, build_policy


@pytest.fixture
def flow_config(tiny_policy_config):
    return dataclasses.replace(tiny_policy_config, name="flow_vla", flow_steps=8)


def _obs(seed=0):
    rng = np.random.default_rng(seed)
    return {"image": rng.integers(0, 255, (16, 16, 3), dtype=np.uint8),
            "state": rng.standard_normal(39).astype(np.float32)}


def _batch(b=6, h=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randint(0, 255, (b, 16, 16, 3), dtype=torch.uint8, generator=g),
            "state": torch.randn(b, 39, generator=g), "prompt": ["open the drawer"] * b,
            "action": torch.rand(b, h, 4, generator=g) * 2 - 1, "action_mask": torch.ones(b, h, dtype=torch.bool)}


def test_flow_vla_is_built_in_and_selectable(flow_config, fake_embedder):
    assert available_policies()["flow_vla"] == "built in"
    policy = build_policy(flow_config, fake_embedder, seed=0)
    assert isinstance(policy, FlowVLA) and isinstance(policy, SmallVLA)
    chunk = policy.act(_obs(), "open the drawer")
    assert chunk.shape == (flow_config.horizon, 4) and chunk.dtype == np.float32 and np.all(np.abs(chunk) <= 1)


def test_acting_is_reproducible_from_the_noise_seed(flow_config, fake_embedder):
    policy = build_policy(flow_config, fake_embedder, seed=0)
    policy.reseed(7)
    first = [policy.act(_obs(), "p") for _ in range(3)]
    policy.reseed(7)
    again = [policy.act(_obs(), "p") for _ in range(3)]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[0], first[1])  # a sampler: new noise, another chunk


def test_loss_masks_unlabelled_steps_and_replays_from_the_generator(flow_config, fake_embedder):
    policy = build_policy(flow_config, fake_embedder, seed=0)
    batch = _batch()
    batch["action_mask"][0] = False
    out = policy.loss(batch, generator=torch.Generator().manual_seed(3), augment_shift=1)
    assert out["loss"].shape == () and out["loss"].requires_grad
    assert out["per_sample"].shape == (6,) and out["per_sample"][0] == 0
    assert torch.isclose(out["loss"], out["per_sample"][1:].mean())
    again = policy.loss(batch, generator=torch.Generator().manual_seed(3), augment_shift=1)["loss"]
    assert torch.equal(out["loss"], again)  # noise and flow times come from the generator: a resumed run matches


def test_two_demonstrated_answers_are_sampled_not_averaged(flow_config, fake_embedder):
    """Half the labels say +0.8, half -0.8 for the same observation. The regression head (MSE) learns their average,
    an action nobody demonstrated; the flow head learns both modes and samples them."""
    torch.manual_seed(0)
    obs = _obs()
    image = torch.from_numpy(obs["image"])[None].expand(64, -1, -1, -1).contiguous()
    state = torch.from_numpy(obs["state"])[None].expand(64, -1).contiguous()
    signs = torch.tensor([1.0, -1.0]).repeat(32)[:, None, None]
    batch = {"image": image, "state": state, "prompt": ["p"] * 64, "action": 0.8 * signs.expand(64, 2, 4).clone(),
             "action_mask": torch.ones(64, 2, dtype=torch.bool)}

    def train(config):
        policy = build_policy(config, fake_embedder, seed=0)
        opt = torch.optim.Adam(policy.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(0)
        for _ in range(1200):
            opt.zero_grad()
            policy.loss(batch, generator=g)["loss"].backward()
            opt.step()
        return policy

    config = dataclasses.replace(flow_config, hidden=(64, 64))
    flow = train(config)
    flow.reseed(0)
    samples = np.array([flow.act(obs, "p")[0, 0] for _ in range(60)])
    regression = train(dataclasses.replace(config, name="small_vla", loss="mse")).act(obs, "p")[0, 0]
    assert abs(regression) < 0.3  # the average: neither answer
    assert np.mean(np.abs(samples) > 0.5) > 0.85  # the flow head gives one of the two answers ...
    assert 0.25 < np.mean(samples > 0) < 0.75  # ... and both of them


def test_a_checkpoint_round_trips_and_acts_the_same(flow_config, fake_embedder):
    policy = build_policy(flow_config, fake_embedder, seed=0)
    policy.prompts.get("p")
    loaded = policy_from_tensors(*policy_to_tensors(policy), embedder=fake_embedder)
    assert isinstance(loaded, FlowVLA) and loaded.config == policy.config
    policy.reseed(1), loaded.reseed(1)
    assert np.array_equal(policy.act(_obs(), "p"), loaded.act(_obs(), "p"))


def test_recap_guidance_mixes_velocities(flow_config, fake_embedder):
    policy = build_policy(flow_config, fake_embedder, seed=0)
    policy.enable_advantage_conditioning(guidance_beta=1.0)
    with torch.no_grad():  # make the positive indicator matter
        policy.indicator.weight[POSITIVE].normal_(0, 1.0)
    noise = torch.randn(1, flow_config.horizon, 4)
    with torch.inference_mode():
        images, prompts, states = policy._one(_obs(), "p", None)
        cond = policy.forward(images, prompts, states, torch.tensor([POSITIVE]), noise=noise)[0]
        uncond = policy.forward(images, prompts, states, torch.tensor([DROPPED]), noise=noise)[0]
    assert not torch.allclose(cond, uncond)
    policy.reseed(5)
    beta1 = policy.act(_obs(), "p", guidance_beta=1.0)
    policy.reseed(5)
    beta0 = policy.act(_obs(), "p", guidance_beta=0.0)  # uncond + 0 * (cond - uncond): the unconditional flow
    policy.reseed(5)
    beta2 = policy.act(_obs(), "p", guidance_beta=2.0)
    assert not np.allclose(beta1, beta0) and not np.allclose(beta2, beta1)
    batch = {**_batch(h=flow_config.horizon), "indicator": torch.tensor([POSITIVE, DROPPED] * 3)}
    assert torch.isfinite(policy.loss(batch, generator=torch.Generator().manual_seed(0))["loss"])


@pytest.mark.parametrize("algorithm", ["bc", "hg_dagger", "recap"])
def test_flow_vla_trains_with_every_algorithm_and_publishes_a_loadable_checkpoint(algorithm, flow_config, tmp_path):
    from learner.algorithms import build_algorithm
    from learner.buffer import FrameIndex
    from learner.checkpoints import load_checkpoint, save_checkpoint
    from learner.config import get_preset
    from learner.trainer import Trainer

    from .conftest import FakeEmbedder, make_episode

    train = dataclasses.replace(get_preset("debug").train, algorithm=algorithm, lr=3e-3, batch_size=32)
    index = FrameIndex(horizon=flow_config.horizon)
    for i in range(3):
        index.add_episode(make_episode(tmp_path / f"ep{i}.h5", seed=i))
    policy = build_policy(flow_config, embedder=FakeEmbedder(), seed=0)
    probe = index.load_batch(np.arange(len(index)))

    def probe_loss():  # every frame, the same noise and flow times: the flow loss without its sampling noise
        with torch.no_grad():
            return float(policy.loss(probe, generator=torch.Generator().manual_seed(0))["loss"])

    with Trainer(train, index, policy, build_algorithm(train)) as trainer:
        before = probe_loss()  # after the trainer fitted the normalisation the loss is measured in
        losses = [trainer.train_step()["loss"] for _ in range(100)]
    after = probe_loss()
    assert np.isfinite(losses).all() and after < 0.8 * before, "it learns"
    assert policy.config.advantage_conditioning == (algorithm == "recap")
    saved = save_checkpoint(tmp_path / "ckpt", policy, version=1, algorithm=algorithm)
    loaded = load_checkpoint(saved.path, expected_sha256=saved.sha256, expected_size=saved.size).policy
    assert isinstance(loaded, FlowVLA)
    prompt = policy.prompts.prompts()[0]
    policy.reseed(3), loaded.reseed(3)
    np.testing.assert_array_equal(policy.act(_obs(), prompt), loaded.act(_obs(), prompt))
