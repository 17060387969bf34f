"""Closed-loop evaluation of a policy on one simulated task, without interventions. Pure core (no Django)."""

from __future__ import annotations

import dataclasses
import logging
import random
from typing import Callable, Optional

from learner.policy import use_inference_threads
from robots.agent.environment import MetaWorldEnvironment
from robots.agent.learned import PolicyAgent
from robots.agent.runtime import Runtime
from robots.agent.seeding import stream_seed
from robots.protocol import Outcome, Split, TaskAssigned

FAST_HZ = 1000.0  # simulated evaluation need not run in real time


@dataclasses.dataclass(frozen=True)
class EvalOutcome:
    episodes: int
    successes: int
    mean_length: float
    lengths: tuple[int, ...]

    @property
    def success_rate(self) -> float:
        return self.successes / self.episodes if self.episodes else 0.0


def evaluate_policy(policy, env_id: str, prompts: list[str], max_steps: int, episodes: int, *, seed: int = 0,
                    image_size: int = 96, camera: str = "corner3", version: Optional[int] = None,
                    progress: Optional[Callable[[int, int], None]] = None,
                    guidance_beta: Optional[float] = None) -> EvalOutcome:
    """Run ``episodes`` episodes with fresh task variations (seeded) through the robot agent's runtime.

    An advantage-conditioned (RECAP) policy is evaluated with classifier-free guidance ``guidance_beta``, by default
    its checkpoint's ``eval_guidance_beta`` (robots collect data with ``guidance_beta``, usually 1)."""
    if guidance_beta is None:
        guidance_beta = evaluation_guidance_beta(policy)
    use_inference_threads(1)  # as on the robots; several evaluations run side by side
    logging.getLogger("robots.agent").setLevel(logging.WARNING)
    rng = random.Random(seed)
    # The held-out placements: the seed tree's eval stream, disjoint from demonstrations and online episodes.
    # a policy that reads several cameras gets them rendered as a robot would (agent --extra-cameras)
    extra = tuple(c for c in getattr(getattr(policy, "config", None), "cameras", ()) if c != camera)
    env = MetaWorldEnvironment(env_id, camera=camera, image_size=image_size, seed=stream_seed(seed, "eval", env_id),
                               extra_cameras=extra)
    agent = PolicyAgent(policy, version, guidance_beta=guidance_beta)
    runtime = Runtime(lambda _: env, agent, control_hz=FAST_HZ, camera=camera)
    successes, lengths = 0, []
    try:
        for i in range(episodes):
            if hasattr(policy, "reseed"):  # a sampling policy (flow_vla) draws the same noise for the same placement
                policy.reseed(stream_seed(seed, "eval", env_id, "noise", i))
            result = runtime.run_episode(TaskAssigned(task="eval", env_id=env_id, prompt=rng.choice(prompts),
                                                      max_steps=max_steps, split=Split.EVAL.value))
            successes += int(result.outcome == Outcome.SUCCESS)
            lengths.append(result.steps)
            if progress:
                progress(i + 1, episodes)
    finally:
        runtime.stop()
        env.close()
    return EvalOutcome(episodes, successes, sum(lengths) / max(1, len(lengths)), tuple(lengths))


def evaluation_guidance_beta(policy) -> Optional[float]:
    """The checkpoint's ``eval_guidance_beta`` for an advantage-conditioned policy; None for any other policy."""
    config = getattr(policy, "config", None)
    if config is None or not getattr(config, "advantage_conditioning", False):
        return None
    return float(config.eval_guidance_beta)
