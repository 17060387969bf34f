import math

import numpy as np
import pytest

from learner.sampler import (
    LossWindow,
    build_groups,
    mixture_weights,
    online_weight,
    sample_frames,
    task_online_weight,
)


def test_online_weight_is_the_sop_formula_inside_the_clip_range():
    l_on, l_off, a = 0.3, 0.5, 2.0
    expected = math.exp(a * l_on) / (math.exp(a * l_on) + math.exp(l_off))
    assert online_weight(l_on, l_off, a, (0.0, 1.0)) == pytest.approx(expected)
    assert online_weight(l_on, l_off, a) == pytest.approx(expected)  # 0.52: inside [0.2, 0.8]


def test_higher_online_loss_means_more_online_data():
    assert online_weight(0.6, 0.2, 2.0) > online_weight(0.3, 0.2, 2.0) > online_weight(0.0, 0.2, 2.0)


@pytest.mark.parametrize("l_on, l_off, expected", [(1e6, 0.0, 0.8), (0.0, 1e6, 0.2), (50.0, 1.0, 0.8), (0.0, 50.0, 0.2)])
def test_extreme_losses_hit_the_clip_bounds_without_overflow(l_on, l_off, expected):
    assert online_weight(l_on, l_off, 2.0, (0.2, 0.8)) == expected


def test_a_task_without_online_data_is_all_offline_and_one_without_offline_data_all_online():
    assert task_online_weight(False, True, None, 0.1, 2.0) == 0.0
    assert task_online_weight(True, False, 0.5, None, 2.0) == 1.0
    assert task_online_weight(True, True, None, 0.1, 2.0) == 0.5  # no online loss measured yet


def _groups(sizes):
    """sizes: per task (offline frames, online frames) -> groups with distinct ids."""
    groups, next_id = [], 0
    for n_off, n_on in sizes:
        off = np.arange(next_id, next_id + n_off); next_id += n_off
        on = np.arange(next_id, next_id + n_on); next_id += n_on
        groups.append((off, on))
    return groups


def test_tasks_are_balanced_whatever_their_size():
    groups = _groups([(10, 0), (1000, 0), (3, 500), (50, 50)])
    frames = sample_frames(np.random.default_rng(0), groups, np.array([0.0, 0.0, 0.5, 0.5]), 40_000)
    task_of = np.concatenate([np.full(len(off) + len(on), m) for m, (off, on) in enumerate(groups)])
    shares = np.bincount(task_of[frames], minlength=4) / len(frames)
    np.testing.assert_allclose(shares, 0.25, atol=0.01)


def test_the_online_share_of_each_task_follows_its_weight():
    groups = _groups([(100, 100), (100, 100), (100, 0)])
    w_on = np.array([0.2, 0.73, 0.0])
    frames = sample_frames(np.random.default_rng(1), groups, w_on, 60_000)
    for m, (off, on) in enumerate(groups):
        mine = frames[(frames >= off.min()) & (frames <= max(off.max(), on.max() if len(on) else 0))]
        online_share = np.isin(mine, on).mean()
        assert online_share == pytest.approx(w_on[m], abs=0.015)


def test_mixture_weights_use_windowed_losses_per_task():
    groups = _groups([(5, 5), (5, 0), (0, 5), (5, 5)])
    means = np.array([[0.1, 100.0], [0.1, np.nan], [np.nan, 0.3], [0.2, 0.3]])
    w = mixture_weights(groups, means, 2.0, (0.2, 0.8))
    assert w[0] == 0.8 and w[1] == 0.0 and w[2] == 1.0
    assert w[3] == pytest.approx(online_weight(0.3, 0.2, 2.0))


def test_tasks_without_trainable_frames_are_not_sampled():
    groups = _groups([(0, 0), (4, 0)])
    frames = sample_frames(np.random.default_rng(0), groups, np.zeros(2), 100)
    assert set(frames) <= set(groups[1][0])
    with pytest.raises(ValueError):
        sample_frames(np.random.default_rng(0), _groups([(0, 0)]), np.zeros(1), 4)


def test_groups_split_trainable_frames_by_task_and_split():
    task = np.array([0, 0, 1, 1, 0, 1])
    online = np.array([False, True, False, True, True, True])
    trainable = np.array([True, True, True, False, True, True])
    groups = build_groups(task, online, trainable, 3)
    assert [g[0].tolist() for g in groups] == [[0], [2], []]
    assert [g[1].tolist() for g in groups] == [[1, 4], [5], []]


def test_the_loss_window_forgets_steps_older_than_w():
    window = LossWindow(3)
    window.record(np.array([0, 0]), np.array([False, True]), np.array([9.0, 9.0]))
    for _ in range(3):
        window.record(np.array([0, 1]), np.array([False, True]), np.array([1.0, 2.0]))
    means = window.means()
    assert means[0, 0] == 1.0 and np.isnan(means[0, 1]) and means[1, 1] == 2.0 and np.isnan(means[1, 0])


def test_the_loss_window_averages_per_sample_not_per_step():
    window = LossWindow(10)
    window.record(np.array([0, 0, 0]), np.array([True] * 3), np.array([1.0, 1.0, 1.0]))
    window.record(np.array([0]), np.array([True]), np.array([5.0]))
    assert window.means()[0, 1] == pytest.approx(2.0)


def test_sampled_online_share_follows_the_formula_from_windowed_losses():
    """End to end: losses recorded in the window -> w_on -> the online share of many draws."""
    window = LossWindow(200)
    for _ in range(50):  # task 0: online much harder (clipped at 0.8); task 1: l_on 0.5, l_off 0.4
        window.record(np.array([0, 0, 1, 1]), np.array([True, False, True, False]), np.array([3.0, 0.1, 0.5, 0.4]))
    groups = _groups([(300, 300), (300, 300)])
    w_on = mixture_weights(groups, window.means(), 2.0, (0.2, 0.8))
    frames = sample_frames(np.random.default_rng(2), groups, w_on, 80_000)
    for m, expected in enumerate([0.8, online_weight(0.5, 0.4, 2.0)]):
        off, on = groups[m]
        mine = frames[(frames >= off.min()) & (frames <= on.max())]
        assert np.isin(mine, on).mean() == pytest.approx(expected, abs=0.01)


def test_relative_losses_make_the_weight_adapt_whatever_the_loss_scale():
    # raw: small L1 losses barely move the weight, whatever their ratio
    assert abs(online_weight(0.10, 0.05, 2.0) - online_weight(0.05, 0.10, 2.0)) < 0.06
    for scale in (0.01, 1.0, 100.0):  # relative: the same ratio gives the same weight at any scale
        assert online_weight(0.10 * scale, 0.10 * scale, 2.0, (0.0, 1.0), relative=True) == pytest.approx(
            1 / (1 + np.exp(-1.0)))
        assert online_weight(0.10 * scale, 0.05 * scale, 2.0, relative=True) == 0.8  # online harder: clip's top
        assert online_weight(0.05 * scale, 0.10 * scale, 2.0, relative=True) == pytest.approx(0.5)
    assert online_weight(0.0, 0.0, 2.0, relative=True) == online_weight(0.0, 0.0, 2.0)  # no division by zero
