"""The Policy interface the fleet and the learner share, and SmallVLA, the default that trains on a CPU.

Pure core: numpy + torch. The robot agent imports this module (with learner.checkpoints) to run a checkpoint, so it
imports fast: the sentence encoder is only loaded when a prompt is missing from the checkpoint's embedding cache.
Architecture, observation fields and their reasons: docs/policy.md.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
import math
import re
from typing import Any, Optional, TypedDict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from learner.config import PolicyConfig
from learner.prompts import Embedder, PromptCache


class Observation(TypedDict, total=False):
    image: np.ndarray  # uint8 [H, W, 3], any size (resized to the policy's input): the primary camera
    state: np.ndarray  # float32 [state_dim], the robot's raw state vector (the policy picks from it, see config)
    cameras: dict[str, np.ndarray]  # every camera by name (the primary's too) on a robot that records several


def observation_images(config: PolicyConfig, observation: Observation) -> list[np.ndarray]:
    """The frames a policy reads from ONE observation: its ``config.cameras`` by name, or the primary image."""
    if not config.cameras:
        return [observation["image"]]
    frames = observation.get("cameras") or {}
    missing = [c for c in config.cameras if c not in frames]
    if missing:
        raise ValueError(f"the policy reads cameras {list(config.cameras)}; this robot does not record {missing} "
                         f"(it has {sorted(frames) or 'its primary camera only'}: start it with --extra-cameras)")
    return [frames[c] for c in config.cameras]


def policy_state_width(config: PolicyConfig) -> int:
    """Entries of the normalised state vector the network gets: ``state_indices`` then ``task_input_indices``."""
    return len(config.state_indices) + len(config.task_input_indices)


def task_input_mask(config: PolicyConfig, env_ids: Optional[list[str]], batch: int) -> np.ndarray:
    """bool [batch]: which samples may see the task inputs (their environment states its target as part of the
    task). No environment given (``None`` or ""): no task input, the safe default."""
    if env_ids is None or not config.task_input_indices:
        return np.zeros(batch, bool)
    allowed = set(config.task_input_envs)
    return np.fromiter((e in allowed for e in env_ids), bool, count=batch)


@dataclasses.dataclass
class Normalization:
    """Input/output scaling fitted on training data; it travels inside every checkpoint.

    state: ``(state[state_indices + task_input_indices] - state_mean) / state_std``, where the task-input part is
    fitted on the frames allowed to see it only. action: the network predicts ``action / action_scale`` and the output
    is clipped to the action space [-1, 1].
    """

    state_mean: np.ndarray  # float32 [policy_state_width(config)]
    state_std: np.ndarray  # float32 [policy_state_width(config)], floored so that a constant field cannot blow up
    action_scale: np.ndarray  # float32 [action_dim], robust max |action| per dimension, floored

    STD_FLOOR = 1e-2
    SCALE_FLOOR = 0.05

    @classmethod
    def identity(cls, config: PolicyConfig) -> "Normalization":
        s = policy_state_width(config)
        return cls(np.zeros(s, np.float32), np.ones(s, np.float32), np.ones(config.action_dim, np.float32))

    @classmethod
    def fit(cls, config: PolicyConfig, states: np.ndarray, actions: np.ndarray,
            env_ids: Optional[list[str]] = None) -> "Normalization":
        """From raw states [N, state_dim], actions [N, action_dim] and each frame's environment id (for the task
        inputs; without them the task-input stats stay at the identity) of training frames."""
        states = np.asarray(states, np.float64)
        proprio = states[:, list(config.state_indices)]
        mean, std = [proprio.mean(0)], [proprio.std(0)]
        if config.task_input_indices:
            allowed = task_input_mask(config, env_ids, len(states))
            task = states[allowed][:, list(config.task_input_indices)]
            n = len(config.task_input_indices)
            mean.append(task.mean(0) if len(task) else np.zeros(n))
            std.append(task.std(0) if len(task) else np.ones(n))
        scale = np.quantile(np.abs(np.asarray(actions, np.float64)), 0.99, axis=0)
        return cls(
            np.concatenate(mean).astype(np.float32),
            np.maximum(np.concatenate(std), cls.STD_FLOOR).astype(np.float32),
            np.maximum(scale, cls.SCALE_FLOOR).astype(np.float32),
        )

    def to_dict(self) -> dict[str, list[float]]:
        return {f.name: getattr(self, f.name).tolist() for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Normalization":
        return cls(**{f.name: np.asarray(data[f.name], np.float32) for f in dataclasses.fields(cls)})


class Policy(nn.Module, abc.ABC):
    """A multi-task, language-conditioned visuomotor policy that predicts action chunks.

    Contract for implementations (a team's bigger VLA plugs in here and is registered in ``POLICIES``):

    - ``__init__(config, embedder=None)`` builds the network from a ``PolicyConfig``; no I/O, no downloads.
    - ``act(observation, prompt, env_id=...)`` -> float32 [H, action_dim] in [-1, 1]: the next H actions for ONE
      observation, without gradients. ``env_id`` says which environment runs (it decides whether the task inputs,
      e.g. reach's target, are given: ``task_input_mask``); without it the policy gets no task input. It must be
      fast (the robot calls it in its control loop) and must not load anything that a checkpoint could carry
      (prompt embeddings come from ``self.prompts``).
    - ``loss(batch, generator=..., augment_shift=...)`` -> {"loss": scalar to minimise, "per_sample": [B] detached
      losses}, on a batch from ``learner.buffer.FrameIndex.load_batch``; only entries where ``action_mask`` is True are
      labels; ``batch["env_id"]`` (list[str]) decides the task inputs as in ``act``. ``per_sample`` feeds the
      sampler's online/offline loss windows. All randomness (augmentation) must come from ``generator`` (a CPU
      generator, also when the policy is on a GPU: draw on it, then move) so that a resumed run continues identically.
      Batches are CPU tensors; ``loss`` moves what it uses to ``self.device``.
    - ``normalization`` / ``set_normalization``: stats fitted on training data, part of ``state_dict()``.
    - ``state_dict()`` / ``load_state_dict()``: tensors only (saved as safetensors, never pickled).
    """

    config: PolicyConfig
    prompts: PromptCache

    @abc.abstractmethod
    def act(self, observation: Observation, prompt: str, *, env_id: Optional[str] = None) -> np.ndarray: ...

    @abc.abstractmethod
    def loss(
        self, batch: dict[str, Any], *, generator: Optional[torch.Generator] = None, augment_shift: int = 0
    ) -> dict[str, torch.Tensor]: ...

    @property
    @abc.abstractmethod
    def normalization(self) -> Normalization: ...

    @abc.abstractmethod
    def set_normalization(self, norm: Normalization) -> None: ...

    @property
    def normalization_fitted(self) -> bool:
        """True once ``set_normalization`` ran (or a checkpoint with fitted stats was loaded)."""
        return False

    @property
    def device(self) -> torch.device:
        """Where the parameters are (the trainer moves a policy with ``.to(device)``; robots run on the CPU). Batches
        arrive as CPU tensors: ``loss`` moves what it uses, and ``per_sample`` may stay on the device."""
        for tensor in self.parameters():
            return tensor.device
        return torch.device("cpu")


def random_shift(images: torch.Tensor, pad: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    """DrQ-style augmentation: replicate-pad by ``pad`` pixels, then crop back at a random offset per sample."""
    b, c, h, w = images.shape
    padded = F.pad(images.contiguous(), (pad, pad, pad, pad), mode="replicate")
    # offsets drawn on the CPU generator (the same draws on every device), then moved to the images' device
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(images.device)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(images.device)
    rows = torch.arange(h, device=images.device)[None, :] + dy[:, None]
    cols = torch.arange(w, device=images.device)[None, :] + dx[:, None]
    # one gather over the flattened padded image: ~20x faster than 4-d advanced indexing on this CPU
    flat = (rows[:, :, None] * (w + 2 * pad) + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return padded.view(b, c, -1).gather(2, flat).view(b, c, h, w)


# Rows of the advantage-indicator embedding (RECAP): I = 0, I = 1, and "no indicator" (the unconditional prediction).
NEGATIVE, POSITIVE, DROPPED = 0, 1, 2


def _indicator_embedding(width: int) -> nn.Embedding:
    embedding = nn.Embedding(3, width)
    nn.init.zeros_(embedding.weight)  # conditional == unconditional == the policy without the embedding, at first
    return embedding


class SmallVLA(Policy):
    """Image (stride-2 CNN) + frozen MiniLM prompt embedding + proprio state -> MLP -> H x action_dim actions."""

    def __init__(self, config: PolicyConfig, embedder: Optional[Embedder] = None):
        super().__init__()
        self.config = config
        self.prompts = PromptCache(config.prompt_dim, embedder)
        layers: list[nn.Module] = []
        channels = 3
        for width in config.conv_channels:
            # Stride-2 convs only: PLATFORM_NOTES measured ~7x the throughput of stride-1 convs + max-pool here.
            layers += [nn.Conv2d(channels, width, 3, stride=2, padding=1), nn.ReLU(inplace=True)]
            channels = width
        side = config.image_size // 2 ** len(config.conv_channels)
        self.image_encoder = nn.Sequential(
            *layers,
            nn.Flatten(),  # keep the spatial layout: where the hand and the object are is the information
            nn.Linear(channels * side * side, config.image_features),
            nn.LayerNorm(config.image_features),
            nn.ReLU(inplace=True),
        )
        self.prompt_proj = nn.Sequential(nn.Linear(config.prompt_dim, config.prompt_features), nn.ReLU(inplace=True))
        n_state = policy_state_width(config)
        self.state_proj = nn.Sequential(nn.Linear(n_state, config.state_features), nn.ReLU(inplace=True))
        head: list[nn.Module] = []
        self.num_cameras = max(1, len(config.cameras))  # one encoder, shared by the cameras; features concatenated
        width = self.context_width = (config.image_features * self.num_cameras + config.prompt_features
                                      + config.state_features)
        for hidden in config.hidden:
            head += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
            width = hidden
        head.append(nn.Linear(width, config.horizon * config.action_dim))
        self.head = nn.Sequential(*head)
        # RECAP's advantage indicator, added to the head's input. Absent (no parameters, no state-dict keys) unless
        # config.advantage_conditioning, so policies without it keep their exact architecture and checkpoints.
        self.indicator: Optional[nn.Embedding] = (
            _indicator_embedding(self.context_width) if config.advantage_conditioning else None
        )
        self.register_buffer("state_index", torch.tensor(config.state_indices, dtype=torch.long), persistent=False)
        self.register_buffer("task_index", torch.tensor(config.task_input_indices, dtype=torch.long), persistent=False)
        norm = Normalization.identity(config)
        self.register_buffer("state_mean", torch.from_numpy(norm.state_mean))
        self.register_buffer("state_std", torch.from_numpy(norm.state_std))
        self.register_buffer("action_scale", torch.from_numpy(norm.action_scale))
        self.register_buffer("norm_fitted", torch.zeros((), dtype=torch.uint8))

    # -- normalisation ---------------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.state_mean.device  # a buffer moves with the parameters: no walk over the modules per call

    @property
    def normalization(self) -> Normalization:
        return Normalization(self.state_mean.cpu().numpy().copy(), self.state_std.cpu().numpy().copy(),
                             self.action_scale.cpu().numpy().copy())

    def set_normalization(self, norm: Normalization) -> None:
        with torch.no_grad():
            self.state_mean.copy_(torch.from_numpy(np.asarray(norm.state_mean, np.float32)))
            self.state_std.copy_(torch.from_numpy(np.asarray(norm.state_std, np.float32)))
            self.action_scale.copy_(torch.from_numpy(np.asarray(norm.action_scale, np.float32)))
            self.norm_fitted.fill_(1)

    @property
    def normalization_fitted(self) -> bool:
        return bool(self.norm_fitted.item())

    # -- network ---------------------------------------------------------------------------------------------------

    def _batch_context(self, batch: dict[str, Any], generator: Optional[torch.Generator],
                       augment_shift: int) -> torch.Tensor:
        """A training batch -> its context [B, context_width], images augmented (random shift) when asked."""
        images = self._batch_images(batch)
        if augment_shift > 0:
            images = random_shift(images, augment_shift, generator)
        # "indicator" (int64 [B]) is set by RECAP; without it a conditioned policy learns the unconditional row
        return self.context(images, self._prompt_batch(batch["prompt"]),
                            self._states(batch["state"], batch.get("env_id")), batch.get("indicator"))

    def _batch_images(self, batch: dict[str, Any]) -> torch.Tensor:
        """A training batch's frames of the policy's cameras -> float [B * num_cameras, 3, S, S] (sample-major)."""
        if not self.config.cameras:
            return self._images(batch["image"])
        if "cameras" not in batch:
            raise ValueError(f"the policy reads cameras {list(self.config.cameras)}: the batch must come from a "
                             f"FrameIndex built with those cameras")
        return torch.stack([self._images(batch["cameras"][c]) for c in self.config.cameras], dim=1).flatten(0, 1)

    def _images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, H, W, 3] -> float [B, 3, S, S] in [-0.5, 0.5], on the policy's device."""
        x = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
        size = self.config.image_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return x.sub_(0.5)

    def _states(self, states: torch.Tensor, env_ids: Optional[list[str]] = None) -> torch.Tensor:
        """Raw states [B, state_dim] -> the normalised policy state [B, policy_state_width]. The task inputs of a
        sample whose environment does not state a target are zeros, whatever the raw state holds there."""
        n = len(self.config.state_indices)
        states = states.to(self.device, non_blocking=True)
        proprio = states.index_select(1, self.state_index)
        out = ((proprio - self.state_mean[:n]) / self.state_std[:n]).clamp_(-10.0, 10.0)
        if not len(self.config.task_input_indices):
            return out
        allowed = torch.from_numpy(task_input_mask(self.config, env_ids, states.shape[0]))[:, None].to(self.device)
        task = ((states.index_select(1, self.task_index) - self.state_mean[n:]) / self.state_std[n:]).clamp_(-10, 10)
        return torch.cat([out, torch.where(allowed, task, torch.zeros_like(task))], dim=1)

    def context(self, images: torch.Tensor, prompt_embeddings: torch.Tensor, states: torch.Tensor,
                indicator: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Preprocessed inputs -> the observation's features [B, context_width] the action head reads.

        ``indicator`` (int64 [B]: ``NEGATIVE``, ``POSITIVE`` or ``DROPPED``) is only used by an advantage-conditioned
        policy; None there means ``DROPPED`` (the unconditional prediction)."""
        batch = states.shape[0]  # images: [B * num_cameras, 3, S, S], each sample's cameras in a row
        features = torch.cat(
            [self.image_encoder(images).view(batch, -1), self.prompt_proj(prompt_embeddings), self.state_proj(states)],
            dim=1,
        )
        if self.indicator is not None:
            if indicator is None:
                indicator = torch.full((features.shape[0],), DROPPED, dtype=torch.long)
            features = features + self.indicator(indicator.to(features.device))
        return features

    def forward(self, images: torch.Tensor, prompt_embeddings: torch.Tensor, states: torch.Tensor,
                indicator: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Preprocessed inputs -> normalised action chunk [B, H, action_dim] (see ``context``)."""
        features = self.context(images, prompt_embeddings, states, indicator)
        return self.head(features).view(-1, self.config.horizon, self.config.action_dim)

    def enable_advantage_conditioning(self, guidance_beta: float = 1.0, eval_guidance_beta: float = 1.0) -> None:
        """Add the RECAP indicator embedding to a policy built without it (e.g. the BC base checkpoint), and record
        the guidance weights in its config. The embedding starts at zero, so every indicator value predicts exactly
        what the policy predicted before. Idempotent for the embedding; the betas are always updated."""
        if self.indicator is None:
            self.indicator = _indicator_embedding(self.context_width).to(self.device)
        self.config = dataclasses.replace(self.config, advantage_conditioning=True, guidance_beta=float(guidance_beta),
                                          eval_guidance_beta=float(eval_guidance_beta))

    def _prompt_batch(self, prompts: list[str]) -> torch.Tensor:
        unique = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
        table = torch.from_numpy(np.stack([self.prompts.get(p) for p in unique]))
        return table[torch.tensor([unique[p] for p in prompts])].to(self.device)

    # -- the interface ---------------------------------------------------------------------------------------------

    def act(self, observation: Observation, prompt: str, guidance_beta: Optional[float] = None, *,
            env_id: Optional[str] = None) -> np.ndarray:
        """The next H actions. An advantage-conditioned policy asks for I = positive with classifier-free guidance
        ``uncond + beta * (cond - uncond)`` (on normalised actions, before clipping); ``guidance_beta`` defaults to
        the checkpoint's ``config.guidance_beta``, and beta = 1 runs the conditional pass only. Other policies ignore
        ``guidance_beta``."""
        with torch.inference_mode():
            images, prompts, states = self._one(observation, prompt, env_id)
            if self.indicator is None:
                out = self.forward(images, prompts, states)[0]
            else:
                out = self._guided(images, prompts, states,
                                   self.config.guidance_beta if guidance_beta is None else float(guidance_beta))
            return (out * self.action_scale).clamp_(-1.0, 1.0).cpu().numpy()

    def _one(self, observation: Observation, prompt: str,
             env_id: Optional[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ONE observation, checked, -> the network's preprocessed inputs (batch of one). In inference mode."""
        state = np.array(observation["state"], dtype=np.float32)  # a copy: torch wants writable arrays
        if state.shape != (self.config.state_dim,):
            raise ValueError(f"state must be [{self.config.state_dim}], got {state.shape}")
        views = []
        for image in observation_images(self.config, observation):
            image = np.asarray(image)
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
                raise ValueError(f"image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
            if not (image.flags.c_contiguous and image.flags.writeable):
                image = np.array(image, order="C")
            views.append(self._images(torch.from_numpy(image)[None]))
        images = views[0] if len(views) == 1 else torch.cat(views)  # [num_cameras, 3, S, S]
        prompts = torch.from_numpy(self.prompts.get(prompt))[None].to(self.device)
        states = self._states(torch.from_numpy(state)[None], None if env_id is None else [env_id])
        return images, prompts, states

    def _guided(self, images: torch.Tensor, prompts: torch.Tensor, states: torch.Tensor, beta: float) -> torch.Tensor:
        """Classifier-free guidance for ONE preprocessed observation -> normalised chunk [H, action_dim]."""
        if beta == 1.0:
            return self.forward(images, prompts, states, torch.tensor([POSITIVE], device=self.device))[0]
        both = self.forward(images.repeat(2, 1, 1, 1), prompts.expand(2, -1), states.expand(2, -1),
                            torch.tensor([POSITIVE, DROPPED], device=self.device))
        cond, uncond = both[0], both[1]
        return uncond + beta * (cond - uncond)

    def loss(
        self, batch: dict[str, Any], *, generator: Optional[torch.Generator] = None, augment_shift: int = 0
    ) -> dict[str, torch.Tensor]:
        pred = self.head(self._batch_context(batch, generator, augment_shift)).view(
            -1, self.config.horizon, self.config.action_dim)
        target = batch["action"].to(pred.device, non_blocking=True) / self.action_scale
        diff = pred.float() - target
        err = (diff.abs() if self.config.loss == "l1" else diff.square()).mean(dim=2)  # [B, H]
        return _masked_chunk_loss(err, batch["action_mask"])


def _masked_chunk_loss(err: torch.Tensor, action_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-step errors [B, H] -> the loss over labelled steps (``action_mask``) and one detached loss per sample (0 for
    a sample without a label)."""
    mask = action_mask.to(err.device).to(err.dtype)
    valid = mask.sum(dim=1)
    per_sample = (err * mask).sum(dim=1) / valid.clamp(min=1.0)
    loss = per_sample[valid > 0].mean() if bool((valid > 0).any()) else err.sum() * 0.0
    return {"loss": loss, "per_sample": per_sample.detach()}


def _time_features(t: torch.Tensor, width: int) -> torch.Tensor:
    """Sinusoidal features [B, width] of flow times t [B] in [0, 1] (periods from 2 down to ~1/500)."""
    freqs = torch.exp(torch.linspace(0.0, math.log(1000.0), width // 2, device=t.device)) * math.pi
    angles = t[:, None].float() * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class FlowVLA(SmallVLA):
    """The same encoders as SmallVLA (image CNN, frozen prompt embedding, proprio state) with a flow-matching action
    head, the family of pi0 and SmolVLA: the head learns a velocity field that carries Gaussian noise to the action
    chunk, and ``act`` integrates it in ``config.flow_steps`` Euler steps (openpi's conventions: x_t = t * noise +
    (1 - t) * actions, target velocity noise - actions, t ~ Beta(1.5, 1) on [0.001, 1], integrated from t = 1 to 0).

    Unlike a regression head it models a distribution of chunks, so two ways of doing a task are not averaged into a
    third; and RECAP's indicator conditions a likelihood: classifier-free guidance mixes the conditional and
    unconditional velocities at every integration step (pi*0.6). ``config.loss`` does not apply (the flow loss is the
    squared velocity error). Robots draw the noise from a generator of their own (``reseed``), so a process that acts on
    the same observations from the same seed acts identically. docs/policy.md "Two policy families".
    """

    TIME_FEATURES = 32

    def __init__(self, config: PolicyConfig, embedder: Optional[Embedder] = None):
        super().__init__(config, embedder)
        chunk = config.horizon * config.action_dim
        layers: list[nn.Module] = []
        width = self.context_width + chunk + self.TIME_FEATURES
        for hidden in config.hidden:
            layers += [nn.Linear(width, hidden), nn.SiLU()]  # smooth in x and t: the velocity field is integrated
            width = hidden
        layers.append(nn.Linear(width, chunk))
        self.head = nn.Sequential(*layers)  # replaces the regression head: (context, x_t, t) -> velocity
        self._noise = torch.Generator().manual_seed(0)

    def reseed(self, seed: int) -> None:
        """Restart the acting noise from ``seed`` (evaluation and robots call it for reproducible rollouts)."""
        self._noise.manual_seed(int(seed))

    def velocity(self, context: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v(x_t, t | observation): context [B, C], x [B, H, A] (normalised actions), t [B] -> [B, H, A]."""
        inputs = torch.cat([context, x.flatten(1), _time_features(t, self.TIME_FEATURES).to(context.dtype)], dim=1)
        return self.head(inputs).view_as(x)

    def forward(self, images: torch.Tensor, prompt_embeddings: torch.Tensor, states: torch.Tensor,
                indicator: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Preprocessed inputs -> a sampled normalised chunk [B, H, action_dim] (from ``noise``, else drawn)."""
        context = self.context(images, prompt_embeddings, states, indicator)
        return self._integrate(lambda x, t: self.velocity(context, x, t), context.shape[0], noise)

    def _integrate(self, field, batch: int, noise: Optional[torch.Tensor]) -> torch.Tensor:
        shape = (batch, self.config.horizon, self.config.action_dim)
        x = (torch.randn(shape, generator=self._noise) if noise is None else noise).to(self.device)
        steps = self.config.flow_steps
        for k in range(steps):
            t = torch.full((batch,), 1.0 - k / steps, device=self.device)
            x = x - field(x, t) / steps
        return x

    def _guided(self, images: torch.Tensor, prompts: torch.Tensor, states: torch.Tensor, beta: float) -> torch.Tensor:
        """CFG on the velocity: v = v_uncond + beta * (v_cond - v_uncond) at every step, for ONE observation."""
        if beta == 1.0:
            return self.forward(images, prompts, states, torch.tensor([POSITIVE], device=self.device))[0]
        both = self.context(images.repeat(2, 1, 1, 1), prompts.expand(2, -1), states.expand(2, -1),
                            torch.tensor([POSITIVE, DROPPED], device=self.device))

        def field(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            v = self.velocity(both, x.expand(2, -1, -1), t.expand(2))
            return v[1:] + beta * (v[:1] - v[1:])

        return self._integrate(field, 1, None)[0]

    def loss(
        self, batch: dict[str, Any], *, generator: Optional[torch.Generator] = None, augment_shift: int = 0
    ) -> dict[str, torch.Tensor]:
        context = self._batch_context(batch, generator, augment_shift)
        actions = batch["action"].to(context.device, non_blocking=True) / self.action_scale
        b = actions.shape[0]
        # noise and times drawn on the CPU generator (the same draws on every device, and on resume), then moved
        noise = torch.randn(actions.shape, generator=generator).to(context.device)
        t = (torch.rand(b, generator=generator) ** (1.0 / 1.5) * 0.999 + 0.001).to(context.device)  # Beta(1.5, 1)
        x_t = t[:, None, None] * noise + (1.0 - t[:, None, None]) * actions
        err = (self.velocity(context, x_t, t).float() - (noise - actions)).square().mean(dim=2)  # [B, H]
        return _masked_chunk_loss(err, batch["action_mask"])


POLICIES: dict[str, type[Policy]] = {"small_vla": SmallVLA, "flow_vla": FlowVLA}  # built in; plug-ins come from ENTRY_POINT_GROUP
ENTRY_POINT_GROUP = "sop.policies"
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*")


def available_policies() -> dict[str, str]:
    """Policy names this process can build: the built-in ones and every installed package's ``sop.policies`` entry
    point (name -> where it comes from). What the console and the CLI offer."""
    from importlib.metadata import entry_points

    found = {name: "built in" for name in POLICIES}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, f"{ep.value} ({ep.dist.name if ep.dist else 'installed'})")
    return found


def policy_class(name: str) -> type[Policy]:
    """The Policy implementation a config names (docs/policy.md "Bring your own policy"): a built-in name, the name
    of an entry point in the ``sop.policies`` group of an installed package (how a team's package plugs in, on the
    learner and on every robot alike), or a ``package.module:Class`` path to an importable class. Whatever is found
    must subclass ``Policy``. A name only ever resolves to code already installed where it runs."""
    if name in POLICIES:
        return POLICIES[name]
    from importlib.metadata import entry_points

    matches = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    try:
        if matches:
            cls = matches[0].load()
        elif _DOTTED.fullmatch(name):
            module, attr = name.split(":")
            cls = getattr(importlib.import_module(module), attr)
        else:
            raise ValueError(f"unknown policy {name!r}; known: {sorted(available_policies())}")
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"policy {name!r} cannot be loaded here: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, Policy)):
        raise ValueError(f"policy {name!r} is {cls!r}, not a learner.policy.Policy")
    return cls


def build_policy(config: PolicyConfig, embedder: Optional[Embedder] = None, seed: Optional[int] = None) -> Policy:
    """A fresh policy from its config; ``seed`` makes the initial weights reproducible without touching global RNG."""
    cls = policy_class(config.name)
    if seed is None:
        return cls(config, embedder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(config, embedder)


def use_inference_threads(threads: int = 1) -> None:
    """Run this process's torch ops on ``threads`` intra-op threads (process-wide). One is right for acting: a
    single observation is too small to split, and on a busy 2-core machine a 2-thread OpenMP team waits for a core.
    Measured while two evaluations ran: ``act`` took 12-42 ms with torch's default (2 threads) and 1.3-1.8 ms with
    one. Robots (before their first checkpoint loads) and evaluation processes call it."""
    torch.set_num_threads(max(1, int(threads)))


def count_parameters(policy: nn.Module) -> int:
    return sum(p.numel() for p in policy.parameters())
