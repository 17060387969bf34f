"""What the control loop drives: the ``Environment`` interface and the Meta-World simulator behind it."""

from __future__ import annotations

import abc
import dataclasses
import os
import threading
from typing import Any, Optional

import numpy as np

# Headless rendering without a display. Must be set before mujoco is imported anywhere in the process; setdefault so
# an operator can still choose osmesa (or glfw on a desk machine).
os.environ.setdefault("MUJOCO_GL", "egl")

# {"image": uint8 [H, W, 3], "state": float32 [S], "cameras": {name: uint8 [H, W, 3]}}: "image" is the primary camera's
# frame; "cameras" (optional) holds every camera by name, the primary's included (the same array, not a copy).
Observation = dict[str, Any]


def flips(camera: str) -> bool:
    """Whether Meta-World's ``camera`` renders upside down (its corner cameras do) and its frames need flipping."""
    return camera.startswith("corner")


@dataclasses.dataclass(frozen=True)
class StepResult:
    observation: Observation  # after the action
    reward: float
    success: bool  # the task is solved in this state


class Environment(abc.ABC):
    """One robot or simulator, used only from the control thread.

    Contract:
    - ``reset()`` starts a new episode with a fresh task variation (object/goal positions) and returns the first
      observation. ``step(action)`` applies one action of ``action_dim`` floats in [-1, 1] and returns the result.
    - Observations are ``{"image": uint8 [H, W, 3], "state": float32 [state_dim]}``, and an environment with several
      cameras adds ``"cameras": {name: uint8 [H, W, 3]}`` (every camera, the primary ``camera`` included); the arrays
      belong to the caller (an implementation must not reuse or mutate them later).
    - ``step`` must return within a control period in the normal case; the runtime measures and reports when it does
      not. The number of steps is the runtime's business (the assignment's ``max_steps``), not the environment's.
    - ``close()`` releases the simulator / hardware; the runtime calls it before creating an environment for another
      ``env_id``.
    """

    env_id: str  # which task family this environment runs (e.g. "reach-v3")
    camera: str  # name of the camera that produces observation["image"]
    extra_cameras: tuple[str, ...] = ()  # the other cameras in observation["cameras"], recorded beside the primary

    @abc.abstractmethod
    def reset(self) -> Observation: ...

    @abc.abstractmethod
    def step(self, action: np.ndarray) -> StepResult: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


class MetaWorldEnvironment(Environment):
    """A single Meta-World v3 task (goal observable: the 39-d state ends with the goal xyz), rendered offscreen.

    Every ``reset()`` draws a fresh random goal/object placement from the environment's own seeded generator, so
    ``seed`` makes a sequence of episodes reproducible while no two episodes share a variation. (The ``MT1`` benchmark
    would instead cycle through 50 pre-sampled variations and costs 50 resets to build.)
    """

    def __init__(self, env_id: str, camera: str = "corner3", image_size: int = 96, seed: Optional[int] = None,
                 extra_cameras: tuple[str, ...] = ()):
        import mujoco
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE

        key = f"{env_id}-goal-observable"
        if key not in ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE:
            raise ValueError(f"unknown Meta-World v3 environment {env_id!r}")
        if seed is None:
            seed = int(np.random.SeedSequence().entropy % (2**31))
        self.env_id = env_id
        self.camera = camera
        self.image_size = image_size
        env = ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE[key](seed=seed)
        # The goal-observable classes freeze the variation drawn at construction. Unfreezing with the seeded
        # generator samples a new one from env.np_random on every reset (SawyerXYZEnv._get_state_rand_vec).
        env._freeze_rand_vec = False
        env.seeded_rand_vec = True
        env.seed(seed)
        # SawyerXYZEnv raises once curr_path_length passes max_path_length (500); the runtime enforces max_steps.
        env.max_path_length = 1_000_000_000
        self._env = env
        names = {env.model.camera(i).name for i in range(env.model.ncam)}
        unknown = [c for c in (camera, *extra_cameras) if c not in names]
        if unknown or camera in extra_cameras or len(set(extra_cameras)) != len(extra_cameras):
            env.close()
            raise ValueError(f"cameras {[camera, *extra_cameras]}: {'unknown ' + str(unknown) if unknown else 'repeated'}"
                             f"; {env_id} has {', '.join(sorted(names))}")
        self.extra_cameras = tuple(extra_cameras)
        # Held around every physics change (reset, step): the video capture thread (media.py) copies the scene under
        # it (~0.02 ms), so it never sees a half-stepped state and the control thread never waits longer than that.
        self.sim_lock = threading.Lock()
        vis = env.model.vis
        # Fast offscreen settings: the default 4096 shadow map and 4x MSAA cost 55-110 ms a frame on a CPU renderer.
        vis.quality.shadowsize = 0
        vis.quality.offsamples = 0
        vis.global_.offwidth = max(vis.global_.offwidth, image_size)
        vis.global_.offheight = max(vis.global_.offheight, image_size)
        try:
            self._renderer = mujoco.Renderer(env.model, height=image_size, width=image_size)
            self._render()  # the first render pays for GL context/shader setup (~0.1-0.4 s): not inside an episode
        except Exception:
            env.close()
            raise

    @property
    def model(self):
        """The MuJoCo model (read-only for others; media.py renders it with a renderer of its own)."""
        return self._env.model

    @property
    def data(self):
        """The MuJoCo data: read it only under ``sim_lock``."""
        return self._env.data

    @property
    def state_dim(self) -> int:
        return int(self._env.observation_space.shape[0])

    def reset(self) -> Observation:
        with self.sim_lock:
            state, _ = self._env.reset()
        return self._observation(state)

    def step(self, action: np.ndarray) -> StepResult:
        with self.sim_lock:
            state, reward, _terminated, _truncated, info = self._env.step(np.asarray(action, dtype=np.float32))
        return StepResult(self._observation(state), float(reward), bool(info.get("success", False)))

    def close(self) -> None:
        self._renderer.close()
        self._env.close()

    def _observation(self, state: np.ndarray) -> Observation:
        image = self._render()
        return {"image": image, "state": np.asarray(state, dtype=np.float32),
                "cameras": {self.camera: image, **{name: self._render(name) for name in self.extra_cameras}}}

    def _render(self, camera: Optional[str] = None) -> np.ndarray:
        camera = camera or self.camera
        self._renderer.update_scene(self._env.data, camera=camera)
        image = self._renderer.render()
        return np.ascontiguousarray(image[::-1]) if flips(camera) else image

    def __repr__(self) -> str:
        return (f"MetaWorldEnvironment({self.env_id!r}, camera={self.camera!r}, image_size={self.image_size}, "
                f"extra_cameras={self.extra_cameras!r})")
