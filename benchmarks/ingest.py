"""Episode ingest throughput: episodes/s and MB/s through the HTTP upload endpoint of ONE daphne process.

Setup (all private to this run, removed at the end): a temp SOP_DATA_DIR, ``manage.py migrate`` + ``add_tasks`` on
SQLite (default) or on a fresh PostgreSQL database (``--postgres``, created and dropped), Redis db 9 on the local
server (or the embedded one), 8 robots registered with their own tokens, and one real daphne subprocess on loopback.

Payloads are REAL renders: for each of 4 Meta-World tasks the simulator (MetaWorldEnvironment, corner3, 96x96, fast
render settings) runs the scripted expert (with a little action noise) for 200 steps, written with the product's
``write_episode`` (LZF, one chunk per frame), so the compression ratio is the real one. Every upload is a copy of
one of these with a fresh UUID in its attributes (the server checks the file's id against the URL), prepared in
memory before the clock starts so the client spends its CPU on HTTP only.

Each uploader thread is one robot (own token, own httpx.Client) and runs the agent's upload loop: POST the
announcement, then PUT 4 MiB chunks (the agent's default) at ``Upload-Offset`` until the reply says ``verified``.
The measured pass (200 episodes) runs ``--repeat`` times (median episodes/s is the headline, each pass is kept):
this machine is shared, so the spread matters. Reported: episodes/s, MB/s, p50/p95/p99 of the whole upload
(POST .. verified, pooled), server CPU (cores used by the daphne process, CPU seconds per episode), client and
other-process CPU, a sweep over fewer uploaders (does it scale?), and, when the throughput is below the goal (or with
``--profile always``), a py-spy profile of the server during a separate pass.

    .venv/bin/python benchmarks/ingest.py              # SQLite, 200 episodes -> benchmarks/results/ingest.json
    .venv/bin/python benchmarks/ingest.py --postgres   # a fresh PostgreSQL database (kept as runs.postgresql there)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

TEMPLATE_TASKS = {"reach": "reach-v3", "push": "push-v3", "drawer-open": "drawer-open-v3",
                  "window-open": "window-open-v3"}
GOAL_EPISODES_PER_S = 10.0
PROFILE_FOCUS = (
    "append_upload", "open_upload", "_write_chunk", "_verify", "_sha256", "EpisodeReader", "_partial_bytes",
    "read_body", "_store_segments", "authenticate", "fsync", "save (django/db/models/base.py)",
    "dataReceived", "handle_reply", "rollover", "SQLiteCursorWrapper.execute", "_commit", "Thread.start",
)


def run_pass(server: common.BenchServer, tokens: dict[str, str], episodes: dict[str, list[common.PreparedEpisode]],
             chunk: int, duration: float) -> dict:
    """All uploader threads at once; each robot uploads its own list back to back until done or ``duration``."""
    import httpx

    records: list[dict] = []
    lock = threading.Lock()
    start_gate = threading.Barrier(len(episodes) + 1)
    deadline = [0.0]

    def worker(robot: str):
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {tokens[robot]}"},
                          timeout=120.0) as client:
            client.get("/healthz")  # open the keep-alive connection before the clock starts
            start_gate.wait()
            for ep in episodes[robot]:
                if time.monotonic() > deadline[0]:
                    break
                started = time.monotonic()
                try:
                    res = common.upload_episode(client, ep, chunk)
                except Exception as exc:  # a broken connection: counted as a failed upload
                    res = {"ok": False, "requests": 0, "seconds": time.monotonic() - started, "post_s": 0.0,
                           "put_s": 0.0, "error": repr(exc)}
                res.update(robot=robot, id=ep.id, bytes=len(ep.body), started=started, ended=time.monotonic())
                with lock:
                    records.append(res)

    threads = [threading.Thread(target=worker, args=(r,), daemon=True) for r in episodes]
    for t in threads:
        t.start()
    meter = common.CpuMeter({"server": server.pid, "client": os.getpid()})
    deadline[0] = time.monotonic() + duration + 5.0  # workers check it after the gate; reset just below
    meter.start()
    start_gate.wait()
    t0 = time.monotonic()
    deadline[0] = t0 + duration
    for t in threads:
        t.join()
    cpu = meter.stop()
    ok = [r for r in records if r["ok"]]
    window = (max(r["ended"] for r in ok) - t0) if ok else 0.0
    total_bytes = sum(r["bytes"] for r in ok)
    secs = [r["seconds"] for r in ok]
    return {
        "episodes_attempted": len(records),
        "episodes_verified": len(ok),
        "failures": [{"id": r["id"], "error": r["error"]} for r in records if not r["ok"]][:10],
        "window_s": round(window, 3),
        "episodes_per_s": round(len(ok) / window, 3) if window else 0.0,
        "MB_per_s": round(total_bytes / window / 1e6, 3) if window else 0.0,
        "MiB_per_s": round(total_bytes / window / 2**20, 3) if window else 0.0,
        "bytes_verified": total_bytes,
        "upload_s": {**common.percentiles(secs), "mean": round(float(np.mean(secs)), 4) if secs else None,
                     "max": round(max(secs), 4) if secs else None},
        "post_s": common.percentiles([r["post_s"] for r in ok]),
        "put_total_s": common.percentiles([r["put_s"] for r in ok]),
        "requests_per_episode": round(float(np.mean([r["requests"] for r in ok])), 3) if ok else None,
        "cpu": cpu,
        "_records": ok,  # popped before saving; pooled over repetitions
    }


def pooled(passes: list[dict]) -> dict:
    """The repetitions of the measured pass together: throughput per pass (median is the headline), latencies pooled."""
    ok = [r for p in passes for r in p.pop("_records")]
    secs = [r["seconds"] for r in ok]
    eps = sorted(p["episodes_per_s"] for p in passes)
    mbs = sorted(p["MB_per_s"] for p in passes)
    return {
        "repetitions": len(passes),
        "episodes_verified": len(ok),
        "episodes_per_s": float(np.median(eps)),
        "episodes_per_s_each": [p["episodes_per_s"] for p in passes],
        "MB_per_s": float(np.median(mbs)),
        "MB_per_s_each": [p["MB_per_s"] for p in passes],
        "upload_s": {**common.percentiles(secs), "mean": round(float(np.mean(secs)), 4) if secs else None,
                     "max": round(max(secs), 4) if secs else None},
        "post_s": common.percentiles([r["post_s"] for r in ok]),
        "put_total_s": common.percentiles([r["put_s"] for r in ok]),
        "server_cores_each": [p["cpu"]["server_cores"] for p in passes],
        "other_processes_cores_each": [p["cpu"]["other_processes_cores"] for p in passes],
        "server_cpu_s_per_episode": round(sum(p["cpu"]["server_cpu_s"] for p in passes) / max(1, len(ok)), 4),
        "failures": [f for p in passes for f in p["failures"]][:10],
        "passes": passes,
    }


def measure_floor(server: common.BenchServer, tokens: dict[str, str], prepare, per_robot: int, chunk: int,
                  args) -> dict:
    """The measured passes again, against benchmarks/ingest_floor.py on the same daphne and machine; then the real
    server is started again for the passes that follow."""
    server.stop_daphne()
    token_file = server.workdir / "floor-tokens.json"
    token_file.write_text(json.dumps(list(tokens.values())))
    server.start(app="benchmarks.ingest_floor:app", SOP_FLOOR_TOKENS=token_file)
    try:
        passes = []
        for rep in range(args.repeat):
            measured = prepare(per_robot)
            print(f"floor pass {rep + 1}/{args.repeat} ...", flush=True)
            passes.append(run_pass(server, tokens, measured, chunk, args.duration))
            print(f"  {passes[-1]['episodes_per_s']} episodes/s, server {passes[-1]['cpu']['server_cores']} cores",
                  flush=True)
        return pooled(passes)
    finally:
        server.stop_daphne()
        server.start()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--uploaders", type=int, default=8, help="concurrent uploaders = robots (default 8)")
    parser.add_argument("--episodes", type=int, default=200, help="episodes in the measured pass (default 200)")
    parser.add_argument("--duration", type=float, default=90.0, help="stop starting new uploads after this (s)")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions of the measured pass (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="episodes per uploader before the clock starts")
    parser.add_argument("--steps", type=int, default=200, help="steps per episode (default 200)")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--chunk-bytes", type=int, default=None, help="PUT body size (default: the agent's, 4 MiB)")
    parser.add_argument("--postgres", action="store_true", help="a fresh PostgreSQL database instead of SQLite")
    parser.add_argument("--pg-server", default=common.DEFAULT_PG_SERVER)
    parser.add_argument("--redis", default=common.DEFAULT_REDIS, help="Redis URL, or 'embedded'")
    parser.add_argument("--sweep", default="1,2,4",
                        help="also measure with these uploader counts (comma list, '' for none): does it scale?")
    parser.add_argument("--sweep-episodes", type=int, default=48)
    parser.add_argument("--profile", choices=("auto", "always", "never"), default="auto",
                        help="py-spy the server in a second pass: when below the goal (auto), always, never")
    parser.add_argument("--profile-episodes", type=int, default=120)
    parser.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True,
                        help="also run the measured passes against the bare upload app on the same daphne "
                             "(benchmarks/ingest_floor.py) and report the ratio")
    parser.add_argument("--keep", action="store_true", help="keep the temp data dir (printed) for inspection")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or common.ROOT / "benchmarks" / "results" / "ingest.json"
    chunk = args.chunk_bytes or common.chunk_bytes_default()

    robots = [f"bench-up-{i:02d}" for i in range(args.uploaders)]
    result: dict = {
        "benchmark": "ingest",
        "command": common.command_line(),
        "machine": common.machine_info(),
        "parameters": {
            "uploaders": args.uploaders, "episodes": args.episodes, "repeat": args.repeat,
            "duration_cap_s": args.duration,
            "warmup_per_uploader": args.warmup, "steps": args.steps, "image_size": args.image_size,
            "chunk_bytes": chunk, "server": "1 daphne process (python -m daphne sop_web.asgi:application)",
            "client": f"{args.uploaders} threads in one process, one httpx.Client + token per robot, the agent's "
                      "upload loop (POST, PUT chunks at Upload-Offset until verified)",
            "payload": "real Meta-World renders (MetaWorldEnvironment corner3 + ScriptedExpertAgent noise 0.1, "
                       "200 steps, no early stop), written by robots.episode_file.write_episode (LZF); each upload "
                       "a copy with a fresh UUID",
        },
        "goal": {"episodes_per_s": GOAL_EPISODES_PER_S},
    }
    t_setup = time.monotonic()
    with common.BenchServer("ingest", postgres=args.postgres, pg_server=args.pg_server, redis_url=args.redis,
                            keep=args.keep) as server:
        tokens = server.setup(list(TEMPLATE_TASKS), robots)
        result["parameters"].update(database=server.database_kind, redis=server.redis_url)
        print(f"data dir {server.data_dir}, {server.database_kind}, redis {server.redis_url}", flush=True)

        print(f"rendering {len(TEMPLATE_TASKS)} template episodes of {args.steps} steps ...", flush=True)
        templates = common.make_template_episodes(server.workdir / "templates", list(TEMPLATE_TASKS.items()),
                                                  args.steps, args.image_size)
        result["templates"] = templates
        mean_size = float(np.mean([t["size"] for t in templates]))
        print("templates: " + ", ".join(f"{t['task']} {t['size'] / 1e6:.2f} MB (x{t['compression_ratio']})"
                                        for t in templates), flush=True)

        def prepare(n_per_robot: int) -> dict[str, list[common.PreparedEpisode]]:
            work = server.workdir / "prep"
            work.mkdir(exist_ok=True)
            prepared: dict[str, list[common.PreparedEpisode]] = {r: [] for r in robots}
            for i in range(n_per_robot * len(robots)):
                robot = robots[i % len(robots)]
                tpl = templates[i % len(templates)]
                prepared[robot].append(common.prepare_episode(Path(tpl["path"]), tpl["task"], robot, work))
            return prepared

        per_robot = -(-args.episodes // len(robots))
        print(f"preparing {args.warmup * len(robots)} warm-up uploads in memory ...", flush=True)
        warm = prepare(args.warmup)
        result["setup_s"] = round(time.monotonic() - t_setup, 1)

        server.start()
        if args.warmup:
            print("warm-up pass ...", flush=True)
            wres = run_pass(server, tokens, warm, chunk, args.duration)
            wres.pop("_records")
            result["warmup"] = wres
            del warm
        passes = []
        for rep in range(args.repeat):
            measured = prepare(per_robot)  # before the clock, fresh UUIDs each time
            print(f"measured pass {rep + 1}/{args.repeat}: {per_robot * len(robots)} episodes, {len(robots)} "
                  "uploaders ...", flush=True)
            passes.append(run_pass(server, tokens, measured, chunk, args.duration))
            del measured
            print(f"  {passes[-1]['episodes_per_s']} episodes/s, {passes[-1]['MB_per_s']} MB/s, server "
                  f"{passes[-1]['cpu']['server_cores']} cores, other processes "
                  f"{passes[-1]['cpu']['other_processes_cores']} cores", flush=True)
        res = pooled(passes)
        res["stored_files_on_server"] = len(server.stored_episodes())
        result["result"] = res
        print(json.dumps({k: res[k] for k in ("episodes_verified", "episodes_per_s", "episodes_per_s_each",
                                              "MB_per_s", "upload_s", "post_s")}, indent=None))
        result["goal"]["met"] = res["episodes_per_s"] >= GOAL_EPISODES_PER_S
        if args.floor:
            result["floor"] = measure_floor(server, tokens, prepare, per_robot, chunk, args)
            result["ratio_to_floor"] = round(res["episodes_per_s"] / result["floor"]["episodes_per_s"], 3)
            print(f"floor: {result['floor']['episodes_per_s']} episodes/s; the server reaches "
                  f"{result['ratio_to_floor']} of it", flush=True)

        sweep = {}
        for k in [int(x) for x in args.sweep.split(",") if x.strip()]:
            k = min(k, len(robots))
            n = -(-args.sweep_episodes // k)
            eps = prepare(n)
            sub = {r: eps[r] for r in robots[:k]}
            del eps
            print(f"sweep: {k} uploader(s), {n * k} episodes ...", flush=True)
            sres = run_pass(server, tokens, sub, chunk, args.duration)
            sres.pop("_records")
            sweep[str(k)] = {key: sres[key] for key in ("episodes_verified", "window_s", "episodes_per_s", "MB_per_s",
                                                         "upload_s", "post_s", "put_total_s", "cpu")}
            print(f"  {sres['episodes_per_s']} episodes/s, p50 {sres['upload_s']['p50']} s", flush=True)
        sweep[str(len(robots))] = {key: res[key] for key in ("episodes_verified", "episodes_per_s", "MB_per_s",
                                                              "upload_s", "post_s", "put_total_s", "server_cores_each",
                                                              "other_processes_cores_each")}
        result["uploader_sweep"] = sweep
        result["goal"]["mean_episode_MB"] = round(mean_size / 1e6, 3)

        if args.profile == "always" or (args.profile == "auto" and not result["goal"]["met"]):
            n = -(-args.profile_episodes // len(robots))
            print(f"profiling pass (py-spy on daphne pid {server.pid}): {n * len(robots)} episodes ...", flush=True)
            prof_eps = prepare(n)
            raw = server.workdir / "server-profile.txt"
            try:
                spy = common.py_spy_record(server.pid, 600, raw, rate=100)
                time.sleep(1.0)  # py-spy attaches
                pres = run_pass(server, tokens, prof_eps, chunk, args.duration)
                pres.pop("_records")
                spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
                spy.wait(30)
                profile = common.summarize_collapsed(raw, focus=PROFILE_FOCUS)
                profile["pass"] = {k: pres[k] for k in ("episodes_verified", "episodes_per_s", "MB_per_s", "upload_s",
                                                         "cpu")}
                profile["method"] = ("py-spy record --threads --nonblocking --rate 100 on the daphne process during a "
                                     "second pass (numbers of that pass are lowered by the sampling); 'share' = "
                                     "fraction of active-thread samples")
                result["profile"] = profile
            except Exception as exc:
                result["profile"] = {"error": repr(exc)}
            print("profile (share of active server-thread samples): " + json.dumps(
                {k: v["share"] for k, v in result["profile"].get("focus", {}).items()}))
        log_lines = server.log_tail(10**9).splitlines()
        result["server_log"] = {"lines": len(log_lines), "errors": sum(" ERROR " in ln for ln in log_lines),
                                "warnings": sum(" WARNING " in ln for ln in log_lines)}
    # One file, one entry per database backend: a PostgreSQL run does not erase the SQLite one.
    runs = {}
    if out.exists():
        try:
            runs = json.loads(out.read_text()).get("runs", {})
        except (ValueError, AttributeError):
            runs = {}
    result["machine"]["loadavg_at_end"] = list(os.getloadavg())
    runs[result["parameters"]["database"]] = result
    common.write_result(out, {"benchmark": "ingest", "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
