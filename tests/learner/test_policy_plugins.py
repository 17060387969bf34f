"""Bring your own policy: a package outside the project plugs in by its "sop.policies" entry point (learner.policy
``policy_class``), trains with the project's trainer and round-trips through a checkpoint (docs/policy.md)."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from learner.algorithms import build_algorithm
from learner.buffer import FrameIndex
from learner.checkpoints import load_checkpoint, save_checkpoint
from learner.config import ConfigError, PolicyConfig, get_preset
from learner.policy import SmallVLA, available_policies, build_policy, policy_class
from learner.trainer import Trainer

from .conftest import FakeEmbedder, make_episode

PLUGIN = Path(__file__).resolve().parents[1] / "plugins" / "sop_toy_policy"


def install_plugin(target: Path) -> Path:
    """pip-installs the toy policy package from tests/plugins/ into ``target`` (no network, no other packages). It
    builds from a copy: a build writes build/ and *.egg-info/ beside the sources."""
    source = target.parent / f"{target.name}-src"
    shutil.copytree(PLUGIN, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--no-index", "--target", str(target), str(source)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return target


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    return install_plugin(tmp_path_factory.mktemp("plugins"))


@pytest.fixture
def plugin_path(installed, monkeypatch):
    monkeypatch.syspath_prepend(str(installed))
    yield installed
    for name in [m for m in sys.modules if m.startswith("sop_toy_policy")]:
        del sys.modules[name]


def test_an_installed_package_is_found_by_its_entry_point(plugin_path):
    assert "toy_mlp" in available_policies() and available_policies()["small_vla"] == "built in"
    cls = policy_class("toy_mlp")
    assert cls.__module__ == "sop_toy_policy" and cls is policy_class("sop_toy_policy:ToyPolicy")
    assert policy_class("small_vla") is SmallVLA


def test_a_plugin_trains_and_round_trips_through_a_checkpoint(plugin_path, tmp_path):
    preset = get_preset("debug")
    config = dataclasses.replace(preset.policy, name="toy_mlp", options={"hidden": 8})
    index = FrameIndex(horizon=config.horizon)
    for i in range(2):
        index.add_episode(make_episode(tmp_path / f"ep{i}.h5", seed=i))
    policy = build_policy(config, embedder=FakeEmbedder(), seed=0)
    assert policy.net[0].out_features == 8, "the run's options reach the plug-in"
    with Trainer(preset.train, index, policy, build_algorithm(preset.train)) as trainer:
        first = trainer.train_step()["loss"]
        for _ in range(30):
            last = trainer.train_step()["loss"]
    assert last < first, "it learns"
    saved = save_checkpoint(tmp_path / "ckpt", policy, version=1, algorithm="bc")
    loaded = load_checkpoint(saved.path, expected_sha256=saved.sha256, expected_size=saved.size)
    assert type(loaded.policy).__name__ == "ToyPolicy" and loaded.policy.config.options == {"hidden": 8}
    obs = {"image": np.full((16, 16, 3), 90, np.uint8), "state": np.linspace(-1, 1, 39).astype(np.float32)}
    prompt = policy.prompts.prompts()[0]  # a prompt the checkpoint carries: no encoder needed
    np.testing.assert_array_equal(policy.act(obs, prompt), loaded.policy.act(obs, prompt))


@pytest.mark.parametrize("name, message", [
    ("no_such_policy", "unknown policy 'no_such_policy'; known: "),
    ("no_such_module:Policy", "cannot be loaded here"),
    ("os:getcwd", "not a learner.policy.Policy"),
    ("os.path:sep", "not a learner.policy.Policy"),
])
def test_a_name_that_is_no_policy_is_refused_clearly(name, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        policy_class(name)


def test_a_checkpoint_of_a_plugin_this_machine_lacks_is_refused_with_its_name(installed, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(installed))
    preset = get_preset("debug")
    policy = build_policy(dataclasses.replace(preset.policy, name="toy_mlp"), embedder=FakeEmbedder(), seed=0)
    saved = save_checkpoint(tmp_path / "ckpt", policy, version=1)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(installed)])
    for name in [m for m in sys.modules if m.startswith("sop_toy_policy")]:
        del sys.modules[name]
    from learner.checkpoints import CheckpointError

    with pytest.raises(CheckpointError, match="toy_mlp"):
        load_checkpoint(saved.path, expected_sha256=saved.sha256, expected_size=saved.size)


@pytest.mark.parametrize("options", [{"f": object()}, {"x": "y" * 20_000}, {1: 2}])
def test_policy_options_are_small_json(options):
    with pytest.raises(ConfigError):
        PolicyConfig(options=options)
