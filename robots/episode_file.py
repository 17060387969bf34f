"""The episode payload: one self-describing HDF5 file per episode, chunked per frame (schema: docs/episode_format.md).

Written by the robot agent at the end of an episode, verified by the server on upload, read lazily by the learner.
Pure core: numpy + h5py only, no Django.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Optional

import h5py
import numpy as np

FORMAT = "sop-episode"
FORMAT_VERSION = 1

# attribute name -> python type; all are required in a valid file
ATTRIBUTES = {
    "episode_id": str,
    "robot": str,
    "task": str,
    "env_id": str,
    "prompt": str,
    "policy": str,
    "policy_version": int,  # -1 when the policy is not a checkpoint (scripted expert, random)
    "split": str,
    "outcome": str,
    "success": bool,
    "started_at": float,  # unix seconds
    "ended_at": float,
    "control_hz": float,  # nominal rate; actual step times are in /timestamp
    "camera": str,
}

# Optional attributes (added within format version 1; a file without them reads as the default): name -> default.
OPTIONAL_ATTRIBUTES = {
    "outcome_source": "robot",  # "robot": the environment / runtime decided the outcome; "operator": a console label
    "outcome_by": "",  # username of the operator who labelled the outcome, "" otherwise
}


class EpisodeFileError(ValueError):
    """The file is not a valid episode payload."""


@dataclasses.dataclass
class Segment:
    """A run of steps [start, end) driven by someone other than the policy."""

    start: int
    end: int
    source: str  # protocol.ControlSource value: "operator" or "sim_operator"
    operator: str = ""  # username for a human operator
    reason: str = ""


@dataclasses.dataclass
class EpisodeData:
    """An episode in memory, as the agent's recorder builds it."""

    meta: dict[str, Any]  # the ATTRIBUTES
    images: np.ndarray  # uint8 [T, H, W, 3]
    states: np.ndarray  # float32 [T, S]
    actions: np.ndarray  # float32 [T, A]  the EXECUTED action
    control_source: np.ndarray  # uint8 [T]  protocol.CONTROL_SOURCE_CODES
    rewards: np.ndarray  # float32 [T]
    successes: np.ndarray  # bool [T]   the environment's success flag after the step
    timestamps: np.ndarray  # float64 [T] seconds since the episode started, measured, never nominal
    segments: list[Segment] = dataclasses.field(default_factory=list)

    @property
    def steps(self) -> int:
        return int(self.actions.shape[0])


def write_episode(path: str | os.PathLike, data: EpisodeData) -> None:
    """Write atomically: a temp file beside ``path``, fsync, rename. A reader never sees a half-written file."""
    path = Path(path)
    _check_arrays(data)
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w", libver="latest") as f:
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        for key, kind in ATTRIBUTES.items():
            f.attrs[key] = kind(data.meta[key])
        for key in OPTIONAL_ATTRIBUTES:
            if key in data.meta:
                f.attrs[key] = str(data.meta[key])
        f.attrs["steps"] = data.steps
        f.attrs["interventions"] = json.dumps([dataclasses.asdict(s) for s in data.segments])
        t, h, w, c = data.images.shape
        # One chunk per frame: the sampler reads a single frame without touching the rest. LZF is fast enough for
        # the agent's background writer and roughly halves rendered frames.
        f.create_dataset("observation/image", data=data.images, chunks=(1, h, w, c), compression="lzf")
        f.create_dataset("observation/state", data=data.states.astype(np.float32))
        f.create_dataset("action", data=data.actions.astype(np.float32))
        f.create_dataset("control_source", data=data.control_source.astype(np.uint8))
        f.create_dataset("reward", data=data.rewards.astype(np.float32))
        f.create_dataset("success", data=data.successes.astype(bool))
        f.create_dataset("timestamp", data=data.timestamps.astype(np.float64))
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _check_arrays(data: EpisodeData) -> None:
    t = data.steps
    if t == 0:
        raise EpisodeFileError("an episode needs at least one step")
    if data.images.dtype != np.uint8 or data.images.ndim != 4 or data.images.shape[-1] != 3:
        raise EpisodeFileError(f"images must be uint8 [T,H,W,3], got {data.images.dtype} {data.images.shape}")
    for name in ("images", "states", "actions", "control_source", "rewards", "successes", "timestamps"):
        arr = getattr(data, name)
        if arr.shape[0] != t:
            raise EpisodeFileError(f"{name} has {arr.shape[0]} rows, expected {t}")
    for seg in data.segments:
        if not (0 <= seg.start < seg.end <= t):
            raise EpisodeFileError(f"intervention segment [{seg.start}, {seg.end}) outside [0, {t})")


class EpisodeReader:
    """Lazy, read-only access to one episode file. Opening reads only the attributes and dataset headers.

    Use as a context manager, or call ``close()``. ``frame(i)`` reads one step; ``load()`` reads everything.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._f = h5py.File(self.path, "r")
        except (OSError, ValueError) as exc:
            raise EpisodeFileError(f"not an HDF5 file: {exc}") from None
        try:
            self.meta = self._validate()
        except Exception:
            self._f.close()
            raise

    def _validate(self) -> dict[str, Any]:
        f = self._f
        if f.attrs.get("format") != FORMAT:
            raise EpisodeFileError("missing format attribute 'sop-episode'")
        if int(f.attrs.get("format_version", -1)) != FORMAT_VERSION:
            raise EpisodeFileError(f"unsupported format_version {f.attrs.get('format_version')}")
        meta: dict[str, Any] = {}
        for key, kind in ATTRIBUTES.items():
            if key not in f.attrs:
                raise EpisodeFileError(f"missing attribute {key!r}")
            value = f.attrs[key]
            meta[key] = value.decode() if isinstance(value, bytes) else kind(value)
        for key, default in OPTIONAL_ATTRIBUTES.items():
            value = f.attrs.get(key, default)
            meta[key] = value.decode() if isinstance(value, bytes) else str(value)
        steps = int(f.attrs.get("steps", -1))
        expected = {
            "observation/image": (np.uint8, 4),
            "observation/state": (np.float32, 2),
            "action": (np.float32, 2),
            "control_source": (np.uint8, 1),
            "reward": (np.float32, 1),
            "success": (np.bool_, 1),
            "timestamp": (np.float64, 1),
        }
        for name, (dtype, ndim) in expected.items():
            ds = f.get(name)
            if not isinstance(ds, h5py.Dataset):
                raise EpisodeFileError(f"missing dataset {name!r}")
            if ds.dtype != dtype or ds.ndim != ndim or ds.shape[0] != steps:
                raise EpisodeFileError(f"dataset {name!r} is {ds.dtype}{ds.shape}, expected {np.dtype(dtype)} with {steps} rows")
        try:
            segments = [Segment(**s) for s in json.loads(f.attrs.get("interventions", "[]"))]
        except (TypeError, ValueError) as exc:
            raise EpisodeFileError(f"bad interventions attribute: {exc}") from None
        for seg in segments:
            if not (0 <= seg.start < seg.end <= steps):
                raise EpisodeFileError(f"intervention segment [{seg.start}, {seg.end}) outside the episode")
        meta["steps"] = steps
        meta["segments"] = segments
        meta["image_shape"] = tuple(f["observation/image"].shape[1:])
        return meta

    @property
    def steps(self) -> int:
        return self.meta["steps"]

    def frame(self, i: int) -> dict[str, Any]:
        """One step, reading only that frame's chunk of the image dataset."""
        if not 0 <= i < self.steps:
            raise IndexError(i)
        f = self._f
        return {
            "image": f["observation/image"][i],
            "state": f["observation/state"][i],
            "action": f["action"][i],
            "control_source": int(f["control_source"][i]),
            "reward": float(f["reward"][i]),
            "success": bool(f["success"][i]),
            "timestamp": float(f["timestamp"][i]),
        }

    def column(self, name: str, start: int = 0, stop: Optional[int] = None) -> np.ndarray:
        """A slice of one dataset, e.g. ``column("action", t, t + horizon)`` for an action chunk."""
        return self._f[name][start:stop]

    def load(self) -> EpisodeData:
        f = self._f
        return EpisodeData(
            meta={k: self.meta[k] for k in (*ATTRIBUTES, *(k for k in OPTIONAL_ATTRIBUTES if k in f.attrs))},
            images=f["observation/image"][:],
            states=f["observation/state"][:],
            actions=f["action"][:],
            control_source=f["control_source"][:],
            rewards=f["reward"][:],
            successes=f["success"][:],
            timestamps=f["timestamp"][:],
            segments=list(self.meta["segments"]),
        )

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "EpisodeReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
