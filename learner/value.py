"""RECAP's distributional value function V(o, prompt): a network of its own, saved as safetensors + JSON.

It is a ``SmallVLA`` body whose "action chunk" is one row of B logits over returns in [-1, 0] (``recap_math``):
the same image encoder, prompt projection and state normalisation, separate weights. Separate rather than a second
head on the policy's encoders because (1) the policy's checkpoint format, size and inference cost stay as they are
(robots never need V), (2) the value can be pretrained, frozen or refreshed independently of the policy, and (3) the
value's cross-entropy cannot pull the policy's features around. It is warm-started from the policy's encoders when
created, which costs nothing and starts it from features that already see the hand and the object.

Pure core: numpy + torch + safetensors. Loading never unpickles.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from learner import recap_math
from learner.config import ConfigError, PolicyConfig, from_dict, to_dict
from learner.policy import Normalization, SmallVLA, random_shift

VALUE_FORMAT = "sop-value"
ENCODERS = ("image_encoder", "prompt_proj", "state_proj")


class ValueFunction(nn.Module):
    """V(o, prompt) = sum_b softmax(logits)_b * center_b over ``bins`` bins on [-1, 0]."""

    def __init__(self, policy_config: PolicyConfig, bins: int, prompts=None):
        super().__init__()
        self.bins = int(bins)
        # one camera: the batch's "image" (the policy's first camera, or the primary)
        self.config = dataclasses.replace(policy_config, name="small_vla", horizon=1, action_dim=self.bins,
                                          advantage_conditioning=False, cameras=())
        self.net = SmallVLA(self.config)
        if prompts is not None:
            self.net.prompts = prompts  # share the policy's prompt cache (the same frozen sentence embeddings)
        self.register_buffer("centers", torch.from_numpy(recap_math.bin_centers(self.bins)).float(),
                             persistent=False)

    @property
    def prompts(self):
        return self.net.prompts

    @classmethod
    def from_policy(cls, policy: SmallVLA, bins: int) -> "ValueFunction":
        """A value net with the policy's architecture knobs, prompt cache, state normalisation and (as a warm start)
        copies of its encoders' weights."""
        value = cls(policy.config, bins, prompts=policy.prompts)
        for name in ENCODERS:
            getattr(value.net, name).load_state_dict(getattr(policy, name).state_dict())
        norm = policy.normalization
        value.net.set_normalization(Normalization(norm.state_mean, norm.state_std, np.ones(value.bins, np.float32)))
        if not policy.normalization_fitted:
            value.net.norm_fitted.fill_(0)
        return value

    def logits(self, batch: dict[str, Any], *, generator: Optional[torch.Generator] = None,
               augment_shift: int = 0) -> torch.Tensor:
        """[B, bins] from a batch with ``image`` (uint8 [B, H, W, 3]), ``state`` (raw), ``prompt`` and ``env_id``
        (lists; the latter decides the task inputs as for the policy)."""
        images = self.net._images(batch["image"])
        if augment_shift > 0:
            images = random_shift(images, augment_shift, generator)
        out = self.net.forward(images, self.net._prompt_batch(list(batch["prompt"])),
                               self.net._states(batch["state"], batch.get("env_id")))
        return out.view(-1, self.bins)

    def expected(self, logits: torch.Tensor) -> torch.Tensor:
        return (logits.softmax(dim=-1) * self.centers).sum(dim=-1)

    def loss(self, batch: dict[str, Any], targets: np.ndarray, *, generator: Optional[torch.Generator] = None,
             augment_shift: int = 0) -> Optional[torch.Tensor]:
        """Cross-entropy against two-hot targets; frames whose target is NaN (truncated episodes) are skipped.
        None when no frame of the batch has a target."""
        targets = np.asarray(targets, np.float64)
        keep = ~np.isnan(targets)
        if not keep.any():
            return None
        logits = self.logits(batch, generator=generator, augment_shift=augment_shift)
        logits = logits[torch.from_numpy(keep).to(logits.device)].float()
        soft = torch.from_numpy(recap_math.two_hot(targets[keep], self.bins)).to(logits.device, logits.dtype)
        return -(soft * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()

    @torch.no_grad()
    def predict(self, images: np.ndarray, states: np.ndarray, prompt: str, env_id: str = "",
                chunk: int = 256) -> np.ndarray:
        """V for many frames of one episode (uint8 [T, H, W, 3], raw states [T, S]) run in ``env_id``: float64 [T]."""
        was_training = self.training
        self.eval()
        out = []
        embedding = torch.from_numpy(self.prompts.get(prompt))[None].to(self.net.device)
        for start in range(0, len(images), chunk):
            imgs = torch.from_numpy(np.ascontiguousarray(images[start:start + chunk]))
            sts = torch.from_numpy(np.ascontiguousarray(states[start:start + chunk], dtype=np.float32))
            logits = self.net.forward(self.net._images(imgs), embedding.expand(len(imgs), -1),
                                      self.net._states(sts, [env_id] * len(imgs)))
            out.append(self.expected(logits.view(-1, self.bins).float()).double().cpu().numpy())
        self.train(was_training)
        return np.concatenate(out) if out else np.zeros(0)


# -- files --------------------------------------------------------------------------------------------------------


def save_value(path: str | Path, value: ValueFunction, meta: Optional[dict[str, Any]] = None) -> Path:
    """One safetensors file: ``value.*`` tensors, ``prompts.embeddings``, and a JSON header (key ``sop``) with the
    network's config, bins and whatever the caller records (c_fail, task_max_steps, training steps). Atomic."""
    from learner.checkpoints import _atomic_write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"value.{k}": v.detach().contiguous().clone() for k, v in value.net.state_dict().items()}
    prompts, embeddings = value.prompts.to_arrays()
    tensors["prompts.embeddings"] = torch.from_numpy(embeddings)
    doc = {"format": VALUE_FORMAT, "format_version": 1, "created_at": time.time(), **(meta or {}),
           "policy_config": to_dict(value.config), "bins": value.bins, "prompts": prompts}
    _atomic_write(path, safetensors.torch.save(tensors, metadata={"sop": json.dumps(doc)}))
    return path


def load_value(path: str | Path, embedder=None) -> tuple[ValueFunction, dict[str, Any]]:
    from learner.checkpoints import CheckpointError, _parse, _read_verified

    data = _read_verified(Path(path), None, None)
    tensors, meta = _parse(data, VALUE_FORMAT, path)
    try:
        config = from_dict(PolicyConfig, meta["policy_config"])
        value = ValueFunction(config, int(meta["bins"]))
        if embedder is not None:
            value.net.prompts._embedder = embedder
        value.net.load_state_dict({k[len("value."):]: v for k, v in tensors.items() if k.startswith("value.")})
        value.prompts.load_arrays(list(meta["prompts"]), tensors["prompts.embeddings"].numpy())
    except (KeyError, TypeError, ValueError, RuntimeError, ConfigError) as exc:
        raise CheckpointError(f"{path} does not describe a loadable value function: {exc}") from None
    return value, meta


def train_value(value: ValueFunction, next_batch: Callable[[], dict[str, Any]], targets: Callable[[dict], np.ndarray],
                steps: int, lr: float, *, generator: Optional[torch.Generator] = None, augment_shift: int = 0,
                progress: Optional[Callable[[int, float], None]] = None) -> float:
    """Offline value pretraining (``manage.py pretrain_value``): ``steps`` Adam steps on batches from ``next_batch``
    with targets from ``targets(batch)``. Returns the last loss."""
    optimizer = torch.optim.Adam(value.parameters(), lr=lr)
    value.train()
    last = float("nan")
    for step in range(1, steps + 1):
        batch = next_batch()
        loss = value.loss(batch, targets(batch), generator=generator, augment_shift=augment_shift)
        if loss is not None:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(value.parameters(), 1.0)
            optimizer.step()
            last = loss.item()
        if progress is not None:
            progress(step, last)
    return last
