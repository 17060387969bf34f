"""The learner's fixed cast: tiny synthetic episodes, the debug configs and a fake prompt embedder.

No database: these tests exercise the pure training core and never need Django.
"""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path
from typing import Optional

import numpy as np
import pytest

from learner.algorithms import build_algorithm
from learner.buffer import FrameIndex
from learner.config import get_preset
from learner.policy import build_policy
from learner.prompts import MINILM_DIM
from learner.trainer import Trainer
from robots.episode_file import EpisodeData, Segment, write_episode
from robots.protocol import CONTROL_SOURCE_CODES, ControlSource

POLICY = CONTROL_SOURCE_CODES[ControlSource.POLICY]
OPERATOR = CONTROL_SOURCE_CODES[ControlSource.OPERATOR]
SIM_OPERATOR = CONTROL_SOURCE_CODES[ControlSource.SIM_OPERATOR]


class FakeEmbedder:
    """Satisfies learner.prompts.Embedder: a deterministic unit vector per text, and counts its calls."""

    dim = MINILM_DIM

    def __init__(self):
        self.calls: list[str] = []

    def embed(self, text: str) -> np.ndarray:
        self.calls.append(text)
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
        v = np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32)
        return v / np.linalg.norm(v)


def _segments_of(control: np.ndarray) -> list[Segment]:
    """The intervention segments a recorder writes for these control codes: each run of non-policy steps."""
    found, start = [], None
    for t in range(len(control) + 1):
        code = int(control[t]) if t < len(control) else POLICY
        if start is not None and (code != int(control[start])):
            found.append(Segment(start, t, "operator" if int(control[start]) == OPERATOR else "sim_operator"))
            start = None
        if start is None and code != POLICY:
            start = t
    return found


def make_episode(
    path: Path,
    *,
    task: str = "reach",
    split: str = "offline",
    steps: int = 6,
    image_size: int = 16,
    segments: tuple[tuple[int, int, int], ...] = (),  # (start, end, control source code) of interventions
    seed: int = 0,
    source: Optional[int] = None,  # control source of the other steps; default: expert for offline, policy online
    outcome: str = "success",
    cameras: Optional[dict[str, int]] = None,  # more cameras: name -> side
) -> Path:
    """A tiny episode file whose actions depend on the state, so a policy can learn something from it."""
    rng = np.random.default_rng(seed)
    states = rng.uniform(-1, 1, (steps, 39)).astype(np.float32)
    actions = np.tanh(states[:, :4] + states[:, 36:37]).astype(np.float32)
    base = SIM_OPERATOR if split == "offline" else POLICY
    control = np.full(steps, base if source is None else source, np.uint8)
    for start, end, code in segments:
        control[start:end] = code
    data = EpisodeData(
        meta=dict(
            episode_id=str(uuid.uuid4()),
            robot="robot-1",
            task=task,
            env_id=f"{task}-v3",
            prompt=f"{task} the target",
            policy="scripted" if split == "offline" else "small_vla",
            policy_version=-1 if split == "offline" else 1,
            split=split,
            outcome=outcome,
            success=outcome == "success",
            started_at=1.0,
            ended_at=2.0,
            control_hz=30.0,
            camera="corner3",
        ),
        images=rng.integers(0, 255, (steps, image_size, image_size, 3), dtype=np.uint8),
        states=states,
        actions=actions,
        control_source=control,
        rewards=np.zeros(steps, np.float32),
        successes=np.zeros(steps, bool),
        timestamps=np.arange(steps) / 30.0,
        segments=_segments_of(control),
        cameras={name: rng.integers(0, 255, (steps, side, side, 3), dtype=np.uint8)
                 for name, side in (cameras or {}).items()},
    )
    write_episode(path, data)
    return path


@pytest.fixture
def fake_embedder():
    """Stands in for MiniLM everywhere except the one test that embeds a real prompt."""
    return FakeEmbedder()


@pytest.fixture
def tiny_policy_config():
    """The debug preset's policy: 16x16 images, two convs, 2-step action chunks."""
    return get_preset("debug").policy


@pytest.fixture
def tiny_train_config():
    """The debug preset's training config: batch 8, one thread, no prefetch."""
    return get_preset("debug").train


@pytest.fixture
def episodes(tmp_path) -> list[Path]:
    """Two tasks; each has 2 offline demos and 2 online episodes with a 2-step intervention (one by a human
    operator, one by the simulated operator) in the middle of 6 autonomous steps."""
    paths = []
    seed = 0
    for task in ("reach", "push"):
        for i in range(2):
            seed += 1
            paths.append(make_episode(tmp_path / f"{task}-off-{i}.h5", task=task, split="offline", seed=seed))
        for i, code in enumerate((OPERATOR, SIM_OPERATOR)):
            seed += 1
            paths.append(make_episode(tmp_path / f"{task}-on-{i}.h5", task=task, split="online", seed=seed,
                                      segments=((2, 4, code),)))
    return paths


@pytest.fixture
def checkpoint_dir(settings, tmp_path):
    settings.CHECKPOINT_DIR = tmp_path / "checkpoints"
    return settings.CHECKPOINT_DIR


@pytest.fixture
def trainer(tmp_path):
    """A debug-sized trainer on two tiny offline episodes."""
    preset = get_preset("debug")
    index = FrameIndex(horizon=preset.policy.horizon)
    for i in range(2):
        index.add_episode(make_episode(tmp_path / f"ep{i}.h5", seed=i))
    policy = build_policy(preset.policy, embedder=FakeEmbedder(), seed=0)
    with Trainer(preset.train, index, policy, build_algorithm(preset.train)) as t:
        t.train_step()
        yield t
