"""A policy that reads several named cameras (PolicyConfig.cameras): the frame index delivers them, the shared
encoder concatenates their features, the robot's observation must carry them."""

import dataclasses

import numpy as np
import pytest
import torch

from learner.algorithms import build_algorithm
from learner.buffer import FrameIndex
from learner.checkpoints import policy_from_tensors, policy_to_tensors
from learner.config import ConfigError, PolicyConfig, get_preset
from learner.policy import build_policy
from learner.trainer import Trainer
from robots.episode_file import EpisodeReader

from .conftest import FakeEmbedder, make_episode

CAMERAS = ("corner3", "gripperPOV")


def test_the_index_delivers_every_named_camera_exactly(tmp_path):
    paths = [make_episode(tmp_path / f"e{i}.h5", seed=i, steps=5, cameras={"gripperPOV": 12}) for i in range(2)]
    index = FrameIndex(horizon=2, cameras=CAMERAS)
    for path in paths:
        index.add_episode(path)
    ids = np.arange(len(index))
    direct = index.load_batch(ids)
    index._layouts = [None] * len(index._layouts)  # the HDF5 path reads the same frames
    through_hdf5 = index.load_batch(ids)
    for batch in (direct, through_hdf5):
        assert set(batch["cameras"]) == set(CAMERAS) and batch["image"] is batch["cameras"]["corner3"]
        for k, gid in enumerate(ids):
            entry = index.episodes[int(index.episode[gid])]
            with EpisodeReader(entry.path) as reader:
                frame = reader.frame(int(index.frame[gid]))
            np.testing.assert_array_equal(batch["cameras"]["corner3"][k].numpy(), frame["image"])
            np.testing.assert_array_equal(batch["cameras"]["gripperPOV"][k].numpy(), frame["cameras"]["gripperPOV"])


def test_a_camera_of_another_size_is_resized_to_the_first_episodes(tmp_path):
    index = FrameIndex(horizon=2, cameras=("gripperPOV",))
    index.add_episode(make_episode(tmp_path / "a.h5", seed=0, cameras={"gripperPOV": 12}))
    index.add_episode(make_episode(tmp_path / "b.h5", seed=1, cameras={"gripperPOV": 20}))
    batch = index.load_batch(np.arange(len(index)))
    assert batch["cameras"]["gripperPOV"].shape == (len(index), 12, 12, 3) and batch["image"].shape[1:3] == (12, 12)


def test_an_episode_without_the_camera_is_refused_by_name(tmp_path):
    index = FrameIndex(horizon=2, cameras=CAMERAS)
    with pytest.raises(ValueError, match="camera 'gripperPOV' was not recorded in this episode .*reads corner3, "
                                         "gripperPOV"):
        index.add_episode(make_episode(tmp_path / "a.h5"))
    assert len(index) == 0


@pytest.mark.parametrize("name", ["small_vla", "flow_vla"])
def test_a_two_camera_policy_trains_round_trips_and_acts_on_both(tmp_path, name):
    preset = get_preset("debug")
    config = dataclasses.replace(preset.policy, name=name, cameras=CAMERAS)
    index = FrameIndex(horizon=config.horizon, cameras=CAMERAS)
    for i in range(3):
        index.add_episode(make_episode(tmp_path / f"e{i}.h5", seed=i, cameras={"gripperPOV": 16}))
    policy = build_policy(config, embedder=FakeEmbedder(), seed=0)
    assert policy.context_width == 2 * config.image_features + config.prompt_features + config.state_features
    with Trainer(preset.train, index, policy, build_algorithm(preset.train)) as trainer:
        for _ in range(3):
            assert np.isfinite(trainer.train_step()["loss"])
    loaded = policy_from_tensors(*policy_to_tensors(policy), embedder=FakeEmbedder())
    assert loaded.config.cameras == CAMERAS
    rng = np.random.default_rng(0)
    scene, wrist = (rng.integers(0, 255, (16, 16, 3), dtype=np.uint8) for _ in range(2))
    obs = {"image": scene, "state": np.zeros(39, np.float32), "cameras": {"corner3": scene, "gripperPOV": wrist}}
    prompt = policy.prompts.prompts()[0]
    for p in (policy, loaded):
        getattr(p, "reseed", lambda s: None)(0)
    np.testing.assert_array_equal(policy.act(obs, prompt), loaded.act(obs, prompt))
    if name == "small_vla":  # the wrist view is an input: another wrist frame, another action
        other = {**obs, "cameras": {"corner3": scene, "gripperPOV": 255 - wrist}}
        assert not np.array_equal(policy.act(obs, prompt), policy.act(other, prompt))
    with pytest.raises(ValueError, match=r"does not record \['gripperPOV'\].*--extra-cameras"):
        policy.act({"image": scene, "state": np.zeros(39, np.float32), "cameras": {"corner3": scene}}, prompt)


@pytest.mark.parametrize("cameras", [("a", "a"), ("../x",), tuple(f"c{i}" for i in range(6))])
def test_camera_lists_are_checked(cameras):
    with pytest.raises(ConfigError, match="cameras"):
        PolicyConfig(cameras=cameras)


def test_a_batch_without_the_cameras_says_how_to_build_one(tmp_path):
    config = dataclasses.replace(get_preset("debug").policy, cameras=CAMERAS)
    policy = build_policy(config, embedder=FakeEmbedder(), seed=0)
    index = FrameIndex(horizon=config.horizon)
    index.add_episode(make_episode(tmp_path / "a.h5", cameras={"gripperPOV": 16}))
    with pytest.raises(ValueError, match="FrameIndex built with those cameras"):
        policy.loss(index.load_batch(np.arange(4)), generator=torch.Generator())


def test_whole_episode_reads_give_the_camera_the_batches_give(tmp_path):
    """RECAP's value function trains on a batch's "image" and predicts on episode_columns' "image": one camera."""
    index = FrameIndex(horizon=2, cameras=("gripperPOV", "corner3"))
    index.add_episode(make_episode(tmp_path / "a.h5", steps=4, cameras={"gripperPOV": 12}))
    whole = index.episode_columns(0)["image"]
    batch = index.load_batch(np.arange(4))
    np.testing.assert_array_equal(whole, batch["image"].numpy())
    assert whole.shape == (4, 12, 12, 3)
