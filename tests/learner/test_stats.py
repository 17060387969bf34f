"""Wilson intervals: known values, the edges, and bad input."""

import pytest

from learner.stats import wilson_interval


@pytest.mark.parametrize("k, n, lo, hi", [
    (47, 50, 0.8378, 0.9794),  # 0.94 of 50
    (44, 50, 0.7619, 0.9438),  # 0.88 of 50: the two intervals overlap
    (0, 20, 0.0, 0.1611),
    (20, 20, 0.8389, 1.0),
    (5, 10, 0.2366, 0.7634),
])
def test_known_values(k, n, lo, hi):
    got = wilson_interval(k, n)
    assert got == pytest.approx((lo, hi), abs=1e-4)
    assert got[0] <= k / n <= got[1]


def test_no_trials_says_nothing_and_bad_counts_fail():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    for k, n in ((3, 2), (-1, 5), (1, -1)):
        with pytest.raises(ValueError):
            wilson_interval(k, n)
