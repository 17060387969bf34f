"""The robot agent's configuration: one frozen dataclass, built from the command line in ``__main__``."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit, urlunsplit

from robots.episode_file import CAMERA_NAME, EpisodeFileError, check_camera_names

AGENT_VERSION = "0.1.0"

# --policy value -> name reported to the server ("learned" reports the running checkpoint as "v<N>")
POLICY_NAMES = {"expert": "scripted-expert", "random": "random", "learned": "learned", "hold": "hold"}
FALLBACKS = ("idle", "expert")  # what --policy learned does until its first checkpoint arrives
SIM_EXPERTS = ("recovering", "metaworld")  # what the simulated operator drives with (supervisors.py)


@dataclasses.dataclass(frozen=True)
class AgentConfig:
    server: str  # base URL of the SOP web server, http(s)://host:port[/prefix]; the websocket URL is derived from it
    token: str = dataclasses.field(repr=False)  # the robot's bearer token; never logged, never in repr
    spool_dir: Path = Path("var/spool/robot")  # durable local store of episodes waiting for upload
    control_hz: float = 10.0  # nominal control rate of the episode loop
    policy: str = "expert"  # key of POLICY_NAMES: which Agent drives the robot
    noise: float = 0.0  # std of gaussian noise added to the scripted expert's action (then clipped to [-1, 1])
    image_size: int = 96  # rendered camera frames are image_size x image_size
    camera: str = "corner3"  # fixed camera recorded into the episode file
    # more cameras rendered and recorded beside it (observation/cameras/<name>; Meta-World has gripperPOV, corner,
    # corner2, topview, behindGripper). Each costs one more render per step (~10-15 ms at 96 px on this 2-core host)
    extra_cameras: tuple[str, ...] = ()
    episodes: Optional[int] = None  # stop after this many episodes are ended AND verified by the server (tests)
    run_timeout_s: float = 600.0  # with ``episodes``: give up (exit 1) if they are not all verified by then
    seed: Optional[int] = None  # seeds task variations, expert noise and the random policy; None = fresh entropy
    heartbeat_s: float = 5.0  # status period until the server's welcome says otherwise
    idle_poll_s: float = 0.1  # how often the control thread looks for a task while it has none
    backoff_initial_s: float = 0.5  # first reconnect / re-upload delay cap (full jitter below it)
    backoff_max_s: float = 30.0  # the delay cap stops doubling here
    upload_chunk_bytes: int = 4 * 1024 * 1024  # body size of one resumable PUT
    http_timeout_s: float = 30.0  # per HTTP request of the uploader
    agent_version: str = AGENT_VERSION  # reported in hello
    fallback: str = "idle"  # --policy learned before the first checkpoint: "idle" (wait) or "expert" (scripted expert)
    policy_download_attempts: int = 4  # tries per announced checkpoint (backoff between them) before giving up on it
    sim_operator: bool = False  # wrap the policy in the simulated operator gate (headless HG-DAgger)
    sim_patience: int = 15  # gate: steps without progress before it takes over
    sim_takeover_steps: int = 20  # gate: minimum length of a takeover before it hands back
    sim_handbacks: int = 1  # gate: hand-backs per episode; the takeover after the last one finishes the episode
    sim_late_fraction: float = 0.6  # gate: from this fraction of max_steps on, 5 stalled steps suffice; 0 = off
    sim_divergence: float = 1.6  # gate: mean |policy - expert| hand motion over sim_patience steps to take over; 0 off
    sim_expert: str = "recovering"  # gate: "recovering" (supervisors.py where a task has one) or "metaworld"
    video: bool = True  # serve the camera and the teleop data channel over WebRTC (docs/console.md)
    video_fps: float = 15.0  # camera frames per second while someone watches (independent of control_hz)
    video_size: int = 224  # the video frames are video_size x video_size
    video_stamp: bool = False  # write the capture time into each frame (glass-to-glass benchmark)
    max_viewers: int = 8  # WebRTC sessions at once; one more is answered with an error
    help_stall_steps: int = 15  # ask for help when the hand stays still this many steps under the policy; 0 = never
    help_still_m: float = 0.01  # "still": less net hand motion than this over help_stall_steps (metres)
    help_uncertainty: float = 0.0  # ask when the policy's re-plans disagree by more than this on average; 0 = off

    def __post_init__(self):
        scheme = urlsplit(self.server).scheme
        if scheme not in ("http", "https"):
            raise ValueError(f"--server must be an http:// or https:// URL, got {self.server!r}")
        if not self.token:
            raise ValueError("a robot token is required (--token or SOP_ROBOT_TOKEN)")
        if self.policy not in POLICY_NAMES:
            raise ValueError(f"policy must be one of {sorted(POLICY_NAMES)}")
        if self.control_hz <= 0 or self.image_size <= 0 or self.noise < 0:
            raise ValueError("control_hz and image_size must be positive, noise non-negative")
        if self.episodes is not None and self.episodes <= 0:
            raise ValueError("episodes must be positive")
        if not CAMERA_NAME.fullmatch(self.camera):
            raise ValueError(f"--camera {self.camera!r} is not a camera name ([A-Za-z0-9][A-Za-z0-9_-]*, at most 40)")
        try:
            check_camera_names(list(self.extra_cameras), self.camera)
        except EpisodeFileError as exc:
            raise ValueError(f"--extra-cameras: {exc}") from None
        if self.fallback not in FALLBACKS:
            raise ValueError(f"fallback must be one of {list(FALLBACKS)}")
        if self.sim_expert not in SIM_EXPERTS:
            raise ValueError(f"sim_expert must be one of {list(SIM_EXPERTS)}")
        if self.video_fps <= 0 or self.video_fps > 60 or not 16 <= self.video_size <= 1024 or self.max_viewers < 1:
            raise ValueError("video_fps must be in (0, 60], video_size in [16, 1024], max_viewers >= 1")
        if self.policy_download_attempts < 1:
            raise ValueError("policy_download_attempts must be >= 1")

    @property
    def server_url(self) -> str:
        """The server base URL without a trailing slash: API paths are appended to it."""
        return self.server.rstrip("/")

    @property
    def ws_url(self) -> str:
        """``http://host:port`` -> ``ws://host:port/ws/robots/`` (``https`` -> ``wss``), keeping any path prefix."""
        parts = urlsplit(self.server_url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        return urlunsplit((scheme, parts.netloc, parts.path + "/ws/robots/", "", ""))

    @property
    def policy_name(self) -> str:
        return POLICY_NAMES[self.policy]

    @property
    def policies_dir(self) -> Path:
        """Where checkpoints are downloaded, and the last one run is kept for the next start."""
        return self.spool_dir / "policies"

    @classmethod
    def debug(cls, server: str, token: str, spool_dir: Path, **overrides) -> "AgentConfig":
        """A preset for tests: fast rate, small frames, short backoffs, one chunk per few KiB to exercise resuming."""
        values = dict(
            control_hz=50.0,
            image_size=32,
            heartbeat_s=0.5,
            idle_poll_s=0.02,
            backoff_initial_s=0.05,
            backoff_max_s=0.2,
            upload_chunk_bytes=64 * 1024,
            http_timeout_s=5.0,
            run_timeout_s=60.0,
            seed=0,
        )
        values.update(overrides)
        return cls(server=server, token=token, spool_dir=Path(spool_dir), **values)
