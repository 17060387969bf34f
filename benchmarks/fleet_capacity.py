"""Fleet capacity of the web tier: how many robot sockets one web process (or N behind nginx) holds, what a
heartbeat costs, how fast a ``policy.updated`` announcement and a console update reach everyone.

N simulated robots (websocket clients only, no simulator) connect to one real daphne process, or to ``--nodes`` of
them through nginx (PostgreSQL + Redis by default, everything private to the run: a temp data dir, a fresh database, its own channel prefix), say ``hello`` and
send the heartbeat a running robot sends (state running, a task, an episode id, a growing step, loop Hz/p99) every
``1/--hz`` seconds with random phases. One logged-in console socket watches. For each fleet size of the sweep:

- robots held / handshake failures (a connect or hello that fails or takes over 20 s);
- server CPU per heartbeat: CPU seconds of the daphne process(es) over the measuring window / heartbeats sent in it
  (with ``--nodes 2`` or more: the web nodes behind nginx, the proxy's own CPU reported apart);
- announcement fan-out: three ``policy.updated`` group sends to the fleet group (the learner's path, from this
  process through the channel layer); per robot the time from the send to the frame arriving; p50 / p99 / max and
  how many never arrived (within 15 s);
- console update latency: once a second one robot changes its state (running <-> idle); the time from its heartbeat
  being sent to the console's ``robot.state`` frame showing the change; and the console's frame rate.

    .venv/bin/python benchmarks/fleet_capacity.py [--robots 64,256,512,1024] [--hz 1] [--seconds 20] [--nodes 1]
                                                  [--label L]

Writes benchmarks/results/fleet_capacity.json (runs keyed by ``--label``, with the command line and the machine;
a run with the same label replaces the old one) and docs/img/fleet_capacity.png. Figures, never pass/fail.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "fleet_capacity.json"
PLOT = ROOT / "docs" / "img" / "fleet_capacity.png"
CONNECT_TIMEOUT_S = 20.0
FANOUT_WAIT_S = 15.0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--robots", default="64,256,512,1024", help="fleet sizes, ascending (comma-separated)")
    p.add_argument("--hz", type=float, default=1.0, help="heartbeats per second per robot (the agent's default: 1)")
    p.add_argument("--seconds", type=float, default=20.0, help="measuring window per fleet size")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds after everyone connected, before measuring")
    p.add_argument("--sqlite", action="store_true", help="the embedded SQLite instead of a fresh PostgreSQL database")
    p.add_argument("--nodes", type=int, default=1,
                   help="web nodes (daphne processes); more than 1 runs them behind nginx (docs/deploy.md)")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/11")
    p.add_argument("--label", default="current", help="name of this run in the results file (e.g. a commit)")
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--plot", default=str(PLOT))
    p.add_argument("--report-only", action="store_true", help="redraw the plot from the results file")
    return p.parse_args()


# ---------------------------------------------------------------- the simulated fleet


class Robot:
    """One robot's socket: hello, then heartbeats; records when announcements arrive."""

    def __init__(self, name: str, token: str, url: str, hz: float):
        self.name, self.token, self.url, self.hz = name, token, url, hz
        self.ws = None
        self.sent = 0
        self.step = 0
        self.state = "running"
        self.episode = str(uuid.uuid4())
        self.announced: dict[int, float] = {}  # version -> monotonic arrival
        self.errors: list[str] = []
        self.stop = False
        self.tasks = None  # (reader, heartbeat) once connected

    def status(self) -> str:
        self.step += 10
        return json.dumps({
            "v": 1, "type": "status", "state": self.state, "task": "reach",
            "episode_id": self.episode if self.state == "running" else None, "step": self.step,
            "control_source": "policy", "loop_hz": round(random.uniform(9.8, 10.1), 2),
            "loop_p99_ms": round(random.uniform(101, 104), 1), "policy": "scripted-expert", "spool_pending": 0,
        })

    async def connect(self) -> None:
        from websockets.asyncio.client import connect

        self.ws = await connect(self.url.replace("http", "ws", 1) + "/ws/robots/", max_size=None,
                                open_timeout=CONNECT_TIMEOUT_S, ping_interval=None,
                                additional_headers={"Authorization": f"Bearer {self.token}"})
        await self.ws.send(json.dumps({"v": 1, "type": "hello", "agent_version": "capacity-bench",
                                       "capabilities": [], "policy": "scripted-expert"}))
        while True:  # welcome first; task.assigned etc. may follow
            frame = json.loads(await asyncio.wait_for(self.ws.recv(), CONNECT_TIMEOUT_S))
            if frame.get("type") == "welcome":
                return

    async def read(self) -> None:
        try:
            async for text in self.ws:
                frame = json.loads(text)
                if frame.get("type") == "policy.updated":
                    self.announced.setdefault(frame["version"], time.monotonic())
                elif frame.get("type") == "error":
                    self.errors.append(frame.get("code", "?"))
        except Exception:
            pass

    async def beat(self) -> None:
        period = 1.0 / self.hz
        await asyncio.sleep(random.uniform(0, period))
        next_at = time.monotonic()
        while not self.stop:
            try:
                await self.ws.send(self.status())
            except Exception:
                return
            self.sent += 1
            next_at += period
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def change_state(self) -> float:
        """Flip running <-> idle and send the heartbeat now; returns when it was sent."""
        self.state = "idle" if self.state == "running" else "running"
        sent_at = time.monotonic()
        await self.ws.send(self.status())
        self.sent += 1
        return sent_at


class Console:
    def __init__(self, url: str, session_key: str):
        self.url, self.session_key = url, session_key
        self.frames = 0
        self.seen: list[tuple[float, str, str]] = []  # (arrival, robot, state) of robot.state frames

    async def connect(self) -> None:
        from websockets.asyncio.client import connect

        self.ws = await connect(self.url.replace("http", "ws", 1) + "/ws/console/", max_size=None,
                                open_timeout=CONNECT_TIMEOUT_S, origin=self.url, ping_interval=None,
                                additional_headers={"Cookie": f"sessionid={self.session_key}"})
        hello = json.loads(await asyncio.wait_for(self.ws.recv(), 30))
        assert hello["type"] == "hello", hello

    async def read(self) -> None:
        try:
            async for text in self.ws:
                frame = json.loads(text)
                self.frames += 1
                if frame.get("type") == "robot.state":
                    robot = frame["robot"]
                    self.seen.append((time.monotonic(), robot.get("name"), robot.get("state")))
        except Exception:
            pass


# ---------------------------------------------------------------- one fleet size


async def measure(server: common.BenchServer, robots: list[Robot], console: Console, args, version: int) -> dict:
    from channels.layers import get_channel_layer

    from robots import events, protocol

    layer = get_channel_layer()
    t_connect = time.monotonic()
    gate = asyncio.Semaphore(64)
    failures: list[str] = []

    async def open_one(robot: Robot):
        async with gate:
            try:
                await robot.connect()
            except Exception as exc:
                failures.append(f"{type(exc).__name__}: {exc}"[:200])
                robot.ws = None

    await asyncio.gather(*(open_one(r) for r in robots if r.ws is None))
    held = [r for r in robots if r.ws is not None]
    connect_s = time.monotonic() - t_connect
    for r in held:
        if r.tasks is None:  # connected in this pass (the sockets of smaller sizes keep running)
            r.tasks = (asyncio.ensure_future(r.read()), asyncio.ensure_future(r.beat()))
    await asyncio.sleep(args.warmup)

    sent0 = sum(r.sent for r in held)
    frames0 = console.frames
    meter = common.CpuMeter({"server": server.node_pids, "proxy": server.proxy_pids, "bench": os.getpid()}).start()
    t0 = time.monotonic()
    fanout: list[float] = []
    missing = 0
    console_lat: list[float] = []
    console_missed = 0
    announcements = [args.seconds * f for f in (0.2, 0.5, 0.8)]
    next_change = 1.0
    pending: list[tuple[float, int]] = []  # (sent_at, version) of the announcements sent
    changes: list[tuple[float, Robot, str]] = []
    while (now := time.monotonic() - t0) < args.seconds:
        if announcements and now >= announcements[0]:
            announcements.pop(0)
            version += 1
            msg = protocol.PolicyUpdated(version=version, url=f"{server.url}/api/robot/checkpoints/{version}",
                                         size=1000, sha256="0" * 64)
            sent_at = time.monotonic()
            await layer.group_send(events.FLEET_GROUP, {"type": msg.TYPE.value, "message": msg.to_dict()})
            pending.append((sent_at, version))
        if now >= next_change:
            next_change += 1.0
            robot = random.choice(held)
            sent_at = await robot.change_state()
            changes.append((sent_at, robot, robot.state))
        await asyncio.sleep(0.05)
    cpu = meter.stop()
    sent = sum(r.sent for r in held) - sent0
    frames = console.frames - frames0
    await asyncio.sleep(min(FANOUT_WAIT_S, 5.0))
    deadline = time.monotonic() + FANOUT_WAIT_S
    for sent_at, v in pending:
        while time.monotonic() < deadline and sum(v in r.announced for r in held) < len(held):
            await asyncio.sleep(0.2)
        for r in held:
            if v in r.announced:
                fanout.append(r.announced[v] - sent_at)
            else:
                missing += 1
    for sent_at, robot, state in changes:
        arrivals = [t for t, name, s in console.seen if name == robot.name and s == state and t >= sent_at]
        if arrivals:
            console_lat.append(min(arrivals) - sent_at)
        else:
            console_missed += 1
    # a robot that flipped to idle flips back, so every size measures running robots
    for _, robot, _ in changes:
        robot.state = "running"
    errors = sorted({e for r in held for e in r.errors})
    return {
        "robots": len(robots), "held": len(held), "handshake_failures": len(failures),
        "failure_examples": failures[:3], "connect_s": round(connect_s, 2), "hz": args.hz,
        "heartbeats": sent, "heartbeats_per_s": round(sent / cpu["wall_s"], 1),
        "server_cores": cpu["server_cores"], "proxy_cores": cpu["proxy_cores"],
        "server_cpu_ms_per_heartbeat": round(1000 * cpu["server_cpu_s"] / sent, 3) if sent else None,
        "bench_cores": cpu["bench_cores"], "other_processes_cores": cpu["other_processes_cores"],
        "machine_busy_cores": cpu["machine_busy_cores"],
        "fanout_s": common.percentiles(fanout, (50, 99)) | {"max": round(max(fanout), 3) if fanout else None},
        "fanout_missing": missing, "announcements": len(pending),
        "console_latency_s": (common.percentiles(console_lat, (50, 99))
                              | {"max": round(max(console_lat), 3) if console_lat else None}),
        "console_changes": len(changes), "console_missed": console_missed,
        "console_frames_per_s": round(frames / cpu["wall_s"], 1),
        "robot_errors": errors,
    }, version


def login_session(username: str) -> str:
    """The session cookie of a new console viewer (watches only), as tests/e2e/conftest.py console_socket makes it."""
    from django.contrib.auth import get_user_model
    from django.test import Client

    client = Client()
    client.force_login(get_user_model().objects.create_user(username, password=uuid.uuid4().hex))
    return client.cookies["sessionid"].value


async def sweep(server: common.BenchServer, tokens: dict[str, str], sizes: list[int], args) -> list[dict]:
    from asgiref.sync import sync_to_async

    session = await sync_to_async(login_session)("capacity-watcher")
    console = Console(server.url, session)
    await console.connect()
    reader = asyncio.ensure_future(console.read())
    names = sorted(tokens)
    robots = [Robot(n, tokens[n], server.url, args.hz) for n in names]
    out, version = [], 0
    for n in sizes:
        print(f"{n} robots at {args.hz} Hz ...", flush=True)
        row, version = await measure(server, robots[:n], console, args, version)
        fan, lat = row["fanout_s"], row["console_latency_s"]
        print(f"  held {row['held']}/{n} (failures {row['handshake_failures']}), server {row['server_cores']} cores, "
              f"{row['server_cpu_ms_per_heartbeat']} ms/heartbeat, fan-out p50 {fan.get('p50')} p99 {fan.get('p99')} "
              f"max {fan.get('max')} s (missing {row['fanout_missing']}), console p50 {lat.get('p50')} "
              f"p99 {lat.get('p99')} s, other processes {row['other_processes_cores']} cores", flush=True)
        out.append(row)
    for r in robots:
        r.stop = True
        if r.ws is not None:
            await r.ws.close()
    reader.cancel()
    return out


# ---------------------------------------------------------------- results and plot


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for label, run in results.get("runs", {}).items():
        rows = run["sizes"]
        n = [r["robots"] for r in rows]
        axes[0].plot(n, [r["server_cpu_ms_per_heartbeat"] for r in rows], "o-", label=label)
        axes[1].plot(n, [r["server_cores"] for r in rows], "o-", label=label)
        axes[2].plot(n, [r["fanout_s"].get("p99") for r in rows], "o-", label=f"{label}: p99")
        axes[2].plot(n, [r["fanout_s"].get("max") for r in rows], "x--", label=f"{label}: max")
    axes[0].set(title="server CPU per heartbeat", xlabel="robots", ylabel="ms")
    axes[1].set(title="server CPU (web nodes together)", xlabel="robots", ylabel="cores")
    axes[2].set(title="policy.updated fan-out to every robot", xlabel="robots", ylabel="seconds")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_xscale("log", base=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main() -> int:
    args = parse_args()
    results_path = Path(args.results)
    results = json.loads(results_path.read_text()) if results_path.exists() else {"runs": {}}
    if args.report_only:
        plot(results, Path(args.plot))
        return 0
    sizes = sorted(int(x) for x in args.robots.split(","))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the sockets, here and in daphne (inherited)
    with common.BenchServer("capacity", postgres=not args.sqlite, redis_url=args.redis_url,
                            log_level="WARNING") as server:
        print(f"setting up {max(sizes)} robots ...", flush=True)
        tokens = server.setup(["reach"], [f"cap-{i:04d}" for i in range(max(sizes))])
        server.start(nodes=args.nodes)
        for key, value in server.env(DJANGO_SETTINGS_MODULE="sop_web.settings").items():
            os.environ[key] = value
        import django

        django.setup()
        rows = asyncio.run(sweep(server, tokens, sizes, args))
        try:
            commit = common.subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                           text=True).stdout.strip()
        except Exception:
            commit = "?"
    results.setdefault("runs", {})[args.label] = {
        "command": common.command_line(), "commit": commit, "machine": common.machine_info(),
        "database": "sqlite" if args.sqlite else "postgresql", "nodes": args.nodes,
        "server": "1 daphne process" if args.nodes == 1 else f"{args.nodes} daphne processes behind nginx",
        "heartbeat": "status of a running robot (state, task, episode, step, loop Hz/p99) every 1/hz s",
        "sizes": rows,
    }
    results["method"] = __doc__.split("\n\n")[1].replace("\n", " ")
    common.write_result(results_path, results)
    plot(results, Path(args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
