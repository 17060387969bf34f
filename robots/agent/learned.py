"""The learned policy as an ``Agent``: a checkpoint's action chunks, re-planned every few steps."""

from __future__ import annotations

from typing import Optional

import numpy as np

from .agents import Agent, Decision
from .environment import Observation


class PolicyAgent(Agent):
    """Runs a ``learner.policy.Policy`` (loaded from a verified checkpoint) on the control thread.

    Receding horizon: the policy predicts an H-step action chunk; the agent executes the first ``execute_steps`` of it
    and then asks again (1 = re-plan every step, which one CPU core affords: inference is a few ms). Evaluation jobs
    use this same class, so a checkpoint is measured exactly as robots run it.
    """

    def __init__(self, policy, version: Optional[int], execute_steps: int = 1,
                 guidance_beta: Optional[float] = None):
        self.policy = policy
        # Classifier-free guidance weight for an advantage-conditioned (RECAP) policy. None: the checkpoint's own
        # config.guidance_beta (what the robots run); evaluation passes the checkpoint's eval_guidance_beta. Policies
        # without the indicator are called exactly as before.
        self.guidance_beta = guidance_beta
        self.policy_version = version
        self.name = f"v{version}" if version is not None else "learned"
        self.execute_steps = max(1, execute_steps)
        self._prompt = ""
        self._env_id = ""
        self._chunk: Optional[np.ndarray] = None
        self._used = 0

    def reset(self, env_id: str, prompt: str) -> None:
        self._prompt = prompt
        self._env_id = env_id  # the policy gets task inputs (reach's target) only where this environment states them
        self._chunk, self._used = None, 0

    def skipped(self, steps: int) -> None:
        self._chunk, self._used = None, 0  # the queued chunk was planned for a state the operator has left: re-plan

    def act(self, observation: Observation) -> Decision:
        doubt = None
        if self._chunk is None or self._used >= min(self.execute_steps, len(self._chunk)):
            if self.guidance_beta is None:
                chunk = self.policy.act(observation, self._prompt, env_id=self._env_id)
            else:
                chunk = self.policy.act(observation, self._prompt, guidance_beta=self.guidance_beta,
                                        env_id=self._env_id)
            doubt = replan_disagreement(self._chunk, self._used, chunk)
            self._chunk, self._used = chunk, 0
        action = np.asarray(self._chunk[self._used], dtype=np.float32)
        self._used += 1
        return Decision(action, uncertainty=doubt)


def replan_disagreement(old: Optional[np.ndarray], used: int, new: np.ndarray) -> Optional[float]:
    """How much a re-plan changed the policy's mind: the mean distance (hand xyz, actions in [-1, 1]) between the new
    chunk and the rest of the old one, over the steps both cover. None without an old chunk to compare."""
    if old is None:
        return None
    rest = np.asarray(old[used:], dtype=np.float64)
    n = min(len(rest), len(new))
    if n == 0:
        return None
    return float(np.linalg.norm(rest[:n, :3] - np.asarray(new[:n, :3], dtype=np.float64), axis=1).mean())
