"""Learner throughput: steps/s, the share of step time spent sampling + loading, and peak RSS vs episodes indexed.

Writes synthetic episodes to disk (4 tasks, 96x96 rendered-looking frames that compress like real ones, half offline
demos, half online episodes with an intervention), then for each episode count runs the learner with the given preset
in a fresh process and records its peak RSS. Prompt embeddings are computed once with the real MiniLM and handed to
the children (as a checkpoint would), so that the encoder's ~300 MB does not blur the memory-vs-episodes curve.

    .venv/bin/python benchmarks/learner_throughput.py            # -> benchmarks/results/learner_throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TASKS = ("reach", "push", "drawer-open", "button-press-topdown")


def synthetic_episode(path: Path, task_id: int, seed: int, steps: int, size: int, online: bool) -> None:
    from robots.episode_file import EpisodeData, Segment, write_episode

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    # a shaded wall over a wood-like table: a static texture, so LZF compresses frames about as well as real renders
    grain = np.random.default_rng(7).integers(-12, 13, (size, size, 1))
    table = np.clip(np.stack([120 + xx // 4, 90 + 0 * xx, 60 + yy // 4], -1) + grain, 0, 255).astype(np.uint8)
    table[: size // 3] = np.clip(np.array([170, 180, 190]) - yy[: size // 3, :, None], 0, 255)
    hand = rng.uniform(0.2, 0.8, 2)
    target = rng.uniform(0.2, 0.8, 2)
    images = np.empty((steps, size, size, 3), np.uint8)
    states = np.zeros((steps, 39), np.float32)
    actions = np.zeros((steps, 4), np.float32)
    for t in range(steps):
        delta = np.clip((target - hand) * 5, -1, 1)
        hand = hand + 0.02 * delta
        frame = table.copy()
        ty, tx = (target * size).astype(int)
        frame[ty - 3: ty + 3, tx - 3: tx + 3] = (200, 30 + 40 * task_id, 30)  # the object
        hy, hx = (hand * size).astype(int)
        frame[hy - 4: hy + 4, hx - 2: hx + 2] = (40, 40, 40)  # the gripper
        images[t] = frame
        states[t, :2], states[t, 36:38] = hand, target
        actions[t, :2] = delta
        actions[t, 3] = -1.0
    control = np.zeros(steps, np.uint8) if online else np.full(steps, 2, np.uint8)
    # the episode file requires control codes and segments to agree (robots/episode_file.py check_control_source)
    segments = [] if online else [Segment(0, steps, "sim_operator")]
    if online:
        start = int(rng.integers(10, steps // 2))
        control[start: start + 20] = 2
        segments = [Segment(start, min(start + 20, steps), "sim_operator")]
    meta = dict(episode_id=str(uuid.UUID(int=seed + 1)), robot="bench", task=TASKS[task_id], env_id=TASKS[task_id],
                prompt=f"{TASKS[task_id].replace('-', ' ')}", policy="bench", policy_version=1 if online else -1,
                split="online" if online else "offline", outcome="success", success=True, started_at=0.0,
                ended_at=steps / 30, control_hz=30.0, camera="corner3")
    write_episode(path, EpisodeData(meta, images, states, actions, control, np.zeros(steps, np.float32),
                                    np.zeros(steps, bool), np.arange(steps) / 30.0, segments))


def _write(args):
    synthetic_episode(*args)


def _vm_hwm_mib() -> float:
    """This process's peak resident set size in MiB (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(args) -> dict:
    """One learner process: index the first N episodes, train, report."""
    import torch

    from learner.algorithms import build_algorithm
    from learner.buffer import FrameIndex
    from learner.config import get_preset
    from learner.policy import build_policy
    from learner.trainer import Trainer

    # VmHWM, not ru_maxrss: on Linux ru_maxrss carries the parent's peak across fork + exec.
    rss = lambda: _vm_hwm_mib()  # noqa: E731
    preset = get_preset(args.preset)
    import dataclasses

    config = dataclasses.replace(preset.train, prefetch=not args.no_prefetch)
    if args.threads:
        config = dataclasses.replace(config, num_threads=args.threads)
    if args.max_open:
        config = dataclasses.replace(config, max_open_episodes=args.max_open)
    embeddings = json.loads(Path(args.embeddings).read_text())
    rss_imported = rss()
    t0 = time.perf_counter()
    index = FrameIndex(preset.policy.horizon, config.max_open_episodes)
    for path in sorted(Path(args.data).glob("*.h5"))[: args.child]:
        index.add_episode(path)
    index_s = time.perf_counter() - t0
    policy = build_policy(preset.policy, seed=0)
    for prompt, vector in embeddings.items():
        policy.prompts.add(prompt, np.asarray(vector, np.float32))
    trainer = Trainer(config, index, policy, build_algorithm(config))
    trainer.run(args.warmup)
    warm = dataclasses.replace(trainer.timing)
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.run(args.warmup + args.steps)
    elapsed, cpu_elapsed = time.perf_counter() - t0, time.process_time() - c0
    trainer.close()
    sample_load = trainer.timing.sample_load_s - warm.sample_load_s
    update = trainer.timing.update_s - warm.update_s
    update_cpu = trainer.timing.update_cpu_s - warm.update_cpu_s
    load_cpu = trainer.timing.load_cpu_s - warm.load_cpu_s
    return {
        "episodes": len(index.episodes),
        "frames": len(index),
        "prefetch": config.prefetch,
        "max_open_episodes": config.max_open_episodes,
        "index_build_s": round(index_s, 3),
        "index_bytes": index.nbytes(),
        "steps": args.steps,
        "steps_per_s": round(args.steps / elapsed, 2),
        "sample_load_ms_per_step": round(1000 * sample_load / args.steps, 3),
        "update_ms_per_step": round(1000 * update / args.steps, 3),
        "sample_load_share": round(sample_load / (sample_load + update), 4),
        "loader_busy_ms_per_step": round(1000 * (trainer.timing.load_busy_s - warm.load_busy_s) / args.steps, 3),
        # CPU time of the threads doing the work: what other tenants of a shared machine do not distort
        "update_cpu_ms_per_step": round(1000 * update_cpu / args.steps, 3),
        "load_cpu_ms_per_step": round(1000 * load_cpu / args.steps, 3),
        "load_cpu_share": round(load_cpu / (load_cpu + update_cpu), 4),
        "process_cpu_s_per_step": round(cpu_elapsed / args.steps, 4),
        "episode_files_opened": index.opens,
        "peak_rss_mib_after_import": round(rss_imported, 1),
        "peak_rss_mib": round(rss(), 1),
        "torch_threads": torch.get_num_threads(),
        "final_loss": round(trainer.last_stats.get("loss"), 4),
        "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
    }


def _copy_as_new_episode(source: Path, target: Path) -> None:
    """A copy of an episode file under a fresh episode id (the index keys episodes by id): a distinct file on disk,
    so the page cache and the open-file costs are those of a store this size."""
    if target.exists():
        return
    import h5py

    partial = target.with_suffix(".tmp")
    shutil.copyfile(source, partial)
    with h5py.File(partial, "r+") as f:
        f.attrs["episode_id"] = str(uuid.UUID(int=int(target.stem.split("-")[1]) + 1))
    partial.rename(target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--episodes", default="50,200,800", help="comma-separated episode counts to index")
    parser.add_argument("--steps-per-episode", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--steps", type=int, default=300, help="measured learner steps per run")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--data", help="episode directory (default: a temp dir, deleted afterwards)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/learner_throughput.json"))
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--embeddings", help=argparse.SUPPRESS)
    parser.add_argument("--no-prefetch", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--max-open", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--unique", type=int, default=0,
                        help="render only this many distinct episodes and fill the store with copies of them under "
                             "new episode ids (a 10,000-episode store in minutes instead of an hour of rendering)")
    parser.add_argument("--variants", action=argparse.BooleanOptionalAction, default=True,
                        help="also run the middle count without prefetch and with 2 torch threads, and the largest "
                             "count with an LRU that holds every episode")
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args)))
        return

    load_at_start = os.getloadavg()
    counts = [int(n) for n in args.episodes.split(",")]
    data = Path(args.data) if args.data else Path(tempfile.mkdtemp(prefix="sop-bench-"))
    data.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        rendered = min(args.unique or max(counts), max(counts))
        jobs = [(data / f"ep-{i:05d}.h5", i % len(TASKS), i, args.steps_per_episode, args.image_size, i % 2 == 1)
                for i in range(rendered) if not (data / f"ep-{i:05d}.h5").exists()]
        with ProcessPoolExecutor(2) as pool:
            list(pool.map(_write, jobs, chunksize=16))
        for i in range(rendered, max(counts)):
            _copy_as_new_episode(data / f"ep-{i % rendered:05d}.h5", data / f"ep-{i:05d}.h5")
        write_s = time.perf_counter() - t0
        disk = sum(p.stat().st_size for p in data.glob("*.h5"))
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from learner.prompts import MiniLMEmbedder

        embedder = MiniLMEmbedder()
        embeddings = {t.replace("-", " "): embedder.embed(t.replace("-", " ")).tolist() for t in TASKS}
        emb_path = data / "embeddings.json"
        emb_path.write_text(json.dumps(embeddings))
        runs = []
        plan = [(n, []) for n in counts]
        if args.variants:
            middle = counts[len(counts) // 2]
            plan += [(middle, ["--no-prefetch"]), (middle, ["--threads", "2"]),
                     (max(counts), ["--max-open", str(max(counts))])]
        for n, extra in plan:
            cmd = [sys.executable, __file__, "--child", str(n), "--data", str(data), "--embeddings", str(emb_path),
                   "--preset", args.preset, "--steps", str(args.steps), "--warmup", str(args.warmup), *extra]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(runs[-1]), flush=True)
    finally:
        if not args.data:
            shutil.rmtree(data, ignore_errors=True)
    result = {
        "benchmark": "learner_throughput",
        "command": " ".join([os.path.relpath(sys.executable, ROOT), os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
        "preset": args.preset,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "dataset": {"tasks": len(TASKS), "max_episodes": max(counts), "distinct_episodes": rendered,
                    "steps_per_episode": args.steps_per_episode,
                    "image_size": args.image_size, "bytes_on_disk": disk, "write_s": round(write_s, 1)},
        "goals": {"sample_load_share": "<= 0.10", "peak_rss": "flat in the number of episodes indexed"},
        "loadavg_at_start": [round(x, 2) for x in load_at_start],
        "runs": runs,
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
