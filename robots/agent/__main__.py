"""``python -m robots.agent --server URL``: the edge process of one robot (here a simulated Meta-World robot).

Threads: the main thread runs asyncio with the websocket (``connection``) and the WebRTC sessions of operator consoles
(``webrtc``); the ``control`` thread runs the fixed-rate episode loop (``runtime``) with the operator gate outermost
(``teleop``); ``camera`` renders video frames while someone watches (``media``); ``spool-writer`` writes finished
episodes to disk (``recorder``); ``uploader`` sends them to the server (``uploader``); with ``--policy learned``,
``policy-download`` fetches and verifies checkpoints (``policy_updates``). Only locks, thread-safe queues and
``call_soon_threadsafe`` cross between them.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Callable, Optional

from robots import protocol

from .agents import Agent, ScriptedExpertAgent, make_agent
from .attention import HelpMonitor, HelpRule, LastStep
from .backoff import Backoff
from .config import FALLBACKS, POLICY_NAMES, SIM_EXPERTS, AgentConfig
from .seeding import robot_key, seeded_builds
from .connection import Connection, EventReporter
from .environment import Environment, MetaWorldEnvironment
from .operator import GatedProvider, SimulatedOperatorGate, TakeoverRule
from .policy_updates import LearnedPolicy, PolicyUpdates
from .recorder import EpisodeRecorder, SpoolWriter
from .runtime import AgentProvider, FixedAgent, Runtime
from .media import CameraPreparer, CameraThread, SimulatorCapture
from .spool import Spool
from .teleop import OperatorControl, OperatorGate, OperatorProvider
from .uploader import Uploader
from .webrtc import WebrtcHub

log = logging.getLogger("robots.agent")

TOKEN_ENV = "SOP_ROBOT_TOKEN"
SHOWN_TOKEN_CHARS = 12  # the server's robots.auth.SHOWN_PREFIX_CHARS: "sop_" + 8 characters, shown in the admin too


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m robots.agent", description="The SOP robot agent: runs one robot.")
    p.add_argument("--server", required=True, help="SOP server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--token", default=None, help=f"robot token (prefer the {TOKEN_ENV} environment variable: "
                                                 "arguments are visible to every user in ps)")
    p.add_argument("--spool", type=Path, default=None, help="spool directory (default ./var/spool/<token prefix>)")
    p.add_argument("--hz", type=float, default=10.0, help="control rate (default 10)")
    p.add_argument("--policy", choices=sorted(POLICY_NAMES), default="expert",
                   help="expert: Meta-World's scripted expert; random; learned: the checkpoint the server publishes, "
                        "downloaded in the background and swapped in between episodes")
    p.add_argument("--fallback", choices=FALLBACKS, default="idle",
                   help="--policy learned before its first checkpoint: idle (wait; default) or run the expert")
    p.add_argument("--noise", type=float, default=0.0, help="std of gaussian noise on the expert's action")
    gate = p.add_argument_group("simulated operator (headless HG-DAgger)")
    gate.add_argument("--sim-operator", action="store_true",
                      help="a scripted supervisor takes over when the policy stops making progress, then hands back")
    gate.add_argument("--sim-patience", type=int, default=15, help="steps without progress before it takes over")
    gate.add_argument("--sim-takeover-steps", type=int, default=20, help="minimum takeover length before handing back")
    gate.add_argument("--sim-handbacks", type=int, default=1,
                      help="hand-backs per episode; the takeover after the last one finishes the episode")
    gate.add_argument("--sim-late-fraction", type=float, default=0.6,
                      help="from this fraction of max_steps on, 5 steps without progress suffice and the operator "
                           "finishes the episode (0 disables)")
    gate.add_argument("--sim-divergence", type=float, default=1.6,
                      help="take over when the policy's hand motion differs from the expert's by this much on average "
                           "over --sim-patience steps (xyz of actions in [-1, 1]); 0 = off")
    gate.add_argument("--sim-expert", choices=SIM_EXPERTS, default="recovering",
                      help="who the operator drives with: recovering (default: Meta-World's experts, with a "
                           "supervisor that recovers where one exists, robots/agent/supervisors.py) or metaworld "
                           "(the experts only)")
    video = p.add_argument_group("operator console video (WebRTC)")
    video.add_argument("--no-video", action="store_true",
                       help="no WebRTC: no camera stream, teleop only over the websocket fallback")
    video.add_argument("--video-fps", type=float, default=15.0, help="camera frames per second while watched")
    video.add_argument("--video-size", type=int, default=224, help="video frames are N x N (default 224)")
    video.add_argument("--video-stamp", action="store_true",
                       help="write the capture time into the top of each frame (glass-to-glass benchmark)")
    video.add_argument("--max-viewers", type=int, default=8, help="WebRTC sessions at once (default 8)")
    helpg = p.add_argument_group("asking for help (docs/console.md, Help queue)")
    helpg.add_argument("--help-stall-steps", type=int, default=15,
                       help="ask an operator for help when the hand moves less than --help-still-m over this many "
                            "steps while the policy drives (default 15: 1.5 s at 10 Hz; measured in benchmarks/results/help_detector.json); 0 = never")
    helpg.add_argument("--help-still-m", type=float, default=0.01, help="metres of net hand motion that count as still")
    helpg.add_argument("--help-uncertainty", type=float, default=0.0,
                       help="also ask when a learned policy's re-plans disagree by more than this on average over the "
                            "window (mean |new chunk - old chunk| on the steps they share, actions in [-1, 1]); 0 = off")
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--camera", default="corner3", help="the primary camera (observation/image; the one streamed)")
    p.add_argument("--extra-cameras", default="", metavar="NAME,...",
                   help="more cameras to render and record beside it, e.g. gripperPOV (a policy config picks which "
                        "it reads; the console shows them)")
    p.add_argument("--episodes", type=int, default=None,
                   help="exit 0 once this many episodes have ended and been verified by the server")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="with --episodes: exit 1 if they are not all verified after this many seconds")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], type=str.upper)
    return p.parse_args(argv)


def default_spool(token: str) -> Path:
    prefix = re.sub(r"[^A-Za-z0-9_-]", "", token[:SHOWN_TOKEN_CHARS]) or "robot"
    return Path("var") / "spool" / prefix


def config_from_args(args: argparse.Namespace) -> AgentConfig:
    token = args.token or os.environ.get(TOKEN_ENV, "")
    return AgentConfig(
        server=args.server,
        token=token,
        spool_dir=args.spool or default_spool(token),
        control_hz=args.hz,
        policy=args.policy,
        noise=args.noise,
        image_size=args.image_size,
        camera=args.camera,
        extra_cameras=tuple(c.strip() for c in args.extra_cameras.split(",") if c.strip()),
        episodes=args.episodes,
        run_timeout_s=args.timeout,
        seed=args.seed,
        fallback=args.fallback,
        sim_operator=args.sim_operator,
        sim_patience=args.sim_patience,
        sim_takeover_steps=args.sim_takeover_steps,
        sim_handbacks=args.sim_handbacks,
        sim_late_fraction=args.sim_late_fraction,
        sim_divergence=args.sim_divergence,
        sim_expert=args.sim_expert,
        video=not args.no_video,
        video_fps=args.video_fps,
        video_size=args.video_size,
        video_stamp=args.video_stamp,
        max_viewers=args.max_viewers,
        help_stall_steps=args.help_stall_steps,
        help_still_m=args.help_still_m,
        help_uncertainty=args.help_uncertainty,
    )


def takeover_rule(config: AgentConfig) -> TakeoverRule:
    return TakeoverRule(
        patience=config.sim_patience,
        takeover_steps=config.sim_takeover_steps,
        handbacks=config.sim_handbacks,
        late_fraction=config.sim_late_fraction,
        divergence=config.sim_divergence,
    )


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)-7s %(threadName)s %(name)s: %(message)s",
    )
    if args.log_level != "DEBUG":
        for noisy in ("httpx", "OpenGL"):  # a line per upload chunk; a notice about an optional accelerator
            logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        config = config_from_args(args)
        rule = takeover_rule(config)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    # The one argument to change for a real robot: a callable env_id -> Environment that drives the hardware.
    # Each build of an environment (every task switch) gets a fresh seed of this robot's own stream (seeding.py).
    make_env = seeded_builds(
        functools.partial(MetaWorldEnvironment, camera=config.camera, image_size=config.image_size,
                          extra_cameras=config.extra_cameras),
        config.seed, "episodes", robot_key(config.token),
    )
    agent = None if config.policy == "learned" else make_agent(config.policy, noise=config.noise, seed=config.seed)
    return asyncio.run(serve(config, make_env, agent, rule))


async def serve(config: AgentConfig, make_env: Callable[[str], Environment], agent: Optional[Agent],
                rule: Optional[TakeoverRule] = None) -> int:
    """Wire the threads, run until a signal (exit 0), ``--episodes`` verified (0) or a failure/timeout (1).

    ``agent`` runs every episode; None (``--policy learned``) runs the checkpoints the server publishes instead."""
    log.info("starting %r", config)
    spool = Spool(config.spool_dir)
    leftovers = spool.recover()  # before the writer thread exists: it may delete half-written temp files
    if leftovers:
        log.info("%d episode(s) left in the spool by an earlier run will be uploaded first", len(leftovers))
    backoff = Backoff(config.backoff_initial_s, config.backoff_max_s)
    uploader = Uploader(
        spool, config.server_url, config.token,
        chunk_bytes=config.upload_chunk_bytes, timeout_s=config.http_timeout_s, backoff=backoff,
    )
    writer = SpoolWriter(spool, on_spooled=uploader.enqueue)

    def spool_pending() -> int:
        return uploader.pending + writer.backlog

    runtime: Runtime  # built below; the connection's callbacks only run once the loop serves
    prompts: list[str] = []  # the assigned prompt, embedded ahead of time by the downloader if a checkpoint lacks it

    updates: Optional[PolicyUpdates] = None
    provider: AgentProvider
    if agent is None:
        # Import torch and the learner now, before the control loop runs: an import holds the GIL for about a second,
        # which inside an episode would show up as overruns.
        import learner.checkpoints  # noqa: F401

        updates = PolicyUpdates(
            config.policies_dir, config.server_url, config.token,
            timeout_s=config.http_timeout_s, attempts=config.policy_download_attempts,
            backoff=Backoff(config.backoff_initial_s, config.backoff_max_s), warm_prompts=lambda: list(prompts),
            cameras=(config.camera, *config.extra_cameras),
        )
        fallback = ScriptedExpertAgent(noise=config.noise, seed=config.seed) if config.fallback == "expert" else None
        learned = LearnedPolicy(updates, fallback=fallback)
        if learned.restore() is None:
            log.info("no checkpoint yet: %s until the server publishes one",
                     "running the scripted expert" if fallback else "idling")
        provider = learned
    else:
        provider = FixedAgent(agent)
    gate: Optional[SimulatedOperatorGate] = None
    if config.sim_operator:
        inner = provider.current or ScriptedExpertAgent()  # replaced by the provider's choice before each episode
        expert = ScriptedExpertAgent(seed=config.seed, recover=config.sim_expert == "recovering")
        gate = SimulatedOperatorGate(inner, expert, rule or TakeoverRule())
        provider = GatedProvider(provider, gate)
    # A human in the console: the outermost agent, over the simulated operator and any policy (docs/console.md).
    control = OperatorControl()
    provider = OperatorProvider(provider, OperatorGate(provider.current, control))
    camera: Optional[CameraThread] = None
    hub: Optional[WebrtcHub] = None
    if config.video:
        try:
            import aiortc  # noqa: F401  (import it now: an import inside an episode holds the GIL)
            import av  # noqa: F401
        except ImportError as exc:
            log.warning("no WebRTC video (%s): teleop works over the websocket only", exc)
        else:
            capture = SimulatorCapture(lambda: runtime.environment, size=config.video_size, camera=config.camera)
            camera = CameraThread(capture, fps=config.video_fps, stamp=config.video_stamp)

    last_step = LastStep()  # the console's live plot (the data channel's hud)
    monitor: Optional[HelpMonitor] = None
    if config.help_stall_steps > 0 or config.help_uncertainty > 0:
        # a request goes out in a status at once (not at the next heartbeat): the console hears it within a second
        rule = HelpRule(stall=config.help_stall_steps > 0, stall_steps=max(config.help_stall_steps, 2),
                        still_m=config.help_still_m, uncertainty=config.help_uncertainty)
        monitor = HelpMonitor(rule, on_change=lambda: connection.send_threadsafe(None))

    def reported_policy() -> tuple[Optional[int], str]:
        current = runtime.agent
        return (current.policy_version, current.name) if current is not None else (None, "")

    def hello() -> protocol.Hello:
        version, name = reported_policy()
        return protocol.Hello(
            agent_version=config.agent_version,
            capabilities=["metaworld", "teleop", *(["webrtc"] if hub is not None else [])],
            cameras=[config.camera, *config.extra_cameras],
            policy_version=version,
            policy=name,
            spool_pending=spool_pending(),
        )

    def status() -> protocol.Status:
        snap = runtime.snapshot()
        _, estop_seq, estop_local, estopped_by = control.estop_report()
        return protocol.Status(
            state=snap.state.value,
            task=snap.task,
            episode_id=snap.episode_id,
            step=snap.step,
            control_source=snap.control_source.value,
            loop_hz=round(snap.loop_hz, 3),
            loop_p99_ms=round(snap.loop_p99_ms, 3),
            overruns=snap.overruns,
            policy_version=snap.policy_version,
            policy=snap.policy,
            spool_pending=spool_pending(),
            policy_error=(updates.error or "") if updates else "",
            lease=control.lease,
            operator=control.operator,
            deadman=control.deadman(),
            estopped=snap.estopped,
            estop_seq=estop_seq,
            estop_local=estop_local,
            estopped_by=estopped_by,
            last_command_age_ms=control.last_command_age_ms(),
            video_fps=hub.video_fps if hub is not None else 0.0,
            viewers=hub.viewers if hub is not None else 0,
            help=monitor.current() if monitor is not None else None,
        )

    def on_assignment(assignment: protocol.TaskAssigned) -> None:
        if assignment.prompt:
            prompts[:] = [assignment.prompt]
        runtime.assign(assignment)

    tasks: set[asyncio.Task] = set()  # console work in flight (offers, closes), kept referenced until done

    def spawn(coro) -> None:
        task = asyncio.create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def apply_estop(message: protocol.ControlEstop) -> None:
        """The server's e-stop (numbered; re-sent until our status agrees). A stale clear is ignored (teleop.py)."""
        if control.estop_from_server(message.engaged, message.by, message.seq):
            runtime.estop(message.engaged, message.by)
        connection.send(None)  # the console shows the latch at once, and the server sees it applied

    def local_estop(by: str) -> None:
        """An e-stop on the robot itself (an operator's over the WebRTC data channel): latched now, reported to the
        server in the status that follows (which adopts it, audits it and acknowledges it)."""
        control.estop_local(by)
        runtime.estop(True, by)
        connection.send(None)

    def on_takeover(message: protocol.ControlTakeover) -> None:
        control.takeover(message.lease, message.operator, message.reason)
        connection.send(None)

    def on_release(message: protocol.ControlRelease) -> None:
        if control.release(message.lease, message.reason):
            connection.send(None)

    def on_command(message: protocol.ControlCommand) -> None:
        control.command(message.seq, message.t, message.action, message.grip, via="ws", lease=message.lease)

    def on_label(message: protocol.EpisodeLabel) -> None:
        runtime.label(message.outcome, message.by, message.episode_id)

    def on_webrtc_offer(message: protocol.WebrtcOffer) -> None:
        if hub is None:
            connection.send(protocol.WebrtcAnswer(session=message.session, error="this robot serves no video"))
        else:
            spawn(hub.offer(message))

    def on_webrtc_close(message: protocol.WebrtcClose) -> None:
        if hub is not None:
            spawn(hub.close(message.session, "closed by the console"))

    def on_disconnect() -> None:
        # The server ends the leases of an offline robot (docs/console.md): stop obeying, and end the video sessions.
        if control.release(None, "robot offline"):
            log.warning("websocket lost during a takeover: the policy drives again")
        if hub is not None:
            spawn(hub.close_all("websocket lost"))

    connection = Connection(
        config, hello=hello, status=status, on_assignment=on_assignment,
        on_policy=updates.offer if updates else lambda message: None,
        on_takeover=on_takeover, on_release=on_release,
        on_estop=apply_estop,
        on_command=on_command, on_label=on_label, on_webrtc_offer=on_webrtc_offer, on_webrtc_close=on_webrtc_close,
        on_disconnect=on_disconnect,
    )
    if camera is not None:
        camera.start()
        hub = await WebrtcHub(
            camera, control, connection.send, estop=local_estop,
            extra_hud=lambda: {"step": runtime.snapshot().step, **last_step.hud()}, max_viewers=config.max_viewers,
        ).start()
    runtime = Runtime(
        make_env,
        provider,
        [EpisodeRecorder(writer), EventReporter(connection), *([gate] if gate else []),
         *([CameraPreparer(camera)] if camera is not None else []), *([monitor] if monitor is not None else []),
         last_step],
        control_hz=config.control_hz,
        camera=config.camera,
        robot_name=lambda: connection.robot_name or "unknown",
        max_episodes=config.episodes,
        idle_poll_s=config.idle_poll_s,
    )
    control.on_lease = runtime.wake  # a takeover's deadman may be due before the next control tick

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("second %s: exiting now (the spool is consistent: every write is atomic)",
                        signal.Signals(signum).name)
            os._exit(1)
        log.info("%s: finishing the current step, then shutting down", signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)

    writer.start()
    uploader.start()
    if updates is not None:
        updates.start()
    control_thread = threading.Thread(target=runtime.run, name="control", daemon=True)
    control_thread.start()
    link = asyncio.create_task(connection.run(stop), name="connection")

    exit_code = 0
    deadline = loop.time() + config.run_timeout_s if config.episodes else None
    while not stop.is_set():
        if not control_thread.is_alive():
            ended = runtime.ended_ids
            if not (config.episodes and len(ended) >= config.episodes):
                log.error("the control loop stopped unexpectedly")
                exit_code = 1
                break
            unsettled = [i for i in ended if i not in uploader.verified and i not in uploader.rejected]
            if writer.backlog == 0 and not unsettled:
                verified = sum(i in uploader.verified for i in ended)
                log.info("%d episode(s) ended, %d verified by the server: done", len(ended), verified)
                exit_code = 0 if verified == len(ended) else 1
                break
        if deadline is not None and loop.time() > deadline:
            log.error("timed out after %.0f s: %d of %d episode(s) verified", config.run_timeout_s,
                      sum(i in uploader.verified for i in runtime.ended_ids), config.episodes)
            exit_code = 1
            break
        try:
            await asyncio.wait_for(stop.wait(), 0.1)
        except asyncio.TimeoutError:
            pass

    # Shutdown, in the order that keeps data: the control loop ends its episode (aborted) and hands it to the
    # writer; the writer puts it in the spool; the uploader finishes its request in flight; then the socket closes.
    runtime.stop()
    await asyncio.to_thread(control_thread.join)
    if hub is not None:
        await hub.stop()
    if camera is not None:
        await asyncio.to_thread(camera.stop)
    await asyncio.to_thread(writer.close)
    await asyncio.to_thread(uploader.stop, config.http_timeout_s + 5)
    if updates is not None:
        await asyncio.to_thread(updates.stop, config.http_timeout_s + 5)
    stop.set()
    await link
    log.info("stopped; %d episode(s) left in the spool", spool.pending_count())
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
