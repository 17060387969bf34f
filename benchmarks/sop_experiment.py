"""The SOP experiment: from a pretrained base, a simulated fleet post-trains the shared policy online.

    .venv/bin/python benchmarks/sop_experiment.py --tasks reach,drawer-open,... --demos 3 --budget-min 30

Everything runs for real on this machine in a private data directory: demonstrations (collect_demos), the base
policy (pretrain, checkpoint v1), a daphne server, a Celery worker with beat, N robot agents running the learned
policy with the simulated operator, and one online training run (--algorithm, default hg_dagger) that publishes
checkpoints the robots swap to between episodes. After the wall-clock budget everything stops and checkpoints are
evaluated without interventions (`manage.py evaluate`, the robots' own PolicyAgent): the base and the final one with
--eval-episodes per task, some intermediate ones with fewer, for the success-vs-time curve. Results go to
benchmarks/results/<name>.json and a plot to docs/img/<name>.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", required=True)
    p.add_argument("--demos", default="3", help="demonstrations per task: N, or e.g. 'reach=8,window-open=2,1' "
                                                "(per task, then a default)")
    p.add_argument("--noise", type=float, default=0.1, help="expert noise of the demonstrations")
    p.add_argument("--pretrain-steps", type=int, default=3000)
    p.add_argument("--preset", default="default")
    p.add_argument("--algorithm", default="hg_dagger")
    p.add_argument("--budget-min", type=float, default=30.0, help="wall clock of the online phase")
    p.add_argument("--robots", type=int, default=2)
    p.add_argument("--hz", type=float, default=10.0)
    p.add_argument("--checkpoint-every", type=int, default=300, help="learner steps between checkpoints")
    p.add_argument("--eval-episodes", type=int, default=20, help="per task, for the base and the final checkpoint")
    p.add_argument("--curve-points", type=int, default=4, help="intermediate checkpoints evaluated for the curve")
    p.add_argument("--curve-episodes", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="sop_experiment")
    p.add_argument("--data-dir", help="keep everything here (default: a temp dir, removed at the end)")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/12")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--ema-decay", type=float, default=0.0,
                   help="checkpoints publish a moving average of the weights with this decay (0: the raw weights)")
    p.add_argument("--demo-expert", choices=("metaworld", "recovering"), default="metaworld",
                   help="who records the demonstrations: Meta-World's experts, or with the supervisors of "
                        "robots/agent/supervisors.py where a task has one")
    p.add_argument("--sim-expert", choices=("recovering", "metaworld"), default="recovering",
                   help="who the simulated operator drives with (same choices)")
    p.add_argument("--sim-operator-args", default="", help="extra agent flags, e.g. '--sim-patience 10'")
    args = p.parse_args()

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    data = Path(args.data_dir or tempfile.mkdtemp(prefix="sop-exp-")).resolve()
    data.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "SOP_DATA_DIR": str(data), "REDIS_URL": args.redis_url, "PYTHONUNBUFFERED": "1",
           "SOP_CHANNEL_PREFIX": f"exp{os.getpid()}"}
    env.pop("DATABASE_URL", None)
    subprocess.run(["redis-cli", "-u", args.redis_url, "flushdb"], check=False, capture_output=True)
    result: dict = {
        "benchmark": args.name, "command": " ".join([Path(PY).name, *sys.argv]),
        "params": {k: v for k, v in vars(args).items() if k not in ("data_dir",)},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "loadavg_at_start": os.getloadavg()},
    }
    t_start = time.time()

    def manage(*cmd, check=True) -> str:
        out = subprocess.run([PY, "manage.py", *cmd], cwd=ROOT, env=env, capture_output=True, text=True)
        if check and out.returncode != 0:
            raise SystemExit(f"manage.py {' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        return out.stdout

    log(f"data dir {data}")
    manage("migrate", "-v0")
    manage("add_tasks", *tasks)
    t0 = time.time()
    for count, group in demo_groups(args.demos, tasks).items():
        manage("collect_demos", "--tasks", ",".join(group), "--episodes", str(count), "--noise", str(args.noise),
               "--expert", args.demo_expert,
               "--seed", str(args.seed))
    result["collect_demos_s"] = round(time.time() - t0, 1)
    t0 = time.time()
    manage("pretrain", "--tasks", ",".join(tasks), "--steps", str(args.pretrain_steps), "--preset", args.preset,
           "--seed", str(args.seed))
    result["pretrain_s"] = round(time.time() - t0, 1)
    log(f"base policy v1 after {result['collect_demos_s']} s of demos and {result['pretrain_s']} s of pretraining")

    children: list[subprocess.Popen] = []
    logs = data / "logs"
    logs.mkdir(exist_ok=True)

    def spawn(name, cmd, extra_env=None):
        fh = open(logs / f"{name}.log", "wb")
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**env, **(extra_env or {})}, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
        children.append(proc)
        return proc

    url = f"http://127.0.0.1:{args.port}"
    timeline = []
    run_id = None
    try:
        spawn("web", [PY, "-m", "daphne", "-b", "127.0.0.1", "-p", str(args.port), "sop_web.asgi:application"])
        spawn("worker", [PY, "-m", "celery", "-A", "sop_web", "worker", "-B", "-l", "INFO", "--concurrency", "1",
                         "-Q", "default,learner", "--schedule", str(data / "beat-schedule")])
        wait_http(f"{url}/healthz")
        tokens = {}
        for i in range(1, args.robots + 1):
            out = manage("add_robot", f"exp-{i}")
            tokens[f"exp-{i}"] = re.search(r"token \(shown once[^:]*: (\S+)", out).group(1)
        manage("shell", "-c", _ASSIGN.format(tasks=tasks))
        for i, (name, token) in enumerate(tokens.items(), start=1):
            spawn(name, [PY, "-m", "robots.agent", "--server", url, "--spool", str(data / "spool" / name),
                         "--policy", "learned", "--fallback", "idle", "--sim-operator", "--sim-expert", args.sim_expert,
                         *args.sim_operator_args.split(),
                         "--hz", str(args.hz), "--seed", str(args.seed * 100 + i)], {"SOP_ROBOT_TOKEN": token})
        out = manage("shell", "-c", _START.format(algorithm=args.algorithm, tasks=tasks, every=args.checkpoint_every,
                                                  ema=args.ema_decay))
        run_id = int(out.strip().splitlines()[-1])
        log(f"online phase: run {run_id} ({args.algorithm}), {args.robots} robots, {args.budget_min} min")
        t_online = time.time()
        while time.time() - t_online < args.budget_min * 60:
            time.sleep(30)
            snap = json.loads(manage("shell", "-c", _SNAPSHOT.format(run=run_id)).strip().splitlines()[-1])
            snap["t_min"] = round((time.time() - t_online) / 60, 2)
            timeline.append(snap)
            log(f"[{snap['t_min']:5.1f} min] v{snap['version']} step {snap['step']} online episodes {snap['episodes']}"
                f" success {snap['success_rate']} interventions/episode {snap['interventions_per_episode']}")
    finally:
        if run_id is not None:
            manage("shell", "-c", f"from learner import services; from learner.models import TrainingRun as R; "
                                  f"services.stop_run(R.objects.get(pk={run_id}))", check=False)
            time.sleep(5)
        for proc in children:
            _kill(proc, signal.SIGTERM)
        for proc in children:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                _kill(proc, signal.SIGKILL)
    result["online_phase_min"] = round((time.time() - t_online) / 60, 2)
    result["timeline"] = timeline
    bucket_s = max(60, int(args.budget_min * 6))  # ten bars over the online phase, at least a minute each
    summary = json.loads(manage("shell", "-c", _SUMMARY.format(run=run_id, bucket_s=bucket_s)).strip().splitlines()[-1])
    result.update(summary)

    # Evaluation without interventions: base, final, and evenly spaced checkpoints in between (2 processes).
    checkpoints = summary["checkpoints"]  # [[version, minutes since the online phase started], ...]
    final = checkpoints[-1][0]
    picks = {1: args.eval_episodes, final: args.eval_episodes}
    inner = [c for c in checkpoints[1:-1]]
    for k in range(1, args.curve_points + 1):
        if inner:
            picks.setdefault(inner[min(len(inner) - 1, round(k * len(inner) / (args.curve_points + 1)))][0],
                             args.curve_episodes)
    log(f"evaluating checkpoints {sorted(picks)} ...")
    t0 = time.time()
    evals = {}
    pending = sorted(picks.items())
    running: list[tuple[int, subprocess.Popen]] = []
    while pending or running:
        while pending and len(running) < 2:
            version, episodes = pending.pop(0)
            running.append((version, subprocess.Popen(
                [PY, "manage.py", "evaluate", "--checkpoint", str(version), "--tasks", ",".join(tasks),
                 "--episodes", str(episodes)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                text=True)))
        for version, proc in list(running):
            if proc.poll() is not None:
                running.remove((version, proc))
                evals[version] = parse_eval(proc.stdout.read())
                log(f"v{version}: {evals[version]}")
        time.sleep(1)
    result["evaluation_s"] = round(time.time() - t0, 1)
    minutes = {v: (0.0 if v == 1 else m) for v, m in checkpoints}
    result["evaluations"] = [
        {"version": v, "minutes": minutes.get(v, 0.0), "episodes_per_task": picks[v], "tasks": evals[v],
         "mean_success": round(sum(t["success"] for t in evals[v].values()) / max(1, len(evals[v])), 3)}
        for v in sorted(evals)
    ]
    result["base"] = next(e for e in result["evaluations"] if e["version"] == 1)
    result["final"] = next(e for e in result["evaluations"] if e["version"] == final)
    result["total_s"] = round(time.time() - t_start, 1)
    result["machine"]["loadavg_at_end"] = os.getloadavg()

    out_dir = ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    plot(result, ROOT / "docs" / "img" / f"{args.name}.png")
    log(f"base {result['base']['mean_success']} -> final v{final} {result['final']['mean_success']}; "
        f"wrote benchmarks/results/{args.name}.json and docs/img/{args.name}.png")
    if not args.data_dir:
        shutil.rmtree(data, ignore_errors=True)
    return 0


_ASSIGN = """
from robots.models import Task, TaskAssignment
for t in Task.objects.filter(name__in={tasks!r}):
    TaskAssignment.objects.get_or_create(robot=None, task=t)
"""

_START = """
from learner import services
run = services.start_run({algorithm!r}, {tasks!r}, total_steps=10_000_000,
                         overrides={{"checkpoint_every_steps": {every}, "checkpoint_every_s": 1e9,
                                     "ema_decay": {ema}}})
print(run.pk)
"""

_SNAPSHOT = """
import json
from django.db.models import Count, Q, Sum
from learner.models import Checkpoint, TrainingRun
from robots.models import Episode
run = TrainingRun.objects.get(pk={run})
eps = Episode.objects.filter(split="online", status="verified")
agg = eps.aggregate(n=Count("id"), ok=Count("id", filter=Q(success=True)), iv=Sum("intervention_count"),
                    ivs=Sum("intervention_steps"), steps=Sum("steps"))
cp = Checkpoint.objects.order_by("-version").first()
n = agg["n"] or 0
print(json.dumps({{"version": cp.version if cp else None, "step": run.step, "episodes": n,
                  "success_rate": round((agg["ok"] or 0) / n, 3) if n else None,
                  "interventions_per_episode": round((agg["iv"] or 0) / n, 3) if n else None,
                  "intervention_step_share": round((agg["ivs"] or 0) / agg["steps"], 3) if agg["steps"] else None}}))
"""

_SUMMARY = """
import json
from django.db.models import Avg, Count, Q, Sum
from learner.models import Checkpoint, TrainingRun
from robots.models import Episode
run = TrainingRun.objects.get(pk={run})
t0 = run.started_at
cps = [[c.version, round((c.created_at - t0).total_seconds() / 60, 2)] for c in Checkpoint.objects.order_by("version")]
eps = Episode.objects.filter(split="online", status="verified", started_at__gte=t0)
hours = max(1e-9, (max(e.ended_at for e in eps) - t0).total_seconds() / 3600) if eps.exists() else 1e-9
per_task = {{}}
for row in eps.values("task__name").annotate(n=Count("id"), ok=Count("id", filter=Q(success=True)),
                                             length=Avg("steps"), iv=Sum("intervention_count"),
                                             ivs=Sum("intervention_steps"), steps=Sum("steps")):
    per_task[row["task__name"]] = {{"episodes": row["n"], "episodes_per_hour": round(row["n"] / hours, 1),
        "success_rate_online": round(row["ok"] / row["n"], 3), "mean_length": round(row["length"], 1),
        "interventions_per_episode": round(row["iv"] / row["n"], 3),
        "intervention_step_share": round(row["ivs"] / row["steps"], 3)}}
buckets = []
for e in eps.order_by("started_at"):
    k = int((e.started_at - t0).total_seconds() // {bucket_s})
    while len(buckets) <= k:
        buckets.append([0, 0])
    buckets[k][0] += 1
    buckets[k][1] += int(e.intervention_count > 0)
print(json.dumps({{"run": run.pk, "learner_steps": run.step, "checkpoints": cps, "online": per_task,
                  "online_hours": round(hours, 3),
                  "intervention_bucket_min": {bucket_s} / 60,
                  "intervened_share": [round(b[1] / b[0], 3) if b[0] else None for b in buckets]}}))
"""


def demo_groups(spec: str, tasks: list[str]) -> dict[int, list[str]]:
    """'reach=8,window-open=2,1' -> {8: ['reach'], 2: ['window-open'], 1: [the other tasks]}."""
    default, per_task = None, {}
    for part in spec.split(","):
        name, _, count = part.rpartition("=")
        if name:
            per_task[name.strip()] = int(count)
        else:
            default = int(count)
    groups: dict[int, list[str]] = {}
    for task in tasks:
        count = per_task.get(task, default)
        if count is None:
            raise SystemExit(f"--demos gives no count for {task}")
        groups.setdefault(count, []).append(task)
    return groups


def parse_eval(stdout: str) -> dict:
    tasks = {}
    for line in stdout.splitlines():
        m = re.match(r"^(\S+)\s+success ([\d.]+)\s+mean length (\S+)\s+\((\d+) episodes\)", line)
        if m:
            tasks[m.group(1)] = {"success": float(m.group(2)),
                                 "mean_length": None if m.group(3) == "-" else float(m.group(3)),
                                 "episodes": int(m.group(4))}
    return tasks


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    evals = result["evaluations"]
    xs = [e["minutes"] if e["version"] != 1 else 0.0 for e in evals]
    ax1.plot(xs, [e["mean_success"] for e in evals], "o-", color="#2f6fed", label="mean over tasks")
    for task in evals[0]["tasks"]:
        ax1.plot(xs, [e["tasks"].get(task, {}).get("success") for e in evals], ".--", alpha=0.6, label=task)
    ax1.set(xlabel="wall-clock minutes of online post-training", ylabel="success without interventions",
            ylim=(-0.02, 1.02), title=f"SOP + {result['params']['algorithm']}: success vs time")
    ax1.legend(fontsize=7, loc="lower right")
    ax1.grid(alpha=0.3)
    shares, width = result.get("intervened_share", []), result.get("intervention_bucket_min", 5)
    ax2.bar([width * (i + 0.5) for i in range(len(shares))], [s or 0 for s in shares], width=0.85 * width,
            color="#7b4bd6")
    ax2.set(xlabel="wall-clock minutes", ylabel="share of episodes with an intervention", ylim=(0, 1),
            title="intervention rate over time")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def wait_http(url: str, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise SystemExit(f"{url} did not answer")


def _kill(proc, sig):
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def log(text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {text}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
