"""WebRTC sessions with operator consoles, on the agent's asyncio loop (docs/console.md).

The browser's offer (recvonly video + a data channel "teleop", all ICE candidates gathered) arrives over the robot's
websocket as ``webrtc.offer``; ``WebrtcHub.offer`` answers it with one ``RTCPeerConnection`` per session: the camera
track (one ``CameraTrack`` per robot, encoded once to VP8 and fanned out to every viewer by ``VideoBroadcast``; the
answer accepts VP8 only) and the teleop channel. aiortc gathers all ICE candidates inside ``setLocalDescription``, so
the answer goes back as one ``webrtc.answer`` (no trickle ICE). At most ``max_viewers`` sessions; one more is
answered with an ``error``.

Teleop channel, browser -> robot: ``cmd`` / ``keepalive`` -> ``OperatorControl.command`` with the session's user (it
counts only while that user holds the lease), ``ping`` -> ``pong`` with ``robot_t``, ``estop`` -> the e-stop latch
(operator and admin sessions only: the offer carries the role the server authenticated; clearing needs the
websocket; the latch is reported to the server, which audits it). Robot -> browser: a ``hud`` message every 100 ms,
pongs, and an ``error`` for a refused e-stop.

Sessions close on ``webrtc.close``, when the peer connection fails or closes, when the websocket to the server is lost
(``close_all``), and at shutdown.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from typing import Any, Callable, Optional

from robots import console_protocol as cp
from robots import protocol

from .media import CameraThread, FpsMeter, VideoBroadcast, make_camera_track
from .teleop import ACCEPTED, OperatorControl

log = logging.getLogger(__name__)

HUD_PERIOD_S = 0.1
OFFER_TIMEOUT_S = 15.0
TELEOP_LABEL = "teleop"


@dataclasses.dataclass
class Session:
    id: str
    user: str
    pc: Any  # RTCPeerConnection
    role: str = "viewer"  # the user's console role, as the server authenticated it with the offer
    track: Any = None  # this viewer's track of the broadcast
    channel: Any = None  # the "teleop" RTCDataChannel, once the browser opened it
    opened_at: float = dataclasses.field(default_factory=time.monotonic)
    closed: bool = False
    invalid: int = 0  # malformed data channel messages


def ice_servers(dicts: list[dict]):
    """RTCIceServer objects from the server's list of RTCIceServer dicts (``urls``, ``username``, ``credential``)."""
    from aiortc import RTCIceServer

    servers = []
    for entry in dicts:
        urls = entry.get("urls") if isinstance(entry, dict) else None
        if not urls or not isinstance(urls, (str, list)):
            continue
        servers.append(RTCIceServer(urls=urls, username=entry.get("username"), credential=entry.get("credential")))
    return servers


class WebrtcHub:
    """All WebRTC sessions of this robot. Every method runs on the asyncio loop.

    ``send`` queues a protocol message for the server (the connection's loop-side send); ``estop(by)`` latches the
    e-stop; ``extra_hud()`` adds live fields to the hud (the runtime's ``step``)."""

    def __init__(self, camera: Optional[CameraThread], control: OperatorControl,
                 send: Callable[[protocol.Message], None], *, estop: Callable[[str], None],
                 extra_hud: Callable[[], dict] = dict, max_viewers: int = 8, hud_period_s: float = HUD_PERIOD_S):
        self.camera = camera
        self.control = control
        self.send = send
        self.estop = estop
        self.extra_hud = extra_hud
        self.max_viewers = max_viewers
        self.hud_period_s = hud_period_s
        self.sessions: dict[str, Session] = {}
        self.refused = 0
        self._broadcast: Optional[VideoBroadcast] = None
        self._source = None
        self._hud_task: Optional[asyncio.Task] = None
        self._closing = False
        self._meter = FpsMeter()

    # ------------------------------------------------------------ status

    @property
    def viewers(self) -> int:
        return len(self.sessions)

    @property
    def video_fps(self) -> float:
        """Frames per second the camera track hands to the encoders (one source for all viewers)."""
        if self._source is None or not self.sessions:
            return 0.0
        return self._source.meter.rate()

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> "WebrtcHub":
        if self.camera is not None and self._source is None:
            self._source = make_camera_track(self.camera)
            self._broadcast = VideoBroadcast(self._source)
        if self._hud_task is None:
            self._hud_task = asyncio.create_task(self._hud_loop(), name="webrtc-hud")
        return self

    async def stop(self) -> None:
        self._closing = True
        await self.close_all("shutdown")
        if self._hud_task is not None:
            self._hud_task.cancel()
            await asyncio.gather(self._hud_task, return_exceptions=True)
            self._hud_task = None
        if self._broadcast is not None:
            await self._broadcast.stop()
            self._broadcast = None
        if self._source is not None:
            self._source.stop()
            self._source = None

    # ------------------------------------------------------------ signalling

    def _answer(self, session: str, sdp: str = "", error: str = "") -> None:
        try:
            self.send(protocol.WebrtcAnswer(session=session, sdp=sdp, error=error[: protocol.MAX_STRING]))
        except protocol.ProtocolError as exc:
            log.error("cannot send the answer of session %s: %s", session, exc.message)
            if sdp:
                self.send(protocol.WebrtcAnswer(session=session, error="answer too large"))

    async def offer(self, message: protocol.WebrtcOffer) -> None:
        """Answer one offer (never raises: failures are answered with ``error``)."""
        if self._closing:
            return self._answer(message.session, error="robot shutting down")
        if message.session in self.sessions:
            await self.close(message.session, "renegotiated")
        if len(self.sessions) >= self.max_viewers:
            self.refused += 1
            log.warning("refusing a video session of %s: %d viewers already", message.user, len(self.sessions))
            return self._answer(message.session, error=f"too many viewers (at most {self.max_viewers})")
        try:
            sdp = await asyncio.wait_for(self._negotiate(message), OFFER_TIMEOUT_S)
        except Exception as exc:  # a bad SDP, ICE gathering trouble: one refused session, never the robot
            log.warning("cannot answer the offer of %s (session %s): %s", message.user, message.session,
                        exc or type(exc).__name__)
            await self.close(message.session, "negotiation failed")
            return self._answer(message.session, error=f"cannot answer: {type(exc).__name__}: {exc}")
        self._answer(message.session, sdp=sdp)

    async def _negotiate(self, message: protocol.WebrtcOffer) -> str:
        from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

        pc = RTCPeerConnection(configuration=RTCConfiguration(iceServers=ice_servers(message.ice_servers)))
        session = Session(message.session, message.user, pc, role=message.role)
        self.sessions[message.session] = session
        self._viewers_changed()

        @pc.on("datachannel")
        def on_datachannel(channel):
            if channel.label != TELEOP_LABEL:
                log.info("ignoring data channel %r of session %s", channel.label, session.id)
                return
            session.channel = channel

            @channel.on("message")
            def on_message(raw):
                self._on_message(session, raw)

        @pc.on("connectionstatechange")
        async def on_state():
            log.info("video session %s of %s: %s", session.id, session.user, pc.connectionState)
            if pc.connectionState in ("failed", "closed"):
                await self.close(session.id, pc.connectionState)

        if self._broadcast is not None and "\nm=video " in "\n" + message.sdp.replace("\r\n", "\n"):
            # Added before the offer is applied, so that the offer's video m-line takes this transceiver and its codec
            # preference: the broadcast's packets are VP8, so only VP8 may be negotiated (every WebRTC browser offers
            # it). aiortc fixes a transceiver's codecs in setRemoteDescription.
            from aiortc import RTCRtpSender

            session.track = self._broadcast.subscribe()
            sender = pc.addTrack(session.track)
            vp8 = [c for c in RTCRtpSender.getCapabilities("video").codecs if c.mimeType.lower() == "video/vp8"]
            next(t for t in pc.getTransceivers() if t.sender is sender).setCodecPreferences(vp8)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=message.sdp, type="offer"))
        if not pc.getTransceivers() and pc.sctp is None:
            raise ValueError("the offer has neither a video transceiver nor a data channel")
        answer = await pc.createAnswer()
        await pc.setLocalDescription(answer)  # gathers every ICE candidate before it returns
        log.info("answered the video session %s of %s (%d viewers)", session.id, session.user, self.viewers)
        return pc.localDescription.sdp

    async def close(self, session_id: str, reason: str = "") -> None:
        session = self.sessions.pop(session_id, None)
        if session is None or session.closed:
            return
        session.closed = True
        self._viewers_changed()
        if session.track is not None:
            session.track.stop()
        try:
            await session.pc.close()
        except Exception:
            log.debug("closing session %s failed", session_id, exc_info=True)
        log.info("video session %s of %s closed (%s); %d viewers", session_id, session.user, reason or "closed",
                 self.viewers)

    async def close_all(self, reason: str = "") -> None:
        await asyncio.gather(*(self.close(s, reason) for s in list(self.sessions)), return_exceptions=True)

    def _viewers_changed(self) -> None:
        if self.camera is not None:
            self.camera.set_viewers(len(self.sessions))

    # ------------------------------------------------------------ the teleop data channel

    def _on_message(self, session: Session, raw) -> None:
        """One data channel message, decoded by the typed layer (robots/console_protocol.py ``DATA_CHANNEL``: bytes,
        depth, fields). Anything else is counted as invalid and ignored."""
        if isinstance(raw, bytes):
            session.invalid += 1
            return
        try:
            message = cp.DATA_CHANNEL.decode(raw, accept=cp.CHANNEL_BROWSER_MESSAGES)
        except protocol.ProtocolError:
            session.invalid += 1
            return
        if isinstance(message, cp.ChannelPing):
            self._send(session, {"type": "pong", "id": message.id, "t": message.t,
                                 "robot_t": round(time.time() * 1000.0, 1)})
        elif isinstance(message, (cp.ChannelCommand, cp.ChannelKeepalive)):
            action = message.action if isinstance(message, cp.ChannelCommand) else None
            grip = message.grip if isinstance(message, cp.ChannelCommand) else None
            result = self.control.command(message.seq, float(message.t), action, grip, via="dc",
                                          session_user=session.user)
            if result != ACCEPTED:
                log.debug("teleop command %s of %s dropped: %s", message.seq, session.user, result)
        elif isinstance(message, cp.ChannelTrace):  # latency instrumentation: when did ``seq`` arrive and first act
            accepted_t, applied_t = self.control.traced(message.seq)
            self._send(session, {"type": "trace", "seq": message.seq, "accepted_t": accepted_t, "applied_t": applied_t})
        elif isinstance(message, cp.ChannelEstop):
            if session.role not in protocol.ESTOP_ROLES:
                # A viewer watches and nothing else: the server told us this session's role with the offer.
                log.warning("e-stop over the data channel by %s refused: role %s", session.user, session.role)
                session.invalid += 1
                self._send(session, {"type": "error", "code": "forbidden", "ref": "estop",
                                     "detail": "viewers cannot e-stop; ask an operator"})
                return
            log.warning("e-stop over the data channel by %s (%s)", session.user, session.role)
            self.estop(session.user)

    def _send(self, session: Session, body: dict) -> None:
        channel = session.channel
        if channel is None or channel.readyState != "open":
            return
        try:
            channel.send(json.dumps(body, separators=(",", ":")))
        except Exception:
            log.debug("data channel send failed on session %s", session.id, exc_info=True)

    def hud(self) -> dict:
        body = self.control.hud()
        body.update(self.extra_hud())
        body["video_fps"] = self.video_fps
        return body

    async def _hud_loop(self) -> None:
        while True:
            await asyncio.sleep(self.hud_period_s)
            if not self.sessions:
                continue
            try:
                body = self.hud()
            except Exception:
                log.exception("cannot build the hud")
                continue
            for session in list(self.sessions.values()):
                self._send(session, body)
