"""How well the robot's help detectors (robots/agent/attention.py) foresee failures, measured on a trained checkpoint.

Runs a checkpoint autonomously (no operator) on fresh placements of each task (their own branch of the seed tree:
never the held-out evaluation set), records every step's hand position and
the policy's re-plan disagreement (``Decision.uncertainty``), and then replays the two detectors offline over those
traces for a sweep of thresholds: a request "fires" in an episode if the detector would have asked before its end.
A fired request is a true alarm when the episode then failed (timeout) and a false alarm when it succeeded anyway.

    .venv/bin/python benchmarks/help_detector.py CHECKPOINT [--tasks reach,drawer-open] [--episodes 20]
        -> benchmarks/results/help_detector.json (with the command that produced it)

Precision = failed episodes among those where the detector fired; recall = failed episodes where it fired among all
failed ones; median lead = steps between the first request and the episode's end, for failures (time an operator has).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STALL_WINDOWS = (15, 20, 30, 45)
STILL_M = 0.01
UNCERTAINTY = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.6)


def _run(policy, env_id: str, prompt: str, max_steps: int, episodes: int, seed: int) -> list[dict]:
    from robots.agent.environment import MetaWorldEnvironment
    from robots.agent.learned import PolicyAgent
    from robots.agent.runtime import Runtime, Subscriber
    from robots.agent.seeding import stream_seed
    from robots.protocol import Outcome, Split, TaskAssigned

    class Recorder(Subscriber):
        def __init__(self):
            self.hand, self.doubt = [], []

        def on_episode_start(self, episode):
            self.hand, self.doubt = [], []

        def on_step(self, episode, step):
            self.hand.append(np.asarray(step.observation["state"][0:3], np.float64))
            self.doubt.append(step.decision.uncertainty)

    # placements of their own: the robots' "episodes" stream under a path no robot uses (never the eval stream)
    env = MetaWorldEnvironment(env_id, image_size=96, seed=stream_seed(seed, "episodes", "help-detector", env_id))
    recorder = Recorder()
    runtime = Runtime(lambda _: env, PolicyAgent(policy, None), [recorder], control_hz=1000.0)
    out = []
    try:
        for _ in range(episodes):
            result = runtime.run_episode(TaskAssigned(task="detector", env_id=env_id, prompt=prompt,
                                                      max_steps=max_steps, split=Split.EVAL.value))
            out.append({"success": result.outcome == Outcome.SUCCESS, "steps": result.steps,
                        "hand": np.array(recorder.hand), "doubt": recorder.doubt})
    finally:
        runtime.stop()
        env.close()
    return out


def first_stall(hand: np.ndarray, window: int, still_m: float = STILL_M):
    for t in range(window - 1, len(hand)):
        if np.linalg.norm(hand[t] - hand[t - window + 1]) < still_m:
            return t
    return None


def first_doubt(doubt: list, window: int, threshold: float):
    for t in range(len(doubt)):
        recent = [d for d in doubt[max(0, t - window + 1):t + 1] if d is not None]
        if len(recent) == window and float(np.mean(recent)) > threshold:
            return t
    return None


def score(episodes: list[dict], fire) -> dict:
    fired = [(fire(e), e) for e in episodes]
    failures = [e for e in episodes if not e["success"]]
    alarms = [e for t, e in fired if t is not None]
    true = [(t, e) for t, e in fired if t is not None and not e["success"]]
    return {
        "fired": len(alarms), "true_alarms": len(true), "false_alarms": len(alarms) - len(true),
        "failures": len(failures),
        "precision": round(len(true) / len(alarms), 3) if alarms else None,
        "recall": round(len(true) / len(failures), 3) if failures else None,
        "median_lead_steps": float(np.median([e["steps"] - t for t, e in true])) if true else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--tasks", default="reach,drawer-open,button-press-topdown,window-open,door-open")
    parser.add_argument("--episodes", type=int, default=20, help="per task")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--max-steps", type=int, default=150)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/help_detector.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from learner.checkpoints import load_checkpoint
    from robots.catalog import lookup

    torch.set_num_threads(1)
    checkpoint = load_checkpoint(args.checkpoint)
    policy = checkpoint.policy.eval()
    episodes: list[dict] = []
    started = time.time()
    for name in args.tasks.split(","):
        (spec,) = lookup([name])
        ran = _run(policy, spec.env_id, spec.prompts[0], args.max_steps, args.episodes, args.seed)
        for e in ran:
            e["task"] = name
        episodes += ran
        print(f"{name}: {sum(e['success'] for e in ran)}/{len(ran)} succeeded", flush=True)

    stall = {str(w): score(episodes, lambda e, w=w: first_stall(e["hand"], w)) for w in STALL_WINDOWS}
    doubt = {f"{w}x{th}": score(episodes, lambda e, w=w, th=th: first_doubt(e["doubt"], w, th))
             for w in (15, 30) for th in UNCERTAINTY}
    successes = [d for e in episodes if e["success"] for d in e["doubt"] if d is not None]
    failures = [d for e in episodes if not e["success"] for d in e["doubt"] if d is not None]
    result = {
        "command": " ".join([".venv/bin/python", "benchmarks/help_detector.py", *sys.argv[1:]]),
        "checkpoint": {"path": str(args.checkpoint), "version": checkpoint.meta.get("version")},
        "host": platform.node(), "seconds": round(time.time() - started, 1),
        "episodes": len(episodes), "failures": sum(not e["success"] for e in episodes),
        "per_task": {n: {"episodes": sum(e["task"] == n for e in episodes),
                         "failures": sum(e["task"] == n and not e["success"] for e in episodes)}
                     for n in args.tasks.split(",")},
        "disagreement": {"success_mean": round(float(np.mean(successes)), 4) if successes else None,
                         "failure_mean": round(float(np.mean(failures)), 4) if failures else None,
                         "success_p95": round(float(np.percentile(successes, 95)), 4) if successes else None},
        "stall": {"still_m": STILL_M, "by_window": stall},
        "uncertainty": {"by_window_x_threshold": doubt},
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("episodes", "failures", "disagreement")}, indent=2))


if __name__ == "__main__":
    main()
