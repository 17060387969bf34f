"""One seed tree per run: independent, named random streams derived from one root seed (numpy ``SeedSequence``).

Placements (Meta-World's object and goal positions) come from the environment's own generator, seeded when the
environment is built. Seeding every build with the same number repeats the same placements after every task switch,
and seeding demonstrations and evaluation with the same number makes the evaluation set the demonstration set. So each
use draws from its own stream: ``demos`` (offline collection), ``episodes`` (one robot's online episodes: its own
sub-stream, and a fresh seed for every environment it builds) and ``eval`` (the held-out evaluation placements).
Placements are continuous, so distinct streams share one only by chance.

Pure: numpy and the stdlib (the robot agent imports it).
"""

from __future__ import annotations

import hashlib
import itertools
from typing import Callable, Optional

import numpy as np

STREAMS = ("demos", "episodes", "eval")


def _key(part: str | int) -> int:
    """A stable 32-bit key for one path element (Python's hash() is salted per process)."""
    if isinstance(part, int) and not isinstance(part, bool) and part >= 0:
        return part
    return int.from_bytes(hashlib.sha256(str(part).encode("utf-8")).digest()[:4], "big")


def stream_seed(root: Optional[int], stream: str, *path: str | int) -> int:
    """The 31-bit seed of ``stream``/``path`` under ``root``; ``root`` None draws fresh entropy (not reproducible)."""
    if stream not in STREAMS:
        raise ValueError(f"unknown seed stream {stream!r} (one of {', '.join(STREAMS)})")
    if root is None:
        return int(np.random.SeedSequence().generate_state(1)[0] % 2**31)
    sequence = np.random.SeedSequence(int(root), spawn_key=(_key(stream), *(_key(p) for p in path)))
    return int(sequence.generate_state(1)[0] % 2**31)


def seeded_builds(build: Callable[..., object], root: Optional[int], stream: str,
                  *path: str | int) -> Callable[[str], object]:
    """``build(env_id, seed=...)`` as an ``env_id -> Environment`` factory whose n-th build of a task gets the seed of
    ``stream/path/env_id/n``: rebuilding a task (after a task switch) continues with new placements, never repeats."""
    counters: dict[str, itertools.count] = {}

    def make(env_id: str):
        n = next(counters.setdefault(env_id, itertools.count()))
        return build(env_id, seed=stream_seed(root, stream, *path, env_id, n))

    return make


def robot_key(token: str) -> str:
    """A per-robot path element that is stable across restarts and reveals nothing of the token."""
    return hashlib.sha256(("seed:" + token).encode("utf-8")).hexdigest()[:16]
