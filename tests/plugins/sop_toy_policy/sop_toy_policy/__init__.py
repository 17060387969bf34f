"""A tiny MLP policy: an 8x8 grey thumbnail of the camera + the proprio state + the prompt embedding -> an action chunk.

Written against learner.policy's interface only, as a team's own package would be. Its one setting comes from the
run's policy options: ``hidden`` (width of the hidden layer, default 32).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from learner.policy import Normalization, PromptCache, Policy

THUMB = 8


class ToyPolicy(Policy):
    def __init__(self, config, embedder=None):
        super().__init__()
        self.config = config
        self.prompts = PromptCache(config.prompt_dim, embedder)
        hidden = int(config.options.get("hidden", 32))
        n_state = len(config.state_indices)
        self.net = nn.Sequential(nn.Linear(THUMB * THUMB + config.prompt_dim + n_state, hidden), nn.ReLU(),
                                 nn.Linear(hidden, config.horizon * config.action_dim))
        norm = Normalization.identity(config)
        self.register_buffer("state_mean", torch.from_numpy(norm.state_mean))
        self.register_buffer("state_std", torch.from_numpy(norm.state_std))
        self.register_buffer("action_scale", torch.from_numpy(norm.action_scale))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.uint8))
        self.register_buffer("index", torch.tensor(config.state_indices, dtype=torch.long), persistent=False)

    @property
    def normalization(self) -> Normalization:
        return Normalization(self.state_mean.numpy().copy(), self.state_std.numpy().copy(),
                             self.action_scale.numpy().copy())

    def set_normalization(self, norm: Normalization) -> None:
        with torch.no_grad():
            self.state_mean.copy_(torch.from_numpy(np.asarray(norm.state_mean, np.float32)))
            self.state_std.copy_(torch.from_numpy(np.asarray(norm.state_std, np.float32)))
            self.action_scale.copy_(torch.from_numpy(np.asarray(norm.action_scale, np.float32)))
            self.fitted.fill_(1)

    @property
    def normalization_fitted(self) -> bool:
        return bool(self.fitted.item())

    def _predict(self, images: torch.Tensor, prompts: list[str], states: torch.Tensor) -> torch.Tensor:
        grey = images.float().mean(dim=3, keepdim=True).permute(0, 3, 1, 2) / 255.0
        thumb = F.adaptive_avg_pool2d(grey, THUMB).flatten(1)
        words = torch.from_numpy(np.stack([self.prompts.get(p) for p in prompts]))
        n = len(self.config.state_indices)
        proprio = ((states.index_select(1, self.index) - self.state_mean[:n]) / self.state_std[:n]).clamp(-10, 10)
        out = self.net(torch.cat([thumb, words, proprio], dim=1))
        return out.view(-1, self.config.horizon, self.config.action_dim)

    def act(self, observation, prompt: str, guidance_beta: Optional[float] = None, *,
            env_id: Optional[str] = None) -> np.ndarray:
        image = torch.from_numpy(np.array(observation["image"], dtype=np.uint8))[None]
        state = torch.from_numpy(np.array(observation["state"], dtype=np.float32))[None]
        with torch.inference_mode():
            return (self._predict(image, [prompt], state)[0] * self.action_scale).clamp(-1.0, 1.0).numpy()

    def loss(self, batch: dict[str, Any], *, generator: Optional[torch.Generator] = None,
             augment_shift: int = 0) -> dict[str, torch.Tensor]:
        pred = self._predict(batch["image"], batch["prompt"], batch["state"])
        err = (pred - batch["action"] / self.action_scale).abs().mean(dim=2)
        mask = batch["action_mask"].to(err.dtype)
        per_sample = (err * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return {"loss": per_sample.mean(), "per_sample": per_sample.detach()}
