"""Devices: CPU by default, CUDA when asked and present, a clear error when asked and absent; checkpoints are CPU."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from learner import checkpoints as ckpt
from learner.algorithms import build_algorithm
from learner.buffer import FrameIndex
from learner.config import ConfigError, TrainConfig, get_preset
from learner.devices import DeviceError, autocast, resolve
from learner.policy import build_policy
from learner.trainer import Trainer

from .conftest import FakeEmbedder, make_episode

NO_CUDA = not torch.cuda.is_available()


def test_the_config_names_a_device_and_a_precision_or_refuses():
    assert TrainConfig().device == "" and TrainConfig().amp == "off"
    for good in ("", "cpu", "cuda", "cuda:1"):
        TrainConfig(device=good)
    for bad in ("gpu", "cuda:x", "mps", "cpu;rm -rf /"):
        with pytest.raises(ConfigError, match="device"):
            TrainConfig(device=bad)
    with pytest.raises(ConfigError, match="amp"):
        TrainConfig(amp="fp8")


def test_the_default_device_is_the_workers_setting(monkeypatch):
    monkeypatch.delenv("SOP_DEVICE", raising=False)
    assert resolve() == torch.device("cpu")
    monkeypatch.setenv("SOP_DEVICE", "cpu")
    assert resolve("") == torch.device("cpu")


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
def test_asking_for_cuda_without_it_is_a_clear_error_before_any_step(monkeypatch, tmp_path):
    with pytest.raises(DeviceError, match="no CUDA device"):
        resolve("cuda")
    monkeypatch.setenv("SOP_DEVICE", "cuda")
    with pytest.raises(DeviceError, match="no CUDA device"):
        resolve()
    preset = get_preset("debug")
    index = FrameIndex(horizon=preset.policy.horizon)
    index.add_episode(make_episode(tmp_path / "ep.h5", seed=0))
    config = dataclasses.replace(preset.train, device="cuda")
    with pytest.raises(DeviceError, match="no CUDA device"):
        Trainer(config, index, build_policy(preset.policy, embedder=FakeEmbedder(), seed=0), build_algorithm(config))


def test_bf16_autocast_applies_on_cuda_only():
    assert isinstance(autocast(torch.device("cpu"), "bf16"), type(autocast(torch.device("cpu"), "off")))


def test_checkpoints_and_resume_state_hold_cpu_tensors(tmp_path):
    preset = get_preset("debug")
    index = FrameIndex(horizon=preset.policy.horizon)
    for i in range(2):
        index.add_episode(make_episode(tmp_path / f"ep{i}.h5", seed=i))
    config = dataclasses.replace(preset.train, device="cpu")
    policy = build_policy(preset.policy, embedder=FakeEmbedder(), seed=0)
    with Trainer(config, index, policy, build_algorithm(config)) as trainer:
        trainer.train_step()
        assert trainer.device == torch.device("cpu") and trainer.policy.device == torch.device("cpu")
        saved = ckpt.save_checkpoint(tmp_path / "ck", trainer.policy, version=1, algorithm="bc", step=1)
        trainer.save_state(tmp_path / "state.safetensors")
    tensors, _ = ckpt.load_trainer_state(tmp_path / "state.safetensors")
    assert all(t.device.type == "cpu" for t in tensors.values())
    assert ckpt.load_checkpoint(saved.path).policy.device == torch.device("cpu")


@pytest.mark.skipif(NO_CUDA, reason="no CUDA device here (benchmarks/cuda_smoke.py covers a GPU machine)")
def test_training_on_cuda_matches_the_cpu_at_the_first_step(tmp_path):
    preset = get_preset("debug")
    index = FrameIndex(horizon=preset.policy.horizon)
    for i in range(2):
        index.add_episode(make_episode(tmp_path / f"ep{i}.h5", seed=i))
    losses = {}
    for device in ("cpu", "cuda"):
        config = dataclasses.replace(preset.train, device=device, prefetch=False)
        policy = build_policy(preset.policy, embedder=FakeEmbedder(), seed=0)
        with Trainer(config, index, policy, build_algorithm(config)) as trainer:
            losses[device] = trainer.train_step()["loss"]
    assert losses["cuda"] == pytest.approx(losses["cpu"], rel=1e-3)
