import hashlib
import json
import pickle

import numpy as np
import pytest
import torch

from learner.checkpoints import (
    CheckpointError,
    load_checkpoint,
    load_trainer_state,
    save_checkpoint,
    save_trainer_state,
)
from learner.policy import Normalization, build_policy


class NoEmbedder:
    """An embedder that must never be called: a checkpoint carries the embeddings of its training prompts."""

    dim = 384

    def embed(self, text):
        raise AssertionError(f"the encoder was needed for {text!r}")


@pytest.fixture
def trained_policy(tiny_policy_config, fake_embedder):
    policy = build_policy(tiny_policy_config, fake_embedder, seed=1)
    policy.prompts.ensure(["reach the target", "push the puck"])
    rng = np.random.default_rng(0)
    policy.set_normalization(Normalization.fit(tiny_policy_config, rng.standard_normal((50, 39)),
                                               rng.uniform(-1, 1, (50, 4))))
    return policy


@pytest.fixture
def saved(tmp_path, trained_policy):
    return save_checkpoint(tmp_path, trained_policy, version=3, parent=2, algorithm="hg_dagger", step=500,
                           metrics={"loss": 0.1})


def _obs(seed):
    rng = np.random.default_rng(seed)
    return {"image": rng.integers(0, 255, (16, 16, 3), dtype=np.uint8),
            "state": rng.standard_normal(39).astype(np.float32)}


def test_a_loaded_checkpoint_reproduces_the_policy_exactly(saved, trained_policy):
    loaded = load_checkpoint(saved.path, embedder=NoEmbedder())
    for seed in range(5):
        for prompt in ("reach the target", "push the puck"):
            np.testing.assert_array_equal(loaded.policy.act(_obs(seed), prompt), trained_policy.act(_obs(seed), prompt))
    assert loaded.policy.normalization_fitted
    np.testing.assert_array_equal(loaded.policy.normalization.state_mean, trained_policy.normalization.state_mean)


def test_the_sidecar_describes_the_checkpoint(saved):
    sidecar = json.loads(saved.sidecar.read_text())
    assert saved.path.name == "policy-v3.safetensors" and saved.sidecar.name == "policy-v3.json"
    assert sidecar["sha256"] == hashlib.sha256(saved.path.read_bytes()).hexdigest()
    assert sidecar["size"] == saved.path.stat().st_size
    assert (sidecar["version"], sidecar["parent"], sidecar["algorithm"], sidecar["step"]) == (3, 2, "hg_dagger", 500)
    assert sidecar["prompts"] == ["push the puck", "reach the target"]
    assert sidecar["policy_config"]["image_size"] == 16 and "state_std" in sidecar["normalization"]
    assert sidecar["metrics"] == {"loss": 0.1}


def test_loading_never_unpickles(saved, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("pickle/torch.load must never run on a checkpoint")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    load_checkpoint(saved.path, embedder=NoEmbedder())


def test_a_version_is_never_overwritten(tmp_path, saved, trained_policy):
    with pytest.raises(CheckpointError, match="already exists"):
        save_checkpoint(tmp_path, trained_policy, version=3)


def test_a_wrong_checksum_is_rejected(saved):
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(saved.path, expected_sha256="0" * 64)


def test_a_wrong_size_is_rejected(saved):
    with pytest.raises(CheckpointError, match="bytes"):
        load_checkpoint(saved.path, expected_sha256=saved.sha256, expected_size=saved.size + 1)


def test_a_corrupted_byte_is_caught_by_the_sidecar_checksum(saved):
    data = bytearray(saved.path.read_bytes())
    data[-10] ^= 0xFF  # inside the tensor data: still parses, but the weights are wrong
    saved.path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(saved.path)


@pytest.mark.parametrize("keep", [0, 5, 100, -1])
def test_a_truncated_file_is_rejected_even_without_a_checksum(saved, keep):
    data = saved.path.read_bytes()
    saved.path.write_bytes(data[:keep] if keep >= 0 else data[:-1])
    saved.sidecar.unlink()
    with pytest.raises(CheckpointError):
        load_checkpoint(saved.path)


def test_a_file_that_is_not_a_checkpoint_is_rejected(tmp_path):
    bogus = tmp_path / "policy-v1.safetensors"
    bogus.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1}       ")
    with pytest.raises(CheckpointError):
        load_checkpoint(bogus)
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_a_checkpoint_of_another_architecture_is_rejected(saved):
    data = saved.path.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + header_len])
    meta = json.loads(header["__metadata__"]["sop"])
    meta["policy_config"]["hidden"] = [64]
    header["__metadata__"]["sop"] = json.dumps(meta)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    saved.path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + header_len:])
    saved.sidecar.unlink()
    with pytest.raises(CheckpointError, match="loadable"):
        load_checkpoint(saved.path)


def test_trainer_state_detects_corrupted_tensors(tmp_path):
    path = tmp_path / "state.safetensors"
    save_trainer_state(path, {"w": torch.arange(100, dtype=torch.float32)}, {"step": 7})
    tensors, meta = load_trainer_state(path)
    assert meta["step"] == 7 and torch.equal(tensors["w"], torch.arange(100, dtype=torch.float32))
    data = bytearray(path.read_bytes())
    data[-4] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        load_trainer_state(path)


def test_writes_leave_no_temp_files_behind(tmp_path, saved):
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy-v3.json", "policy-v3.safetensors"]
