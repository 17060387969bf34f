"""CUDA smoke check: one short training round and one evaluation on the GPU, compared with the same on the CPU.

    .venv/bin/python benchmarks/cuda_smoke.py            # writes benchmarks/results/cuda_smoke.json

Without a GPU it says so, writes ``{"cuda": false, ...}`` and exits 0 (the CPU path is what every test runs). With one:
the debug-sized policy trains ``--steps`` steps from the same weights and data on cpu, cuda and cuda+bf16; the first
step's loss must agree between cpu and cuda (float32) to 1e-3; the trained GPU checkpoint is saved, loaded back on
the CPU (as a robot would) and evaluated closed-loop on reach for ``--episodes`` episodes on the GPU. Steps/s of each
device are recorded (a measurement, not a pass/fail criterion).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from learner import checkpoints as ckpt  # noqa: E402
from learner.algorithms import build_algorithm  # noqa: E402
from learner.buffer import FrameIndex  # noqa: E402
from learner.config import get_preset  # noqa: E402
from learner.evaluation import evaluate_policy  # noqa: E402
from learner.policy import build_policy  # noqa: E402
from learner.trainer import Trainer  # noqa: E402
from robots.episode_file import EpisodeData, write_episode  # noqa: E402


class HashEmbedder:
    """Deterministic prompt vectors (no model download; the smoke check is about devices, not language)."""

    dim = 384

    def embed(self, text: str) -> np.ndarray:
        v = np.random.default_rng(abs(hash(text)) % (2**32)).standard_normal(self.dim).astype(np.float32)
        return v / np.linalg.norm(v)


def synthetic_episode(path: Path, seed: int, steps: int = 60) -> Path:
    rng = np.random.default_rng(seed)
    states = rng.uniform(-1, 1, (steps, 39)).astype(np.float32)
    data = EpisodeData(
        meta=dict(episode_id=f"00000000-0000-4000-8000-{seed:012d}", robot="smoke", task="reach", env_id="reach-v3",
                  prompt="reach the goal", policy="scripted", policy_version=-1, split="offline", outcome="success",
                  success=True, started_at=1.0, ended_at=2.0, control_hz=10.0, camera="corner3"),
        images=rng.integers(0, 255, (steps, 64, 64, 3), dtype=np.uint8),
        states=states,
        actions=np.tanh(states[:, :4] + states[:, 36:37]).astype(np.float32),  # learnable from the state
        control_source=np.zeros(steps, np.uint8),
        rewards=np.zeros(steps, np.float32),
        successes=np.zeros(steps, bool),
        timestamps=np.arange(steps) / 10.0,
    )
    write_episode(path, data)
    return path


def train(index: FrameIndex, device: str, amp: str, steps: int) -> dict:
    preset = get_preset("debug")
    config = dataclasses.replace(preset.train, device=device, amp=amp, prefetch=False, seed=0)
    policy = build_policy(preset.policy, embedder=HashEmbedder(), seed=0)
    with Trainer(config, index, policy, build_algorithm(config)) as trainer:
        first = trainer.train_step()["loss"]
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps - 1):
            last = trainer.train_step()["loss"]
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        rate = (steps - 1) / (time.perf_counter() - start)
        return {"device": device, "amp": amp, "first_loss": first, "last_loss": last, "steps_per_s": round(rate, 1),
                "policy": trainer.policy}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--episodes", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cuda_smoke.json"))
    p.add_argument("--device", default="cuda", help="the device compared with the CPU (cpu: a dry run of this script)")
    args = p.parse_args()
    target = args.device
    result: dict = {"command": "python benchmarks/cuda_smoke.py " + " ".join(sys.argv[1:]),
                    "torch": torch.__version__, "python": platform.python_version(),
                    "cuda": torch.cuda.is_available(), "device": target}
    if target.startswith("cuda") and not torch.cuda.is_available():
        result["message"] = "no CUDA device on this machine (torch.cuda.is_available() is False): nothing to check"
        print(result["message"])
    else:
        result["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        with tempfile.TemporaryDirectory() as tmp:
            index = FrameIndex(horizon=get_preset("debug").policy.horizon)
            for seed in range(4):
                index.add_episode(synthetic_episode(Path(tmp) / f"ep{seed}.h5", seed))
            runs = [train(index, "cpu", "off", args.steps), train(index, target, "off", args.steps),
                    train(index, target, "bf16", args.steps)]
            cpu, gpu = runs[0], runs[1]
            agree = abs(cpu["first_loss"] - gpu["first_loss"]) <= 1e-3 * max(1.0, abs(cpu["first_loss"]))
            saved = ckpt.save_checkpoint(Path(tmp) / "ck", gpu["policy"], version=1, algorithm="bc",
                                         step=args.steps)
            on_cpu = ckpt.load_checkpoint(saved.path, embedder=HashEmbedder()).policy  # as a robot loads it
            started = time.perf_counter()
            outcome = evaluate_policy(on_cpu.to(target), "reach-v3", ["reach the goal"], 100, args.episodes,
                                      image_size=64)
            result.update({
                "training": [{k: v for k, v in r.items() if k != "policy"} for r in runs],
                "first_step_loss_agrees": agree,
                "checkpoint_tensors_on_cpu": all(t.device.type == "cpu" for t in on_cpu.state_dict().values()),
                "evaluation": {"episodes": outcome.episodes, "successes": outcome.successes,
                               "seconds": round(time.perf_counter() - started, 1)},
            })
            print(json.dumps(result, indent=1))
            if not agree:
                print("FAIL: the first step's loss differs between cpu and cuda")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0 if ("message" in result or result.get("first_step_loss_agrees")) else 1


if __name__ == "__main__":
    raise SystemExit(main())
