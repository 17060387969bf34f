"""Console latencies in a real browser: glass-to-glass video, teleop command, deadman reaction.

Runs the real pieces the operator uses: daphne (embedded SQLite + Redis in a scratch data directory), one simulated
Meta-World robot agent and Debian's Chromium (Playwright), the robot and the browser inside a private network namespace
(tests/e2e/netns.py; needs root), the server on the host side of its veth pair.

- Glass-to-glass: the agent stamps its capture time (unix ms mod 2^24) into each frame (``--video-stamp``); the page
  reads the stamp of every presented frame (requestVideoFrameCallback, canvas, frontend/console/video.js readStamp)
  and subtracts it from the presentation time. Same machine, same clock: no offset to estimate.
- Teleop: real key presses (Playwright keyboard) on the robot page while holding the lease. A capture-phase listener
  takes the keydown's event time; the command it triggered (sent at once, on the data channel) is traced on the robot
  (a "trace" request answered with the robot's accept and first-apply times). keydown -> accepted is the command
  latency (goal p50 <= 20 ms, p99 <= 60 ms); keydown -> applied adds the wait for the next control tick.
- Deadman: the page stops sending (its teleop timers stop); the robot reports how long after the last accepted
  command its first hold-still step came (goal <= 300 ms; DEADMAN_S = 250 ms, and the control loop wakes when the
  deadman trips instead of waiting for its next tick).

    .venv/bin/python benchmarks/console_latency.py [--fps 30] [--hz 10] [--seconds 20] [--presses 60]

Writes benchmarks/results/console_latency.json (with the command line). Timings are not pass/fail.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_info, percentiles, write_result  # noqa: E402
from tests.e2e import netns  # noqa: E402

PASSWORD = "benchmark-password-42"

GLASS_JS = """async ([name, seconds]) => {
  const { readStamp, stampLatencyMs } = await import('/static/frontend/console/video.js');
  const video = window.sopConsole.viewers.get(name).video;
  const canvas = document.createElement('canvas');
  const out = [];
  const end = performance.now() + seconds * 1000;
  await new Promise((done) => {
    const onFrame = (now, meta) => {
      const stamp = readStamp(video, canvas);
      const shown = performance.timeOrigin + (meta.expectedDisplayTime || now);
      const ms = stampLatencyMs(stamp, shown);
      if (ms !== null) out.push(ms);
      if (performance.now() < end) video.requestVideoFrameCallback(onFrame); else done();
    };
    video.requestVideoFrameCallback(onFrame);
  });
  return out;
}"""

INSTRUMENT_JS = """(name) => {
  window.__keys = [];
  window.__traces = new Map();
  window.__hud = null;
  addEventListener('keydown', (e) => {
    if (e.repeat) return;
    const t = performance.timeOrigin + e.timeStamp;
    setTimeout(() => window.__keys.push({ t, seq: window.sopConsole.teleop.lastCommand?.seq ?? null }), 0);
  }, true);
  const viewer = window.sopConsole.viewers.get(name);
  viewer.dc.addEventListener('message', (e) => {
    const msg = JSON.parse(e.data);
    if (msg.type === 'trace') window.__traces.set(msg.seq, msg);
    if (msg.type === 'hud') window.__hud = msg;
  });
}"""

TRACE_JS = """async (name) => {
  const viewer = window.sopConsole.viewers.get(name);
  for (const k of window.__keys) viewer.sendData({ type: 'trace', seq: k.seq });
  await new Promise((r) => setTimeout(r, 1000));
  return window.__keys.map((k) => ({ ...k, ...(window.__traces.get(k.seq) || {}) }));
}"""


def wait_for(predicate, timeout: float, what: str, procs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        for name, proc in procs:
            if proc.poll() is not None:
                raise SystemExit(f"{name} exited with {proc.returncode} while waiting for {what}")
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what}")


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fps", type=int, default=30, help="video frames per second (default 30)")
    p.add_argument("--size", type=int, default=224, help="video frame size (default 224)")
    p.add_argument("--hz", type=float, default=10.0, help="the robot's control rate (default 10)")
    p.add_argument("--seconds", type=float, default=20.0, help="glass-to-glass sampling time")
    p.add_argument("--presses", type=int, default=60, help="key presses for the teleop latency")
    p.add_argument("--deadman-trials", type=int, default=10)
    p.add_argument("--keep", action="store_true", help="keep the scratch data directory")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "console_latency.json")
    args = p.parse_args()
    ok, why = netns.available()
    if not ok:
        raise SystemExit(f"cannot run: {why}")

    data = Path(tempfile.mkdtemp(prefix="sop-latency-"))
    ns = netns.NetNamespace().create()
    env = {**os.environ, "SOP_DATA_DIR": str(data), "PYTHONUNBUFFERED": "1", "ALLOWED_HOSTS": ns.outer}
    env.pop("DATABASE_URL", None)
    env.pop("REDIS_URL", None)
    py = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv").exists() else sys.executable
    procs: list[tuple[str, subprocess.Popen]] = []
    redis = None

    def spawn(name: str, cmd: list[str], **extra) -> subprocess.Popen:
        log = open(data / f"{name}.log", "wb")
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**env, **extra}, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        procs.append((name, proc))
        return proc

    try:
        from sop_web import embedded

        redis = embedded.start_redis(data, data / "redis.sock")
        manage = [py, "manage.py"]
        subprocess.run([*manage, "migrate", "-v", "0"], cwd=ROOT, env=env, check=True)
        subprocess.run([*manage, "add_user", "bench", "--role", "operator", "--password-env", "BENCH_PASSWORD"],
                       cwd=ROOT, env={**env, "BENCH_PASSWORD": PASSWORD}, check=True, capture_output=True)
        subprocess.run([*manage, "shell", "-c",
                        "from robots.models import Task, TaskAssignment\n"
                        "t = Task.objects.create(name='reach', env_id='reach-v3', prompts=['reach the goal'],"
                        " max_steps=100000)\nTaskAssignment.objects.create(robot=None, task=t)"],
                       cwd=ROOT, env=env, check=True)
        out = subprocess.run([*manage, "add_robot", "arm-1"], cwd=ROOT, env=env, check=True, capture_output=True,
                             text=True).stdout
        token = next(word for word in out.split() if word.startswith("sop_"))
        port = 8765
        url = f"http://{ns.outer}:{port}"
        spawn("daphne", [py, "-m", "daphne", "-b", ns.outer, "-p", str(port), "sop_web.asgi:application"])
        wait_for(lambda: http_ok(f"{url}/healthz"), 60, "daphne", procs)
        spawn("agent", ns.wrap([py, "-m", "robots.agent", "--server", url, "--spool", str(data / "spool"),
                                "--policy", "random", "--hz", str(args.hz), "--image-size", "64",
                                "--video-fps", str(args.fps), "--video-size", str(args.size), "--video-stamp"]),
              SOP_ROBOT_TOKEN=token)

        from playwright.sync_api import sync_playwright

        result: dict = {"command": " ".join(["python", "benchmarks/console_latency.py", *sys.argv[1:]]),
                        "machine": machine_info(), "video_fps": args.fps, "video_size": args.size, "control_hz": args.hz}
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=str(ns.executable("/usr/bin/chromium", data)),
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
                      "--disable-features=WebRtcHideLocalIpsWithMdns", "--autoplay-policy=no-user-gesture-required"],
            )
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"{url}/login/")
            page.fill("input[name=username]", "bench")
            page.fill("input[name=password]", PASSWORD)
            page.click("button[type=submit]")
            page.wait_for_url(f"{url}/")
            page.goto(f"{url}/robots/arm-1/")
            page.wait_for_function("() => { const v = window.sopConsole?.viewers?.get('arm-1');"
                                   " return v && v.dc && v.dc.readyState === 'open' && v.video.videoWidth > 0; }",
                                   timeout=90_000)
            time.sleep(2.0)  # let the jitter buffer settle

            print(f"glass-to-glass: sampling {args.seconds:.0f} s of {args.fps} fps video", flush=True)
            glass = page.evaluate(GLASS_JS, ["arm-1", args.seconds])
            result["glass_to_glass_ms"] = {**percentiles(glass), "frames": len(glass),
                                           "frames_per_s": round(len(glass) / args.seconds, 1)}

            page.get_by_test_id("takeover").click()
            page.wait_for_function("() => window.sopConsole.holding === true", timeout=20_000)
            page.evaluate(INSTRUMENT_JS, "arm-1")
            print(f"teleop: {args.presses} key presses", flush=True)
            page.locator("body").focus()
            for _ in range(args.presses):
                page.keyboard.down("d")
                time.sleep(0.12)
                page.keyboard.up("d")
                time.sleep(0.18)
            rows = page.evaluate(TRACE_JS, "arm-1")
            accepted = [r["accepted_t"] - r["t"] for r in rows if r.get("accepted_t")]
            applied = [r["applied_t"] - r["t"] for r in rows if r.get("applied_t")]
            result["teleop_keydown_to_accepted_ms"] = {**percentiles(accepted), "n": len(accepted)}
            result["teleop_keydown_to_applied_ms"] = {**percentiles(applied), "n": len(applied)}
            result["teleop_untraced"] = len(rows) - len(accepted)

            print(f"deadman: {args.deadman_trials} trials", flush=True)
            reactions = []
            for _ in range(args.deadman_trials):
                page.evaluate("() => window.sopConsole.teleop.start()")
                time.sleep(1.0)
                page.evaluate("() => { window.sopConsole.teleop.stop(); window.__hud = null; }")
                time.sleep(1.0)
                hud = page.evaluate("() => window.__hud")
                if hud and hud.get("deadman") and hud.get("deadman_reaction_ms") is not None:
                    reactions.append(hud["deadman_reaction_ms"])
            page.evaluate("() => window.sopConsole.teleop.start()")
            result["deadman_reaction_ms"] = {**percentiles(reactions), "n": len(reactions)}
            page.get_by_test_id("release").click()
            browser.close()
        write_result(args.out, result)
        print(json.dumps(result, indent=2))
        return 0
    finally:
        for _name, proc in reversed(procs):
            if proc.poll() is None:
                os.killpg(proc.pid, 15)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, 9)
        if redis is not None:
            redis.terminate()
        ns.delete()
        if args.keep:
            print(f"data and logs kept in {data}")
        else:
            shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
