"""RECAP (pi*0.6, arXiv 2511.14759): an advantage-conditioned policy trained on ALL data with a distributional value
function. docs/policy.md "RECAP" has the definitions; the formulas are pure functions in learner/recap_math.py.

One learner step (``update``):
1. Value warm-up: until the value function is ready (loaded from ``value_path``, or ``value_pretrain_steps`` value
   updates done in this run), the step trains V on the batch and leaves the policy as it is.
2. Advantages: V(o) is computed for whole episodes in batched forward passes (images read lazily from the episode
   files), at most ``value_frames_per_step`` frames per learner step, for episodes without values or with values
   from an older value version. Values are cached per episode and value version (in memory, and in the run's
   trainer state so that the next round does not recompute them); the stored episodes are never rewritten. Per-task
   thresholds eps_task make ``positive_share`` of each task's autonomous (policy-driven online) frames positive;
   operator corrections and demonstrations are always positive, and no advantage credits a policy frame with what
   happened after a takeover (``recap_math.episode_advantages``). A frame without an advantage yet is trained with the indicator dropped.
3. Policy: L1 on the action chunk with the indicator I in the input; I is replaced by "dropped" with probability
   ``indicator_dropout`` (one model learns the conditional and the unconditional prediction).
4. ``value_mode == "refresh"`` (default): V keeps training, one step on every batch (all data, online episodes as
   they arrive), and every ``value_refresh_every`` value updates the value version is bumped (cached values then
   refresh incrementally). "frozen" leaves V fixed once ready (it then only knows the data of its first steps).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch

from learner import distributed, recap_math
from learner.algorithms.base import Algorithm, supervised_step
from learner.checkpoints import CheckpointError, optimizer_from_tensors, optimizer_to_tensors
from learner.config import TrainConfig
from learner.devices import autocast
from learner.policy import DROPPED, Policy
from learner.value import ValueFunction, load_value

if TYPE_CHECKING:
    from learner.buffer import FrameIndex


class RECAP(Algorithm):
    name = "recap"

    def __init__(self, config: TrainConfig):
        super().__init__(config)
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.value: Optional[ValueFunction] = None
        self.value_optimizer: Optional[torch.optim.Optimizer] = None
        self.value_ready = False
        self.value_version = 0  # bumped when V is ready and at every refresh; cached values carry theirs
        self.value_updates = 0
        self.last_value_loss: Optional[float] = None
        self.frozen_scales: dict[str, int] = {}  # task -> max_steps the value targets were defined with
        self.index: Optional["FrameIndex"] = None
        self.cache: dict[str, tuple[int, np.ndarray]] = {}  # episode_id -> (value version, V float64 [T])
        self.advantages = np.zeros(0)  # per global frame, NaN = not computed yet
        self.indicator = np.zeros(0, np.int8)  # per global frame: 1 positive, 0 negative, -1 unknown
        self.thresholds = np.zeros(0)  # per task id
        self.positive_share: dict[str, float] = {}  # task -> share of frames with I = positive (of those known)
        self._dirty = False
        self._policy: Optional[Policy] = None
        self._scales: dict[str, int] = {}
        self._scales_key: Any = None

    # -- the Algorithm interface --------------------------------------------------------------------------------

    def trainable_mask(self, index: "FrameIndex") -> np.ndarray:
        # Every frame is a label: demonstrations, autonomous steps and interventions; the indicator tells them apart.
        # The index is also remembered here (the trainer calls this whenever episodes are added): update() computes
        # advantages for the new episodes from it.
        self.index = index
        return np.ones(index.num_frames, bool)

    def bind(self, policy: Policy) -> None:
        if not hasattr(policy, "enable_advantage_conditioning"):
            raise TypeError(f"{type(policy).__name__} has no advantage indicator input; RECAP needs one")
        policy.enable_advantage_conditioning(self.config.guidance_beta, self.config.eval_guidance_beta)
        self._policy = policy
        self.optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=self.config.lr,
                                           weight_decay=self.config.weight_decay)
        if self.config.value_path:
            value, meta = load_value(self.config.value_path)
            if value.bins != self.config.value_bins or float(meta.get("c_fail", -1)) != self.config.c_fail:
                raise CheckpointError(f"{self.config.value_path} was trained with {value.bins} bins and c_fail "
                                      f"{meta.get('c_fail')}; this run uses {self.config.value_bins} and "
                                      f"{self.config.c_fail}")
            value.net.prompts = policy.prompts
            self._set_value(value)
            self.frozen_scales = {str(k): int(v) for k, v in meta.get("task_max_steps", {}).items()}
            self.value_ready, self.value_version = True, 1

    def update(self, policy: Policy, batch: dict[str, Any], *, generator: Optional[torch.Generator] = None
               ) -> dict[str, Any]:
        assert self.optimizer is not None, "bind(policy) first"
        if self.value is None:
            with torch.random.fork_rng(devices=[]):  # reproducible initial head, global RNG untouched
                torch.manual_seed(self.config.seed + 1)
                self._set_value(ValueFunction.from_policy(policy, self.config.value_bins))
        stats: dict[str, Any] = {}
        if not self.value_ready:
            stats["value_loss"] = self._value_step(batch, generator)
            if self.value_updates >= self.config.value_pretrain_steps:
                self._make_ready()
            with torch.no_grad():  # the policy waits for the advantages; its losses still feed the sampler
                policy.eval()
                out = policy.loss(batch)
            return {"loss": out["loss"].item(), "per_sample": out["per_sample"].float().cpu().numpy(), "grad_norm": 0.0,
                    "value_version": self.value_version, **stats}

        self.advance(self.config.value_frames_per_step)
        frame_ids = batch["frame_id"].numpy()
        known = self.indicator[frame_ids] if len(self.indicator) else np.full(len(frame_ids), -1, np.int8)
        indicator = torch.from_numpy(np.where(known < 0, DROPPED, known).astype(np.int64))
        dropped = torch.rand(len(frame_ids), generator=generator) < self.config.indicator_dropout
        batch = {**batch, "indicator": torch.where(dropped, torch.full_like(indicator, DROPPED), indicator)}

        step = supervised_step(policy, self.optimizer, self.config, batch, generator)
        if self.config.value_mode == "refresh":
            stats["value_loss"] = self._value_step(batch, generator)
            if self.value_updates % self.config.value_refresh_every == 0:
                self.value_version += 1  # cached values become stale and are recomputed a few episodes per step
        return {**step,
                "positive_share": dict(self.positive_share), "value_version": self.value_version,
                "indicator_positive": float((indicator == 1).float().mean()), **stats}

    def task_metrics(self) -> dict[str, dict[str, Any]]:
        """Per task, for the trainer's metrics (and so the console): share of positive advantages, eps_task."""
        out: dict[str, dict[str, Any]] = {}
        if self.index is None:
            return out
        for m, name in enumerate(self.index.tasks):
            eps = self.thresholds[m] if m < len(self.thresholds) else np.nan
            out[name] = {"positive_share": self.positive_share.get(name),
                         "advantage_threshold": None if np.isnan(eps) else float(eps)}
        return out

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        assert self.optimizer is not None, "bind(policy) first"
        tensors, opt_meta = optimizer_to_tensors(self.optimizer, "optimizer")
        meta: dict[str, Any] = {"optimizer": opt_meta, "value_ready": self.value_ready,
                                "value_version": self.value_version, "value_updates": self.value_updates,
                                "frozen_scales": self.frozen_scales, "value_bins": self.config.value_bins}
        if self.value is not None:
            tensors.update({f"value.{k}": v.detach().cpu().contiguous().clone() for k, v in
                            self.value.net.state_dict().items()})
            value_opt, meta["value_optimizer"] = optimizer_to_tensors(self.value_optimizer, "value_optimizer")
            tensors.update(value_opt)
        # The value cache: a few bytes per frame, so that the next round (a new process) does not recompute it.
        ids = sorted(self.cache)
        meta["cache"] = [[i, self.cache[i][0], len(self.cache[i][1])] for i in ids]
        tensors["cache.values"] = torch.from_numpy(
            np.concatenate([self.cache[i][1] for i in ids]).astype(np.float64) if ids else np.zeros(0))
        return tensors, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        assert self.optimizer is not None and self._policy is not None, "bind(policy) first"
        optimizer_from_tensors(self.optimizer, tensors, meta["optimizer"], "optimizer")
        value_state = {k[len("value."):]: v for k, v in tensors.items() if k.startswith("value.")}
        if value_state:
            value = ValueFunction(self._policy.config, int(meta["value_bins"]), prompts=self._policy.prompts)
            value.net.load_state_dict(value_state)
            self._set_value(value)
            optimizer_from_tensors(self.value_optimizer, tensors, meta["value_optimizer"], "value_optimizer")
        self.value_ready = bool(meta["value_ready"])
        self.value_version = int(meta["value_version"])
        self.value_updates = int(meta["value_updates"])
        self.frozen_scales = {str(k): int(v) for k, v in meta["frozen_scales"].items()}
        values, offset, self.cache = tensors["cache.values"].numpy(), 0, {}
        for episode_id, version, length in meta["cache"]:
            self.cache[episode_id] = (int(version), values[offset: offset + length].copy())
            offset += length
        self._dirty = True

    # -- values and advantages ----------------------------------------------------------------------------------

    def _set_value(self, value: ValueFunction) -> None:
        if self._policy is not None:
            value.to(self._policy.device)  # the value net trains and predicts where the policy is
        self.value = value
        self.value_optimizer = torch.optim.Adam(value.parameters(), lr=self.config.value_lr)

    def _make_ready(self) -> None:
        self.value_ready = True
        self.value_version += 1
        if self.index is not None:  # freeze the normalisation the value was trained with
            self.frozen_scales.update(self.task_scales(self.index))

    def task_scales(self, index: "FrameIndex") -> dict[str, int]:
        """Max episode length M per task: the config's ``task_max_steps``, else the scale the value function was
        trained with, else the longest episode of the task indexed so far."""
        key = (id(index), index.version, tuple(sorted(self.frozen_scales.items())))
        if self._scales_key != key:
            configured = dict(self.config.task_max_steps)
            longest: dict[str, int] = {}
            for entry in index.episodes:
                longest[entry.task] = max(longest.get(entry.task, 1), entry.steps)
            self._scales = {t: int(configured.get(t, self.frozen_scales.get(t, longest.get(t, 1))))
                            for t in index.tasks}
            self._scales_key = key
        return self._scales

    def returns_for(self, frame_ids: np.ndarray) -> np.ndarray:
        """Normalised returns-to-go of global frames (NaN for truncated episodes): the value targets."""
        index = self.index
        assert index is not None
        scales = self.task_scales(index)
        episodes = index.episode[frame_ids]
        entries = [index.episodes[int(e)] for e in episodes]
        return recap_math.frame_returns(
            index.frame[frame_ids], np.array([e.steps for e in entries]),
            np.array([recap_math.outcome_code(e.outcome) for e in entries]),
            np.array([scales[e.task] for e in entries]), self.config.c_fail)

    def _value_step(self, batch: dict[str, Any], generator: Optional[torch.Generator]) -> Optional[float]:
        assert self.value is not None and self.value_optimizer is not None
        self.value.train()
        with autocast(self.value.net.device, self.config.amp):
            loss = self.value.loss(batch, self.returns_for(batch["frame_id"].numpy()), generator=generator,
                                   augment_shift=self.config.augment_shift)
        self.value_updates += 1
        if loss is None:
            if distributed.active():  # the other ranks average their value gradients now: take part with none
                self.value_optimizer.zero_grad(set_to_none=True)
                distributed.average_gradients(self.value.parameters())
                if any(p.grad is not None for p in self.value.parameters()):
                    if self.config.grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(self.value.parameters(), self.config.grad_clip)
                    self.value_optimizer.step()
            return None
        self.value_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        distributed.average_gradients(self.value.parameters())
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.value.parameters(), self.config.grad_clip)
        self.value_optimizer.step()
        self.last_value_loss = loss.item()
        return self.last_value_loss

    def advance(self, frame_budget: int) -> int:
        """Compute V for episodes that have none or an older version, up to ``frame_budget`` frames (at least one
        episode), then refresh advantages and thresholds if anything changed. Returns the frames computed."""
        index, value = self.index, self.value
        if index is None or value is None or not self.value_ready:
            return 0
        if len(self.advantages) < index.num_frames:
            grow = index.num_frames - len(self.advantages)
            self.advantages = np.concatenate([self.advantages, np.full(grow, np.nan)])
            self._dirty = True
        todo = [e for e in index.episodes if self.cache.get(e.episode_id, (-1,))[0] != self.value_version]
        todo.sort(key=lambda e: (e.episode_id in self.cache, self.cache.get(e.episode_id, (-1,))[0], e.index))
        done = 0
        for entry in todo:
            if done and done + entry.steps > frame_budget:
                break
            columns = index.episode_columns(entry.index)
            self.cache[entry.episode_id] = (self.value_version,
                                            value.predict(columns["image"], columns["state"], entry.prompt,
                                                          entry.env_id))
            done += entry.steps
        if done or self._dirty:
            self._recompute(index)
        return done

    def _recompute(self, index: "FrameIndex") -> None:
        """Advantages of every cached episode, thresholds and indicators: numpy over all frames (cheap)."""
        scales = self.task_scales(index)
        for entry in index.episodes:
            cached = self.cache.get(entry.episode_id)
            if cached is not None and len(cached[1]) == entry.steps:
                frames = slice(entry.offset, entry.offset + entry.steps)
                self.advantages[frames] = recap_math.episode_advantages(
                    cached[1], entry.outcome, scales[entry.task], self.config.c_fail, self.config.advantage_lookahead,
                    takeover=recap_math.next_takeover(index.intervention[frames]))
        task = index.task
        # Expert frames are positive whatever V says: operator corrections and demonstrations (offline episodes);
        # the thresholds are quantiles over the policy's own frames only.
        expert = index.intervention | ~index.online
        self.thresholds = recap_math.task_thresholds(self.advantages, task, ~expert, self.config.positive_share,
                                                     len(index.tasks))
        self.indicator = recap_math.indicators(self.advantages, task, self.thresholds, expert)
        self.positive_share = {}
        for m, name in enumerate(index.tasks):
            known = self.indicator[task == m]
            known = known[known >= 0]
            if len(known):
                self.positive_share[name] = float((known == 1).mean())
        self._dirty = False


ALGORITHM = RECAP
