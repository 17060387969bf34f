"""SOP's task-balanced, loss-adaptive online/offline sampler, as pure functions on numpy arrays plus a loss window.

1. Every task with trainable data gets the same share of a batch (1/M), so short or busy tasks don't dominate.
2. Within task m a sample is online with probability w_on = exp(a*l_on) / (exp(a*l_on) + exp(l_off)), where l_on
   and l_off are the mean losses of that task's online and offline samples over the last W learner steps, a > 1,
   clipped to [0.2, 0.8]. A task with no online (trainable) data is all offline; one with only online data is all
   online; before both kinds have a loss in the window, the mix is the middle of the clip range.
3. Within (task, split) a frame is drawn uniformly from the trainable frames.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np

OFFLINE, ONLINE = 0, 1


def online_weight(l_on: float, l_off: float, a: float, clip: tuple[float, float] = (0.2, 0.8),
                  relative: bool = False) -> float:
    """The SOP formula, clipped. exp(a*l_on)/(exp(a*l_on)+exp(l_off)) == sigmoid(a*l_on - l_off), which never
    overflows.

    ``relative``: the losses are first divided by their mean, (l_on + l_off) / 2. On raw losses the formula only
    moves when losses are O(1): with the L1 losses of this policy (0.05-0.3) it stays at 0.50-0.55 whatever the
    ratio (measured: w_on 0.505-0.58 in a study run, docs/experiment.md), so "adaptive" does nothing. Relative
    losses make it scale-free: equal losses give sigmoid(a - 1) (0.73 at a = 2), online twice as hard as offline
    sigmoid(2) -> the clip's top, online half as hard sigmoid(0) = 0.5."""
    if relative:
        scale = 0.5 * (l_on + l_off)
        if scale > 0:
            l_on, l_off = l_on / scale, l_off / scale
    z = a * l_on - l_off
    w = 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))
    return min(max(w, clip[0]), clip[1])


def task_online_weight(
    has_online: bool, has_offline: bool, l_on: Optional[float], l_off: Optional[float], a: float,
    clip: tuple[float, float] = (0.2, 0.8), relative: bool = False,
) -> float:
    """w_on for one task, including the cases where the formula does not apply."""
    if not has_online:
        return 0.0
    if not has_offline:
        return 1.0
    if l_on is None or l_off is None:
        return 0.5 * (clip[0] + clip[1])
    return online_weight(l_on, l_off, a, clip, relative)


class LossWindow:
    """Per-(task, split) loss sums and counts over the last ``window`` learner steps (a ring of per-step totals)."""

    def __init__(self, window: int, num_tasks: int = 0):
        self.window = int(window)
        self.sums = np.zeros((self.window, num_tasks, 2), np.float64)
        self.counts = np.zeros((self.window, num_tasks, 2), np.int64)
        self.position = 0  # the slot the next step writes

    @property
    def num_tasks(self) -> int:
        return self.sums.shape[1]

    def ensure_tasks(self, num_tasks: int) -> None:
        if num_tasks > self.num_tasks:
            grow = ((0, 0), (0, num_tasks - self.num_tasks), (0, 0))
            self.sums = np.pad(self.sums, grow)
            self.counts = np.pad(self.counts, grow)

    def record(self, task: np.ndarray, online: np.ndarray, losses: np.ndarray) -> None:
        """One learner step's per-sample losses; the step ``window`` steps ago drops out."""
        task = np.asarray(task, np.int64)
        if len(task):
            self.ensure_tasks(int(task.max()) + 1)
        split = np.asarray(online, bool).astype(np.int64)
        slot_sums = np.zeros(self.sums.shape[1:], np.float64)
        slot_counts = np.zeros(self.counts.shape[1:], np.int64)
        np.add.at(slot_sums, (task, split), np.asarray(losses, np.float64))
        np.add.at(slot_counts, (task, split), 1)
        self.sums[self.position] = slot_sums
        self.counts[self.position] = slot_counts
        self.position = (self.position + 1) % self.window

    def means(self) -> np.ndarray:
        """[num_tasks, 2] mean loss per task and split (column 0 offline, 1 online); NaN where the window is empty."""
        counts = self.counts.sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(counts > 0, self.sums.sum(0) / np.maximum(counts, 1), np.nan)

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        return {"sums": self.sums, "counts": self.counts}, {"window": self.window, "position": self.position}

    def load_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        if int(meta["window"]) != self.window:
            raise ValueError(f"saved loss window has W={meta['window']}, this run uses W={self.window}")
        self.sums = np.asarray(arrays["sums"], np.float64).copy()
        self.counts = np.asarray(arrays["counts"], np.int64).copy()
        self.position = int(meta["position"])


def build_groups(
    task: np.ndarray, online: np.ndarray, trainable: np.ndarray, num_tasks: int,
    order: Optional[np.ndarray] = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each task id, (offline frame ids, online frame ids) among the trainable frames, listed in ``order`` (a
    permutation of all frame ids; default: id order)."""
    ids = np.flatnonzero(trainable) if order is None else order[trainable[order]]
    keys = task[ids].astype(np.int64) * 2 + online[ids].astype(np.int64)
    order = np.argsort(keys, kind="stable")
    ids, keys = ids[order], keys[order]
    bounds = np.searchsorted(keys, np.arange(2 * num_tasks + 1))
    return [
        (ids[bounds[2 * m]: bounds[2 * m + 1]], ids[bounds[2 * m + 1]: bounds[2 * m + 2]]) for m in range(num_tasks)
    ]


def mixture_weights(
    groups: list[tuple[np.ndarray, np.ndarray]], means: np.ndarray, a: float, clip: tuple[float, float],
    relative: bool = False,
) -> np.ndarray:
    """w_on for every task from its data and its windowed mean losses ([num_tasks, 2], NaN = no loss yet)."""
    weights = np.zeros(len(groups))
    for m, (offline, online) in enumerate(groups):
        l_off = means[m, OFFLINE] if m < len(means) and not np.isnan(means[m, OFFLINE]) else None
        l_on = means[m, ONLINE] if m < len(means) and not np.isnan(means[m, ONLINE]) else None
        weights[m] = task_online_weight(len(online) > 0, len(offline) > 0, l_on, l_off, a, clip, relative)
    return weights


def sample_frames(
    rng: np.random.Generator, groups: list[tuple[np.ndarray, np.ndarray]], w_on: np.ndarray, batch_size: int,
    task_order: Optional[list[int]] = None,
) -> np.ndarray:
    """Global frame ids of one batch: task uniform over tasks with data, split by w_on, frame uniform in the group.
    ``task_order`` (default: id order) fixes which task each random draw maps to."""
    order = range(len(groups)) if task_order is None else task_order
    active = np.array([m for m in order if len(groups[m][0]) + len(groups[m][1]) > 0], np.int64)
    if len(active) == 0:
        raise ValueError("no trainable frames to sample")
    tasks = active[rng.integers(len(active), size=batch_size)]
    is_online = rng.random(batch_size) < w_on[tasks]
    frames = np.empty(batch_size, np.int64)
    for m in active:
        for split in (OFFLINE, ONLINE):
            slots = np.flatnonzero((tasks == m) & (is_online == bool(split)))
            if len(slots):
                group = groups[m][split]
                frames[slots] = group[rng.integers(len(group), size=len(slots))]
    return frames
