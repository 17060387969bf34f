"""Post-training algorithms, registered by name: the config value is the registry key is the file name."""

from __future__ import annotations

import importlib

from learner.algorithms.base import Algorithm
from learner.config import TrainConfig

# Each name is a module here that defines ALGORITHM.
NAMES = ("bc", "hg_dagger", "recap")


def get_algorithm(name: str) -> type[Algorithm]:
    if name not in NAMES:
        raise ValueError(f"unknown algorithm {name!r}; known: {list(NAMES)}")
    return importlib.import_module(f"learner.algorithms.{name}").ALGORITHM


def build_algorithm(config: TrainConfig) -> Algorithm:
    return get_algorithm(config.algorithm)(config)


__all__ = ["Algorithm", "NAMES", "build_algorithm", "get_algorithm"]
