"""The console camera (robots/agent/media.py): the timestamp stamp, the capture thread, the simulator renderer."""

import threading
import time

import numpy as np
import pytest

from robots.agent.media import (
    STAMP_MODULUS,
    CameraThread,
    PatternCapture,
    SimulatorCapture,
    decode_stamp,
    encode_stamp,
    stamp_block,
    stamp_latency_ms,
    stamp_now,
)


@pytest.mark.parametrize("size", [224, 96, 48])
def test_the_stamp_round_trips(size):
    rng = np.random.default_rng(size)
    for value in (0, 1, STAMP_MODULUS - 1, 0xA5A5A5, int(rng.integers(0, STAMP_MODULUS))):
        image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        encode_stamp(image, value)
        assert decode_stamp(image) == value
        assert decode_stamp(image.tolist()) == value  # pure Python: nested lists work the same


def test_the_stamp_layout_is_24_blocks_of_8_px_msb_first():
    image = np.full((224, 224, 3), 77, dtype=np.uint8)
    encode_stamp(image, 1 << 23 | 1)
    assert stamp_block(224) == 8 and stamp_block(96) == 4
    assert (image[0:8, 0:8] == 255).all() and (image[0:8, 8:184] == 0).all() and (image[0:8, 184:192] == 255).all()
    assert (image[8:] == 77).all() and (image[0:8, 192:] == 77).all()  # nothing else is touched


def test_stamp_latency_wraps():
    assert stamp_latency_ms(stamp_now(1000.000), 1000.120) == 120
    wrap = STAMP_MODULUS / 1000.0  # seconds per wrap
    assert stamp_latency_ms(stamp_now(wrap - 0.010), wrap + 0.030) == 40


def test_the_stamp_survives_vp8():
    import av
    from aiortc.codecs.vpx import Vp8Decoder, Vp8Encoder, vp8_depayload
    from aiortc.jitterbuffer import JitterFrame

    encoder, decoder = Vp8Encoder(), Vp8Decoder()
    rng = np.random.default_rng(0)
    values, decoded = [], []
    for i in range(12):
        image = PatternCapture(224).frame()
        image[20:] = rng.integers(0, 256, (204, 224, 3), dtype=np.uint8)  # noise below: a hard frame to encode
        value = int(rng.integers(0, STAMP_MODULUS))
        encode_stamp(image, value)
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts, frame.time_base = i * 6000, __import__("fractions").Fraction(1, 90000)
        payloads, timestamp = encoder.encode(frame, force_keyframe=(i == 0))
        data = b"".join(vp8_depayload(p) for p in payloads)
        for out in decoder.decode(JitterFrame(data=data, timestamp=timestamp)):
            rgb = out.to_ndarray(format="rgb24")
            assert rgb.shape == (224, 224, 3)
            decoded.append(decode_stamp(rgb))
            values.append(value)
    assert len(decoded) >= 10 and decoded == values


def test_the_camera_renders_only_while_someone_watches():
    camera = CameraThread(PatternCapture(32), fps=50.0).start()
    seen = threading.Event()
    camera.add_listener(seen.set)
    try:
        time.sleep(0.2)
        assert camera.frames == 0 and camera.latest() is None  # nobody watches: no rendering at all
        camera.set_viewers(1)
        assert seen.wait(1.0)
        time.sleep(0.3)
        assert 8 <= camera.frames <= 25  # ~50 fps
        image, mono, unix, number = camera.latest()
        assert image.shape == (32, 32, 3) and number == camera.frames and abs(unix - time.time()) < 1.0
        camera.set_viewers(0)
        time.sleep(0.1)
        frames = camera.frames
        time.sleep(0.3)
        assert camera.frames == frames
    finally:
        camera.stop()


def test_the_stamp_goes_into_each_captured_frame():
    camera = CameraThread(PatternCapture(224), fps=30.0, stamp=True).start()
    camera.set_viewers(1)
    try:
        assert_wait(lambda: camera.latest() is not None)
        image, _, unix, _ = camera.latest()
        assert decode_stamp(image) == stamp_now(unix)
    finally:
        camera.stop()


def assert_wait(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_the_simulator_camera_has_its_own_renderer_and_barely_holds_the_control_thread():
    from robots.agent.environment import MetaWorldEnvironment

    env = MetaWorldEnvironment("reach-v3", camera="corner3", image_size=32, seed=0)
    capture = SimulatorCapture(lambda: env, size=224)
    camera = CameraThread(capture, fps=15.0).start()
    try:
        assert camera.prepare(env, timeout=30.0)  # the renderer is built ahead of the first viewer
        camera.set_viewers(1)
        waits = []
        for _ in range(30):  # the control thread: physics steps while the camera copies the scene
            started = time.perf_counter()
            with env.sim_lock:
                waits.append(time.perf_counter() - started)
            env.step(np.array([0.5, 0.0, 0.0, -1.0], dtype=np.float32))
            time.sleep(0.01)
        assert_wait(lambda: camera.frames >= 3)
        image = camera.latest()[0]
        assert image.shape == (224, 224, 3) and image.dtype == np.uint8 and image.std() > 10  # a real picture
        import mujoco

        assert capture._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] == 0  # the fast video settings ...
        assert capture._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SKYBOX] == 1  # ... and only those
        # One short lock per frame (update_scene; the render itself runs outside it). How short is a measurement,
        # not a test on this shared machine: ~0.02 ms typically (docs/agent.md).
        assert len(capture.lock_s) >= camera.frames - 1 and len(waits) == 30
        frames = camera.frames
        with env.sim_lock:  # while the control thread holds the simulator, the camera cannot copy the scene
            time.sleep(0.3)
            assert camera.frames <= frames + 1
        assert_wait(lambda: camera.frames > frames + 1)
    finally:
        camera.stop()
        env.close()


def test_a_robot_with_more_cameras_streams_them_side_by_side():
    from robots.agent.environment import MetaWorldEnvironment

    env = MetaWorldEnvironment("reach-v3", camera="corner3", image_size=32, seed=0, extra_cameras=("gripperPOV",))
    capture = SimulatorCapture(lambda: env, size=48)
    try:
        frame = capture.frame()
        assert frame.shape == (48, 96, 3)  # the primary, then the wrist view
        alone = SimulatorCapture(lambda: env, size=48, camera="corner3")
        env.extra_cameras, extra = (), env.extra_cameras
        try:
            np.testing.assert_array_equal(alone.frame(), frame[:, :48])  # same scene, same renderer settings
        finally:
            env.extra_cameras = extra
            alone.close()
        assert not np.array_equal(frame[:, :48], frame[:, 48:])
    finally:
        capture.close()
        env.close()
