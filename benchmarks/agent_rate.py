"""Control-loop rate and jitter of a REAL robot agent process (10 Hz, Meta-World, 96x96) while uploads run.

Setup (private to this run, removed at the end): a temp SOP_DATA_DIR, ``manage.py migrate`` + ``add_tasks`` (the demo
tasks) on SQLite (default) or a fresh PostgreSQL database (``--postgres``), Redis db 9 (or the embedded one), one
daphne process on loopback, robots registered with their own tokens, and ``python -m robots.agent --hz 10`` as a
subprocess (token in SOP_ROBOT_TOKEN). The agent gets its tasks from the server, records every episode to its spool
and uploads it to the server itself, as in production.

Phases, one after the other with the same agent process:
  quiet   the agent alone (its own spool writes and uploads only)
  loaded  plus a background uploader in this process (``--bg-uploaders`` robots, ``--bg-rate`` episodes/s in all,
          default 2 robots at 2 episodes/s ~ 7 MB/s; the agent's upload loop with real-render 200-step episodes as in
          benchmarks/ingest.py)
  heavy   the same at ``--heavy-rate`` (default 8 robots, 8 episodes/s ~ 29 MB/s: near what ingest.py measures as
          the server's capacity on this machine), to see how much server load on the SAME 2 cores costs the loop
(+profile: when a phase misses the goal, it is run once more with py-spy --gil on the agent; ``--profile-agent``)

Measured: the agent's per-step start times as it recorded them (``timestamp`` dataset of each episode file, measured
on the robot, never nominal), read from the server's PAYLOAD_DIR (verified episodes) plus whatever was still in the
agent's spool at shutdown. Period = diff of consecutive timestamps within an episode. An episode counts for a phase
when it started and ended inside the phase. Reported per phase: achieved rate, p50/p90/p99/max period, late periods
(> 110 ms, i.e. > 10 % over nominal) and where in the episode they fall, CPU of agent / server / others; plus an
isolated probe of the step cost (expert act + physics + render) in this process, and the agent's own last
``loop_hz``/``loop_p99_ms`` as the server stored them from its status heartbeats.

    .venv/bin/python benchmarks/agent_rate.py          # 3 x 60 s (~4.5 min) -> benchmarks/results/agent_rate.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

TASKS = ("reach", "drawer-open", "button-press-topdown", "window-open")  # robots.catalog.DEMO_TASKS
BG_TEMPLATES = {"reach": "reach-v3", "drawer-open": "drawer-open-v3"}
AGENT_ROBOT = "bench-agent"
GOAL_P99_MS_FACTOR = 1.10  # p99 period within 10 % of nominal
AGENT_PROFILE_FOCUS = ("run_episode", "act (robots", "_render", "on_step", "write_episode", "sha256_of",
                       "upload (robots", "_request", "_run_once", "Event.wait", "serve (robots")


def read_episode_timing(path: Path) -> dict | None:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
            ts = np.asarray(f["timestamp"][:], dtype=np.float64)
    except (OSError, KeyError):
        return None
    return {"id": str(attrs["episode_id"]), "robot": str(attrs["robot"]), "task": str(attrs["task"]),
            "outcome": str(attrs["outcome"]), "started_at": float(attrs["started_at"]),
            "ended_at": float(attrs["ended_at"]), "control_hz": float(attrs["control_hz"]), "timestamps": ts,
            "path": str(path)}


def period_stats(episodes: list[dict], hz: float) -> dict:
    nominal = 1.0 / hz
    periods, index = [], []
    for ep in episodes:
        d = np.diff(ep["timestamps"])
        periods.append(d)
        index.append(np.arange(1, len(ep["timestamps"])))  # step index whose start ends the period
    if not periods or sum(len(p) for p in periods) == 0:
        return {"episodes": len(episodes), "periods": 0}
    p = np.concatenate(periods) * 1000.0
    idx = np.concatenate(index)
    late = p > nominal * 1000 * GOAL_P99_MS_FACTOR
    early = idx <= 3
    return {
        "episodes": len(episodes),
        "steps": int(sum(len(ep["timestamps"]) for ep in episodes)),
        "periods": int(p.size),
        "achieved_hz": round(float(1000.0 / p.mean()), 4),
        "period_ms": {**common.percentiles(p, (50, 90, 99)), "mean": round(float(p.mean()), 3),
                      "max": round(float(p.max()), 3), "min": round(float(p.min()), 3),
                      "std": round(float(p.std()), 3)},
        "late_periods_gt_110ms": int(late.sum()),
        "late_periods_gt_101ms": int((p > nominal * 1000 + 1.0).sum()),
        "late_periods_gt_150ms": int((p > nominal * 1000 * 1.5).sum()),
        "late_gt_110ms_in_first_3_steps": int((late & early).sum()),
        "periods_in_first_3_steps": int(early.sum()),
        "p99_ms_excluding_first_3_steps": round(float(np.percentile(p[~early], 99)), 3) if (~early).any() else None,
        "worst_periods": [
            {"ms": round(float(p[i]), 2), "step": int(idx[i])} for i in np.argsort(p)[::-1][:8]
        ],
    }


def step_cost_probe(steps: int, image_size: int, seed: int = 123) -> dict:
    """Expert act + physics step + render, timed in this process with nothing of ours running."""
    from robots.agent.agents import ScriptedExpertAgent
    from robots.agent.environment import MetaWorldEnvironment

    env = MetaWorldEnvironment("drawer-open-v3", camera="corner3", image_size=image_size, seed=seed)
    agent = ScriptedExpertAgent(noise=0.1, seed=seed)
    agent.reset("drawer-open-v3", "open the drawer")
    obs = env.reset()
    act_ms, phys_ms, render_ms = [], [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        decision = agent.act(obs)
        t1 = time.perf_counter()
        state = env._env.step(decision.action)[0]  # physics only (the product's own Meta-World instance)
        t2 = time.perf_counter()
        obs = {"image": env._render(), "state": np.asarray(state, np.float32)}
        t3 = time.perf_counter()
        act_ms.append((t1 - t0) * 1000)
        phys_ms.append((t2 - t1) * 1000)
        render_ms.append((t3 - t2) * 1000)
    env.close()
    total = np.array(act_ms) + np.array(phys_ms) + np.array(render_ms)
    return {"steps": steps, "task": "drawer-open-v3", "image_size": image_size,
            "act_ms": common.percentiles(act_ms, (50, 99)), "physics_ms": common.percentiles(phys_ms, (50, 99)),
            "render_ms": common.percentiles(render_ms, (50, 99)), "total_ms": common.percentiles(total, (50, 99))}


class BackgroundUploader:
    """Paced uploads from ``len(episodes)`` robots: ``rate`` episodes/s in all, each robot on its own schedule."""

    def __init__(self, server, tokens, episodes: dict, rate: float, chunk: int):
        self.server, self.tokens, self.episodes, self.chunk = server, tokens, episodes, chunk
        self.interval = len(episodes) / rate
        self.stop_event = threading.Event()
        self.records: list[dict] = []
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(r, i), daemon=True) for i, r in enumerate(episodes)]

    def start(self):
        for t in self.threads:
            t.start()
        return self

    def stop(self):
        self.stop_event.set()
        for t in self.threads:
            t.join()

    def _run(self, robot: str, i: int):
        import httpx

        with httpx.Client(base_url=self.server.url, headers={"Authorization": f"Bearer {self.tokens[robot]}"},
                          timeout=120.0) as client:
            next_at = time.monotonic() + self.interval * i / len(self.threads)
            for ep in self.episodes[robot]:
                if self.stop_event.wait(max(0.0, next_at - time.monotonic())):
                    return
                next_at += self.interval
                try:
                    res = common.upload_episode(client, ep, self.chunk)
                except Exception as exc:
                    res = {"ok": False, "seconds": 0.0, "error": repr(exc)}
                res["bytes"] = len(ep.body)
                with self._lock:
                    self.records.append(res)

    def summary(self, seconds: float) -> dict:
        ok = [r for r in self.records if r["ok"]]
        return {"episodes_verified": len(ok), "failures": len(self.records) - len(ok),
                "episodes_per_s": round(len(ok) / seconds, 3) if seconds else None,
                "MB_per_s": round(sum(r["bytes"] for r in ok) / seconds / 1e6, 3) if seconds else None,
                "upload_s": common.percentiles([r["seconds"] for r in ok])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per phase (default 60)")
    parser.add_argument("--phases", default="quiet,loaded,heavy", help="comma list of quiet, loaded, heavy")
    parser.add_argument("--hz", type=float, default=10.0)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bg-rate", type=float, default=2.0, help="background uploads, episodes/s in all (loaded)")
    parser.add_argument("--bg-uploaders", type=int, default=2)
    parser.add_argument("--heavy-rate", type=float, default=8.0, help="background uploads in the heavy phase")
    parser.add_argument("--heavy-uploaders", type=int, default=8)
    parser.add_argument("--bg-steps", type=int, default=200)
    parser.add_argument("--probe-steps", type=int, default=300, help="steps of the isolated step-cost probe (0: skip)")
    parser.add_argument("--profile-agent", choices=("auto", "always", "never"), default="auto",
                        help="py-spy the agent (--gil) in an extra loaded phase: if the goal is missed (auto)")
    parser.add_argument("--postgres", action="store_true")
    parser.add_argument("--pg-server", default=common.DEFAULT_PG_SERVER)
    parser.add_argument("--redis", default=common.DEFAULT_REDIS, help="Redis URL, or 'embedded'")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--out", type=Path, default=common.ROOT / "benchmarks" / "results" / "agent_rate.json")
    args = parser.parse_args()
    phases = [p for p in args.phases.split(",") if p]
    if not phases or set(phases) - {"quiet", "loaded", "heavy"}:
        parser.error("phases are quiet, loaded, heavy")
    load = {"loaded": (args.bg_rate, args.bg_uploaders), "heavy": (args.heavy_rate, args.heavy_uploaders)}
    chunk = common.chunk_bytes_default()
    nominal_ms = 1000.0 / args.hz
    bg_robots = [f"bench-bg-{i:02d}" for i in range(max(args.bg_uploaders, args.heavy_uploaders))]

    result: dict = {
        "benchmark": "agent_rate",
        "command": common.command_line(),
        "machine": common.machine_info(),
        "parameters": {
            "hz": args.hz, "nominal_period_ms": nominal_ms, "image_size": args.image_size, "camera": "corner3",
            "phase_duration_s": args.duration, "phases": phases, "tasks": list(TASKS), "seed": args.seed,
            "agent": "python -m robots.agent --hz HZ --seed SEED (policy expert; spool in the run's temp dir)",
            "background": {"loaded": {"rate_episodes_per_s": args.bg_rate, "uploaders": args.bg_uploaders},
                           "heavy": {"rate_episodes_per_s": args.heavy_rate, "uploaders": args.heavy_uploaders},
                           "steps": args.bg_steps, "chunk_bytes": chunk,
                           "payload": "real Meta-World renders as in benchmarks/ingest.py"},
        },
        "goal": {"p99_period_ms_max": round(nominal_ms * GOAL_P99_MS_FACTOR, 3)},
    }
    agent_proc = None
    with common.BenchServer("agent", postgres=args.postgres, pg_server=args.pg_server, redis_url=args.redis,
                            keep=args.keep) as server:
        tokens = server.setup(list(TASKS), [AGENT_ROBOT, *bg_robots])
        result["parameters"].update(database=server.database_kind, redis=server.redis_url)
        print(f"data dir {server.data_dir}, {server.database_kind}, redis {server.redis_url}", flush=True)

        if set(phases) & set(load):
            print("rendering background episode templates ...", flush=True)
            templates = common.make_template_episodes(server.workdir / "templates", list(BG_TEMPLATES.items()),
                                                      args.bg_steps, args.image_size, seed=args.seed + 1000)
            result["background_templates"] = [{k: t[k] for k in ("task", "size", "compression_ratio")}
                                              for t in templates]

        def prepare_bg(rate: float, uploaders: int) -> dict:
            n_per = int(rate * args.duration / uploaders * 1.2) + 2
            work = server.workdir / "prep"
            work.mkdir(exist_ok=True)
            return {r: [common.prepare_episode(Path(templates[(i + j) % len(templates)]["path"]),
                                               templates[(i + j) % len(templates)]["task"], r, work)
                        for j in range(n_per)] for i, r in enumerate(bg_robots[:uploaders])}

        server.start()
        spool = server.workdir / "spool"
        agent_log = server.workdir / "agent.log"
        with open(agent_log, "wb") as log:
            agent_proc = subprocess.Popen(
                [common.PYTHON, "-m", "robots.agent", "--server", server.url, "--spool", str(spool),
                 "--hz", str(args.hz), "--image-size", str(args.image_size), "--seed", str(args.seed)],
                cwd=common.ROOT, env={**os.environ, "SOP_ROBOT_TOKEN": tokens[AGENT_ROBOT], "PYTHONUNBUFFERED": "1"},
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            # Warm-up: until the agent's first episode is verified (imports, GL context, first env, first upload).
            t_wait = time.monotonic()
            while not server.stored_episodes():
                if agent_proc.poll() is not None:
                    raise RuntimeError(f"agent exited with {agent_proc.returncode}:\n{agent_log.read_text()[-3000:]}")
                if time.monotonic() - t_wait > 120:
                    raise RuntimeError(f"no verified episode after 120 s:\n{agent_log.read_text()[-3000:]}")
                time.sleep(0.5)
            result["warmup_s"] = round(time.monotonic() - t_wait, 1)

            windows = []

            def run_phase(phase: str) -> None:
                bg = eps = None
                kind = phase.split("+")[0]
                if kind in load:
                    rate, uploaders = load[kind]
                    eps = prepare_bg(rate, uploaders)  # before the clock: CPU work of the benchmark, not the load
                    bg = BackgroundUploader(server, tokens, eps, rate, chunk)
                spy, spy_out = None, server.workdir / "agent-profile.txt"
                meter = common.CpuMeter({"agent": agent_proc.pid, "server": server.pid, "bench": os.getpid()})
                print(f"phase {phase}: {args.duration:.0f} s ...", flush=True)
                if phase.endswith("+profile"):
                    spy = common.py_spy_record(agent_proc.pid, args.duration + 30, spy_out, rate=100, gil=True)
                    time.sleep(1.0)  # py-spy attaches
                start_unix = time.time()
                meter.start()
                if bg:
                    bg.start()
                time.sleep(args.duration)
                if bg:
                    bg.stop()
                cpu = meter.stop()
                end_unix = time.time()
                window = {"phase": phase, "start": start_unix, "end": end_unix, "cpu": cpu}
                if bg:
                    window["background"] = bg.summary(end_unix - start_unix)
                if spy is not None:
                    spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
                    spy.wait(30)
                    window["agent_profile"] = common.summarize_collapsed(spy_out, focus=AGENT_PROFILE_FOCUS)
                    window["agent_profile"]["method"] = ("py-spy record --gil --threads --nonblocking --rate 100 on "
                                                         "the agent: samples of whichever thread holds the GIL")
                windows.append(window)

            for phase in phases:
                run_phase(phase)
            if args.profile_agent != "never":
                so_far = _phase_stats(server, spool, windows, args.hz)
                missed = [ph for ph in phases
                          if (so_far[ph].get("period_ms") or {}).get("p99", 0) > nominal_ms * GOAL_P99_MS_FACTOR]
                if missed or args.profile_agent == "always":
                    run_phase((missed or phases)[-1] + "+profile")  # again, with py-spy on the agent
            # Let the agent's last uploads land, then stop it gracefully (it spools the aborted episode).
            time.sleep(5.0)
            state = _robot_state(server)
        finally:
            if agent_proc is not None and agent_proc.poll() is None:
                rc = common.stop_process_group(agent_proc, signal.SIGTERM, timeout=60)
                result["agent_exit_code"] = rc
        result["agent_log_tail"] = agent_log.read_text(errors="replace").splitlines()[-6:]
        result["agent_reported_state"] = state
        stats = _phase_stats(server, spool, windows, args.hz)
        result["phases"] = []
        for w in windows:
            entry = {"phase": w["phase"], "duration_s": round(w["end"] - w["start"], 2), "cpu": w["cpu"],
                     **({"background": w["background"]} if "background" in w else {}),
                     "periods": stats[w["phase"]]}
            if "agent_profile" in w:
                entry["agent_profile"] = w["agent_profile"]
            result["phases"].append(entry)
            s = stats[w["phase"]]
            print(f"{w['phase']}: {s.get('episodes')} episodes, {s.get('periods')} periods, "
                  f"{s.get('achieved_hz')} Hz, period {s.get('period_ms')}, "
                  f"late>110ms {s.get('late_periods_gt_110ms')}", flush=True)
        result["goal"]["met"] = {w["phase"]: (stats[w["phase"]].get("period_ms") or {}).get("p99", 1e9)
                                 <= nominal_ms * GOAL_P99_MS_FACTOR for w in windows}
        server.stop_daphne()
        if args.probe_steps:
            print("isolated step-cost probe ...", flush=True)
            result["step_cost_probe"] = step_cost_probe(args.probe_steps, args.image_size)
            print(json.dumps(result["step_cost_probe"]))
    result["machine"]["loadavg_at_end"] = list(os.getloadavg())
    common.write_result(args.out, result)
    return 0


def _phase_stats(server, spool: Path, windows: list[dict], hz: float) -> dict:
    files = list(server.stored_episodes()) + sorted(spool.glob("*.h5"))
    episodes = [e for e in (read_episode_timing(p) for p in files) if e and e["robot"] == AGENT_ROBOT]
    out = {}
    for w in windows:
        inside = [e for e in episodes if e["started_at"] >= w["start"] and e["ended_at"] <= w["end"]]
        s = period_stats(inside, hz)
        s["outcomes"] = {o: sum(e["outcome"] == o for e in inside) for o in sorted({e["outcome"] for e in inside})}
        s["from_spool_not_uploaded"] = sum(str(spool) in e["path"] for e in inside)
        out[w["phase"]] = s
    return out


def _robot_state(server) -> dict:
    snippet = (
        "import json, django; django.setup()\n"
        "from robots.models import Robot\n"
        f"r = Robot.objects.get(name={AGENT_ROBOT!r})\n"
        "print(json.dumps({'loop_hz': r.loop_hz, 'loop_p99_ms': r.loop_p99_ms, 'spool_pending': r.spool_pending}))\n"
    )
    try:
        out = subprocess.run([common.PYTHON, "-c", snippet], cwd=common.ROOT, capture_output=True, text=True,
                             env=server.env(DJANGO_SETTINGS_MODULE="sop_web.settings"), timeout=60, check=True)
        return {**json.loads(out.stdout.strip().splitlines()[-1]),
                "note": "last status heartbeat: the agent's own rolling ~10 s window at the end of the run"}
    except Exception as exc:
        return {"error": repr(exc)}


if __name__ == "__main__":
    sys.exit(main())
