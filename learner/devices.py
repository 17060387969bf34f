"""Which device the learner uses, and mixed precision on it. Pure core: torch only.

CPU is the default everywhere and every test runs there; a worker told ``SOP_DEVICE=cuda`` (or a run whose config
says ``device: "cuda"``) trains and evaluates on the GPU. Checkpoints are always written from CPU copies, so a
checkpoint trained on a GPU loads on a robot without one.
"""

from __future__ import annotations

import contextlib
import os

import torch


class DeviceError(RuntimeError):
    """The device asked for does not exist on this machine."""


def default_device() -> str:
    """The worker's device when a run does not name one: ``SOP_DEVICE`` (default ``cpu``)."""
    return os.environ.get("SOP_DEVICE", "").strip() or "cpu"


def resolve(name: str = "") -> torch.device:
    """``""`` -> the worker's default; checks that a CUDA device is really there (a clear error, not a crash in the
    first step)."""
    device = torch.device(name or default_device())
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"this run asks for {device} but this worker has no CUDA device "
                              "(torch.cuda.is_available() is False: a CPU-only torch build, or no GPU/driver)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"this run asks for {device} but this worker has {torch.cuda.device_count()} GPU(s)")
    elif device.type != "cpu":
        raise DeviceError(f"unsupported device {device} (use cpu or cuda[:N])")
    return device


def autocast(device: torch.device, amp: str):
    """The forward passes' precision context: bfloat16 autocast for ``amp == "bf16"`` on CUDA, else nothing."""
    if amp == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
