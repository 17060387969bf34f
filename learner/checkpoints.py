"""Policy checkpoints and resumable trainer state: safetensors + JSON, written atomically, verified, never unpickled.

A checkpoint is ONE self-describing file, ``<dir>/policy-v<version>.safetensors``: the policy's tensors
(``policy.*``), the prompt embeddings (``prompts.embeddings``), and in the safetensors header metadata a JSON document
(key ``sop``) with the policy config, version, parent, algorithm, normalisation, prompt list and metrics. Beside it
``policy-v<version>.json`` (the sidecar) repeats that document plus the file's size and sha256, so the server can
publish a checkpoint without parsing the weights. The sidecar is written after the weights: its presence means the
checkpoint is complete. Format: docs/policy.md.

Pure core: stdlib, numpy, torch, safetensors. Loading never calls ``torch.load`` or pickle.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
import time
from pathlib import Path
from typing import Any, Optional

import safetensors.torch
import torch

from learner.config import ConfigError, PolicyConfig, from_dict, to_dict
from learner.policy import Policy, build_policy
from learner.prompts import Embedder

FORMAT = "sop-policy"
TRAINER_FORMAT = "sop-trainer-state"
FORMAT_VERSION = 1
_META_KEY = "sop"


class CheckpointError(ValueError):
    """A checkpoint or trainer-state file that must not be used: missing, truncated, corrupt or wrong checksum."""


@dataclasses.dataclass
class SavedCheckpoint:
    path: Path  # the .safetensors file
    sidecar: Path  # the .json beside it
    sha256: str
    size: int
    meta: dict[str, Any]


@dataclasses.dataclass
class Checkpoint:
    policy: Policy
    meta: dict[str, Any]  # the JSON document: version, parent, algorithm, policy_config, normalization, metrics, ...
    path: Path
    sha256: str
    size: int

    @property
    def version(self) -> int:
        return int(self.meta["version"])


def checkpoint_path(directory: str | os.PathLike, version: int, tag: str = "") -> Path:
    """``policy-v<version>[-<tag>].safetensors``. The server tags every write attempt, so two workers racing for one
    version write two files and the loser deletes only its own (learner/services.py ``publish_checkpoint``)."""
    return Path(directory) / f"policy-v{version}{'-' + tag if tag else ''}.safetensors"


def sidecar_path(path: str | os.PathLike) -> Path:
    return Path(path).with_suffix(".json")


# -- policy <-> tensors -------------------------------------------------------------------------------------------


def policy_to_tensors(policy: Policy) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Everything needed to rebuild ``policy``: its tensors and the JSON that describes them."""
    tensors = {f"policy.{k}": v.detach().cpu().contiguous().clone() for k, v in policy.state_dict().items()}
    prompts, embeddings = policy.prompts.to_arrays()
    tensors["prompts.embeddings"] = torch.from_numpy(embeddings)
    meta = {
        "policy_config": to_dict(policy.config),
        "normalization": policy.normalization.to_dict(),
        "normalization_fitted": policy.normalization_fitted,
        "prompts": prompts,
    }
    return tensors, meta


def policy_from_tensors(
    tensors: dict[str, torch.Tensor], meta: dict[str, Any], embedder: Optional[Embedder] = None
) -> Policy:
    try:
        config = from_dict(PolicyConfig, meta["policy_config"])
        policy = build_policy(config, embedder)
        state = {k[len("policy."):]: v for k, v in tensors.items() if k.startswith("policy.")}
        policy.load_state_dict(state, strict=True)
        policy.prompts.load_arrays(list(meta["prompts"]), tensors["prompts.embeddings"].numpy())
    except (KeyError, TypeError, ValueError, RuntimeError, ConfigError) as exc:
        raise CheckpointError(f"checkpoint does not describe a loadable policy: {exc}") from None
    return policy


# -- checkpoints --------------------------------------------------------------------------------------------------


def save_checkpoint(
    directory: str | os.PathLike,
    policy: Policy,
    *,
    version: int,
    parent: Optional[int] = None,
    algorithm: str = "",
    step: int = 0,
    metrics: Optional[dict[str, Any]] = None,
    extra: Optional[dict[str, Any]] = None,
    tag: str = "",
) -> SavedCheckpoint:
    """Write ``policy-v<version>[-<tag>].safetensors`` + its sidecar atomically. Files are immutable: an existing file
    is an error (the caller allocates versions monotonically). ``extra`` holds JSON the caller wants recorded (run id,
    training config)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(directory, version, tag)
    if path.exists() or sidecar_path(path).exists():
        raise CheckpointError(f"checkpoint version {version} already exists at {path}")
    tensors, meta = policy_to_tensors(policy)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "version": int(version),
        "parent": parent,
        "algorithm": algorithm,
        "step": int(step),
        "created_at": time.time(),
        "metrics": metrics or {},
        **meta,
        **(extra or {}),
    }
    data = safetensors.torch.save(tensors, metadata={_META_KEY: json.dumps(meta)})
    sha = hashlib.sha256(data).hexdigest()
    _atomic_write(path, data)
    sidecar = {**meta, "file": path.name, "size": len(data), "sha256": sha}
    _atomic_write(sidecar_path(path), json.dumps(sidecar, indent=1).encode())
    return SavedCheckpoint(path, sidecar_path(path), sha, len(data), meta)


def load_checkpoint(
    path: str | os.PathLike,
    expected_sha256: Optional[str] = None,
    expected_size: Optional[int] = None,
    embedder: Optional[Embedder] = None,
) -> Checkpoint:
    """Verify size + sha256, parse, rebuild the policy. Raises ``CheckpointError`` on any problem.

    Without ``expected_*`` the sidecar's size and sha256 are checked if a sidecar exists beside the file; a robot passes
    the values from its ``policy.updated`` message instead. The file is read once, and the bytes that were hashed are
    the bytes that are parsed.
    """
    path = Path(path)
    if expected_sha256 is None and expected_size is None and sidecar_path(path).exists():
        sidecar = read_sidecar(sidecar_path(path))
        expected_sha256, expected_size = sidecar.get("sha256"), sidecar.get("size")
    data = _read_verified(path, expected_sha256, expected_size)
    tensors, meta = _parse(data, FORMAT, path)
    policy = policy_from_tensors(tensors, meta, embedder)
    return Checkpoint(policy, meta, path, hashlib.sha256(data).hexdigest(), len(data))


def read_sidecar(path: str | os.PathLike) -> dict[str, Any]:
    try:
        meta = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"unreadable checkpoint sidecar {path}: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} sidecar")
    return meta


# -- trainer state (resumable training) ---------------------------------------------------------------------------


def save_trainer_state(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> int:
    """One safetensors file with the tensors and a JSON header; ``content_sha256`` covers the tensors so that a
    corrupted file is caught on load. Atomic. Returns the file size."""
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    meta = {"format": TRAINER_FORMAT, "format_version": FORMAT_VERSION, **meta,
            "content_sha256": _content_sha256(tensors)}
    data = safetensors.torch.save(tensors, metadata={_META_KEY: json.dumps(meta)})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(Path(path), data)
    return len(data)


def load_trainer_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    data = _read_verified(Path(path), None, None)
    tensors, meta = _parse(data, TRAINER_FORMAT, path)
    if meta.get("content_sha256") != _content_sha256(tensors):
        raise CheckpointError(f"{path}: tensor contents do not match their recorded checksum")
    return tensors, meta


def optimizer_to_tensors(optimizer: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    """A torch optimizer's state as flat tensors + JSON (no pickle)."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.{index}.{key}"] = value.detach().cpu().clone().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_tensors(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict, prefix: str
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith(prefix + "."):
            index, key = name[len(prefix) + 1:].split(".", 1)
            state.setdefault(int(index), {})[key] = value.clone()
    for index, values in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(values)
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"optimizer state does not fit this policy: {exc}") from None


# -- helpers ------------------------------------------------------------------------------------------------------


def _atomic_write(path: Path, data: bytes) -> None:
    """Temp file beside ``path``, fsync, rename, fsync the directory: readers see the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")  # unique even across hosts
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _read_verified(path: Path, expected_sha256: Optional[str], expected_size: Optional[int]) -> bytes:
    try:
        size = path.stat().st_size
        if expected_size is not None and size != int(expected_size):
            raise CheckpointError(f"{path} is {size} bytes, expected {expected_size} (truncated or wrong file)")
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    if expected_sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != str(expected_sha256).lower():
            raise CheckpointError(f"{path} has sha256 {actual}, expected {expected_sha256}")
    return data


def _parse(data: bytes, fmt: str, path: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read the safetensors header ourselves (for the metadata), then let safetensors parse the tensors."""
    if len(data) < 8:
        raise CheckpointError(f"{path} is too short to be a safetensors file")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8:
        raise CheckpointError(f"{path}: header length {header_len} exceeds the file (truncated)")
    try:
        header = json.loads(data[8:8 + header_len])
        meta = json.loads(header["__metadata__"][_META_KEY])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: unreadable header metadata: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise CheckpointError(f"{path} is not a {fmt} file")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unsupported format_version {meta.get('format_version')}")
    try:
        tensors = safetensors.torch.load(data)
    except Exception as exc:  # SafetensorError derives from Exception directly
        raise CheckpointError(f"{path}: corrupt tensor data: {exc}") from None
    return tensors, meta


def _content_sha256(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()

