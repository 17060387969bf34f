"""Shared helpers for the server-side benchmarks (ingest.py, agent_rate.py).

- ``BenchServer``: a private SOP installation for one benchmark run: its own SOP_DATA_DIR (SQLite by default, or a
  fresh PostgreSQL database that is created and dropped), ``manage.py migrate`` + ``add_tasks``, robots registered
  through ``robots.fleet.register_robot`` in a Django subprocess, and one real daphne process on a free loopback
  port. ``stop()`` ends everything it started (by pid / process group, nothing else).
- ``make_template_episodes``: real Meta-World renders (MetaWorldEnvironment + ScriptedExpertAgent) written with the
  product's ``write_episode``, so the LZF compression ratio is the real one.
- ``PreparedEpisode`` / ``prepare_episodes``: per-upload copies of a template with a fresh UUID (the server checks
  that the file's ``episode_id`` equals the URL's), held in memory with size + sha256, prepared before timing.
- ``upload_episode``: the agent's upload loop (POST announce, PUT chunks at ``Upload-Offset`` until ``verified``).
- ``CpuMeter``: CPU seconds of given pids and of the whole machine over a window.
- ``machine_info``, ``percentiles``, ``write_result``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PYTHON = sys.executable
DEFAULT_REDIS = "redis://127.0.0.1:6379/9"
DEFAULT_PG_SERVER = "postgresql://postgres@127.0.0.1:5432"
EPISODES_PATH = "/api/robot/episodes/"


# ---------------------------------------------------------------- machine / results


def machine_info() -> dict:
    info = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "cpu_model": "",
        "mem_total_gib": None,
        "loadavg_at_start": list(os.getloadavg()),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["mem_total_gib"] = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                            timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [os.path.relpath(PYTHON, ROOT) if PYTHON.startswith(str(ROOT)) else PYTHON,
                                             os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])


def percentiles(values, ps=(50, 95, 99)) -> dict:
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.size == 0:
        return {f"p{p}": None for p in ps}
    return {f"p{p}": round(float(np.percentile(arr, p)), 4) for p in ps}


def write_result(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)
    print(f"wrote {path}")


# ---------------------------------------------------------------- CPU accounting


def _proc_cpu_s(pid: int) -> float:
    """utime + stime of one process (all its threads), in seconds; 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _system_busy_s() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, over all cores."""
    parts = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = parts[3] + parts[4]  # idle + iowait
    total = sum(parts[:8])
    hz = os.sysconf("SC_CLK_TCK")
    return (total - idle) / hz, total / hz


def _cpu_s(pids: int | list[int]) -> float:
    return sum(_proc_cpu_s(p) for p in ([pids] if isinstance(pids, int) else pids))


class CpuMeter:
    """CPU used by named pids (or lists of pids, summed) and by the whole machine between ``start()`` and
    ``stop()``."""

    def __init__(self, pids: dict[str, int | list[int]]):
        self.pids = pids

    def start(self) -> "CpuMeter":
        self._t0 = time.monotonic()
        self._p0 = {name: _cpu_s(pid) for name, pid in self.pids.items()}
        self._s0 = _system_busy_s()
        return self

    def stop(self) -> dict:
        wall = time.monotonic() - self._t0
        p1 = {name: _cpu_s(pid) for name, pid in self.pids.items()}
        s1 = _system_busy_s()
        out = {"wall_s": round(wall, 3)}
        for name in self.pids:
            used = p1[name] - self._p0[name]
            out[f"{name}_cpu_s"] = round(used, 2)
            out[f"{name}_cores"] = round(used / wall, 3) if wall > 0 else None
        busy = s1[0] - self._s0[0]
        out["machine_busy_cores"] = round(busy / wall, 3) if wall > 0 else None
        out["machine_cores"] = os.cpu_count()
        ours = sum(p1[n] - self._p0[n] for n in self.pids)
        out["other_processes_cores"] = round(max(0.0, busy - ours) / wall, 3) if wall > 0 else None
        return out


# ---------------------------------------------------------------- the server under test


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def redis_reachable(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except (redis.RedisError, OSError, ValueError):
        return False


class BenchServer:
    """A private SOP server: data dir, database, Redis, one daphne process. Use as a context manager."""

    def __init__(self, name: str, *, postgres: bool = False, pg_server: str = DEFAULT_PG_SERVER,
                 redis_url: str = DEFAULT_REDIS, keep: bool = False, log_level: str = "INFO"):
        self.name = name
        self.keep = keep
        self.workdir = Path(tempfile.mkdtemp(prefix=f"sop-bench-{name}-"))
        self.data_dir = self.workdir / "data"
        self.data_dir.mkdir()
        self.payload_dir = self.data_dir / "payloads"
        self.log_path = self.workdir / "daphne.log"
        self.pg_server = pg_server.rstrip("/")
        self.pg_db: Optional[str] = None
        self._redis_proc = None
        self.proc: Optional[subprocess.Popen] = None
        self.url = ""
        self.log_level = log_level
        if postgres:
            self.pg_db = f"sop_bench_{name.replace('-', '_')}_{os.getpid()}"
            self.database_url = f"{self.pg_server}/{self.pg_db}"
        else:
            self.database_url = f"sqlite:///{self.data_dir / 'db.sqlite3'}"
        if redis_url == "embedded" or not redis_reachable(redis_url):
            if redis_url != "embedded":
                print(f"Redis at {redis_url} does not answer: using the embedded one", flush=True)
            from sop_web.embedded import start_redis

            sock = self.data_dir / "redis.sock"
            self._redis_proc = start_redis(self.data_dir, sock)
            self.redis_url = f"unix://{sock}"
        else:
            self.redis_url = redis_url
        self.channel_prefix = f"sopbench{os.getpid()}"

    @property
    def database_kind(self) -> str:
        return "postgresql" if self.pg_db else "sqlite"

    def env(self, **extra) -> dict:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "DATABASE_URL": self.database_url,
               "SOP_DATA_DIR": str(self.data_dir), "REDIS_URL": self.redis_url,
               "SOP_CHANNEL_PREFIX": self.channel_prefix, "LOG_LEVEL": self.log_level}
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def __enter__(self) -> "BenchServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def setup(self, tasks: list[str], robots: list[str]) -> dict[str, str]:
        """Create the database, migrate, add tasks, register robots. Returns {robot name: token}."""
        if self.pg_db:
            import psycopg

            with psycopg.connect(f"{self.pg_server}/postgres", autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{self.pg_db}"')
        run = dict(cwd=ROOT, env=self.env(), check=True, capture_output=True, text=True)
        subprocess.run([PYTHON, "manage.py", "migrate", "--noinput", "-v", "0"], **run)
        subprocess.run([PYTHON, "manage.py", "add_tasks", *tasks], **run)
        snippet = (
            "import json, sys, django; django.setup()\n"
            "from robots import fleet\n"
            "print(json.dumps({n: fleet.register_robot(n)[1] for n in sys.argv[1:]}))\n"
        )
        out = subprocess.run([PYTHON, "-c", snippet, *robots],
                             **{**run, "env": self.env(DJANGO_SETTINGS_MODULE="sop_web.settings")})
        return json.loads(out.stdout.strip().splitlines()[-1])

    def start(self, timeout: float = 60.0, extra_cmd_prefix: Optional[list[str]] = None, nodes: int = 1,
              app: str = "sop_web.asgi:application", **env) -> str:
        """One daphne process (``url`` is its own), or ``nodes`` > 1 of them behind nginx as docs/deploy.md runs
        them (``url`` is the proxy's; ``node_pids`` and ``proxy_pids`` for CPU meters). ``app``: the ASGI app daphne
        serves (ingest.py's floor serves benchmarks.ingest_floor:app); ``env``: extra environment for it."""
        self._log = open(self.log_path, "ab")
        self.nodes = []
        for _ in range(nodes):
            port = free_port()
            cmd = [*(extra_cmd_prefix or []), PYTHON, "-m", "daphne", "--proxy-headers", "-b", "127.0.0.1", "-p",
                   str(port), app]
            proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env(**env), stdout=self._log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            self.nodes.append((proc, f"http://127.0.0.1:{port}"))
        self.proc = self.nodes[0][0]
        for proc, url in self.nodes:
            self._wait_healthy(proc, url, timeout, "daphne")
        self.url = self.nodes[0][1]
        if nodes > 1:
            port = free_port()
            conf = self.workdir / "nginx.conf"
            subprocess.run([PYTHON, "manage.py", "proxy_config", "--listen", f"127.0.0.1:{port}", "--prefix",
                            str(self.workdir / "nginx"), "--output", str(conf),
                            *[a for _, url in self.nodes for a in ("--node", url.removeprefix("http://"))]],
                           cwd=ROOT, env=self.env(), check=True, capture_output=True)
            self.proxy = subprocess.Popen([shutil.which("nginx") or "/usr/sbin/nginx", "-c", str(conf), "-g", "daemon off;"], stdout=self._log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
            self.url = f"http://127.0.0.1:{port}"
            self._wait_healthy(self.proxy, self.url, timeout, "nginx")
        return self.url

    def _wait_healthy(self, proc: subprocess.Popen, url: str, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with {proc.returncode}:\n{self.log_tail()}")
            if http_ok(f"{url}/healthz"):
                return
            time.sleep(0.2)
        raise RuntimeError(f"{what} did not answer /healthz within {timeout}s:\n{self.log_tail()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def node_pids(self) -> list[int]:
        return [proc.pid for proc, _ in self.nodes]

    @property
    def proxy_pids(self) -> list[int]:
        """nginx's master and workers (its own process group)."""
        if getattr(self, "proxy", None) is None:
            return []
        out = subprocess.run(["pgrep", "-g", str(self.proxy.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stored_episodes(self) -> list[Path]:
        return sorted((self.payload_dir / "episodes").glob("*/*.h5"))

    def stop_daphne(self) -> None:
        if getattr(self, "proxy", None) is not None and self.proxy.poll() is None:
            stop_process_group(self.proxy)
        for proc, _ in getattr(self, "nodes", []):
            if proc.poll() is None:
                stop_process_group(proc)
        if self.proc is not None:
            self._log.close()

    def stop(self) -> None:
        self.stop_daphne()
        self.proc = None
        if self._redis_proc is None:
            self._clear_channel_keys()
        if self._redis_proc is not None:
            from sop_web.embedded import stop

            stop(self._redis_proc)
            self._redis_proc = None
        if self.pg_db:
            try:
                import psycopg

                with psycopg.connect(f"{self.pg_server}/postgres", autocommit=True) as conn:
                    conn.execute(f'DROP DATABASE IF EXISTS "{self.pg_db}" WITH (FORCE)')
            except Exception as exc:  # report, never hide the benchmark's own error
                print(f"could not drop database {self.pg_db}: {exc}", file=sys.stderr)
            self.pg_db = None
        if not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)
        else:
            print(f"kept {self.workdir}")


    def _clear_channel_keys(self) -> None:
        """The channel layer's keys of this run in the shared Redis (groups outlive the sockets by a day)."""
        try:
            import redis

            client = redis.Redis.from_url(self.redis_url, socket_connect_timeout=2)
            keys = list(client.scan_iter(match=f"{self.channel_prefix}*", count=1000))
            if keys:
                client.delete(*keys)
        except Exception as exc:
            print(f"could not remove the channel-layer keys {self.channel_prefix}*: {exc}", file=sys.stderr)


def stop_process_group(proc: subprocess.Popen, sig=signal.SIGTERM, timeout: float = 15.0) -> int:
    """Signal the child's own process group (it was started with start_new_session), then wait; SIGKILL if stuck."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    return proc.returncode


# ---------------------------------------------------------------- episodes


def make_template_episodes(out_dir: Path, tasks: list[tuple[str, str]], steps: int, image_size: int = 96,
                           noise: float = 0.1, seed: int = 0, camera: str = "corner3") -> list[dict]:
    """Run the real simulator + scripted expert for ``steps`` steps per task (no early stop at success) and write one
    episode file per task with ``write_episode``. Returns [{path, task, size, steps, render_ms, ...}]."""
    from robots.agent.agents import ScriptedExpertAgent
    from robots.agent.environment import MetaWorldEnvironment
    from robots.episode_file import EpisodeData, write_episode

    out_dir.mkdir(parents=True, exist_ok=True)
    made = []
    for i, (task, env_id) in enumerate(tasks):
        env = MetaWorldEnvironment(env_id, camera=camera, image_size=image_size, seed=seed + i)
        agent = ScriptedExpertAgent(noise=noise, seed=seed + i)
        agent.reset(env_id, task)
        obs = env.reset()
        images = np.empty((steps, image_size, image_size, 3), np.uint8)
        states = np.empty((steps, env.state_dim), np.float32)
        actions = np.empty((steps, 4), np.float32)
        rewards = np.empty(steps, np.float32)
        successes = np.empty(steps, bool)
        t0 = time.perf_counter()
        for t in range(steps):
            decision = agent.act(obs)
            result = env.step(decision.action)
            images[t], states[t], actions[t] = obs["image"], obs["state"], decision.action
            rewards[t], successes[t] = result.reward, result.success
            obs = result.observation
        step_ms = (time.perf_counter() - t0) / steps * 1000
        env.close()
        meta = dict(episode_id=str(uuid.uuid4()), robot="bench", task=task, env_id=env_id, prompt=task,
                    policy="scripted-expert", policy_version=-1, split="online",
                    outcome="success" if successes.any() else "timeout", success=bool(successes.any()),
                    started_at=time.time() - steps / 10, ended_at=time.time(), control_hz=10.0, camera=camera)
        path = out_dir / f"template-{task}.h5"
        write_episode(path, EpisodeData(meta, images, states, actions, np.zeros(steps, np.uint8), rewards, successes,
                                        np.arange(steps) / 10.0, []))
        raw = images.nbytes + states.nbytes + actions.nbytes + steps * (1 + 4 + 1 + 8)
        made.append({"task": task, "env_id": env_id, "path": str(path), "steps": steps, "size": path.stat().st_size,
                     "raw_bytes": raw, "compression_ratio": round(raw / path.stat().st_size, 3),
                     "step_plus_render_ms": round(step_ms, 2), "solved": bool(successes.any())})
    return made


@dataclasses.dataclass
class PreparedEpisode:
    id: str
    task: str
    body: bytes
    sha256: str
    metadata: dict


def prepare_episode(template: Path, task: str, robot: str, work: Path) -> PreparedEpisode:
    """A copy of ``template`` with a fresh episode UUID (and robot name) in its attributes, read into memory."""
    import h5py

    from robots.agent.spool import upload_metadata
    from robots.episode_file import EpisodeReader

    episode_id = str(uuid.uuid4())
    path = work / f"{episode_id}.h5"
    shutil.copyfile(template, path)
    now = time.time()
    with h5py.File(path, "r+") as f:
        f.attrs["episode_id"] = episode_id
        f.attrs["robot"] = robot
        steps = int(f.attrs["steps"])
        f.attrs["started_at"] = now - steps / 10
        f.attrs["ended_at"] = now
    # Read the metadata back through the product's reader (also proves the edited file is still valid).
    with EpisodeReader(path) as reader:
        meta, segments, steps = reader.meta, reader.meta["segments"], reader.steps
    body = path.read_bytes()
    path.unlink()
    digest = hashlib.sha256(body).hexdigest()
    return PreparedEpisode(episode_id, task, body, digest, upload_metadata(meta, segments, steps, len(body), digest))


def upload_episode(client, episode: PreparedEpisode, chunk_bytes: int, max_attempts: int = 5) -> dict:
    """The agent's upload loop (robots/agent/uploader.py) for one in-memory episode. ``client``: an httpx.Client
    with the robot's ``Authorization`` header. Returns {"ok", "requests", "seconds", "post_s", "put_s", "error"}."""
    t0 = time.perf_counter()
    out = {"ok": False, "requests": 0, "seconds": 0.0, "post_s": 0.0, "put_s": 0.0, "error": ""}

    def done(ok: bool, error: str = "") -> dict:
        out.update(ok=ok, error=error, seconds=time.perf_counter() - t0)
        return out

    error = ""
    for _attempt in range(max_attempts):
        t = time.perf_counter()
        reply = client.post(EPISODES_PATH, json=episode.metadata)
        out["post_s"] += time.perf_counter() - t
        out["requests"] += 1
        if reply.status_code not in (200, 201):
            error = f"POST {reply.status_code} {reply.text[:200]}"
            continue
        body = reply.json()
        if body.get("status") == "verified":
            return done(True)
        offset, url, size = int(body["offset"]), body["upload_url"], len(episode.body)
        while offset < size:
            chunk = episode.body[offset: offset + chunk_bytes]
            t = time.perf_counter()
            reply = client.put(url, content=chunk, headers={"Upload-Offset": str(offset),
                                                            "Content-Type": "application/octet-stream"})
            out["put_s"] += time.perf_counter() - t
            out["requests"] += 1
            body = reply.json() if reply.headers.get("content-type", "").startswith("application/json") else {}
            if reply.status_code == 200 and body.get("status") == "verified":
                return done(True)
            if reply.status_code == 200 or (reply.status_code == 409 and body.get("code") == "offset_mismatch"):
                offset = int(body["offset"])
            else:
                error = f"PUT {reply.status_code} {reply.text[:200]}"
                break
        else:
            error = "all bytes sent but never verified"
    return done(False, error)


def chunk_bytes_default() -> int:
    """The agent's default PUT body size (AgentConfig.upload_chunk_bytes)."""
    from robots.agent.config import AgentConfig

    return AgentConfig.__dataclass_fields__["upload_chunk_bytes"].default


# ---------------------------------------------------------------- profiling (py-spy, sampled from outside)

PY_SPY_DIR = Path(tempfile.gettempdir()) / "sop-bench-tools"


def find_py_spy(install: bool = True) -> Optional[str]:
    """A py-spy binary: on PATH, in the benchmark tools dir, or installed there now from PyPI (pip, --target)."""
    for candidate in (shutil.which("py-spy"), PY_SPY_DIR / "bin" / "py-spy"):
        if candidate and Path(candidate).exists():
            return str(candidate)
    if not install:
        return None
    res = subprocess.run([PYTHON, "-m", "pip", "install", "--quiet", "--target", str(PY_SPY_DIR), "py-spy"],
                         capture_output=True, text=True)
    exe = PY_SPY_DIR / "bin" / "py-spy"
    if res.returncode != 0 or not exe.exists():
        print(f"py-spy unavailable: {res.stderr[-500:]}", file=sys.stderr)
        return None
    return str(exe)


def py_spy_record(pid: int, seconds: float, out_path: Path, rate: int = 100, gil: bool = False) -> subprocess.Popen:
    """Sample ``pid`` (all threads, active samples only) for ``seconds`` into a collapsed-stack file."""
    exe = find_py_spy()
    if exe is None:
        raise RuntimeError("py-spy is not available")
    cmd = [exe, "record", "--pid", str(pid), "--duration", str(max(1, int(seconds))), "--rate", str(rate),
           "--format", "raw", "--output", str(out_path), "--threads", "--nonblocking"]
    if gil:
        cmd.append("--gil")
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _frame_name(frame: str) -> str:
    """'append_upload (robots/ingest.py:380)' -> 'append_upload (robots/ingest.py)'; site-packages shortened."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    path = where.rsplit(":", 1)[0]
    for marker in ("site-packages/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    else:
        path = os.path.relpath(path, ROOT) if path.startswith(str(ROOT)) else path
    return f"{name} ({path})" if path else name


def summarize_collapsed(path: Path, top: int = 25, focus: tuple[str, ...] = ()) -> dict:
    """Leaf (self) and inclusive shares of samples per function, per thread, and for ``focus`` substrings."""
    from collections import Counter

    self_c, incl_c, threads, focus_c = Counter(), Counter(), Counter(), Counter()
    total = 0
    for line in Path(path).read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        thread = frames[0]
        threads[re.sub(r"\d+", "N", thread.split(": ", 1)[-1])[:60]] += n  # ThreadPoolExecutor-N_N, MainThread
        names = [_frame_name(f) for f in frames[1:]] or [thread]
        self_c[names[-1]] += n
        for name in set(names):
            incl_c[name] += n
        for key in focus:
            if any(key in f for f in frames):
                focus_c[key] += n

    def share(counter):
        return [{"function": k, "samples": v, "share": round(v / total, 4)} for k, v in counter.most_common(top)]

    return {
        "samples": total,
        "self": share(self_c),
        "inclusive": share(incl_c),
        "threads": share(threads),
        "focus": {k: {"samples": focus_c[k], "share": round(focus_c[k] / total, 4) if total else None} for k in focus},
    }
