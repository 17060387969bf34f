"""RECAP's rewards, returns, value targets, advantages and per-task thresholds, as pure numpy functions.

Definitions (docs/policy.md "RECAP"; pi*0.6, arXiv 2511.14759; ../shared/RESEARCH.md section 2). For an episode of
T steps of a task whose maximum episode length is M, with failure penalty ``c_fail`` (in units of M):

- raw reward: r_t = -1 for t < T-1; at the last step r_{T-1} = 0 on success and -c_fail*M on failure or timeout.
- normalised: every reward is divided by S = M * (1 + c_fail), the largest possible |return|, so the return
  R_t = sum_{j >= t} r_j / S lies in (-1, 0] (clipped to [-1, 0] for an episode longer than M). With c_fail = 1 any
  failure returns <= -0.5 and any success > -0.5: the value function separates them at every step.
- aborted episodes (e-stop, shutdown, a robot that went away) are not failures of the policy and have no known
  return: they are *truncated*. They get -1 per step with no terminal reward, are left out of the value targets
  (NaN), and their advantages bootstrap from V at their last observed frame.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

SUCCESS_OUTCOMES = frozenset({"success"})
FAILURE_OUTCOMES = frozenset({"failure", "timeout"})  # everything else (aborted, unknown) is truncated


def is_terminal(outcome: str) -> bool:
    """Whether the episode ended on its own (success, failure, timeout): its return is known."""
    return outcome in SUCCESS_OUTCOMES or outcome in FAILURE_OUTCOMES


def normaliser(max_steps: int, c_fail: float) -> float:
    """S = M * (1 + c_fail): returns are divided by it."""
    return float(max(1, int(max_steps))) * (1.0 + float(c_fail))


def episode_rewards(steps: int, outcome: str, max_steps: int, c_fail: float) -> np.ndarray:
    """Normalised per-step rewards, float64 [steps]."""
    rewards = np.full(int(steps), -1.0)
    if steps and outcome in SUCCESS_OUTCOMES:
        rewards[-1] = 0.0
    elif steps and outcome in FAILURE_OUTCOMES:
        rewards[-1] = -float(c_fail) * max(1, int(max_steps))
    return rewards / normaliser(max_steps, c_fail)


def episode_returns(steps: int, outcome: str, max_steps: int, c_fail: float) -> np.ndarray:
    """Normalised returns-to-go R_t in [-1, 0], float64 [steps]; NaN for a truncated (aborted) episode."""
    if not is_terminal(outcome):
        return np.full(int(steps), np.nan)
    rewards = episode_rewards(steps, outcome, max_steps, c_fail)
    return np.clip(np.cumsum(rewards[::-1])[::-1], -1.0, 0.0)


def frame_returns(t: np.ndarray, steps: np.ndarray, outcome_code: np.ndarray, max_steps: np.ndarray,
                  c_fail: float) -> np.ndarray:
    """``episode_returns`` for individual frames in closed form (vectorised over a batch): frame ``t`` of an
    episode of ``steps`` steps; ``outcome_code`` 1 = success, 2 = failure/timeout, 0 = truncated (-> NaN)."""
    t, steps = np.asarray(t, np.float64), np.asarray(steps, np.float64)
    m = np.maximum(np.asarray(max_steps, np.float64), 1.0)
    code = np.asarray(outcome_code)
    raw = -(steps - 1.0 - t) - np.where(code == 2, c_fail * m, 0.0)
    out = np.clip(raw / (m * (1.0 + c_fail)), -1.0, 0.0)
    return np.where(code == 0, np.nan, out)


def outcome_code(outcome: str) -> int:
    return 1 if outcome in SUCCESS_OUTCOMES else 2 if outcome in FAILURE_OUTCOMES else 0


# -- the distributional value function's bins -------------------------------------------------------------------


def bin_centers(bins: int) -> np.ndarray:
    """B evenly spaced values on [-1, 0] (both ends included)."""
    return np.linspace(-1.0, 0.0, int(bins))


def two_hot(values: np.ndarray, bins: int) -> np.ndarray:
    """float32 [N, B] targets: each value split between its two neighbouring bins in proportion to the distance, so
    that the target distribution's mean is exactly the value (nearest-bin rounding would bias it by up to half a
    bin width, 1/400 of the range with 201 bins, and collapse nearby returns onto one class)."""
    v = np.clip(np.asarray(values, np.float64), -1.0, 0.0)
    pos = (v + 1.0) * (bins - 1)  # in [0, B-1]
    lo = np.clip(np.floor(pos).astype(np.int64), 0, bins - 2)
    frac = pos - lo
    out = np.zeros((len(v), bins), np.float32)
    rows = np.arange(len(v))
    out[rows, lo] = 1.0 - frac
    out[rows, lo + 1] += frac
    return out


# -- advantages ---------------------------------------------------------------------------------------------------


def next_takeover(intervention: np.ndarray) -> np.ndarray:
    """int64 [T]: for each frame, the first frame >= it that an operator drove (T if none follows)."""
    intervention = np.asarray(intervention, bool)
    steps = len(intervention)
    out = np.full(steps, steps, np.int64)
    following = steps
    for t in range(steps - 1, -1, -1):
        if intervention[t]:
            following = t
        out[t] = following
    return out


def episode_advantages(values: np.ndarray, outcome: str, max_steps: int, c_fail: float, lookahead: int,
                       takeover: Optional[np.ndarray] = None) -> np.ndarray:
    """A_t = sum_{k<N} r_{t+k} + V(o_{t+N}) - V(o_t) for every frame of one episode, float64 [T].

    Clipped at the end: for a terminal episode, when t+N >= T there is no future beyond the last step, so only the
    rewards count (the terminal reward is in r_{T-1}; no bootstrap). A truncated (aborted) episode has no terminal
    reward, and its lookahead stops at the last observed frame, bootstrapping from V(o_{T-1}).

    ``takeover`` (``next_takeover`` of the episode's intervention mask): no credit crosses a takeover. A policy frame
    whose lookahead reaches the frame b where an operator took over ends there as if the policy had failed at b
    (rewards up to b, then the failure penalty, no bootstrap): what the operator did next is the operator's, not the
    policy's. Without it the N steps before a takeover bootstrap from V inside the rescue and look good.
    """
    values = np.asarray(values, np.float64)
    steps = len(values)
    if steps == 0:
        return np.zeros(0)
    rewards = episode_rewards(steps, outcome, max_steps, c_fail)
    cum = np.concatenate([[0.0], np.cumsum(rewards)])  # cum[j] = sum of rewards before step j
    t = np.arange(steps)
    n = int(lookahead)
    if is_terminal(outcome):
        end = np.minimum(t + n, steps)
        boot = np.where(t + n < steps, values[np.minimum(t + n, steps - 1)], 0.0)
    else:
        end = np.minimum(t + n, steps - 1)
        boot = values[end]
    advantages = cum[end] - cum[t] + boot - values
    if takeover is not None:
        b = np.asarray(takeover, np.int64)
        crossed = (b > t) & (b < steps) & (b < t + n)
        failure = -float(c_fail) * max(1, int(max_steps)) / normaliser(max_steps, c_fail)
        step_reward = -1.0 / normaliser(max_steps, c_fail)
        advantages = np.where(crossed, (b - t) * step_reward + failure - values, advantages)
    return advantages


def task_thresholds(advantages: np.ndarray, task: np.ndarray, eligible: np.ndarray, share: float,
                    num_tasks: Optional[int] = None) -> np.ndarray:
    """eps per task: the (1 - share) quantile of that task's eligible advantages, so that ``share`` of them lie above
    it. NaN for a task without eligible frames."""
    num_tasks = int(task.max()) + 1 if num_tasks is None and len(task) else int(num_tasks or 0)
    eps = np.full(num_tasks, np.nan)
    ok = np.asarray(eligible, bool) & ~np.isnan(advantages)
    for m in range(num_tasks):
        values = advantages[ok & (task == m)]
        if len(values):
            eps[m] = np.quantile(values, 1.0 - share)
    return eps


def indicators(advantages: np.ndarray, task: np.ndarray, thresholds: np.ndarray,
               intervention: np.ndarray) -> np.ndarray:
    """int8 per frame: 1 = positive (A > eps_task, or an expert frame: ``intervention`` marks the frames that are
    always positive, i.e. operator corrections and demonstrations), 0 = negative, -1 = unknown (no advantage yet)."""
    eps = thresholds[task.astype(np.int64)] if len(task) else np.zeros(0)
    with np.errstate(invalid="ignore"):
        positive = advantages > eps
    out = np.where(np.isnan(advantages) | np.isnan(eps), -1, positive.astype(np.int8)).astype(np.int8)
    out[np.asarray(intervention, bool)] = 1
    return out
