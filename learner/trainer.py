"""The learner loop: sample -> load -> update, with loss windows for the sampler, timing, checkpoint hooks, resume.

Pure core: no Django. The Celery task (learner/tasks.py, Django side) builds a FrameIndex from the verified episodes,
a Policy and an Algorithm, wraps them in a Trainer and publishes what ``on_checkpoint`` saves.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from learner.algorithms import Algorithm, get_algorithm
from learner.buffer import FrameIndex
from learner.checkpoints import (
    CheckpointError,
    load_trainer_state,
    policy_from_tensors,
    policy_to_tensors,
    save_trainer_state,
)
from learner.config import TrainConfig, from_dict, to_dict
from learner.devices import resolve as resolve_device
from learner.policy import Normalization, Policy
from learner.prompts import Embedder
from learner.sampler import LossWindow, build_groups, mixture_weights, sample_frames


@dataclasses.dataclass
class Timing:
    """Where learner time goes. Wall clock: ``sample_load_s`` is what the loop waited for batches (planning + loading,
    or waiting for the prefetch thread), ``update_s`` the updates, ``load_busy_s`` the loader's own time (overlapped
    with updates when prefetching). CPU time of the thread doing the work (``update_cpu_s``, ``load_cpu_s``) is the
    figure that other processes on a shared machine do not distort."""

    steps: int = 0
    sample_load_s: float = 0.0
    update_s: float = 0.0
    load_busy_s: float = 0.0
    update_cpu_s: float = 0.0
    load_cpu_s: float = 0.0

    @property
    def sample_load_share(self) -> float:
        total = self.sample_load_s + self.update_s
        return self.sample_load_s / total if total else 0.0

    @property
    def load_cpu_share(self) -> float:
        """Share of the learner's CPU time spent loading batches, overlapped or not."""
        total = self.load_cpu_s + self.update_cpu_s
        return self.load_cpu_s / total if total else 0.0

    def to_dict(self) -> dict[str, float]:
        return {**dataclasses.asdict(self), "sample_load_share": self.sample_load_share,
                "load_cpu_share": self.load_cpu_share}


class Trainer:
    """Runs learner steps on ``index`` with ``algorithm`` updating ``policy``.

    Each step: draw frame ids (task-balanced, loss-adaptive online/offline mix), read them from the episode files,
    let the algorithm update the policy, record per-sample losses into the per-task/split windows. With
    ``config.prefetch`` the next batch is read in a background thread while the current one trains; its ids are then
    drawn one step earlier (from windows that lack the current step's losses), which the resume state records.
    ``on_checkpoint(step)`` is called every ``checkpoint_every_steps`` steps or ``checkpoint_every_s`` seconds.
    Sets torch's intra-op thread count for the process (``config.num_threads``). Trains on ``config.device`` ("" =
    the worker's SOP_DEVICE, default CPU: learner/devices.py): the policy moves there, batches are loaded on the CPU
    and moved by the policy's ``loss``, and everything saved (checkpoints, resume state) is a CPU copy.
    """

    EXTRA_STATS = ("value_loss", "positive_share", "value_version", "indicator_positive")

    def __init__(
        self,
        config: TrainConfig,
        index: FrameIndex,
        policy: Policy,
        algorithm: Algorithm,
        *,
        on_checkpoint: Optional[Callable[[int], None]] = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        torch.set_num_threads(config.num_threads)
        self.config = config
        self.index = index
        self.device = resolve_device(config.device)
        self.policy = policy.to(self.device)
        self.algorithm = algorithm
        self.on_checkpoint = on_checkpoint
        self.clock = clock
        self.step = 0
        self.rng = np.random.Generator(np.random.PCG64(config.seed))
        self.generator = torch.Generator().manual_seed(config.seed)
        self.window = LossWindow(config.window)
        self.timing = Timing()
        self.last_stats: dict[str, Any] = {}
        self._index_version = -1
        self._trainable = np.zeros(0, bool)
        self._groups: list[tuple[np.ndarray, np.ndarray]] = []
        self._task_order: list[int] = []
        self._pending_ids: Optional[np.ndarray] = None
        self._pending: Optional[concurrent.futures.Future] = None
        self._executor: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._checkpoint_step = 0
        self._checkpoint_time = clock()
        algorithm.bind(policy)
        # The moving average of the policy's parameters that checkpoints publish (config.ema_decay > 0), starting at
        # the weights the run starts from.
        self.ema: Optional[dict[str, torch.Tensor]] = None
        if config.ema_decay > 0:
            self.ema = {name: p.detach().clone() for name, p in policy.named_parameters()}

    # -- data --------------------------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Pick up episodes added to the index since the last step: labels, sampling groups, prompt embeddings, and
        (once per fresh policy) normalisation stats."""
        if self.index.version == self._index_version:
            return
        self._index_version = self.index.version
        self._trainable = np.asarray(self.algorithm.trainable_mask(self.index), bool)
        # Canonical orders (tasks by name, frames by episode id then step) make the draws depend on which episodes
        # are indexed, not on the order they were added, so a run resumed on a rebuilt index continues identically.
        self._task_order = sorted(range(len(self.index.tasks)), key=self.index.tasks.__getitem__)
        episode_ids = [e.episode_id for e in self.index.episodes]
        rank = np.empty(len(episode_ids), np.int64)
        rank[sorted(range(len(episode_ids)), key=episode_ids.__getitem__)] = np.arange(len(episode_ids))
        order = np.lexsort((self.index.frame, rank[self.index.episode]))
        self._groups = build_groups(self.index.task, self.index.online, self._trainable, len(self.index.tasks), order)
        self.window.ensure_tasks(len(self.index.tasks))
        self.policy.prompts.ensure(self.index.prompts())
        if not self.policy.normalization_fitted and self._trainable.any():
            states, actions, env_ids = self.index.collect_columns(
                self._trainable, self.config.norm_max_episodes, np.random.default_rng(self.config.seed)
            )
            self.policy.set_normalization(Normalization.fit(self.policy.config, states, actions, env_ids))

    def online_weights(self) -> np.ndarray:
        """Current w_on per task (index order)."""
        return mixture_weights(self._groups, self.window.means(), self.config.sampler_a, self.config.clip,
                               self.config.sampler_losses == "relative")

    def _plan(self) -> np.ndarray:
        return sample_frames(self.rng, self._groups, self.online_weights(), self.config.batch_size,
                             self._task_order)

    def _load(self, ids: np.ndarray, trainable: np.ndarray) -> tuple[dict[str, Any], float, float]:
        start, cpu = time.perf_counter(), time.thread_time()
        batch = self.index.load_batch(ids, trainable)
        return batch, time.perf_counter() - start, time.thread_time() - cpu

    def _next_batch(self) -> dict[str, Any]:
        if self._pending is not None:
            batch, busy, cpu = self._pending.result()
        elif self._pending_ids is not None:  # planned before a resume, not loaded yet
            batch, busy, cpu = self._load(self._pending_ids, self._trainable)
        else:
            batch, busy, cpu = self._load(self._plan(), self._trainable)
        self._pending, self._pending_ids = None, None
        self.timing.load_busy_s += busy
        self.timing.load_cpu_s += cpu
        if self.config.prefetch:
            self._pending_ids = self._plan()
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sop-loader")
            self._pending = self._executor.submit(self._load, self._pending_ids, self._trainable)
        return batch

    # -- the loop ----------------------------------------------------------------------------------------------

    def train_step(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.refresh()
        batch = self._next_batch()
        t1, cpu = time.perf_counter(), time.thread_time()
        stats = self.algorithm.update(self.policy, batch, generator=self.generator)
        self._update_ema()
        t2 = time.perf_counter()
        self.timing.update_cpu_s += time.thread_time() - cpu
        self.window.record(batch["task"].numpy(), batch["online"].numpy(), stats["per_sample"])
        self.step += 1
        self.timing.steps += 1
        self.timing.sample_load_s += t1 - t0
        self.timing.update_s += t2 - t1
        self.last_stats = {
            "step": self.step,
            "loss": stats["loss"],
            "grad_norm": stats.get("grad_norm", 0.0),
            "online_fraction": float(batch["online"].float().mean()),
            # algorithm-specific stats (RECAP: value_loss, positive_share per task, value_version), JSON-ready
            **{k: stats[k] for k in self.EXTRA_STATS if stats.get(k) is not None},
        }
        if (
            self.step - self._checkpoint_step >= self.config.checkpoint_every_steps
            or self.clock() - self._checkpoint_time >= self.config.checkpoint_every_s
        ):
            self._checkpoint_step, self._checkpoint_time = self.step, self.clock()
            if self.on_checkpoint is not None:
                self.on_checkpoint(self.step)
        return self.last_stats

    def _update_ema(self) -> None:
        if self.ema is None:
            return
        decay = min(self.config.ema_decay, (1.0 + self.step) / (10.0 + self.step))  # step: before this one counts
        with torch.no_grad():
            for name, p in self.policy.named_parameters():
                self.ema[name].lerp_(p.detach(), 1.0 - decay)

    @contextlib.contextmanager
    def published_weights(self):
        """Inside: the policy holds the weights a checkpoint publishes (the moving average when there is one; the raw
        weights come back afterwards, also on an exception). Use it from the training thread, between steps."""
        if self.ema is None:
            yield self.policy
            return
        with torch.no_grad():
            raw = {name: p.detach().clone() for name, p in self.policy.named_parameters()}
            for name, p in self.policy.named_parameters():
                p.copy_(self.ema[name])
        try:
            yield self.policy
        finally:
            with torch.no_grad():
                for name, p in self.policy.named_parameters():
                    p.copy_(raw[name])

    def run(self, steps: Optional[int] = None, should_stop: Optional[Callable[[], bool]] = None) -> dict[str, Any]:
        """Train until ``self.step == steps`` (default ``config.steps``) or ``should_stop()`` returns True."""
        target = self.config.steps if steps is None else steps
        while self.step < target and not (should_stop is not None and should_stop()):
            self.train_step()
        return self.metrics()

    def metrics(self) -> dict[str, Any]:
        """Per-task windowed losses and online weights, and the timing split (JSON-ready)."""
        means = self.window.means()
        weights = self.online_weights() if self._groups else np.zeros(0)
        tasks = {}
        for m, name in enumerate(self.index.tasks):
            offline, online = (means[m] if m < len(means) else (np.nan, np.nan))
            tasks[name] = {
                "loss_offline": None if np.isnan(offline) else float(offline),
                "loss_online": None if np.isnan(online) else float(online),
                "w_on": float(weights[m]) if m < len(weights) else None,
                "offline_frames": int(len(self._groups[m][0])) if m < len(self._groups) else 0,
                "online_frames": int(len(self._groups[m][1])) if m < len(self._groups) else 0,
            }
        task_metrics = getattr(self.algorithm, "task_metrics", None)  # optional: per-task stats of the algorithm
        if task_metrics is not None:
            for name, values in task_metrics().items():
                if name in tasks:
                    tasks[name].update(values)
        return {"step": self.step, "tasks": tasks, "timing": self.timing.to_dict(), **self.last_stats}

    def close(self) -> None:
        """Wait for the background load (its batch is dropped; a failure of it is not raised here, so that it cannot
        mask the exception a ``with`` block is already handling) and stop the loader thread."""
        if self._pending is not None:
            self._pending.exception()
            self._pending = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- resume ------------------------------------------------------------------------------------------------

    def save_state(self, path: str | Path) -> int:
        """Everything needed to continue this run exactly: policy, optimizer, RNGs, loss windows, the planned next
        batch. One safetensors file with a JSON header (no pickle), written atomically. Returns its size."""
        tensors, policy_meta = policy_to_tensors(self.policy)
        algo_tensors, algo_meta = self.algorithm.state()
        tensors.update({f"algorithm.{k}": v for k, v in algo_tensors.items()})
        window_arrays, window_meta = self.window.state()
        tensors["window.sums"] = torch.from_numpy(np.ascontiguousarray(window_arrays["sums"]))
        tensors["window.counts"] = torch.from_numpy(np.ascontiguousarray(window_arrays["counts"]))
        tensors["rng.torch"] = self.generator.get_state()
        if self.ema is not None:
            tensors.update({f"ema.{k}": v.detach().cpu().contiguous().clone() for k, v in self.ema.items()})
        pending = None
        if self._pending_ids is not None:
            pending = [self._frame_ref(int(i)) for i in self._pending_ids]
        meta = {
            "step": self.step,
            "train_config": to_dict(self.config),
            "algorithm": self.algorithm.name,
            "policy": policy_meta,
            "algorithm_state": algo_meta,
            "rng_numpy": self.rng.bit_generator.state,
            "window": window_meta,
            "window_tasks": self.index.tasks[: self.window.num_tasks],
            "pending": pending,
            "checkpoint_step": self._checkpoint_step,
            "timing": dataclasses.asdict(self.timing),
        }
        return save_trainer_state(path, tensors, meta)

    @classmethod
    def resume(
        cls,
        path: str | Path,
        index: FrameIndex,
        *,
        embedder: Optional[Embedder] = None,
        on_checkpoint: Optional[Callable[[int], None]] = None,
        clock: Callable[[], float] = time.monotonic,
        overrides: Optional[dict[str, Any]] = None,
    ) -> "Trainer":
        """A trainer that continues the run saved at ``path`` on ``index`` (rebuilt from the same episode files, in
        any order: frames and tasks are matched by episode id and task name). ``overrides`` replace fields of the
        saved TrainConfig (a data-parallel rank's own device)."""
        tensors, meta = load_trainer_state(path)
        config = from_dict(TrainConfig, meta["train_config"])
        if overrides:
            config = dataclasses.replace(config, **overrides)
        policy = policy_from_tensors(tensors, meta["policy"], embedder)
        algorithm = get_algorithm(meta["algorithm"])(config)
        trainer = cls(config, index, policy, algorithm, on_checkpoint=on_checkpoint, clock=clock)
        trainer._restore(tensors, meta)
        return trainer

    def _restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        algo = {k[len("algorithm."):]: v for k, v in tensors.items() if k.startswith("algorithm.")}
        self.algorithm.load_state(algo, meta["algorithm_state"])
        self.step = int(meta["step"])
        # The step of the last checkpoint, so that checkpoint_every_steps counts across rounds (a round shorter than
        # the interval would otherwise restart the count and never publish until the run ends).
        self._checkpoint_step = int(meta.get("checkpoint_step", self.step))
        self.rng.bit_generator.state = meta["rng_numpy"]
        self.generator.set_state(tensors["rng.torch"])
        self.timing = Timing(**meta["timing"])
        if self.ema is not None:
            saved_ema = {k[len("ema."):]: v for k, v in tensors.items() if k.startswith("ema.")}
            if saved_ema:  # a state written before the run averaged weights starts its average here
                self.ema = {name: saved_ema[name].to(self.device).clone() for name in self.ema}
        # Loss windows are stored per task name; map them onto this index's task ids.
        saved = LossWindow(int(meta["window"]["window"]))
        saved.load_state({"sums": tensors["window.sums"].numpy(), "counts": tensors["window.counts"].numpy()},
                         meta["window"])
        self.window = LossWindow(saved.window, len(self.index.tasks))
        self.window.position = saved.position
        task_ids = {name: i for i, name in enumerate(self.index.tasks)}
        for old, name in enumerate(meta["window_tasks"]):
            if name in task_ids:
                self.window.sums[:, task_ids[name]] = saved.sums[:, old]
                self.window.counts[:, task_ids[name]] = saved.counts[:, old]
        self.refresh()
        if meta.get("pending") is not None:
            self._pending_ids = np.array([self._frame_id(ref) for ref in meta["pending"]], np.int64)

    def _frame_ref(self, frame_id: int) -> list:
        entry = self.index.episodes[int(self.index.episode[frame_id])]
        return [entry.episode_id, int(self.index.frame[frame_id])]

    def _frame_id(self, ref: list) -> int:
        entry = self.index.entry(ref[0])
        if entry is None:
            raise CheckpointError(f"trainer state refers to episode {ref[0]}, which is not in the index")
        return entry.offset + int(ref[1])
