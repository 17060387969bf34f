"""WebRTC in one process: an aiortc client plays the browser (recvonly video + the "teleop" data channel) and the
agent's WebrtcHub answers (docs/console.md). Host candidates only (iceServers=[]); aioice leaves 127.0.0.1 out of its
host candidates, so this needs a non-loopback interface (the test skips, saying so, on a machine with only ``lo``)."""

import asyncio
import json
import time
import uuid

import pytest

from robots import protocol
from robots.agent.media import CameraThread, PatternCapture
from robots.agent.teleop import OperatorControl
from robots.agent.webrtc import WebrtcHub

aiortc = pytest.importorskip("aiortc")


def _has_host_candidate() -> bool:
    import aioice

    addresses = aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=False)
    return bool(addresses)


pytestmark = pytest.mark.skipif(
    not _has_host_candidate(),
    reason="no non-loopback IPv4 address: aioice drops 127.0.0.1, so two aiortc peers cannot connect here",
)


class Client:
    """The browser's side: offers recvonly video and the teleop channel (unordered, no retransmits)."""

    def __init__(self):
        from aiortc import RTCConfiguration, RTCPeerConnection

        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.pc.addTransceiver("video", direction="recvonly")
        self.channel = self.pc.createDataChannel("teleop", ordered=False, maxRetransmits=0)
        self.messages: list[dict] = []
        self.opened = asyncio.Event()
        self.track = asyncio.get_running_loop().create_future()
        self.channel.on("open", self.opened.set)
        self.channel.on("message", lambda raw: self.messages.append(json.loads(raw)))
        self.pc.on("track", lambda track: self.track.done() or self.track.set_result(track))

    async def offer(self, user="alice", role="operator") -> protocol.WebrtcOffer:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return protocol.WebrtcOffer(session=str(uuid.uuid4()), sdp=self.pc.localDescription.sdp, user=user,
                                    role=role, ice_servers=[])

    async def accept(self, answer: protocol.WebrtcAnswer):
        from aiortc import RTCSessionDescription

        assert not answer.error, answer.error
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer.sdp, type="answer"))

    def send(self, body: dict):
        self.channel.send(json.dumps(body))

    async def wait(self, predicate, timeout=10.0):
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, "timed out"
            await asyncio.sleep(0.01)


@pytest.fixture
async def hub():
    camera = CameraThread(PatternCapture(224), fps=30.0).start()
    control = OperatorControl()
    sent: list[protocol.Message] = []
    estops: list[str] = []
    hub = await WebrtcHub(camera, control, sent.append, estop=estops.append, extra_hud=lambda: {"step": 42},
                          max_viewers=2).start()
    hub.sent, hub.estops = sent, estops
    try:
        yield hub
    finally:
        await hub.stop()
        camera.stop()


async def connect(hub, client, user="alice", role="operator"):
    offer = await client.offer(user, role)
    await hub.offer(offer)
    answer = hub.sent[-1]
    assert isinstance(answer, protocol.WebrtcAnswer) and answer.session == offer.session
    await client.accept(answer)
    return offer.session


async def test_a_viewer_gets_video_and_drives_over_the_data_channel(hub):
    client = Client()
    try:
        session = await connect(hub, client)
        assert hub.viewers == 1 and hub.camera.viewers == 1
        track = await asyncio.wait_for(client.track, 10)
        frames = []
        for _ in range(10):
            frame = await asyncio.wait_for(track.recv(), 10)
            frames.append(frame)
        assert all((f.width, f.height) == (224, 224) for f in frames)
        assert len({f.pts for f in frames}) == 10
        assert hub.video_fps > 5

        await asyncio.wait_for(client.opened.wait(), 10)
        client.send({"type": "ping", "id": 1, "t": 123.0})
        await client.wait(lambda: any(m["type"] == "pong" for m in client.messages))
        pong = next(m for m in client.messages if m["type"] == "pong")
        assert pong["id"] == 1 and pong["t"] == 123.0 and abs(pong["robot_t"] - time.time() * 1000) < 5000

        control = hub.control
        control.takeover(9, "alice", "demo")
        now = time.time() * 1000
        client.send({"type": "cmd", "seq": 1, "t": now, "action": [0.5, 0, -0.5], "grip": 1.0})
        client.send({"type": "cmd", "seq": 1, "t": now, "action": [0.9, 0, 0], "grip": None})  # a replay
        client.send({"type": "cmd", "seq": 2, "t": now - 2000, "action": [0.9, 0, 0], "grip": None})  # stale
        await client.wait(lambda: control.accepted == 1 and sum(control.dropped.values()) == 2)
        view = control.view()
        assert list(view.xyz) == [0.5, 0, -0.5] and view.grip == 1.0
        client.send({"type": "keepalive", "seq": 3, "t": time.time() * 1000})
        await client.wait(lambda: control.accepted == 2)

        def latest_hud():
            return [m for m in client.messages if m["type"] == "hud" and m["lease"] == 9 and m["applied_seq"] is None
                    and m["dropped"]["stale"]] or [None]

        await client.wait(lambda: latest_hud()[-1] is not None)  # sent every 100 ms: one after the drops
        hud = latest_hud()[-1]
        assert hud["operator"] == "alice" and hud["step"] == 42 and hud["dropped"] == {"stale": 1, "replayed": 1}
        assert set(hud) >= {"deadman", "estopped", "last_command_age_ms", "applied_seq", "video_fps"}

        client.send({"type": "estop"})
        await client.wait(lambda: hub.estops == ["alice"])

        await hub.close(session, "closed by the console")
        assert hub.viewers == 0 and hub.camera.viewers == 0
    finally:
        await client.pc.close()


async def test_a_viewer_session_cannot_estop_over_the_data_channel(hub):
    """A viewer watches and nothing else: the robot knows the session's role from the offer the server signed off,
    refuses the e-stop, says why on the channel, and counts it as invalid. Before: any session latched it."""
    client = Client()
    try:
        await connect(hub, client, user="dave", role="viewer")
        await asyncio.wait_for(client.opened.wait(), 10)
        client.send({"type": "estop"})
        await client.wait(lambda: any(m["type"] == "error" for m in client.messages))
        error = next(m for m in client.messages if m["type"] == "error")
        assert (error["code"], error["ref"]) == ("forbidden", "estop")
        assert hub.estops == [] and not hub.control.estopped
        client.send({"type": "estop", "pad": "x" * 4000})  # oversized, whatever the role: ignored
        client.send('{"type": "cmd", "seq": 1, "t": 1e400}')  # not finite
        await client.wait(lambda: next(iter(hub.sessions.values())).invalid >= 2)
    finally:
        await client.pc.close()


async def test_two_viewers_decode_one_encode_and_a_late_viewer_starts_at_a_keyframe(hub):
    first, second = Client(), Client()
    try:
        await connect(hub, first)
        assert "VP8" in hub.sent[-1].sdp and "H264" not in hub.sent[-1].sdp  # the broadcast's packets are VP8
        track = await asyncio.wait_for(first.track, 10)
        for _ in range(15):
            await asyncio.wait_for(track.recv(), 10)
        await connect(hub, second)  # joins mid-stream: its decoder needs a keyframe first
        late = await asyncio.wait_for(second.track, 10)
        encoder = hub._source.encoder
        encoded_before, keyframes_before = encoder.frames, encoder.keyframes
        frames = [await asyncio.wait_for(late.recv(), 10) for _ in range(15)]
        assert all((f.width, f.height) == (224, 224) for f in frames)  # decoded from its first packet on
        for _ in range(15):
            await asyncio.wait_for(track.recv(), 10)
        assert encoder.keyframes > keyframes_before  # the new viewer asked for one
        # One encode per captured frame for both viewers (each decoded 15+ frames meanwhile), not one per viewer.
        encoded = encoder.frames - encoded_before
        assert encoded >= 15 and encoded <= hub.camera.frames
        assert hub._broadcast.viewers == 2
    finally:
        await first.pc.close()
        await second.pc.close()


async def test_the_broadcast_starts_each_viewer_at_a_keyframe_and_drops_what_it_queued_before():
    from robots.agent.media import SharedVp8Encoder, VideoBroadcast, is_keyframe, make_camera_track

    camera = CameraThread(PatternCapture(64), fps=60.0).start()
    camera.set_viewers(1)
    encoder = SharedVp8Encoder(keyframe_every_s=1000.0)
    broadcast = VideoBroadcast(make_camera_track(camera, encoder))
    try:
        viewer = broadcast.subscribe()
        await asyncio.sleep(0.3)  # packets queue while the connection would come up
        assert viewer._queue.qsize() > 3
        packet = await asyncio.wait_for(viewer.recv(), 10)
        assert is_keyframe(bytes(packet))  # not the stale deltas queued before
        assert viewer.dropped >= 3
        following = [bytes(await asyncio.wait_for(viewer.recv(), 10)) for _ in range(5)]
        assert not any(is_keyframe(p) for p in following)  # then deltas: no keyframe per frame
    finally:
        await broadcast.stop()
        broadcast.source.stop()
        camera.stop()


async def test_only_the_lease_holders_session_drives(hub):
    client = Client()
    try:
        await connect(hub, client, user="bob")
        await asyncio.wait_for(client.opened.wait(), 10)
        hub.control.takeover(1, "alice")
        client.send({"type": "cmd", "seq": 1, "t": time.time() * 1000, "action": [1, 0, 0], "grip": None})
        await client.wait(lambda: hub.control.dropped["not_holder"] == 1)
        assert hub.control.view().xyz is None
    finally:
        await client.pc.close()


async def test_viewers_beyond_the_limit_get_an_error_and_websocket_loss_closes_all(hub):
    clients = [Client() for _ in range(3)]
    try:
        for client in clients[:2]:
            await connect(hub, client)
        offer = await clients[2].offer()
        await hub.offer(offer)
        answer = hub.sent[-1]
        assert answer.session == offer.session and answer.error.startswith("too many viewers") and answer.sdp == ""
        assert hub.viewers == 2
        await hub.close_all("websocket lost")
        assert hub.viewers == 0 and hub.camera.viewers == 0
    finally:
        for client in clients:
            await client.pc.close()


async def test_a_bad_offer_is_answered_with_an_error(hub):
    await hub.offer(protocol.WebrtcOffer(session=str(uuid.uuid4()), sdp="v=0\r\nnonsense", user="alice"))
    answer = hub.sent[-1]
    assert answer.error and not answer.sdp and hub.viewers == 0
