"""The agent's cast: a fake environment that satisfies the real interface, assignments, and a recording subscriber."""

from __future__ import annotations

import dataclasses
import hashlib
import time

import numpy as np
import pytest

from robots.agent.environment import Environment, StepResult
from robots.agent.runtime import Subscriber
from robots.protocol import TaskAssigned


class FakeEnvironment(Environment):
    """A simulator stand-in: deterministic observations, a configurable step time, success at a chosen step."""

    def __init__(self, env_id: str = "fake-v0", *, step_s: float = 0.0, slow_steps: dict[int, float] | None = None,
                 solve_at: int | None = None, image_size: int = 16, state_dim: int = 39, camera: str = "fake-cam",
                 extra_cameras: dict[str, int] | None = None):
        self.env_id = env_id
        self.camera = camera
        self.extra = dict(extra_cameras or {})  # name -> side: more cameras, as MetaWorldEnvironment(extra_cameras=)
        self.extra_cameras = tuple(self.extra)
        self.step_s = step_s
        self.slow_steps = slow_steps or {}  # step index -> seconds that step takes instead
        self.solve_at = solve_at  # success flag set after this many steps
        self.image_size = image_size
        self.state_dim = state_dim
        self.resets = 0
        self.steps = 0
        self.closed = False
        self.actions: list[np.ndarray] = []
        self._rng = np.random.default_rng(0)

    def reset(self):
        self.resets += 1
        self.steps = 0
        return self._observation()

    def step(self, action):
        delay = self.slow_steps.get(self.steps, self.step_s)
        if delay:
            time.sleep(delay)
        self.actions.append(np.array(action))
        self.steps += 1
        success = self.solve_at is not None and self.steps >= self.solve_at
        return StepResult(self._observation(), reward=float(self.steps), success=success)

    def close(self):
        self.closed = True

    def _observation(self):
        # Noise, like a camera (it does not compress away); pixel (0, 0) carries the step number for the tests.
        image = self._rng.integers(0, 256, (self.image_size, self.image_size, 3), dtype=np.uint8)
        image[0, 0] = self.steps % 256
        state = np.arange(self.state_dim, dtype=np.float32) + self.steps
        cameras = {self.camera: image}
        for name, side in self.extra.items():  # pixel (0, 0): the step number plus 100
            cameras[name] = self._rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
            cameras[name][0, 0] = (self.steps + 100) % 256
        return {"image": image, "state": state, "cameras": cameras}


class Collector(Subscriber):
    """Remembers everything the loop tells its subscribers."""

    def __init__(self):
        self.started, self.steps, self.ended = [], [], []

    def on_episode_start(self, episode):
        self.started.append(episode)

    def on_step(self, episode, step):
        self.steps.append(step)

    def on_episode_end(self, episode, result):
        self.ended.append((episode, result))


def assignment(task: str = "fake-task", env_id: str = "fake-v0", max_steps: int = 20, split: str = "online"):
    return TaskAssigned(task=task, env_id=env_id, prompt=f"do {task}", max_steps=max_steps, split=split)


@pytest.fixture
def collector():
    """A subscriber that records every callback."""
    return Collector()


class FakeEmbedder:
    """Stands in for MiniLM (learner.prompts.Embedder): a deterministic unit vector per prompt, never a model load."""

    dim = 384

    def embed(self, text: str) -> np.ndarray:
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
        vector = np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32)
        return vector / np.linalg.norm(vector)


CHECKPOINT_PROMPTS = ["do fake-task", "reach the red dot"]  # the prompts of conftest.assignment() and the process tests


@pytest.fixture
def make_checkpoint(tmp_path):
    """``make_checkpoint(version)`` saves a tiny (debug preset) policy whose weights differ per version and returns
    learner.checkpoints.SavedCheckpoint (path, sha256, size). The prompts the tests use are embedded in it."""
    from learner.checkpoints import save_checkpoint
    from learner.config import get_preset
    from learner.policy import build_policy

    directory = tmp_path / "published"

    def make(version: int, **config):
        policy_config = dataclasses.replace(get_preset("debug").policy, **config)
        policy = build_policy(policy_config, embedder=FakeEmbedder(), seed=version)
        policy.prompts.ensure(CHECKPOINT_PROMPTS)
        return save_checkpoint(directory, policy, version=version)

    return make
