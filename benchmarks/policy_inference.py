"""Policy inference latency: one action chunk per call, one observation, on ONE CPU core (as on a robot).

Builds the preset's policy, embeds the task prompt once with the real packaged MiniLM (then cached, as a checkpoint
carries it), round-trips the weights through a checkpoint file, and times ``act`` for N calls with fresh observations.

    .venv/bin/python benchmarks/policy_inference.py          # -> benchmarks/results/policy_inference.json
    .venv/bin/python benchmarks/policy_inference.py --policy flow_vla   # -> ..._flow_vla.json (10 Euler steps)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--camera-sizes", default="64,96", help="camera image sizes to time (resized to the input)")
    parser.add_argument("--policy", default="", help="policy family (default: the preset's, small_vla)")
    parser.add_argument("--out", help="default benchmarks/results/policy_inference[_POLICY].json")
    args = parser.parse_args()
    args.out = args.out or str(ROOT / "benchmarks/results" / (
        f"policy_inference_{args.policy}.json" if args.policy else "policy_inference.json"))

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    import torch

    from learner.checkpoints import load_checkpoint, save_checkpoint
    from learner.config import get_preset
    from learner.policy import build_policy, count_parameters

    import_s = time.perf_counter() - t0
    torch.set_num_threads(1)
    preset = get_preset(args.preset)
    config = dataclasses.replace(preset.policy, name=args.policy) if args.policy else preset.policy
    prompt = "reach the red target"
    policy = build_policy(config, seed=0)
    policy.prompts.get(prompt)  # the real MiniLM, once
    with tempfile.TemporaryDirectory() as tmp:
        saved = save_checkpoint(tmp, policy, version=1)
        t0 = time.perf_counter()
        policy = load_checkpoint(saved.path, saved.sha256, saved.size).policy
        load_s = time.perf_counter() - t0
    policy.eval()
    rng = np.random.default_rng(0)
    results = {}
    for size in (int(s) for s in args.camera_sizes.split(",")):
        observations = [
            {"image": rng.integers(0, 255, (size, size, 3), dtype=np.uint8),
             "state": rng.standard_normal(preset.policy.state_dim).astype(np.float32)}
            for _ in range(64)
        ]
        for i in range(args.warmup):
            policy.act(observations[i % 64], prompt)
        times = []
        for i in range(args.calls):
            start = time.perf_counter()
            chunk = policy.act(observations[i % 64], prompt)
            times.append(time.perf_counter() - start)
        ms = np.array(times) * 1000
        results[f"{size}x{size}"] = {
            "p50_ms": round(float(np.percentile(ms, 50)), 3),
            "p95_ms": round(float(np.percentile(ms, 95)), 3),
            "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "mean_ms": round(float(ms.mean()), 3),
            "chunk_shape": list(chunk.shape),
        }
        print(size, results[f"{size}x{size}"], flush=True)
    result = {
        "benchmark": "policy_inference",
        "command": " ".join([os.path.relpath(sys.executable, ROOT), os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
        "preset": args.preset,
        "policy": config.name,
        "policy_input": preset.policy.image_size,
        "parameters": count_parameters(policy),
        "torch_threads": torch.get_num_threads(),
        "calls": args.calls,
        "import_policy_and_checkpoints_s": round(import_s, 2),
        "checkpoint_bytes": saved.size,
        "checkpoint_load_s": round(load_s, 4),
        "goal": "p50 <= 10 ms per action chunk on one core",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "loadavg_1m": round(os.getloadavg()[0], 2)},
        "latency_by_camera_size": results,
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
