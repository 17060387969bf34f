import numpy as np
import pytest

from learner.algorithms import NAMES, build_algorithm, get_algorithm
from learner.buffer import FrameIndex
from learner.config import TrainConfig
from learner.policy import build_policy
from learner.trainer import Trainer


@pytest.fixture
def index(episodes):
    index = FrameIndex(horizon=2)
    for path in episodes:
        index.add_episode(path)
    return index


def test_algorithms_are_registered_under_their_file_names():
    for name in NAMES:
        assert get_algorithm(name).name == name
        assert get_algorithm(name).__module__ == f"learner.algorithms.{name}"
    with pytest.raises(ValueError, match="known"):
        get_algorithm("no_such_algorithm")


def test_bc_learns_only_from_offline_demonstrations(index):
    mask = build_algorithm(TrainConfig(algorithm="bc")).trainable_mask(index)
    np.testing.assert_array_equal(mask, ~index.online)


def test_hg_dagger_learns_from_demonstrations_and_intervention_steps_only(index):
    mask = build_algorithm(TrainConfig(algorithm="hg_dagger")).trainable_mask(index)
    online_labels = mask & index.online
    assert online_labels.sum() == 4 * 2  # the two intervention steps of each online episode
    assert set(index.frame[online_labels]) == {2, 3}
    assert not (mask & index.online & (index.control_source == 0)).any()  # autonomous steps never are labels
    assert mask[~index.online].all()


@pytest.mark.parametrize("name", ["bc", "hg_dagger"])
def test_sampled_batches_contain_only_labels(name, index, tiny_policy_config, tiny_train_config, fake_embedder):
    config = TrainConfig(**{**tiny_train_config.__dict__, "algorithm": name, "batch_size": 64})
    trainer = Trainer(config, index, build_policy(tiny_policy_config, fake_embedder, seed=0), build_algorithm(config))
    trainer.refresh()
    labels = build_algorithm(config).trainable_mask(index)
    seen = np.concatenate([trainer._plan() for _ in range(20)])
    assert labels[seen].all()
    assert index.online[seen].any() == (name == "hg_dagger")
