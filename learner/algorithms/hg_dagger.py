"""HG-DAgger: offline demonstrations plus the human-gated corrections of online episodes (arXiv 1810.02890)."""

from __future__ import annotations

import numpy as np

from learner.algorithms.base import SupervisedAlgorithm


class HGDAgger(SupervisedAlgorithm):
    """Labels are offline demonstration steps and the intervention steps of online episodes (control source operator
    or sim_operator). The policy's own autonomous steps are never labels, and an action chunk that runs past the end
    of an intervention is masked there (the buffer applies this mask per step)."""

    name = "hg_dagger"

    def trainable_mask(self, index) -> np.ndarray:
        return ~index.online | index.intervention


ALGORITHM = HGDAgger
