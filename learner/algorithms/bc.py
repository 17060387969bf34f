"""Behaviour cloning on offline demonstrations only: the baseline that online post-training has to beat."""

from __future__ import annotations

import numpy as np

from learner.algorithms.base import SupervisedAlgorithm


class BC(SupervisedAlgorithm):
    name = "bc"

    def trainable_mask(self, index) -> np.ndarray:
        # Every step of an offline demonstration is a label, whoever drove it; online episodes are ignored.
        return ~index.online


ALGORITHM = BC
