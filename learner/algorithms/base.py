"""The Algorithm plug-in interface and the supervised (behaviour-cloning) update that BC and HG-DAgger share."""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, ClassVar, Optional

import numpy as np
import torch

from learner import distributed
from learner.checkpoints import optimizer_from_tensors, optimizer_to_tensors
from learner.config import TrainConfig
from learner.devices import autocast
from learner.policy import Policy

if TYPE_CHECKING:
    from learner.buffer import FrameIndex


class Algorithm(abc.ABC):
    """A post-training method. The trainer owns sampling and timing; the algorithm owns what is learned and how.

    Contract:
    - ``trainable_mask(index)`` -> bool [index.num_frames]: which frames are labels. The sampler draws only these,
      and a batch's ``action_mask`` hides future steps of a chunk that are not labels. Must be a pure function of the
      index (it is recomputed whenever episodes are added).
    - ``bind(policy)`` is called once before the first update (build optimizers, frozen helpers).
    - ``update(policy, batch, generator=...)`` does one learner step and returns stats: at least ``loss`` (float)
      and ``per_sample`` (float [B], the losses the sampler's online/offline windows track). All randomness comes
      from ``generator``.
    - ``state()`` / ``load_state(tensors, meta)``: everything needed to resume (optimizer moments, value networks),
      as tensors + JSON. Never pickle.
    """

    name: ClassVar[str]

    def __init__(self, config: TrainConfig):
        self.config = config

    @abc.abstractmethod
    def trainable_mask(self, index: "FrameIndex") -> np.ndarray: ...

    @abc.abstractmethod
    def bind(self, policy: Policy) -> None: ...

    @abc.abstractmethod
    def update(
        self, policy: Policy, batch: dict[str, Any], *, generator: Optional[torch.Generator] = None
    ) -> dict[str, Any]: ...

    @abc.abstractmethod
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]: ...

    @abc.abstractmethod
    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None: ...


class SupervisedAlgorithm(Algorithm):
    """Regress the policy's action chunk onto labelled actions with AdamW; subclasses choose the labels."""

    def __init__(self, config: TrainConfig):
        super().__init__(config)
        self.optimizer: Optional[torch.optim.Optimizer] = None

    def bind(self, policy: Policy) -> None:
        self.optimizer = torch.optim.AdamW(
            [p for p in policy.parameters() if p.requires_grad], lr=self.config.lr,
            weight_decay=self.config.weight_decay,
        )

    def update(
        self, policy: Policy, batch: dict[str, Any], *, generator: Optional[torch.Generator] = None
    ) -> dict[str, Any]:
        assert self.optimizer is not None, "bind(policy) first"
        return supervised_step(policy, self.optimizer, self.config, batch, generator)

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        assert self.optimizer is not None, "bind(policy) first"
        tensors, meta = optimizer_to_tensors(self.optimizer, "optimizer")
        return tensors, {"optimizer": meta}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        assert self.optimizer is not None, "bind(policy) first"
        optimizer_from_tensors(self.optimizer, tensors, meta["optimizer"], "optimizer")


def supervised_step(policy: Policy, optimizer: torch.optim.Optimizer, config: TrainConfig, batch: dict[str, Any],
                    generator: Optional[torch.Generator] = None) -> dict[str, Any]:
    """One regression step of the policy's action chunk on ``batch``: loss, backward, clip, optimizer step."""
    policy.train()
    with autocast(policy.device, config.amp):
        out = policy.loss(batch, generator=generator, augment_shift=config.augment_shift)
    optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    distributed.average_gradients(policy.parameters())  # data-parallel ranks step with the same gradient
    grad_norm = 0.0
    if config.grad_clip > 0:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(policy.parameters(), config.grad_clip))
    optimizer.step()
    return {"loss": out["loss"].item(), "per_sample": out["per_sample"].float().cpu().numpy(), "grad_norm": grad_norm}
