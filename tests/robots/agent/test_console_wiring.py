"""The agent process's wiring of the console (``__main__.serve``) against a tiny in-process websocket server: takeover,
websocket teleop, a WebRTC offer, the e-stop, and the status fields that report them."""

import asyncio
import json
import os
import signal
import time
import uuid

import pytest
from websockets.asyncio.server import serve as ws_serve

from robots import protocol
from robots.agent.__main__ import serve
from robots.agent.agents import RandomAgent
from robots.agent.config import AgentConfig

from .conftest import FakeEnvironment

aiortc = pytest.importorskip("aiortc")


async def test_the_agent_obeys_console_messages_and_reports_them(tmp_path):
    inbox: asyncio.Queue = asyncio.Queue()
    outbox: asyncio.Queue = asyncio.Queue()

    async def handler(ws):
        async def pump():
            while True:
                await ws.send(protocol.encode(await outbox.get()))

        task = asyncio.create_task(pump())
        try:
            async for raw in ws:
                await inbox.put(json.loads(raw))
        finally:
            task.cancel()

    async def expect(predicate, timeout=10.0):
        deadline = time.monotonic() + timeout
        while True:
            message = await asyncio.wait_for(inbox.get(), max(0.01, deadline - time.monotonic()))
            if predicate(message):
                return message

    async with ws_serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        config = AgentConfig.debug(f"http://127.0.0.1:{port}", "sop_wiring", tmp_path / "spool", episodes=1,
                                   run_timeout_s=30.0, video_size=64, video_fps=20.0)
        agent = asyncio.create_task(serve(config, lambda env_id: FakeEnvironment(env_id), RandomAgent(seed=0)))
        try:
            hello = await expect(lambda m: m["type"] == "hello")
            assert hello["capabilities"] == ["metaworld", "teleop", "webrtc"]
            await outbox.put(protocol.Welcome(robot="arm-1", heartbeat_s=0.2, server_time=time.time()))
            await outbox.put(protocol.TaskAssigned(task="fake-task", env_id="fake-v0", prompt="p", max_steps=100000))
            await expect(lambda m: m["type"] == "episode.started")

            await outbox.put(protocol.ControlTakeover(lease=5, operator="alice", reason="demo"))
            await outbox.put(protocol.ControlCommand(lease=5, seq=1, t=time.time() * 1000, action=[0.5, 0, 0]))
            status = await expect(lambda m: m["type"] == "status" and m["control_source"] == "operator")
            assert (status["lease"], status["operator"]) == (5, "alice")

            from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

            pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
            pc.addTransceiver("video", direction="recvonly")
            pc.createDataChannel("teleop", ordered=False, maxRetransmits=0)
            await pc.setLocalDescription(await pc.createOffer())
            session = str(uuid.uuid4())
            await outbox.put(protocol.WebrtcOffer(session=session, sdp=pc.localDescription.sdp, user="alice"))
            answer = await expect(lambda m: m["type"] == "webrtc.answer")
            assert answer["session"] == session and answer["sdp"] and not answer["error"]
            await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))
            status = await expect(lambda m: m["type"] == "status" and m["viewers"] == 1 and m["video_fps"] > 0)

            await outbox.put(protocol.ControlEstop(engaged=True, by="alice"))
            ended = await expect(lambda m: m["type"] == "episode.ended")
            assert ended["outcome"] == "aborted"
            status = await expect(lambda m: m["type"] == "status" and m["estopped"])
            assert status["state"] == "estopped"
            await outbox.put(protocol.ControlRelease(lease=5, reason="released"))
            await expect(lambda m: m["type"] == "status" and m["lease"] is None and m["operator"] == "")
            await pc.close()
            os.kill(os.getpid(), signal.SIGINT)  # serve's own handler: a graceful shutdown of every thread
            assert await asyncio.wait_for(agent, 30) == 0
        finally:
            if not agent.done():
                agent.cancel()
                await asyncio.gather(agent, return_exceptions=True)
