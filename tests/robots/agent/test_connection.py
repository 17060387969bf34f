"""The websocket link, in-process against a small websockets server playing the SOP server's part."""

import asyncio
import json
import threading
import uuid

import pytest
from websockets.asyncio.server import serve

from robots import protocol
from robots.agent.config import AgentConfig
from robots.agent.connection import Connection

TOKEN = "sop_connection-test"


def test_the_websocket_url_is_derived_from_the_server_url(tmp_path):
    def ws(server):
        return AgentConfig(server=server, token=TOKEN, spool_dir=tmp_path).ws_url

    assert ws("http://10.0.0.5:8000") == "ws://10.0.0.5:8000/ws/robots/"
    assert ws("https://sop.example.org/") == "wss://sop.example.org/ws/robots/"
    assert ws("https://example.org/sop") == "wss://example.org/sop/ws/robots/"


def test_the_token_never_appears_in_the_config_repr(tmp_path):
    assert TOKEN not in repr(AgentConfig(server="http://h:1", token=TOKEN, spool_dir=tmp_path))


async def test_it_says_hello_relays_assignments_heartbeats_and_reconnects_after_a_drop(tmp_path):
    sessions: list[list[dict]] = []
    headers, paths = [], []

    async def handler(ws):
        headers.append(ws.request.headers.get("Authorization"))
        paths.append(ws.request.path)
        received = []
        sessions.append(received)
        received.append(json.loads(await ws.recv()))
        await ws.send(protocol.encode(protocol.Welcome(robot="arm-1", heartbeat_s=0.05, server_time=0.0)))
        await ws.send(protocol.encode(protocol.TaskAssigned(task="reach", env_id="reach-v3", prompt="p", max_steps=9)))
        if len(sessions) == 1:
            await ws.close(code=1011, reason="server restarting")
            return
        async for raw in ws:
            received.append(json.loads(raw))

    assigned = []
    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        config = AgentConfig.debug(f"http://127.0.0.1:{port}", TOKEN, tmp_path)
        connection = Connection(
            config,
            hello=lambda: protocol.Hello(agent_version="test", capabilities=["metaworld"], spool_pending=3),
            status=lambda: protocol.Status(state="idle"),
            on_assignment=assigned.append,
        )
        stop = asyncio.Event()
        link = asyncio.create_task(connection.run(stop))
        await _until(lambda: len(sessions) == 2 and connection.connected and len(sessions[1]) >= 3)

        # Another thread (the control loop) hands a message over.
        episode_id = str(uuid.uuid4())
        started = protocol.EpisodeStarted(episode_id=episode_id, task="reach", prompt="p", started_at=1.0)
        threading.Thread(target=connection.send_threadsafe, args=(started,)).start()
        await _until(lambda: any(m["type"] == "episode.started" for m in sessions[1]))

        stop.set()
        await asyncio.wait_for(link, 5)

    assert headers == [f"Bearer {TOKEN}"] * 2 and paths == ["/ws/robots/"] * 2
    assert [s[0]["type"] for s in sessions] == ["hello", "hello"] and sessions[1][0]["spool_pending"] == 3
    assert connection.robot_name == "arm-1" and connection.heartbeat_s == 0.05 and connection.sessions == 2
    assert [a.task for a in assigned] == ["reach", "reach"]
    assert sum(m["type"] == "status" for m in sessions[1]) >= 2
    assert next(m for m in sessions[1] if m["type"] == "episode.started")["episode_id"] == episode_id


async def test_messages_offered_while_disconnected_are_dropped_not_queued(tmp_path):
    config = AgentConfig.debug("http://127.0.0.1:9", TOKEN, tmp_path)  # nothing listens there
    connection = Connection(config, hello=lambda: protocol.Hello(agent_version="t"),
                            status=lambda: protocol.Status(state="idle"), on_assignment=lambda a: None)
    stop = asyncio.Event()
    link = asyncio.create_task(connection.run(stop))
    await asyncio.sleep(0.2)
    connection.send_threadsafe(protocol.Status(state="idle"))
    await asyncio.sleep(0.05)
    assert connection._outbox.qsize() == 0 and not connection.connected
    stop.set()
    await asyncio.wait_for(link, 5)


async def _until(condition, timeout=5.0):
    async def poll():
        while not condition():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), timeout)


@pytest.mark.parametrize("camera, extra, message", [
    ("corner3", ("corner3",), "is the primary camera"),
    ("corner3", ("../x",), "is not"),
    ("corner 3", (), "is not a camera name"),
    ("corner3", tuple(f"c{i}" for i in range(5)), "besides the primary"),
])
def test_camera_options_are_checked_before_anything_starts(tmp_path, camera, extra, message):
    with pytest.raises(ValueError, match=message):
        AgentConfig(server="http://h:1", token=TOKEN, spool_dir=tmp_path, camera=camera, extra_cameras=extra)
