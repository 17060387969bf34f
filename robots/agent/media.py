"""The robot's camera for the operator console: a capture thread independent of the control rate, and an aiortc video
track fed by its latest frame (docs/console.md, "Video").

``CameraThread`` renders at ``fps`` (default 15) while at least one viewer is connected, and not at all otherwise. For
the simulator it uses ``SimulatorCapture``: its OWN ``mujoco.Renderer`` (its own EGL context, created, made current and
closed in the capture thread only). The only moment it touches the control thread's simulator is ``update_scene``
(mjv_updateScene copies the poses of the geoms into the renderer's own scene: ~0.02 ms), done under the environment's
``sim_lock``, which the control thread holds around each physics step; rendering and reading pixels happen outside the
lock. Creating a renderer (GL context, shaders, textures) holds the GIL for ~0.5 s, so it is never done inside an
episode: ``CameraPreparer``, a runtime subscriber, has the capture thread build it when the runtime creates an
environment (between episodes, like the environment's own first render).

``--video-stamp`` writes the capture time (unix ms mod 2^24) into the top of each frame as 24 black/white blocks
(``encode_stamp``; ``decode_stamp`` reads it back; layout in docs/console.md) for a glass-to-glass latency benchmark.

``CameraTrack`` is an aiortc ``VideoStreamTrack`` on the asyncio loop; ``webrtc.py`` fans it out to every viewer with
``VideoBroadcast``: one capture, one VP8 encode (``SharedVp8Encoder``), the same packet to every peer connection.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import fractions
import logging
import threading
import time
from typing import Callable, Optional

import numpy as np

from .environment import Environment, flips
from .runtime import Subscriber

log = logging.getLogger(__name__)

STAMP_BITS = 24
STAMP_MODULUS = 1 << STAMP_BITS
STAMP_BLOCK = 8  # px: one block is STAMP_BLOCK x STAMP_BLOCK, the 24 blocks one row at the top left
VIDEO_CLOCK_RATE = 90_000  # RTP video clock: pts are in 1/90000 s
VIDEO_BITRATE = 1_000_000  # bit/s of the one VP8 stream every viewer gets (aiortc's per-peer default starts at 0.5M)
KEYFRAME_EVERY_S = 2.0  # a viewer that lost a packet waits at most this long for a clean picture
# The operator's video skips the table's mirror reflection: a second pass of the whole scene that doubles the software
# (llvmpipe) render at 224 px, ~20 -> ~11 ms (docs/console.md), for a barely visible sheen. Only the console's video
# renderer: the policy's camera images (environment.py) stay as the checkpoints were trained on.
VIDEO_FLAGS_OFF = ("mjRND_REFLECTION",)


# ---------------------------------------------------------------- the timestamp stamp (glass-to-glass benchmark)


def stamp_block(width: int) -> int:
    """Block size for a frame ``width`` px wide: 8 px, smaller only for frames narrower than 24 * 8 = 192 px."""
    return max(1, min(STAMP_BLOCK, width // STAMP_BITS))


def encode_stamp(image: np.ndarray, value: int) -> np.ndarray:
    """Write ``value`` (mod 2^24) into ``image`` (uint8 [H, W, 3], in place): block i (i = 0..23, left to right, at x =
    i*b, y = 0, b x b px) is white (255) when bit 23 - i of the value is 1 (most significant bit first), else black."""
    b = stamp_block(image.shape[1])
    value %= STAMP_MODULUS
    for i in range(STAMP_BITS):
        image[0:b, i * b:(i + 1) * b] = 255 if (value >> (STAMP_BITS - 1 - i)) & 1 else 0
    return image


def decode_stamp(image) -> int:
    """Read the stamp back, in pure Python (the browser's JS decoder does the same on a canvas): for each block, the
    mean luma of its centre (the middle half of its rows and columns; the whole block when b < 4) against 128.
    ``image`` is indexable as image[y][x] -> (r, g, b) (a numpy array or nested lists); its width decides the block."""
    width = len(image[0])
    b = stamp_block(width)
    lo, hi = (b // 4, b - b // 4) if b >= 4 else (0, b)
    value = 0
    for i in range(STAMP_BITS):
        total, n = 0.0, 0
        for y in range(lo, hi):
            row = image[y]
            for x in range(i * b + lo, i * b + hi):
                r, g, bl = row[x][0], row[x][1], row[x][2]
                total += 0.299 * float(r) + 0.587 * float(g) + 0.114 * float(bl)
                n += 1
        value = (value << 1) | (1 if total / n >= 128 else 0)
    return value


def stamp_now(unix_s: Optional[float] = None) -> int:
    """The stamp value of a moment: unix milliseconds mod 2^24 (wraps every ~4.7 hours)."""
    return int((time.time() if unix_s is None else unix_s) * 1000) % STAMP_MODULUS


def stamp_latency_ms(value: int, now_unix_s: Optional[float] = None) -> int:
    """Milliseconds from the stamped capture to ``now`` (mod 2^24: correct for delays under ~4.7 hours)."""
    return (stamp_now(now_unix_s) - value) % STAMP_MODULUS


# ---------------------------------------------------------------- captures (used on the capture thread only)


class Capture(abc.ABC):
    """Produces frames on the capture thread. ``prepare`` (optional) builds what ``frame`` needs ahead of time."""

    size: int

    def prepare(self, env: Optional[Environment]) -> None:  # noqa: B027 - optional hook
        pass

    @abc.abstractmethod
    def frame(self) -> np.ndarray:
        """uint8 [size, size, 3], a new array the caller owns."""

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


class SimulatorCapture(Capture):
    """Renders the runtime's current simulator (``current_env()``) with a renderer of its own.

    An environment renders if it has ``model``, ``data``, ``sim_lock`` and ``camera`` (MetaWorldEnvironment); anything
    else (no environment yet, a fake one) gives a dark grey frame. A robot that records more cameras
    (``extra_cameras``) streams them all, side by side in one frame (primary first): the operator sees what the
    policy may see, at one render per camera and frame."""

    def __init__(self, current_env: Callable[[], Optional[Environment]], size: int = 224, camera: str = ""):
        self.current_env = current_env
        self.size = size
        self.camera = camera
        self._renderer = None
        self._model = None
        self.render_s: collections.deque[float] = collections.deque(maxlen=300)  # seconds per rendered frame
        self.lock_s: collections.deque[float] = collections.deque(maxlen=300)  # seconds the sim lock was held

    def prepare(self, env: Optional[Environment]) -> None:
        if env is not None and getattr(env, "model", None) is not None:
            self._renderer_for(env)
            self.frame_of(env)  # the first render pays for shader and texture setup

    def _renderer_for(self, env):
        import mujoco

        model = env.model
        if self._renderer is None or self._model is not model:
            self._close_renderer()
            vis = model.vis
            vis.global_.offwidth = max(vis.global_.offwidth, self.size)
            vis.global_.offheight = max(vis.global_.offheight, self.size)
            started = time.perf_counter()
            self._renderer = mujoco.Renderer(model, height=self.size, width=self.size)
            for flag in VIDEO_FLAGS_OFF:  # scene flags persist across update_scene
                self._renderer.scene.flags[getattr(mujoco.mjtRndFlag, flag)] = 0
            self._model = model
            log.info("video renderer for %s ready in %.2f s", env.env_id, time.perf_counter() - started)
        return self._renderer

    def frame(self) -> np.ndarray:
        env = self.current_env()
        if env is None or getattr(env, "model", None) is None:
            return np.full((self.size, self.size, 3), 32, dtype=np.uint8)
        return self.frame_of(env)

    def frame_of(self, env) -> np.ndarray:
        renderer = self._renderer_for(env)
        cameras = [self.camera or env.camera, *getattr(env, "extra_cameras", ())]
        started = time.perf_counter()
        images, locked_s = [], 0.0
        for camera in cameras:
            with env.sim_lock:  # the control thread waits at most this long for its next physics step
                locked = time.perf_counter()
                renderer.update_scene(env.data, camera=camera)
            locked_s += time.perf_counter() - locked
            image = renderer.render()
            images.append(np.ascontiguousarray(image[::-1]) if flips(camera) else image)
        self.lock_s.append(locked_s)
        self.render_s.append(time.perf_counter() - started)
        return images[0] if len(images) == 1 else np.concatenate(images, axis=1)

    def _close_renderer(self) -> None:
        if self._renderer is not None:
            renderer, self._renderer, self._model = self._renderer, None, None
            try:
                renderer.close()
            except Exception:  # an EGL error while freeing must not kill the capture thread
                log.debug("closing the video renderer failed", exc_info=True)

    def close(self) -> None:
        self._close_renderer()


class PatternCapture(Capture):
    """A moving test pattern (no simulator): tests, and robots without a camera."""

    def __init__(self, size: int = 224):
        self.size = size
        self._n = 0

    def frame(self) -> np.ndarray:
        self._n += 1
        s = self.size
        y, x = np.mgrid[0:s, 0:s]
        image = np.empty((s, s, 3), dtype=np.uint8)
        image[..., 0] = (x + 4 * self._n) % 256
        image[..., 1] = (y * 2) % 256
        image[..., 2] = 128
        return image


# ---------------------------------------------------------------- the capture thread


class CameraThread:
    """Captures at ``fps`` while ``viewers > 0``; ``latest()`` is the newest frame. Listeners (``add_listener``) are
    called on the capture thread after each frame and must return at once (``loop.call_soon_threadsafe``)."""

    def __init__(self, capture: Capture, fps: float = 15.0, *, stamp: bool = False,
                 clock: Callable[[], float] = time.monotonic):
        if fps <= 0:
            raise ValueError("fps must be positive")
        self.capture = capture
        self.fps = fps
        self.stamp = stamp
        self.size = capture.size
        self._clock = clock
        self._viewers = 0
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._latest: Optional[tuple[np.ndarray, float, float, int]] = None  # image, monotonic, unix, number
        self._listeners: list[Callable[[], None]] = []
        self._prepare: Optional[tuple[Optional[Environment], threading.Event]] = None
        self.frames = 0
        self.errors = 0
        self._thread = threading.Thread(target=self._run, name="camera", daemon=True)

    def start(self) -> "CameraThread":
        self._thread.start()
        return self

    def stop(self, timeout: Optional[float] = 5.0) -> None:
        self._stopped.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def viewers(self) -> int:
        return self._viewers

    def set_viewers(self, n: int) -> None:
        self._viewers = max(0, int(n))
        self._wake.set()

    def add_listener(self, listener: Callable[[], None]) -> None:
        with self._lock:
            self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[], None]) -> None:
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def latest(self) -> Optional[tuple[np.ndarray, float, float, int]]:
        """(image, capture monotonic s, capture unix s, frame number) of the newest frame, None before the first."""
        return self._latest

    def prepare(self, env: Optional[Environment], timeout: float = 10.0) -> bool:
        """Have the capture thread build its renderer for ``env`` now; wait for it (call between episodes only)."""
        if not self._thread.is_alive():
            return False
        done = threading.Event()
        self._prepare = (env, done)
        self._wake.set()
        return done.wait(timeout)

    def _run(self) -> None:
        period = 1.0 / self.fps
        next_at = self._clock()
        try:
            while not self._stopped.is_set():
                request, self._prepare = self._prepare, None
                if request is not None:
                    try:
                        self.capture.prepare(request[0])
                    except Exception:
                        log.exception("could not prepare the video renderer")
                    request[1].set()
                if self._viewers <= 0:
                    self._wake.wait(1.0)  # nobody watches: render nothing
                    self._wake.clear()
                    next_at = self._clock()
                    continue
                self._capture_one()
                now = self._clock()
                next_at += period
                if next_at < now:
                    next_at = now  # too slow for the rate: skip, never burst
                self._wake.wait(next_at - now)
                self._wake.clear()
        finally:
            try:
                self.capture.close()
            except Exception:
                log.debug("closing the capture failed", exc_info=True)

    def _capture_one(self) -> None:
        unix = time.time()
        mono = self._clock()
        try:
            image = self.capture.frame()
        except Exception:
            self.errors += 1
            if self.errors <= 3:
                log.exception("video capture failed")
            return
        if self.stamp:
            encode_stamp(image, stamp_now(unix))
        self.frames += 1
        self._latest = (image, mono, unix, self.frames)
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener()
            except Exception:
                log.debug("a frame listener failed", exc_info=True)


class CameraPreparer(Subscriber):
    """Builds the capture thread's renderer when the runtime creates an environment, before its first episode."""

    def __init__(self, camera: CameraThread):
        self.camera = camera

    def on_environment(self, env: Environment) -> None:
        if not self.camera.prepare(env):
            log.warning("the video renderer was not ready in time; the first viewer may cost a few overruns")


# ---------------------------------------------------------------- the aiortc track (asyncio loop)


def _video_stream_track():
    from aiortc import VideoStreamTrack

    return VideoStreamTrack


class FpsMeter:
    """Frames per second over the last ``window_s``."""

    def __init__(self, window_s: float = 2.0, clock: Callable[[], float] = time.monotonic):
        self.window_s = window_s
        self._clock = clock
        self._times: collections.deque[float] = collections.deque(maxlen=1000)

    def tick(self) -> None:
        self._times.append(self._clock())

    def rate(self) -> float:
        now = self._clock()
        times = [t for t in self._times if now - t <= self.window_s]
        if len(times) < 2:
            return 0.0
        return round((len(times) - 1) / max(1e-6, times[-1] - times[0]), 2) if now - times[-1] < 1.0 else 0.0


class SharedVp8Encoder:
    """One VP8 encoder for every viewer of a camera: each captured frame is encoded once and the same packet goes to
    every peer connection (aiortc packetises ``av.Packet`` data without re-encoding it). Settings as aiortc's own
    ``Vp8Encoder`` (realtime, CBR, no lag) at a fixed bitrate, since one stream serves every viewer.

    Keyframes: on request (a viewer starts, ``request_keyframe``) and at least every ``keyframe_every_s`` (a viewer that
    lost a packet recovers by then: the shared stream cannot answer one viewer's PLI with a keyframe of its own).
    ``encode`` runs on a worker thread, one call at a time (the camera track awaits each)."""

    def __init__(self, bitrate: int = VIDEO_BITRATE, keyframe_every_s: float = KEYFRAME_EVERY_S):
        self.bitrate = bitrate
        self.keyframe_every_s = keyframe_every_s
        self._codec = None
        self._keyframe = True
        self._last_key_pts: Optional[int] = None
        self.frames = 0
        self.keyframes = 0

    def request_keyframe(self) -> None:
        self._keyframe = True

    def _open(self, width: int, height: int):
        import multiprocessing

        import av

        codec = av.CodecContext.create("libvpx", "w")
        codec.width, codec.height = width, height
        codec.bit_rate = self.bitrate
        codec.pix_fmt = "yuv420p"
        codec.gop_size = 3000  # keyframes are ours to decide (above)
        codec.qmin, codec.qmax = 2, 56
        codec.options = {
            "bufsize": str(self.bitrate), "cpu-used": "-6", "deadline": "realtime", "lag-in-frames": "0",
            "minrate": str(self.bitrate), "maxrate": str(self.bitrate), "noise-sensitivity": "4",
            "overshoot-pct": "15", "partitions": "0", "static-thresh": "1", "undershoot-pct": "100",
        }
        codec.thread_count = 1 if width * height < 320 * 240 else min(2, multiprocessing.cpu_count())
        return codec

    def encode(self, frame):
        """``frame``: a yuv420p ``av.VideoFrame`` with pts and time_base. Returns one ``av.Packet`` (None when the
        encoder produced nothing for this frame)."""
        import av

        if self._codec is None or (self._codec.width, self._codec.height) != (frame.width, frame.height):
            self._codec = self._open(frame.width, frame.height)
            self._keyframe = True
        due = (self._last_key_pts is not None
               and (frame.pts - self._last_key_pts) * frame.time_base >= self.keyframe_every_s)
        if self._keyframe or due:
            frame.pict_type = av.video.frame.PictureType.I
        data = b"".join(bytes(p) for p in self._codec.encode(frame))
        if not data:
            return None
        packet = av.Packet(data)
        packet.pts, packet.time_base = frame.pts, frame.time_base
        self.frames += 1
        if frame.pict_type == av.video.frame.PictureType.I:
            self._keyframe = False
            self._last_key_pts = frame.pts
            self.keyframes += 1
        return packet


def is_keyframe(data: bytes) -> bool:
    """VP8 frame tag (RFC 6386 9.1): bit 0 of the first byte is 0 for a key frame."""
    return len(data) >= 3 and not (data[0] & 0x01)


def make_camera_track(camera: CameraThread, encoder: Optional[SharedVp8Encoder] = None):
    """The encoded source of one camera, made on the asyncio loop: ``recv()`` returns one VP8 ``av.Packet`` per
    captured frame, encoded once for all viewers (``VideoBroadcast`` fans it out)."""
    import av
    from aiortc.mediastreams import MediaStreamError

    base = _video_stream_track()
    shared = encoder or SharedVp8Encoder()

    class CameraTrack(base):
        kind = "video"

        def __init__(self):
            super().__init__()
            self._loop = asyncio.get_running_loop()
            self._event = asyncio.Event()
            self._sent = 0
            self._t0: Optional[float] = None
            self.meter = FpsMeter()
            self.encoder = shared
            camera.add_listener(self._notify)

        def _notify(self) -> None:  # capture thread
            try:
                self._loop.call_soon_threadsafe(self._event.set)
            except RuntimeError:  # loop closed
                pass

        async def recv(self):
            while True:
                if self.readyState != "live":
                    raise MediaStreamError
                latest = camera.latest()
                if latest is None or latest[3] == self._sent:
                    self._event.clear()
                    await self._event.wait()
                    continue
                image, mono, _unix, number = latest
                self._sent = number
                if self._t0 is None:
                    self._t0 = mono
                frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format="yuv420p")
                frame.pts = int(round((mono - self._t0) * VIDEO_CLOCK_RATE))
                frame.time_base = fractions.Fraction(1, VIDEO_CLOCK_RATE)
                # The encode (~2-4 ms at 224 px) runs off the loop, which also serves the teleop data channel.
                packet = await self._loop.run_in_executor(None, shared.encode, frame)
                if packet is None:
                    continue
                self.meter.tick()
                return packet

        def stop(self) -> None:
            camera.remove_listener(self._notify)
            super().stop()
            self._event.set()

    return CameraTrack()


class VideoBroadcast:
    """Fans one encoded camera track out to every viewer: one encode, relayed (an SFU's job, in the agent).

    ``subscribe()`` gives a viewer its own track. A viewer starts at a keyframe: its first ``recv`` drops whatever was
    queued before its connection came up, asks the encoder for a keyframe and skips packets until one arrives (no
    burst of stale frames, no undecodable start). A viewer whose queue overflows (it stopped reading) starts over the
    same way. The pump reads the source only while someone is subscribed."""

    def __init__(self, source, queue_size: int = 30):
        self.source = source
        self.queue_size = queue_size
        self._viewers: list = []
        self._pump: Optional[asyncio.Task] = None

    @property
    def viewers(self) -> int:
        return len(self._viewers)

    def subscribe(self):
        track = _viewer_track(self)
        self._viewers.append(track)
        if self._pump is None or self._pump.done():
            self._pump = asyncio.get_running_loop().create_task(self._run(), name="video-broadcast")
        return track

    def _unsubscribe(self, track) -> None:
        if track in self._viewers:
            self._viewers.remove(track)

    def request_keyframe(self) -> None:
        self.source.encoder.request_keyframe()

    async def _run(self) -> None:
        from aiortc.mediastreams import MediaStreamError

        while self._viewers:
            try:
                packet = await self.source.recv()
            except MediaStreamError:
                break
            for viewer in list(self._viewers):
                viewer._put(packet)
        for viewer in list(self._viewers):
            viewer._put(None)  # the source ended

    async def stop(self) -> None:
        for viewer in list(self._viewers):
            viewer.stop()
        if self._pump is not None:
            self._pump.cancel()
            await asyncio.gather(self._pump, return_exceptions=True)
            self._pump = None


def _viewer_track(broadcast: VideoBroadcast):
    from aiortc import MediaStreamTrack
    from aiortc.mediastreams import MediaStreamError

    class ViewerTrack(MediaStreamTrack):
        kind = "video"

        def __init__(self):
            super().__init__()
            self._queue: asyncio.Queue = asyncio.Queue()
            self._synced = False  # False: waiting for a keyframe
            self._started = False
            self.dropped = 0

        def _put(self, packet) -> None:
            if self._queue.qsize() >= broadcast.queue_size:
                self._drain()  # a stalled reader: start over at the next keyframe
                self._synced = False
                broadcast.request_keyframe()
            self._queue.put_nowait(packet)

        def _drain(self) -> None:
            while not self._queue.empty():
                self._queue.get_nowait()
                self.dropped += 1

        async def recv(self):
            if not self._started:  # the sender starts reading once the connection is up
                self._started = True
                self._drain()  # queued before that: stale
                broadcast.request_keyframe()
            while True:
                if self.readyState != "live":
                    raise MediaStreamError
                packet = await self._queue.get()
                if packet is None:
                    self.stop()
                    raise MediaStreamError
                if self._synced or is_keyframe(bytes(packet)):
                    self._synced = True
                    return packet
                self.dropped += 1

        def stop(self) -> None:
            broadcast._unsubscribe(self)
            super().stop()
            self._queue.put_nowait(None)

    return ViewerTrack()
