"""The SOP study (issue 13): every method and fleet size, >= 3 seeds, one fixed held-out evaluation set, resumable.

    .venv/bin/python benchmarks/sop_study.py                 # the whole study (hours; resumes where it stopped)
    .venv/bin/python benchmarks/sop_study.py --seeds 0 --rows base,hg_dagger   # a part of it
    .venv/bin/python benchmarks/sop_study.py --quick         # a minutes-long smoke version (CI), own results file

Per seed: demonstrations of every task (post-trained and held-out) and a base policy (BC, checkpoint v1), then rows:

- ``base``       the base itself;
- ``bc_long``    BC from the base on the demonstrations only, as many learner steps as that seed's SOP + HG-DAgger run;
- ``hg_dagger``  SOP + HG-DAgger: robots run the policy with the simulated operator, the learner trains online;
- ``offline``    HG-DAgger's loss on exactly the data the hg_dagger run collected, from the base, same steps, no loop;
- ``recap``      SOP + RECAP (same robots, budget and pinned learner);
- ``fleet1``, ``fleet4``: SOP + HG-DAgger with 1 and 4 robots (Table B; the 2-robot point is ``hg_dagger``);
- ``sampler``    the ablation: SOP + HG-DAgger with the mixing formula on relative losses;
- ``flow_base``, ``flow``: the second policy family (flow_vla, a flow-matching action head over the same encoders):
                 its own base (same demonstrations, same BC steps) and SOP + HG-DAgger from it, as ``base``/``hg_dagger``.

Every online run gets the same wall-clock budget and the same pinned learner pace (TrainConfig.max_steps_per_s), so
fleet sizes differ only in the data they bring. After a run (never during one) its saved checkpoints are evaluated
without interventions on the held-out placements (the seed tree's ``eval`` stream under SOP_EVAL_SEED: the same
placements for every checkpoint, method and seed, disjoint from demonstrations and online episodes): the final one on
every task, a few earlier ones on the post-trained tasks for the success-vs-time curve. Each finished run is written
to the results file at once; a run already there is skipped, so the study spans sessions.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PY = sys.executable

from learner.stats import wilson_interval  # noqa: E402

POST_TRAINED = ("reach", "drawer-open", "button-press-topdown", "window-open", "door-open")
HELD_OUT = ("drawer-close", "window-close")  # only in the demonstrations: does post-training keep them?
ROWS = ("base", "hg_dagger", "bc_long", "offline", "recap", "fleet1", "fleet4", "sampler",  # controls need hg_dagger
        "flow_base", "flow")
TABLE_A = ("base", "bc_long", "offline", "hg_dagger", "recap", "sampler")
TABLE_C = ("base", "flow_base", "hg_dagger", "flow")  # the two policy families, before and after SOP
FLEET = {"hg_dagger": 2, "recap": 2, "fleet1": 1, "fleet4": 4, "sampler": 2, "flow": 2}
ALGORITHM = {"hg_dagger": "hg_dagger", "recap": "recap", "fleet1": "hg_dagger", "fleet4": "hg_dagger",
             "sampler": "hg_dagger", "flow": "hg_dagger"}
# the policy family of a row (default small_vla) and the base row it starts from
POLICY = {"flow_base": "flow_vla", "flow": "flow_vla"}
BASE_ROW = {"small_vla": "base", "flow_vla": "flow_base"}
# the ablation: SOP's mixing formula on relative losses (raw losses leave w_on at ~0.5, docs/experiment.md)
OVERRIDES = {"sampler": {"sampler_losses": "relative"}}

FULL = dict(demos="reach=8,window-open=2,drawer-close=2,window-close=2,1", pretrain_steps=3000, budget_min=20.0,
            pace=10.0, checkpoint_every=600, eval_episodes=50, curve_minutes=(5.0, 10.0, 15.0), hz=10.0)
QUICK = dict(demos="1", pretrain_steps=60, budget_min=1.5, pace=5.0, checkpoint_every=100, eval_episodes=2,
             curve_minutes=(0.75,), hz=10.0)
QUICK_TASKS, QUICK_HELD_OUT = ("reach",), ("window-close",)
# A timed online run counts only if its learner held this share of the pinned pace (a shared machine slows it, and
# its robots then train on fewer steps than the other rows'); declared before any rerun, applied to every row alike.
PACE_HELD = 0.95
DERIVED = {"hg_dagger": ("bc_long", "offline")}  # rows made from another row's run (its steps, its data)
RECAP_BETA_SWEEP = (1.5, 2.5)  # besides 1.0, what the robots and the main evaluation use


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    p.add_argument("--quick", action="store_true", help="a smoke version: 1+1 tasks, tiny budget, 2 eval episodes")
    p.add_argument("--results", help="default benchmarks/results/sop_study.json (--quick: sop_study_quick.json)")
    p.add_argument("--work", help="data directories (default var/study, --quick: var/study-quick)")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/12")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--eval-seed", type=int, default=2601, help="root of the held-out placements (SOP_EVAL_SEED)")
    p.add_argument("--plot", help="PNG path (default docs/img/<results file name>.png)")
    p.add_argument("--demos", help="demonstrations per task, e.g. 'reach=8,1' (default: the study's)")
    p.add_argument("--report-only", action="store_true", help="recompute the summaries and plots from the file")
    p.add_argument("--rerun-under-paced", action="store_true",
                   help=f"run again the online runs of --rows/--seeds whose learner held less than "
                        f"{PACE_HELD:.0%}% of the pinned pace (the old run is kept under 'superseded'; the controls "
                        "made from it, bc_long and offline, are run again too)")
    args = p.parse_args()
    knobs = dict(QUICK if args.quick else FULL)
    if args.demos:
        knobs["demos"] = args.demos
    tasks, held_out = (QUICK_TASKS, QUICK_HELD_OUT) if args.quick else (POST_TRAINED, HELD_OUT)
    results_path = Path(args.results or ROOT / "benchmarks" / "results" /
                        ("sop_study_quick.json" if args.quick else "sop_study.json"))
    work = Path(args.work or ROOT / "var" / ("study-quick" if args.quick else "study")).resolve()
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    results.setdefault("runs", {})
    results["protocol"] = {
        "command": " ".join([Path(PY).name, *sys.argv]), "post_trained_tasks": list(tasks),
        "held_out_tasks": list(held_out), "eval_seed": args.eval_seed, **knobs,
        "curve_minutes": list(knobs["curve_minutes"]),
        "observation": "corner3 image 96x96 (policy input 64x64), hand xyz + gripper, prompt; reach's target as a "
                       "task input; no object state (docs/policy.md 'What the policy sees')",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    }
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = set(rows) - set(ROWS)
    if unknown:
        raise SystemExit(f"unknown rows {sorted(unknown)}; known: {', '.join(ROWS)}")
    if not args.report_only:
        for seed in [int(s) for s in args.seeds.split(",")]:
            study = Seed(seed, work / f"seed-{seed}", tasks, held_out, knobs, args)
            seed_rows = rows
            if args.rerun_under_paced:
                again = supersede_under_paced(results, rows, seed, knobs["pace"])
                seed_rows = [r for r in ROWS if r in rows or r in again]
            for row in seed_rows:  # in ROWS order: bc_long and offline need the hg_dagger run of their seed
                key = f"{row}/seed-{seed}"
                if key in results["runs"]:
                    log(f"{key}: in {results_path.name} already, skipped")
                    continue
                needs = {"bc_long": "hg_dagger", "offline": "hg_dagger"}.get(row)
                if needs and f"{needs}/seed-{seed}" not in results["runs"]:
                    log(f"{key}: needs {needs}/seed-{seed} first, skipped")
                    continue
                results["runs"][key] = study.row(row, results["runs"])
                summarise(results)
                save(results_path, results)
    for key, run in results["runs"].items():  # runs from before the placement check: check their data now
        if run.get("timeline"):  # and measure the pace between snapshots (older runs divided by the whole run)
            run["learner_steps_per_s"] = timeline_rate(run["timeline"]) or run["learner_steps_per_s"]
        data = work / f"seed-{run['seed']}" / run["row"]
        if run["row"] in FLEET and "placements" not in run and (data / "db.sqlite3").exists():
            run["placements"] = Seed(run["seed"], data.parent, tasks, held_out, knobs, args).placements(data)
    summarise(results)
    save(results_path, results)
    plot(results, Path(args.plot or ROOT / "docs" / "img" / f"{results_path.stem}.png"))
    if not args.quick and not args.results:
        (ROOT / "docs" / "study_results.md").write_text(tables(results))
        readme = ROOT / "README.md"
        text = readme.read_text()
        begin, end = "<!-- sop-study:begin -->", "<!-- sop-study:end -->"
        if begin in text and end in text:
            head, rest = text.split(begin, 1)
            readme.write_text(head + begin + "\n" + headline(results) + end + rest.split(end, 1)[1])
    log(f"wrote {results_path}")
    return 0


class Seed:
    """One seed's data directories: ``base`` (demos + v1) and one copy of it per row that trains."""

    def __init__(self, seed: int, root: Path, tasks, held_out, knobs: dict, args):
        self.seed, self.root, self.knobs, self.args = seed, root, knobs, args
        self.tasks, self.held_out = list(tasks), list(held_out)
        self.all_tasks = self.tasks + self.held_out

    def env(self, data: Path) -> dict:
        env = {**os.environ, "SOP_DATA_DIR": str(data), "REDIS_URL": self.args.redis_url, "PYTHONUNBUFFERED": "1",
               "SOP_CHANNEL_PREFIX": f"study{os.getpid()}", "SOP_EVAL_SEED": str(self.args.eval_seed),
               "HF_HUB_OFFLINE": "1"}
        env.pop("DATABASE_URL", None)  # each data directory has its own SQLite database
        return env

    def manage(self, data: Path, *cmd, check=True) -> str:
        out = subprocess.run([PY, "manage.py", *cmd], cwd=ROOT, env=self.env(data), capture_output=True, text=True)
        if check and out.returncode != 0:
            raise SystemExit(f"manage.py {' '.join(cmd[:3])} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        return out.stdout

    def shell(self, data: Path, code: str):
        return json.loads(self.manage(data, "shell", "-c", code).strip().splitlines()[-1])

    # -- the base, shared by every row of this seed ------------------------------------------------------------

    def base(self, policy: str = "small_vla") -> Path:
        """The seed's demonstrations and BC base of one policy family (the same demonstrations for every family)."""
        base = self.root / BASE_ROW[policy]
        if (base / "ready").exists():
            return base
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir(parents=True)
        t0 = time.time()
        self.manage(base, "migrate", "-v0")
        self.manage(base, "add_tasks", *self.all_tasks)
        for count, group in demo_groups(self.knobs["demos"], self.all_tasks).items():
            self.manage(base, "collect_demos", "--tasks", ",".join(group), "--episodes", str(count), "--noise", "0.1",
                        "--image-size", "96", "--seed", str(self.seed))
        self.manage(base, "pretrain", "--tasks", ",".join(self.all_tasks), "--steps",
                    str(self.knobs["pretrain_steps"]), "--preset", "sop", "--seed", str(self.seed), "--policy", policy)
        (base / "ready").write_text(json.dumps({"setup_s": round(time.time() - t0, 1)}))
        log(f"seed {self.seed}: {policy} base v1 ready in {time.time() - t0:.0f} s")
        return base

    def copy_of_base(self, name: str) -> Path:
        base, data = self.base(POLICY.get(name, "small_vla")), self.root / name
        shutil.rmtree(data, ignore_errors=True)
        shutil.copytree(base, data, ignore=shutil.ignore_patterns("logs", "spool", "*.log", "ready"))
        self.manage(data, "migrate", "-v0")  # a base made by an older checkout (the study spans sessions)
        return data

    # -- rows --------------------------------------------------------------------------------------------------

    def row(self, row: str, done: dict) -> dict:
        log(f"== {row}, seed {self.seed}")
        t0 = time.time()
        if row in ("base", "flow_base"):
            data = self.base(POLICY.get(row, "small_vla"))
            out = {"row": row, "seed": self.seed, "robots": 0, "minutes": 0.0, "learner_steps": 0,
                   "expert_steps_online": 0, "robot_hours": 0.0}
            out["final"] = self.evaluate(data, 1, self.all_tasks)
            out["curve"] = [{"minutes": 0.0, "version": 1, **self.curve_point(out["final"])}]
        elif row in FLEET:
            data = self.root / row
            online_file = data / "online.json"  # the timed phase is done: an interrupted evaluation resumes from here
            if online_file.exists():
                out = json.loads(online_file.read_text())
                log(f"{row}, seed {self.seed}: online phase done earlier (run {out['run']}), evaluating")
            else:
                data = self.copy_of_base(row)
                out = self.online(data, row)
                online_file.write_text(json.dumps(out))
            out = dict(out)
            out["learner_steps_per_s"] = timeline_rate(out["timeline"]) or out["learner_steps_per_s"]
            checkpoints = out.pop("checkpoints")
            final = checkpoints[-1][0]
            out["final"] = self.evaluate(data, final, self.all_tasks)
            base_key = f"{BASE_ROW[POLICY.get(row, 'small_vla')]}/seed-{self.seed}"
            curve = [{"minutes": 0.0, "version": 1, **self.curve_point(done[base_key]["final"])}
                     if base_key in done else None]
            for minutes in self.knobs["curve_minutes"]:
                version = max((v for v, m in checkpoints if m <= minutes), default=None)
                if version is not None and version != final and version > 1:
                    curve.append({"minutes": minutes, "version": version,
                                  **self.curve_point(self.evaluate(data, version, self.tasks))})
            curve.append({"minutes": out["minutes"], "version": final, **self.curve_point(out["final"])})
            out["curve"] = [c for c in curve if c]
            if row == "recap" and self.seed == 0:
                # the guidance weight, swept once on the saved final checkpoint (the robots collected at 1)
                out["beta_sweep"] = {f"{beta:g}": self.curve_point(self.evaluate(data, final, self.tasks, beta))
                                     for beta in RECAP_BETA_SWEEP}
        else:  # bc_long / offline: the same learner steps as this seed's hg_dagger run, without a fleet
            reference = done[f"hg_dagger/seed-{self.seed}"]
            if row == "bc_long":
                data = self.copy_of_base(row)
                algorithm = "bc"
            else:
                data = self.root / "offline"
                shutil.rmtree(data, ignore_errors=True)
                shutil.copytree(self.root / "hg_dagger", data, ignore=shutil.ignore_patterns("logs", "spool"))
                algorithm = "hg_dagger"
            out = self.offline(data, row, algorithm, reference["learner_steps"])
            out["final"] = self.evaluate(data, out.pop("version"), self.all_tasks)
            out["curve"] = []
        out["wall_s"] = round(time.time() - t0, 1)
        out["mean_post_trained"], out["mean_held_out"] = self.means(out["final"])
        log(f"{row}, seed {self.seed}: post-trained {out['mean_post_trained']}, held-out {out['mean_held_out']}")
        return out

    def means(self, evaluation: dict) -> tuple:
        def mean(names):
            rates = [evaluation[t]["success"] for t in names if t in evaluation]
            return round(sum(rates) / len(rates), 4) if rates else None

        return mean(self.tasks), mean(self.held_out)

    def curve_point(self, evaluation: dict) -> dict:
        return {"mean_post_trained": self.means(evaluation)[0],
                "tasks": {t: evaluation[t]["success"] for t in self.tasks if t in evaluation}}

    def evaluate(self, data: Path, version: int, tasks: list[str], beta: float | None = None) -> dict:
        """Per task: successes out of eval_episodes on the held-out placements; two processes, cached per version.
        ``beta``: a RECAP guidance weight other than the checkpoint's (the sweep)."""
        cache = data / (f"eval-v{version}-placements{self.args.eval_seed}"
                        + (f"-beta{beta:g}" if beta is not None else "") + ".json")
        extra = ["--guidance-beta", str(beta)] if beta is not None else []
        found = json.loads(cache.read_text()) if cache.exists() else {}
        todo = [t for t in tasks if t not in found]
        n = self.knobs["eval_episodes"]
        running = []
        while todo or running:
            while todo and len(running) < 2:
                task = todo.pop(0)
                running.append((task, subprocess.Popen(
                    [PY, "manage.py", "evaluate", "--checkpoint", str(version), "--tasks", task, "--episodes", str(n),
                     *extra],
                    cwd=ROOT, env=self.env(data), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)))
            for task, proc in list(running):
                if proc.poll() is not None:
                    running.remove((task, proc))
                    parsed = parse_eval(proc.stdout.read()).get(task)
                    if proc.returncode != 0 or parsed is None:
                        raise SystemExit(f"evaluating v{version} on {task} failed (exit {proc.returncode})")
                    found[task] = {"success": parsed["success"], "episodes": parsed["episodes"],
                                   "successes": round(parsed["success"] * parsed["episodes"]),
                                   "mean_length": parsed["mean_length"]}
                    cache.write_text(json.dumps(found))
            time.sleep(0.5)
        log(f"v{version}: " + ", ".join(f"{t} {found[t]['success']:.2f}" for t in tasks))
        return {t: found[t] for t in tasks}

    def placements(self, data: Path) -> dict:
        """Per post-trained task: how many distinct placements the online episodes had, and how many of them (and
        of the demonstrations') are among the evaluation placements: the seeding, checked on the run's own data."""
        return self.shell(data, _PLACEMENTS.format(tasks=self.tasks, n=self.knobs["eval_episodes"]))

    def offline(self, data: Path, row: str, algorithm: str, steps: int) -> dict:
        worker = spawn(data, "worker", self.env(data), [PY, "-m", "celery", "-A", "sop_web", "worker", "-l", "INFO",
                                                        "--concurrency", "1", "-Q", "default,learner"])
        try:
            run = self.shell(data, _START.format(algorithm=algorithm, tasks=self.all_tasks, steps=max(1, steps),
                                                 every=10**9, pace=0.0, extra={}))
            while True:
                time.sleep(10)
                state = self.shell(data, _RUN_STATE.format(run=run))
                if state["status"] in ("finished", "failed", "stopped"):
                    break
        finally:
            stop([worker])
        if state["status"] != "finished":
            raise SystemExit(f"{row}: run {run} ended {state['status']}: {state['message']}")
        return {"row": row, "seed": self.seed, "algorithm": algorithm, "robots": 0, "minutes": 0.0,
                "learner_steps": state["step"], "expert_steps_online": 0, "robot_hours": 0.0,
                "version": state["version"]}

    def online(self, data: Path, row: str) -> dict:
        robots, algorithm, knobs = FLEET[row], ALGORITHM[row], self.knobs
        env, url = self.env(data), f"http://127.0.0.1:{self.args.port}"
        subprocess.run(["redis-cli", "-u", self.args.redis_url, "flushdb"], check=False, capture_output=True)
        children = [spawn(data, "web", env, [PY, "-m", "daphne", "-b", "127.0.0.1", "-p", str(self.args.port),
                                             "sop_web.asgi:application"]),
                    spawn(data, "worker", env, [PY, "-m", "celery", "-A", "sop_web", "worker", "-B", "-l", "INFO",
                                                "--concurrency", "1", "-Q", "default,learner",
                                                "--schedule", str(data / "beat-schedule")])]
        timeline, run = [], None
        try:
            wait_http(f"{url}/healthz")
            # before any robot connects: a robot without assignments would be given any task, held-out ones too
            self.manage(data, "shell", "-c", _ASSIGN.format(tasks=self.tasks))
            for i in range(1, robots + 1):
                out = self.manage(data, "add_robot", f"robot-{i}")
                token = re.search(r"\b(sop_\S+)", out).group(1)
                children.append(spawn(data, f"robot-{i}", {**env, "SOP_ROBOT_TOKEN": token}, [
                    PY, "-m", "robots.agent", "--server", url, "--spool", str(data / "spool" / f"robot-{i}"),
                    "--policy", "learned", "--fallback", "idle", "--sim-operator", "--hz", str(knobs["hz"]),
                    "--seed", str(self.seed * 100 + i)]))
            run = self.shell(data, _START.format(algorithm=algorithm, tasks=self.all_tasks, steps=10**7,
                                                 every=knobs["checkpoint_every"], pace=knobs["pace"],
                                                 extra=OVERRIDES.get(row, {})))
            t_online = time.time()
            log(f"{row}: run {run} ({algorithm}), {robots} robots, {knobs['budget_min']} min, "
                f"learner pinned at {knobs['pace']} steps/s")
            while time.time() - t_online < knobs["budget_min"] * 60:
                time.sleep(min(30.0, max(1.0, knobs["budget_min"] * 60 - (time.time() - t_online))))
                snap = self.shell(data, _SNAPSHOT.format(run=run))
                snap["t_min"] = round((time.time() - t_online) / 60, 2)
                timeline.append(snap)
                log(f"[{snap['t_min']:5.1f} min] v{snap['version']} step {snap['step']} episodes {snap['episodes']}"
                    f" interventions/episode {snap['interventions_per_episode']} loop Hz {snap['loop_hz']}")
            minutes = (time.time() - t_online) / 60
        finally:
            if run is not None:
                self.manage(data, "shell", "-c", f"from learner import services; from learner.models import "
                            f"TrainingRun as R; services.stop_run(R.objects.get(pk={run}))", check=False)
                time.sleep(5)
            stop(children)
        summary = self.shell(data, _SUMMARY.format(run=run))
        summary["placements"] = self.placements(data)
        return {"row": row, "seed": self.seed, "algorithm": algorithm, "robots": robots,
                "minutes": round(minutes, 2), "robot_hours": round(robots * minutes / 60, 3), **summary,
                # whole run, stop included (an upper bound); row() replaces it with the rate between snapshots
                "learner_steps_per_s": round(summary["learner_steps"] / (60 * minutes), 2),
                "loop_hz": [s["loop_hz"] for s in timeline], "timeline": timeline}


_ASSIGN = """
from robots.models import Task, TaskAssignment
for t in Task.objects.filter(name__in={tasks!r}):
    TaskAssignment.objects.get_or_create(robot=None, task=t)
"""

_START = """
from learner import services
from learner.models import Checkpoint
run = services.start_run({algorithm!r}, {tasks!r}, total_steps={steps}, preset="sop",
                         base_checkpoint=Checkpoint.objects.get(version=1),
                         overrides={{"checkpoint_every_steps": {every}, "checkpoint_every_s": 1e9,
                                     "max_steps_per_s": {pace}, **{extra!r}}})
print(run.pk)
"""

_RUN_STATE = """
import json
from learner.models import Checkpoint, TrainingRun
run = TrainingRun.objects.get(pk={run})
cp = Checkpoint.objects.filter(run=run).order_by("-version").first()
print(json.dumps({{"status": run.status, "step": run.step, "message": run.message,
                  "version": cp.version if cp else None}}))
"""

_SNAPSHOT = """
import json
from django.db.models import Count, Sum
from learner.models import Checkpoint, TrainingRun
from robots.models import Episode, Robot
run = TrainingRun.objects.get(pk={run})
eps = Episode.objects.filter(split="online", status="verified")
agg = eps.aggregate(n=Count("id"), iv=Sum("intervention_count"))
cp = Checkpoint.objects.order_by("-version").first()
n = agg["n"] or 0
print(json.dumps({{"version": cp.version if cp else None, "step": run.step, "episodes": n,
                  "interventions_per_episode": round((agg["iv"] or 0) / n, 3) if n else None,
                  "loop_hz": [round(r.loop_hz, 2) for r in Robot.objects.filter(name__startswith="robot-")]}}))
"""

_PLACEMENTS = """
import json
import numpy as np
from django.conf import settings
from robots.agent.environment import MetaWorldEnvironment
from robots.agent.seeding import stream_seed
from robots.episode_file import EpisodeReader
from robots.models import Episode, Task

def key(state):  # object and goal position at the first frame: the placement
    return tuple(np.round(np.concatenate([state[4:7], state[36:39]]).astype(np.float64), 4).tolist())

out = {{}}
for task in Task.objects.filter(name__in={tasks!r}):
    online, demos = [], []
    for e in Episode.objects.filter(task=task, status="verified").exclude(split="eval"):
        with EpisodeReader(settings.PAYLOAD_DIR / e.payload_path) as reader:
            state = reader.column("observation/state", 0, 1)[0]
        (online if e.split == "online" else demos).append(key(state))
    env = MetaWorldEnvironment(task.env_id, image_size=16, seed=stream_seed(settings.SOP_EVAL_SEED, "eval", task.env_id))
    held_out = {{key(env.reset()["state"]) for _ in range({n})}}
    env.close()
    out[task.name] = {{"online_episodes": len(online), "distinct_online": len(set(online)),
                      "online_in_eval": len(set(online) & held_out), "online_in_demos": len(set(online) & set(demos)),
                      "demos_in_eval": len(set(demos) & held_out), "eval_placements": len(held_out)}}
print(json.dumps(out))
"""

_SUMMARY = """
import json
from django.db.models import Count, Q, Sum
from learner.models import Checkpoint, TrainingRun
from robots.models import Episode
run = TrainingRun.objects.get(pk={run})
t0 = run.started_at
cps = [[c.version, round((c.created_at - t0).total_seconds() / 60, 2)]
       for c in Checkpoint.objects.filter(Q(version=1) | Q(run=run)).order_by("version")]
eps = Episode.objects.filter(split="online", status="verified", started_at__gte=t0)
agg = eps.aggregate(n=Count("id"), ok=Count("id", filter=Q(success=True)),
                    auto=Count("id", filter=Q(success=True, intervention_count=0)),
                    intervened=Count("id", filter=Q(intervention_count__gt=0)), ivs=Sum("intervention_steps"),
                    steps=Sum("steps"))
demo = Episode.objects.filter(split="offline", status="verified").aggregate(steps=Sum("steps"))
by_task = {{r["task__name"]: r["n"] for r in eps.values("task__name").annotate(n=Count("id"))}}
# the sampler's online weight w_on per task over the run (every 250 learner steps): is the mixing adaptive?
from learner.models import TrainingMetric
w_on = [[m.step, {{t: v.get("w_on") for t, v in (m.values.get("tasks") or {{}}).items()}}]
        for m in TrainingMetric.objects.filter(run=run).order_by("step") if m.step % 250 == 0]
print(json.dumps({{"run": run.pk, "learner_steps": run.step, "checkpoints": sorted(cps),
                  "online_episodes": agg["n"], "online_successes": agg["ok"],
                  "autonomous_successes": agg["auto"], "intervened_episodes": agg["intervened"],
                  "expert_steps_online": agg["ivs"] or 0, "online_steps": agg["steps"] or 0,
                  "demo_steps": demo["steps"] or 0, "online_episodes_by_task": by_task, "w_on": w_on}}))
"""


def spawn(data: Path, name: str, env: dict, cmd: list[str]) -> subprocess.Popen:
    (data / "logs").mkdir(parents=True, exist_ok=True)
    fh = open(data / "logs" / f"{name}.log", "ab")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def stop(children: list[subprocess.Popen]) -> None:
    for proc in children:
        _kill(proc, signal.SIGTERM)
    for proc in children:
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            _kill(proc, signal.SIGKILL)


# -- summaries -----------------------------------------------------------------------------------------------------

T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def mean_interval(values: list[float]) -> dict:
    """Mean over seeds with a 95 % Student-t interval (None with one seed)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"mean": round(mean, 4), "n": n, "interval": None}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = T95.get(n - 1, 1.96) * sd / math.sqrt(n)
    return {"mean": round(mean, 4), "n": n, "interval": [round(mean - half, 4), round(mean + half, 4)]}


def summarise(results: dict) -> None:
    protocol = results["protocol"]
    post, held = protocol["post_trained_tasks"], protocol["held_out_tasks"]
    rows: dict[str, dict] = {}
    for key, run in sorted(results["runs"].items()):
        rows.setdefault(run["row"], []).append(run)
    table = {}
    for row, runs in rows.items():
        entry = {"seeds": sorted(r["seed"] for r in runs)}
        for name, tasks in (("post_trained", post), ("held_out", held)):
            means = [r[f"mean_{name}"] for r in runs if r.get(f"mean_{name}") is not None]
            if means:
                entry[name] = mean_interval(means)
                k = sum(r["final"][t]["successes"] for r in runs for t in tasks if t in r["final"])
                n = sum(r["final"][t]["episodes"] for r in runs for t in tasks if t in r["final"])
                entry[name]["pooled_episodes"] = n
                entry[name]["pooled_wilson"] = [round(x, 4) for x in wilson_interval(k, n)]
        entry["tasks"] = {t: mean_interval([r["final"][t]["success"] for r in runs if t in r["final"]])
                          for t in post + held if any(t in r["final"] for r in runs)}
        for field in ("learner_steps", "expert_steps_online", "robot_hours", "minutes"):
            entry[field] = mean_interval([float(r.get(field, 0) or 0) for r in runs])["mean"]
        hours = [r["robot_hours"] for r in runs if r.get("robot_hours")]
        if hours:
            entry["autonomous_successes_per_robot_hour"] = mean_interval(
                [r["autonomous_successes"] / r["robot_hours"] for r in runs if r.get("robot_hours")])
        if any(r.get("curve") for r in runs):
            for level in (0.8, 0.9):
                times = [time_to(r["curve"], level) for r in runs if r.get("curve")]
                entry[f"time_to_{level}"] = {"per_seed": times,
                                             **(mean_interval([t for t in times if t is not None])
                                                if any(t is not None for t in times) else {})}
        table[row] = entry
    fleet = {}
    for row, robots in (("fleet1", 1), ("hg_dagger", 2), ("fleet4", 4)):
        if row in table and table[row].get("time_to_0.8", {}).get("mean") is not None:
            fleet[robots] = table[row]["time_to_0.8"]["mean"]
    if 1 in fleet:
        table["fleet_speedup_time_to_0.8"] = {str(k): round(fleet[1] / v, 2) for k, v in fleet.items() if v}
    results["summary"] = table


def supersede_under_paced(results: dict, rows: list[str], seed: int, pace: float) -> list[str]:
    """Move the seed's under-paced online runs of ``rows`` (and the rows derived from them) to
    ``results["superseded"]``, with the reason, so that the loop runs them again. Nothing is deleted: the report
    lists what was superseded and why. Returns the rows to run again."""
    runs, again = results["runs"], []
    for row in rows:
        key = f"{row}/seed-{seed}"
        run = runs.get(key)
        if run is None or row not in FLEET:
            continue
        rate = run.get("learner_steps_per_s") or 0.0
        if rate >= PACE_HELD * pace:
            continue
        reason = f"learner {rate:.2f} steps/s < {PACE_HELD:.0%} of the pinned {pace:g}"
        for victim in (row, *DERIVED.get(row, ())):
            old = runs.pop(f"{victim}/seed-{seed}", None)
            if old is not None:
                why = reason if victim == row else f"made from {key}, which was run again ({reason})"
                results.setdefault("superseded", []).append({"key": f"{victim}/seed-{seed}", "reason": why,
                                                             "superseded_at": time.strftime("%Y-%m-%d %H:%M"),
                                                             "run": old})
                log(f"{victim}/seed-{seed}: superseded ({why}); it runs again")
                again.append(victim)
    return again


def timeline_rate(timeline: list[dict]):
    """Learner steps/s between the first and the last snapshot of the online phase: both are read the same way, so
    the start-up before the first and the stop after the last (when the run's step still moves) do not count."""
    if len(timeline) < 2 or timeline[-1]["t_min"] <= timeline[0]["t_min"]:
        return None
    return round((timeline[-1]["step"] - timeline[0]["step"]) / (60 * (timeline[-1]["t_min"] - timeline[0]["t_min"])), 2)


def time_to(curve: list[dict], level: float):
    """Minutes until the post-trained mean first reaches ``level``, linearly interpolated between evaluated
    checkpoints; None if it never does within the run (censored at the budget)."""
    points = [(c["minutes"], c["mean_post_trained"]) for c in curve if c.get("mean_post_trained") is not None]
    for (m0, s0), (m1, s1) in zip([(None, None)] + points, points):
        if s1 >= level:
            if m0 is None or s1 == s0:
                return round(m1, 2)
            return round(m0 + (level - s0) * (m1 - m0) / (s1 - s0), 2)
    return None


NAMES = {"base": "base BC", "bc_long": "BC trained as long", "offline": "offline (same data, no loop)",
         "hg_dagger": "SOP + HG-DAgger", "recap": "SOP + RECAP", "fleet1": "SOP + HG-DAgger, 1 robot",
         "fleet4": "SOP + HG-DAgger, 4 robots", "sampler": "SOP + HG-DAgger, relative-loss sampler (ablation)",
         "flow_base": "base BC, flow_vla", "flow": "SOP + HG-DAgger, flow_vla"}


def _cell(stat: dict | None) -> str:
    if not stat or stat.get("mean") is None:
        return "-"
    if stat.get("interval"):
        lo, hi = stat["interval"]
        return f"{stat['mean']:.2f} [{lo:.2f}, {hi:.2f}]"
    return f"{stat['mean']:.2f}"


def tables(results: dict) -> str:
    """docs/study_results.md: Tables A and B as generated from the results file (never edited by hand)."""
    protocol, summary = results["protocol"], results.get("summary", {})
    post, held = protocol["post_trained_tasks"], protocol["held_out_tasks"]
    lines = ["# SOP study: results", "",
             f"Generated by `benchmarks/sop_study.py` from `benchmarks/results/sop_study.json`; do not edit. "
             f"Protocol: docs/experiment.md. Autonomous success on {protocol['eval_episodes']} fixed held-out "
             f"placements per task (placements root {protocol['eval_seed']}); cells are the mean over seeds with a "
             f"95 % t-interval over seeds in brackets (none with one seed). Held-out tasks (*) appear only in the "
             f"demonstrations.", "",
             "## Table A: methods (2 robots where there is a fleet; "
             f"{protocol['budget_min']:g} min online; learner pinned at {protocol['pace']:g} steps/s)", ""]
    head = ["row", "seeds", *post, *(f"{t}*" for t in held), "post-trained mean", "pooled 95 % (Wilson)",
            "held-out mean", "learner steps", "expert steps online", "autonomous successes / robot-hour"]

    def method_rows(rows):
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in rows:
            e = summary.get(row)
            if not e:
                out.append(f"| {NAMES[row]} | not run yet |" + " |" * (len(head) - 2))
                continue
            pooled = e.get("post_trained", {}).get("pooled_wilson")
            out.append("| " + " | ".join([
                NAMES[row], ",".join(map(str, e["seeds"])), *(_cell(e["tasks"].get(t)) for t in post + held),
                _cell(e.get("post_trained")), f"[{pooled[0]:.2f}, {pooled[1]:.2f}]" if pooled else "-",
                _cell(e.get("held_out")), f"{e['learner_steps']:.0f}", f"{e['expert_steps_online']:.0f}",
                _cell(e.get("autonomous_successes_per_robot_hour"))]) + " |")
        return out

    lines += method_rows(TABLE_A)
    lines += ["", "## Table B: fleet scaling (SOP + HG-DAgger, same budget and learner pace)", "",
              "| robots | seeds | final post-trained mean | time to 0.8 (min) | time to 0.9 (min) | speed-up to 0.8 "
              "| real loop Hz (min over snapshots) | learner steps/s |", "|---|---|---|---|---|---|---|---|"]
    speedup = summary.get("fleet_speedup_time_to_0.8", {})
    for row, robots in (("fleet1", 1), ("hg_dagger", 2), ("fleet4", 4)):
        e = summary.get(row)
        if not e:
            lines.append(f"| {robots} | not run yet | | | | | | |")
            continue
        # in seed order, as the seeds column and the per-seed times (a rerun is stored after the runs it followed)
        runs = sorted((r for r in results["runs"].values() if r["row"] == row), key=lambda r: r["seed"])
        hz = [min(h for snap in r.get("loop_hz", []) for h in snap) for r in runs if r.get("loop_hz")]
        sps = [r.get("learner_steps_per_s") for r in runs if r.get("learner_steps_per_s") is not None]

        def times(level):
            t = e.get(f"time_to_{level}", {})
            per = ", ".join("> budget" if x is None else f"{x:.1f}" for x in t.get("per_seed", []))
            return f"{_cell(t) if t.get('mean') is not None else '-'} (seeds: {per})"

        lines.append(f"| {robots} | {','.join(map(str, e['seeds']))} | {_cell(e.get('post_trained'))} | "
                     f"{times(0.8)} | {times(0.9)} | {speedup.get(str(robots), '-')} | "
                     f"{', '.join(f'{h:.1f}' for h in hz) or '-'} | {', '.join(f'{x:.2f}' for x in sps) or '-'} |")
    lines += ["", "## Table C: policy families (small_vla: regression head; flow_vla: flow-matching head over the same "
              "encoders; same demonstrations, BC steps, fleet, budget and learner pace)", ""]
    lines += method_rows(TABLE_C)
    lines += ["", "## The sampler's online weight w_on per task (min-max over each run, after its first 1000 steps)",
              "", "| run | " + " | ".join(post) + " |", "|---|" + "---|" * len(post)]
    for key, run in sorted(results["runs"].items()):
        if not run.get("w_on"):
            continue
        cells = []
        for t in post:
            values = [w[t] for step, w in run["w_on"] if step >= 1000 and w.get(t) is not None]
            cells.append(f"{min(values):.2f}-{max(values):.2f}" if values else "-")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines += ["", "Time to a level is interpolated between evaluated checkpoints (minutes "
              f"{', '.join(f'{m:g}' for m in protocol['curve_minutes'])} and the end); '> budget' means the run "
              "never reached it. The speed-up compares mean times over the seeds that reached the level.", ""]
    if results.get("superseded"):
        lines += ["## Superseded runs (kept in the results file; not in any table)", "",
                  f"A timed run is run again when its learner held less than {PACE_HELD:.0%} of the pinned pace; the "
                  "controls made from it go with it.", "", "| run | reason | its post-trained mean |", "|---|---|---|"]
        for old in results["superseded"]:
            mean = old["run"].get("mean_post_trained")
            lines.append(f"| {old['key']} | {old['reason']} | {'-' if mean is None else f'{mean:.2f}'} |")
        lines.append("")
    return "\n".join(lines)


def headline(results: dict) -> str:
    """The README's summary table (between its sop-study markers), from the results file only."""
    summary, protocol = results.get("summary", {}), results["protocol"]
    lines = ["| row | seeds | post-trained tasks: mean [95 % t over seeds] | pooled Wilson 95 % | held-out tasks |",
             "|---|---|---|---|---|"]
    for row in TABLE_A + ("fleet1", "fleet4", "flow_base", "flow"):
        e = summary.get(row)
        if not e:
            lines.append(f"| {NAMES[row]} | not run yet | | | |")
            continue
        pooled = e.get("post_trained", {}).get("pooled_wilson")
        lines.append(f"| {NAMES[row]} | {','.join(map(str, e['seeds']))} | {_cell(e.get('post_trained'))} | "
                     + (f"[{pooled[0]:.2f}, {pooled[1]:.2f}]" if pooled else "-") + f" | {_cell(e.get('held_out'))} |")
    return ("\n".join(lines) + f"\n\n{protocol['eval_episodes']} held-out placements per task and checkpoint; "
            "generated by `benchmarks/sop_study.py` from `benchmarks/results/sop_study.json`.\n")


def save(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(path)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, protocol = results.get("summary", {}), results["protocol"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    order = [r for r in TABLE_A + ("fleet1", "fleet4") if r in summary and "post_trained" in summary[r]]
    xs = range(len(order))
    for offset, name, color in ((-0.18, "post_trained", "#2f6fed"), (0.18, "held_out", "#9aa5b1")):
        means = [summary[r].get(name, {}).get("mean") for r in order]
        errs = [[0, 0] if not summary[r].get(name, {}).get("interval") else
                [summary[r][name]["mean"] - summary[r][name]["interval"][0],
                 summary[r][name]["interval"][1] - summary[r][name]["mean"]] for r in order]
        ax1.bar([x + offset for x in xs], [m or 0 for m in means], width=0.34, color=color,
                yerr=list(zip(*errs)) if errs else None, capsize=3, label=name.replace("_", "-") + " tasks")
    ax1.set_xticks(list(xs), order, rotation=20)
    ax1.set(ylim=(0, 1.05), ylabel="autonomous success (held-out placements)",
            title=f"Table A: mean over seeds, 95 % t-interval ({protocol['eval_episodes']} episodes/task)")
    ax1.legend(fontsize=8)
    ax1.grid(axis="y", alpha=0.3)
    colors = {"fleet1": "#c0392b", "hg_dagger": "#2f6fed", "fleet4": "#27ae60", "recap": "#7b4bd6"}
    for row, color in colors.items():
        for run in [r for r in results["runs"].values() if r["row"] == row and r.get("curve")]:
            ax2.plot([c["minutes"] for c in run["curve"]], [c["mean_post_trained"] for c in run["curve"]], "o-",
                     color=color, alpha=0.7, label=f"{row} ({FLEET.get(row, '?')} robots)"
                     if run["seed"] == min(r["seed"] for r in results["runs"].values() if r["row"] == row) else None)
    ax2.axhline(0.8, color="#999", lw=0.8, ls="--")
    ax2.set(xlabel="wall-clock minutes of online post-training", ylabel="post-trained tasks: mean success",
            ylim=(0, 1.05), title="success vs time, every seed")
    ax2.legend(fontsize=8, loc="lower right")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


# -- helpers -------------------------------------------------------------------------------------------------------


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
    """``manage.py evaluate``'s per-task lines -> {task: {success, mean_length, episodes}}."""
    tasks = {}
    for line in stdout.splitlines():
        m = re.match(r"^(\S+)\s+success ([\d.]+)\s+mean length (\S+)\s+\((\d+) episodes\)", line)
        if m:
            tasks[m.group(1)] = {"success": float(m.group(2)),
                                 "mean_length": None if m.group(3) == "-" else float(m.group(3)),
                                 "episodes": int(m.group(4))}
    return tasks


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
