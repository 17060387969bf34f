"""Who decides the next action: the ``Agent`` interface, the scripted Meta-World expert and a random baseline."""

from __future__ import annotations

import abc
import dataclasses
import os
import warnings
from typing import Optional

import numpy as np

from robots.protocol import ControlSource

from .environment import Observation

# Meta-World's experts warn on every step whose proportional response exceeds 1 (the env clips it anyway): noise.
warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high", category=UserWarning)


@dataclasses.dataclass(frozen=True)
class Decision:
    """One action and who produced it. An operator gate (a later wrapper agent) sets ``source`` and ``operator``."""

    action: np.ndarray  # float32 [action_dim] in [-1, 1]: exactly what the environment executes
    source: ControlSource = ControlSource.POLICY
    operator: str = ""  # username when a human operator drove the step
    reason: str = ""  # why someone other than the policy took over
    lease: Optional[int] = None  # the takeover lease the step was driven under (human operators); the server
    # attributes the segment to that lease's holder from its own records, never to the name alone
    uncertainty: Optional[float] = None  # the policy's own doubt about this step, where it has a measure (learned.py)


class Agent(abc.ABC):
    """Maps observations to actions, one control step at a time, on the control thread.

    Contract:
    - ``reset(env_id, prompt)`` is called before every episode; ``act(observation)`` once per step and must return
      well within a control period (the runtime measures it as part of the step).
    - ``name`` and ``policy_version`` are reported to the server (hello, status, episode metadata);
      ``policy_version`` is None unless the agent runs a published checkpoint.
    """

    name: str = ""
    policy_version: Optional[int] = None

    @abc.abstractmethod
    def reset(self, env_id: str, prompt: str) -> None: ...

    @abc.abstractmethod
    def act(self, observation: Observation) -> Decision: ...

    def skipped(self, steps: int) -> None:  # noqa: B027 - optional hook
        """Someone outside this agent (a human operator, ``teleop.OperatorGate``) drove the last ``steps`` steps without
        asking it: the next ``act`` starts from a state it did not choose. Stateful agents drop what they planned."""

    def due_in(self) -> Optional[float]:
        """Seconds until this agent needs a step before the next scheduled tick (the runtime then ticks early and
        re-anchors its schedule there), None when it does not: a safety reaction such as the teleop deadman must not
        wait for up to a control period. Called from the control thread between steps; must return at once."""
        return None


class ScriptedExpertAgent(Agent):
    """Meta-World's hand-written expert for the task, plus optional gaussian noise (to make imperfect demos).

    ``recover=True`` (the simulated operator's expert) drives with a supervisor from ``supervisors.RECOVERING`` where
    the task has one: Meta-World's experts assume a reset state, a supervisor must also get out of the policy's.
    """

    name = "scripted-expert"

    def __init__(self, noise: float = 0.0, seed: Optional[int] = None, recover: bool = False):
        os.environ.setdefault("MUJOCO_GL", "egl")  # importing metaworld imports mujoco
        from metaworld.policies import ENV_POLICY_MAP

        from .supervisors import RECOVERING

        self._policy_map = dict(ENV_POLICY_MAP)
        if recover:
            self._policy_map.update(RECOVERING)
        self._policy = None
        self._env_id = ""
        self.noise = noise
        self._rng = np.random.default_rng(seed)

    def reset(self, env_id: str, prompt: str) -> None:
        if env_id != self._env_id:
            if env_id not in self._policy_map:
                raise ValueError(f"no scripted expert for {env_id!r}")
            self._policy = self._policy_map[env_id]()
            self._env_id = env_id
        if hasattr(self._policy, "reset"):  # a stateful supervisor starts each episode afresh
            self._policy.reset()

    def act(self, observation: Observation) -> Decision:
        if self._policy is None:
            raise RuntimeError("reset() before act()")
        action = np.asarray(self._policy.get_action(observation["state"].astype(np.float64)), dtype=np.float32)
        if self.noise > 0:
            action = action + self._rng.normal(0.0, self.noise, size=action.shape).astype(np.float32)
        return Decision(np.clip(action, -1.0, 1.0).astype(np.float32))


class RandomAgent(Agent):
    """Uniform actions in [-1, 1]^action_dim: a floor for success rates and a smoke test for the plumbing."""

    name = "random"

    def __init__(self, action_dim: int = 4, seed: Optional[int] = None):
        self.action_dim = action_dim
        self._rng = np.random.default_rng(seed)

    def reset(self, env_id: str, prompt: str) -> None:
        pass

    def act(self, observation: Observation) -> Decision:
        return Decision(self._rng.uniform(-1.0, 1.0, size=self.action_dim).astype(np.float32))


class HoldAgent(Agent):
    """Never moves: a stuck policy, for trying the help queue and the console without waiting for a real failure."""

    name = "hold"

    def __init__(self, action_dim: int = 4):
        self.action_dim = action_dim

    def reset(self, env_id: str, prompt: str) -> None:
        pass

    def act(self, observation: Observation) -> Decision:
        return Decision(np.zeros(self.action_dim, dtype=np.float32))


def make_agent(policy: str, noise: float = 0.0, seed: Optional[int] = None) -> Agent:
    """The ``--policy`` registry: ``expert``, ``random`` or ``hold``."""
    if policy == "hold":
        return HoldAgent()
    if policy == "expert":
        return ScriptedExpertAgent(noise=noise, seed=seed)
    if policy == "random":
        return RandomAgent(seed=seed)
    raise ValueError(f"unknown policy {policy!r}")
