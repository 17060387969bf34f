"""Tune the base policy of the SOP headline experiment: one configuration end to end, from flags.

    .venv/bin/python benchmarks/sop_base_tuning.py \
        --tasks reach,drawer-open,button-press-topdown,window-open,door-open \
        --demos reach=8,window-open=2,1 --noise 0.1 --image-size 96 --steps 3000 --preset sop --seed 0

(the setup chosen in docs/experiment.md; ``--demos 5`` gives every task 5, ``reach=8,window-open=2,1`` gives the named
tasks their own counts and every other task 1).

Runs, in a fresh data directory of its own (``var/exp-tune-<tag>``, SQLite, Redis db 10 by default), exactly the
commands an operator would type:

    manage.py migrate -v0
    manage.py add_tasks <tasks>
    manage.py collect_demos --tasks ... --episodes N --noise X --image-size S --workers 2 --seed K   (one per count)
    manage.py pretrain --tasks ... --steps S --preset P --seed K          (behaviour cloning, publishes v1)
    manage.py evaluate --checkpoint 1 --tasks ... --episodes E           (closed loop, no interventions)

and appends one record to ``benchmarks/results/sop_base_tuning.json``: per-task success and mean episode length, the
number of demonstrations kept, training time and learner steps/s (from the run's metric rows, i.e. without the
start-up cost), the wall time of every phase, the machine's load, and the exact command. The data directory is
deleted afterwards unless ``--keep-data``.

Evaluation always uses the policy-agent path the robots use (``learner.evaluation.evaluate_policy``: corner3 camera at
96x96, receding horizon re-planned every step, max_steps from the catalog) with the seed of checkpoint v1, so every
configuration is evaluated on the same task variations; the demonstration seeds are ``seed * 10000 + ...``, which do
not overlap the evaluation's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import command_line, machine_info  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "sop_base_tuning.json"
PYTHON = sys.executable
EVAL_LINE = re.compile(r"^(?P<task>\S+)\s+success (?P<rate>[-0-9.]+)\s+mean length (?P<length>[-0-9.]+)\s+"
                       r"\((?P<episodes>\d+) episodes\)")
DEMO_LINE = re.compile(r"stored (?P<kept>\d+) offline demonstrations[^\n;]*(?:; dropped (?P<dropped>\d+))?")

# Read back from the run's database after pretraining (runs inside `manage.py shell`). Raw SQL on the columns it needs,
# so that a data directory made before a later model change can still be read.
RUN_STATS = r"""
import json
from datetime import datetime
from django.db import connection
def ts(v):
    return v if isinstance(v, datetime) or v is None else datetime.fromisoformat(str(v))
cur = connection.cursor()
cur.execute("SELECT id, step, started_at, finished_at FROM learner_trainingrun ORDER BY created_at DESC LIMIT 1")
run_id, step, started, finished = cur.fetchone()
cur.execute("SELECT step, at, \"values\" FROM learner_trainingmetric WHERE run_id = %s ORDER BY step", [run_id])
rows = [(s, ts(a), json.loads(v) if isinstance(v, str) else v) for s, a, v in cur.fetchall()]
cur.execute("SELECT size FROM learner_checkpoint WHERE version = 1")
size = cur.fetchone()[0]
cur.execute("SELECT t.name, COUNT(*), SUM(e.steps) FROM robots_episode e JOIN robots_task t ON t.id = e.task_id "
            "WHERE e.split = 'offline' AND e.status = 'verified' GROUP BY t.name ORDER BY t.name")
demos = cur.fetchall()
speed = None
if len(rows) >= 2:
    dt = (rows[-1][1] - rows[0][1]).total_seconds()
    speed = (rows[-1][0] - rows[0][0]) / dt if dt > 0 else None
print("RUNSTATS" + json.dumps({
    "train_s": (ts(finished) - ts(started)).total_seconds() if finished and started else None,
    "steps_per_s": round(speed, 2) if speed else None,
    "steps": step,
    "final_loss": (rows[-1][2] or {}).get("loss") if rows else None,
    "loss_curve": [[r[0], round((r[2] or {}).get("loss") or 0, 4)] for r in rows[:: max(1, len(rows) // 10)]],
    "checkpoint_mb": round(size / 1e6, 2),
    "demos_per_task": {n: c for n, c, _ in demos},
    "demo_frames_per_task": {n: f for n, _, f in demos},
}))
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", required=True, help="comma-separated catalog names (robots/catalog.py)")
    p.add_argument("--demos", required=True,
                   help="demonstrations per task: N for every task, or per task 'reach=8,4' (a bare N: the rest)")
    p.add_argument("--noise", type=float, default=0.0, help="gaussian action noise of the scripted expert")
    p.add_argument("--image-size", type=int, default=96, help="camera size of the demonstrations (eval uses 96)")
    p.add_argument("--steps", type=int, required=True, help="pretraining learner steps")
    p.add_argument("--preset", default="default", help="learner/config.py preset")
    p.add_argument("--seed", type=int, default=0, help="demonstration and training seed")
    p.add_argument("--eval-episodes", type=int, default=20)
    p.add_argument("--workers", type=int, default=2, help="simulator processes for collect_demos")
    p.add_argument("--tag", default="", help="name of the data directory var/exp-tune-<tag> (default: derived)")
    p.add_argument("--note", default="", help="free text stored with the result")
    p.add_argument("--redis", default=os.environ.get("SOP_TUNE_REDIS", "redis://127.0.0.1:6379/10"))
    p.add_argument("--keep-data", action="store_true", help="keep the data directory (default: delete it)")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--skip-to", choices=["evaluate"],
                   help="reuse a kept data directory: only evaluate again")
    args = p.parse_args()

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    demos = parse_demos(args.demos, tasks)
    demo_tag = args.demos.replace("=", "").replace(",", "_")
    tag = args.tag or f"{len(tasks)}t-d{demo_tag}-n{args.noise:g}-s{args.steps}-{args.preset}-seed{args.seed}"
    data_dir = ROOT / "var" / f"exp-tune-{tag}"
    if args.skip_to is None:
        if data_dir.exists():
            shutil.rmtree(data_dir)  # a fresh installation for every configuration
        data_dir.mkdir(parents=True)
    env = dict(os.environ, SOP_DATA_DIR=str(data_dir), REDIS_URL=args.redis, HF_HUB_OFFLINE="1",
               MUJOCO_GL=os.environ.get("MUJOCO_GL", "egl"), SOP_AUTO_EVALUATE="0")
    task_csv = ",".join(tasks)
    commands = {
        "migrate": ["manage.py", "migrate", "-v0"],
        "add_tasks": ["manage.py", "add_tasks", *tasks],
    }
    # One collect_demos per distinct count (the command takes one --episodes for all its tasks).
    for n in sorted(set(demos.values()), reverse=True):
        group = [t for t in tasks if demos[t] == n]
        commands[f"collect_demos_{n}" if len(set(demos.values())) > 1 else "collect_demos"] = [
            "manage.py", "collect_demos", "--tasks", ",".join(group), "--episodes", str(n),
            "--noise", str(args.noise), "--image-size", str(args.image_size),
            "--workers", str(args.workers), "--seed", str(args.seed)]
    commands.update({
        "pretrain": ["manage.py", "pretrain", "--tasks", task_csv, "--steps", str(args.steps),
                     "--preset", args.preset, "--seed", str(args.seed)],
        "evaluate": ["manage.py", "evaluate", "--checkpoint", "1", "--tasks", task_csv,
                     "--episodes", str(args.eval_episodes)],
    })
    machine = machine_info()
    phases: dict[str, float] = {}
    outputs: dict[str, str] = {}
    t_all = time.monotonic()
    for name, cmd in commands.items():
        if args.skip_to and name != args.skip_to:
            continue
        print(f"== {name}: {' '.join(cmd)}", flush=True)
        t0 = time.monotonic()
        proc = subprocess.run([PYTHON, *cmd], cwd=ROOT, env=env, capture_output=True, text=True)
        phases[name] = round(time.monotonic() - t0, 1)
        outputs[name] = proc.stdout
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n", file=sys.stderr)
            raise SystemExit(f"{name} failed (rc {proc.returncode}); data left in {data_dir}")
        print(f"   {phases[name]:.1f} s", flush=True)

    stats_proc = subprocess.run([PYTHON, "manage.py", "shell", "-c", RUN_STATS], cwd=ROOT, env=env,
                                capture_output=True, text=True)
    stats = {}
    for line in stats_proc.stdout.splitlines():
        if line.startswith("RUNSTATS"):
            stats = json.loads(line[len("RUNSTATS"):])
    if not stats:
        print(stats_proc.stderr[-2000:], file=sys.stderr)

    per_task = {}
    for line in outputs.get("evaluate", "").splitlines():
        m = EVAL_LINE.match(line.strip())
        if m:
            per_task[m["task"]] = {"success": float(m["rate"]) if m["rate"] != "-" else None,
                                   "mean_length": float(m["length"]) if m["length"] != "-" else None,
                                   "episodes": int(m["episodes"])}
    rates = [v["success"] for v in per_task.values() if v["success"] is not None]
    demo_msgs = [DEMO_LINE.search(v) for k, v in outputs.items() if k.startswith("collect_demos")]
    machine["loadavg_at_end"] = list(os.getloadavg())
    record = {
        "command": command_line(),
        "commands": {k: " ".join(["SOP_DATA_DIR=var/exp-tune-" + tag, f"REDIS_URL={args.redis}", ".venv/bin/python",
                                  *(shlex.quote(a) for a in v)]) for k, v in commands.items()},
        "config": {"tasks": tasks, "demos_per_task": demos, "noise": args.noise, "image_size": args.image_size,
                   "steps": args.steps, "preset": args.preset, "seed": args.seed,
                   "eval_episodes": args.eval_episodes, "note": args.note},
        "mean_success": round(sum(rates) / len(rates), 4) if rates else None,
        "per_task": per_task,
        "demos_kept": sum(int(m["kept"]) for m in demo_msgs if m) if demo_msgs else None,
        "demos_dropped": sum(int(m["dropped"]) for m in demo_msgs if m and m["dropped"]),
        "train": stats,
        "phase_wall_s": phases,
        "total_wall_s": round(time.monotonic() - t_all, 1),
        "machine": machine,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    print(json.dumps({k: record[k] for k in ("config", "mean_success", "per_task", "train", "phase_wall_s")},
                     indent=1))
    _append(args.results, record)
    if not args.keep_data:
        shutil.rmtree(data_dir, ignore_errors=True)
    return 0


def parse_demos(spec: str, tasks: list[str]) -> dict[str, int]:
    counts, rest = {}, None
    for part in (x.strip() for x in spec.split(",") if x.strip()):
        if "=" in part:
            name, n = part.split("=", 1)
            if name not in tasks:
                raise SystemExit(f"--demos names {name!r}, which is not in --tasks")
            counts[name] = int(n)
        else:
            rest = int(part)
    missing = [t for t in tasks if t not in counts]
    if missing and rest is None:
        raise SystemExit(f"--demos gives no count for {missing}")
    return {t: counts.get(t, rest) for t in tasks}


def _append(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"benchmark": "sop_base_tuning", "runs": []}
    if path.exists():
        data = json.loads(path.read_text())
    data["runs"].append(record)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
    print(f"appended to {path}")


if __name__ == "__main__":
    raise SystemExit(main())
