"""The episode payload: one self-describing HDF5 file per episode, chunked per frame (schema: docs/episode_format.md).

Written by the robot agent at the end of an episode, verified by the server on upload, read lazily by the learner.
Pure core: numpy + h5py only, no Django.

The files come from robots, so they are untrusted: ``inspect_file`` (and ``EpisodeReader``, which runs the same
checks when it opens a file) refuses anything that is not exactly the schema before a single data byte is read:
links of any kind but hard links, external raw storage, virtual datasets, filters other than LZF on the images,
datasets whose declared size is not backed by storage inside the file (allocation bombs), extra members or
attributes, and attribute values outside their documented ranges. Every failure is an ``EpisodeFileError``. The
server runs these checks in a resource-limited child process (``robots.payload_check``), since libhdf5 parses the
hostile bytes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Optional

import h5py
import numpy as np

FORMAT = "sop-episode"
FORMAT_VERSION = 1

# attribute name -> python type; all are required in a valid file
ATTRIBUTES = {
    "episode_id": str,
    "robot": str,
    "task": str,
    "env_id": str,
    "prompt": str,
    "policy": str,
    "policy_version": int,  # -1 when the policy is not a checkpoint (scripted expert, random)
    "split": str,
    "outcome": str,
    "success": bool,
    "started_at": float,  # unix seconds
    "ended_at": float,
    "control_hz": float,  # nominal rate; actual step times are in /timestamp
    "camera": str,
}

# Optional attributes (added within format version 1; a file without them reads as the default): name -> default.
OPTIONAL_ATTRIBUTES = {
    "outcome_source": "robot",  # "robot": the environment / runtime decided the outcome; "operator": a console label
    "outcome_by": "",  # username of the operator who labelled the outcome, "" otherwise
}

# The attributes of the format itself (besides ATTRIBUTES and OPTIONAL_ATTRIBUTES). "interventions" may be absent
# (reads as no interventions), the others are required.
FORMAT_ATTRIBUTES = {"format": str, "format_version": int, "steps": int, "interventions": str}
ALL_ATTRIBUTES = {**FORMAT_ATTRIBUTES, **ATTRIBUTES, **{k: str for k in OPTIONAL_ATTRIBUTES}}

# dataset path -> (dtype, ndim); every dataset has exactly `steps` rows
DATASETS = {
    "observation/image": (np.dtype(np.uint8), 4),
    "observation/state": (np.dtype(np.float32), 2),
    "action": (np.dtype(np.float32), 2),
    "control_source": (np.dtype(np.uint8), 1),
    "reward": (np.dtype(np.float32), 1),
    "success": (np.dtype(np.bool_), 1),
    "timestamp": (np.dtype(np.float64), 1),
}
IMAGE = "observation/image"
# group path -> its members, exactly ("" is the root group)
GROUPS = {
    "": {"observation", "action", "control_source", "reward", "success", "timestamp"},
    "observation": {"image", "state"},
}
# More cameras (optional; a file without them has no such group): "observation/cameras/<name>", each a dataset like
# observation/image (uint8 [T, H, W, 3], one frame per chunk, LZF or none; its own H and W). observation/image is the
# primary camera, named by the "camera" attribute; the names here are the others, never the primary's.
CAMERAS = "observation/cameras"
MAX_EXTRA_CAMERAS = 4
CAMERA_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,39}")

# protocol.ControlSource values and CONTROL_SOURCE_CODES (not imported: protocol pulls in more than this core needs
# and the checker child should import as little as possible; tests/robots/test_payload_check.py keeps them equal).
POLICY_CODE = 0
SEGMENT_SOURCES = {"operator": 1, "sim_operator": 2}
OUTCOMES = {"success", "failure", "timeout", "aborted"}  # protocol.Outcome
SPLITS = {"offline", "online", "eval"}  # protocol.Split
OUTCOME_SOURCES = {"robot", "operator"}

LZF_FILTER = 32000  # h5py's LZF (h5py.h5z.FILTER_LZF)
MAX_JSON_DEPTH = 4  # interventions: a list of flat objects is depth 2

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_IDENTIFIER = re.compile(r"[a-z0-9][a-z0-9_-]{0,99}")
_TEXT_LIMITS = {"prompt": 500, "env_id": 100, "policy": 100, "camera": 100, "outcome_by": 150}
_SEGMENT_KEYS = {"start", "end", "source", "operator", "reason", "lease"}


class EpisodeFileError(ValueError):
    """The file is not a valid episode payload."""


@dataclasses.dataclass(frozen=True)
class Limits:
    """Bounds on what a valid episode file may declare; everything is checked before any data is read.

    ``max_decoded_bytes`` bounds the uncompressed size of all datasets together (what reading the whole episode
    allocates after LZF decompression), ``max_chunk_bytes`` the uncompressed size of one chunk (what reading a
    single frame allocates). ``chunk_slack_bytes`` is how much larger than its raw size a compressed chunk may be
    stored (LZF never needs more; h5py stores an incompressible chunk raw instead)."""

    max_steps: int = 100_000
    max_image_side: int = 1024
    max_state_dim: int = 4096
    max_action_dim: int = 64
    max_decoded_bytes: int = 2 * 1024**3
    max_chunk_bytes: int = 16 * 1024**2
    chunk_slack_bytes: int = 1024
    max_attribute_bytes: int = 4 * 1024
    max_interventions_bytes: int = 2 * 1024**2
    max_segments: int = 10_000

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if type(value) is not int or value < 0:
                raise ValueError(f"Limits.{field.name} must be a non-negative int, got {value!r}")

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Optional[dict[str, Any]]) -> "Limits":
        values = dict(values or {})
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown limits {sorted(unknown)}")
        return cls(**values)


DEFAULT_LIMITS = Limits()


@dataclasses.dataclass
class Segment:
    """A run of steps [start, end) driven by someone other than the policy."""

    start: int
    end: int
    source: str  # protocol.ControlSource value: "operator" or "sim_operator"
    operator: str = ""  # username for a human operator
    reason: str = ""
    lease: Optional[int] = None  # the takeover lease id the robot obeyed (human operator), None if not known


@dataclasses.dataclass
class EpisodeData:
    """An episode in memory, as the agent's recorder builds it."""

    meta: dict[str, Any]  # the ATTRIBUTES
    images: np.ndarray  # uint8 [T, H, W, 3]
    states: np.ndarray  # float32 [T, S]
    actions: np.ndarray  # float32 [T, A]  the EXECUTED action
    control_source: np.ndarray  # uint8 [T]  protocol.CONTROL_SOURCE_CODES
    rewards: np.ndarray  # float32 [T]
    successes: np.ndarray  # bool [T]   the environment's success flag after the step
    timestamps: np.ndarray  # float64 [T] seconds since the episode started, measured, never nominal
    segments: list[Segment] = dataclasses.field(default_factory=list)
    cameras: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # more cameras: name -> uint8 [T,H,W,3]

    @property
    def steps(self) -> int:
        return int(self.actions.shape[0])


def write_episode(path: str | os.PathLike, data: EpisodeData, limits: Limits = DEFAULT_LIMITS) -> None:
    """Write atomically: a temp file beside ``path``, fsync, rename. A reader never sees a half-written file.

    This is the reference writer: it refuses (``EpisodeFileError``, before writing anything) an episode that
    ``inspect_file`` would refuse under ``limits``."""
    path = Path(path)
    _check_arrays(data, limits)
    try:
        attrs = {key: kind(data.meta[key]) for key, kind in ATTRIBUTES.items()}
    except KeyError as exc:
        raise EpisodeFileError(f"missing attribute {exc}") from None
    except (TypeError, ValueError) as exc:
        raise EpisodeFileError(f"bad attribute value: {exc}") from None
    attrs.update({key: str(data.meta[key]) for key in OPTIONAL_ATTRIBUTES if key in data.meta})
    check_attribute_values({**attrs, "format": FORMAT, "format_version": FORMAT_VERSION, "steps": data.steps}, limits)
    interventions = json.dumps([dataclasses.asdict(s) for s in data.segments])
    if len(interventions.encode("utf-8")) > limits.max_interventions_bytes:
        raise EpisodeFileError(f"the interventions take more than {limits.max_interventions_bytes} bytes")
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w", libver="latest") as f:
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        for key, value in attrs.items():
            f.attrs[key] = value
        f.attrs["steps"] = data.steps
        f.attrs["interventions"] = interventions
        t, h, w, c = data.images.shape
        # One chunk per frame: the sampler reads a single frame without touching the rest. LZF is fast enough for
        # the agent's background writer and roughly halves rendered frames.
        f.create_dataset("observation/image", data=data.images, chunks=(1, h, w, c), compression="lzf")
        for name, frames in sorted(data.cameras.items()):
            f.create_dataset(f"{CAMERAS}/{name}", data=frames, chunks=(1, *frames.shape[1:]), compression="lzf")
        f.create_dataset("observation/state", data=data.states.astype(np.float32))
        f.create_dataset("action", data=data.actions.astype(np.float32))
        f.create_dataset("control_source", data=data.control_source.astype(np.uint8))
        f.create_dataset("reward", data=data.rewards.astype(np.float32))
        f.create_dataset("success", data=data.successes.astype(bool))
        f.create_dataset("timestamp", data=data.timestamps.astype(np.float64))
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _check_arrays(data: EpisodeData, limits: Limits) -> None:
    t = data.steps
    if t == 0:
        raise EpisodeFileError("an episode needs at least one step")
    if t > limits.max_steps:
        raise EpisodeFileError(f"{t} steps, more than the {limits.max_steps} allowed")
    if data.images.dtype != np.uint8 or data.images.ndim != 4 or data.images.shape[-1] != 3:
        raise EpisodeFileError(f"images must be uint8 [T,H,W,3], got {data.images.dtype} {data.images.shape}")
    for name, ndim in (("states", 2), ("actions", 2), ("control_source", 1), ("rewards", 1), ("successes", 1),
                       ("timestamps", 1)):
        arr = getattr(data, name)
        if arr.ndim != ndim:
            raise EpisodeFileError(f"{name} must have {ndim} dimensions, got shape {arr.shape}")
    for name in ("images", "states", "actions", "control_source", "rewards", "successes", "timestamps"):
        arr = getattr(data, name)
        if arr.shape[0] != t:
            raise EpisodeFileError(f"{name} has {arr.shape[0]} rows, expected {t}")
    _check_dims(data.images.shape, data.states.shape, data.actions.shape, limits)
    check_camera_names(list(data.cameras), str(data.meta.get("camera", "")))
    for name, frames in data.cameras.items():
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] != t:
            raise EpisodeFileError(f"camera {name!r}: frames must be uint8 [{t},H,W,3], got {frames.dtype} "
                                   f"{frames.shape}")
        _check_image_shape(frames.shape, limits, f"camera {name!r}")
    if _decoded_bytes_of_arrays(data) > limits.max_decoded_bytes:
        raise EpisodeFileError(f"the episode takes more than {limits.max_decoded_bytes} bytes")
    for seg in data.segments:
        if not (0 <= seg.start < seg.end <= t):
            raise EpisodeFileError(f"intervention segment [{seg.start}, {seg.end}) outside [0, {t})")
    check_segments(data.segments, t, limits)
    codes = np.asarray(data.control_source)
    if not np.issubdtype(codes.dtype, np.integer) and codes.dtype != np.bool_:
        raise EpisodeFileError(f"control_source must be integer codes, got {codes.dtype}")
    check_control_source(codes, data.segments)


def _decoded_bytes_of_arrays(data: EpisodeData) -> int:
    t = data.steps
    per_step = (int(np.prod(data.images.shape[1:])) + 4 * data.states.shape[1] + 4 * data.actions.shape[1]
                + 1 + 4 + 1 + 8 + sum(int(np.prod(frames.shape[1:])) for frames in data.cameras.values()))
    return t * per_step


def check_camera_names(names: list[str], primary: str) -> None:
    """The names of the cameras besides the primary: at most ``MAX_EXTRA_CAMERAS``, each ``CAMERA_NAME``, none the
    primary's (that one is observation/image)."""
    if len(names) > MAX_EXTRA_CAMERAS:
        raise EpisodeFileError(f"{len(names)} more cameras; the format allows {MAX_EXTRA_CAMERAS} besides the primary")
    for name in names:
        if not isinstance(name, str) or not CAMERA_NAME.fullmatch(name):
            raise EpisodeFileError(f"camera name {_short(name)} is not [A-Za-z0-9][A-Za-z0-9_-]* (at most 40)")
        if name == primary:
            raise EpisodeFileError(f"camera {name!r} is the primary camera (observation/image); it is not repeated")


def _check_image_shape(shape: tuple, limits: Limits, what: str = "images") -> None:
    _, h, w, c = shape
    if not (1 <= h <= limits.max_image_side and 1 <= w <= limits.max_image_side and c == 3):
        raise EpisodeFileError(f"{what} are {h}x{w}x{c}: expected HxWx3 with 1 <= H, W <= {limits.max_image_side}")


def _check_dims(image_shape: tuple, state_shape: tuple, action_shape: tuple, limits: Limits) -> None:
    _check_image_shape(image_shape, limits)
    if not 1 <= state_shape[1] <= limits.max_state_dim:
        raise EpisodeFileError(f"state dimension {state_shape[1]} outside [1, {limits.max_state_dim}]")
    if not 1 <= action_shape[1] <= limits.max_action_dim:
        raise EpisodeFileError(f"action dimension {action_shape[1]} outside [1, {limits.max_action_dim}]")


# ---------------------------------------------------------------------------------------------- value checks
# Shared by the reader (on the attributes it read), the writer (on what it is about to write) and the payload
# checker's parent (on the metadata the child sends back).


def check_attribute_values(attrs: dict[str, Any], limits: Limits = DEFAULT_LIMITS) -> None:
    """Refuse root attribute values outside the schema. ``attrs`` maps names to Python values (str, int, float,
    bool); the optional attributes may be absent, ``interventions`` is checked by ``parse_interventions``."""
    if attrs.get("format") != FORMAT:
        raise EpisodeFileError(f"missing format attribute {FORMAT!r}")
    if attrs.get("format_version") != FORMAT_VERSION or type(attrs.get("format_version")) is not int:
        raise EpisodeFileError(f"unsupported format_version {_short(attrs.get('format_version'))}")
    for key in ("steps", *ATTRIBUTES):
        if key not in attrs:
            raise EpisodeFileError(f"missing attribute {key!r}")
    for key, value in attrs.items():
        kind = ALL_ATTRIBUTES.get(key)
        if kind is None:
            raise EpisodeFileError(f"unknown attribute {_short(key)} (the format has no such attribute)")
        if type(value) is not kind:
            raise EpisodeFileError(f"attribute {key!r} must be {kind.__name__}, got {type(value).__name__}")
        if kind is str:
            _check_text(f"attribute {key!r}", value,
                        limits.max_interventions_bytes if key == "interventions" else limits.max_attribute_bytes)
        elif kind is float and not math.isfinite(value):
            raise EpisodeFileError(f"attribute {key!r} is {value}, not a finite number")
    steps = attrs["steps"]
    if not 1 <= steps <= limits.max_steps:
        raise EpisodeFileError(f"steps is {steps}: expected 1 to {limits.max_steps}")
    if not _UUID.fullmatch(attrs["episode_id"]):
        raise EpisodeFileError(f"episode_id {_short(attrs['episode_id'])} is not a lowercase UUID")
    for key in ("robot", "task"):
        if not _IDENTIFIER.fullmatch(attrs[key]):
            raise EpisodeFileError(f"{key} {_short(attrs[key])} is not a lowercase identifier ([a-z0-9][a-z0-9_-]*, "
                                   f"at most 100 characters)")
    for key, most in _TEXT_LIMITS.items():
        if key in attrs and len(attrs[key]) > most:
            raise EpisodeFileError(f"{key} has {len(attrs[key])} characters, more than {most}")
    for key, allowed in (("outcome", OUTCOMES), ("split", SPLITS), ("outcome_source", OUTCOME_SOURCES)):
        if key in attrs and attrs[key] not in allowed:
            raise EpisodeFileError(f"{key} {_short(attrs[key])} is not one of {sorted(allowed)}")
    if not 0 < attrs["control_hz"] <= 1000:
        raise EpisodeFileError(f"control_hz {attrs['control_hz']} outside (0, 1000]")
    if attrs["started_at"] > attrs["ended_at"]:
        raise EpisodeFileError(f"started_at {attrs['started_at']} is after ended_at {attrs['ended_at']}")
    if attrs["policy_version"] < -1:
        raise EpisodeFileError(f"policy_version {attrs['policy_version']} < -1")


def _check_text(what: str, value: str, max_bytes: int) -> None:
    try:
        encoded = value.encode("utf-8")
    except UnicodeEncodeError:
        raise EpisodeFileError(f"{what} is not valid UTF-8") from None
    if len(encoded) > max_bytes:
        raise EpisodeFileError(f"{what} takes {len(encoded)} bytes, more than {max_bytes}")
    if "\x00" in value:
        raise EpisodeFileError(f"{what} contains a NUL character")


def _short(value: Any, most: int = 80) -> str:
    """repr() of an untrusted value, cut for an error message."""
    text = repr(value)
    return text if len(text) <= most else text[:most] + "...'"


_JSON_STRINGS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")


def _json_depth(text: str) -> int:
    """The deepest nesting of brackets outside strings, in linear time and without recursion."""
    brackets = _NOT_BRACKETS.sub("", _JSON_STRINGS.sub("", text))
    if not brackets:
        return 0
    raw = np.frombuffer(brackets.encode("ascii"), dtype=np.uint8)
    return int(np.cumsum(np.where((raw == ord("[")) | (raw == ord("{")), 1, -1)).max())


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate key in an object")
    return result


def parse_interventions(text: str, steps: int, limits: Limits = DEFAULT_LIMITS) -> list[Segment]:
    """The ``interventions`` attribute (a JSON list of segments) as ``Segment``s, checked by ``check_segments``."""
    _check_text("the interventions attribute", text, limits.max_interventions_bytes)
    depth = _json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise EpisodeFileError(f"bad interventions attribute: JSON nested {depth} deep, at most {MAX_JSON_DEPTH}")
    try:
        doc = json.loads(text, parse_constant=_refuse_constant, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as exc:
        raise EpisodeFileError(f"bad interventions attribute: {str(exc)[:200]}") from None
    return segments_from_json(doc, steps, limits)


def segments_from_json(doc: Any, steps: int, limits: Limits = DEFAULT_LIMITS) -> list[Segment]:
    """Segments from parsed JSON (a list of objects), checked by ``check_segments``."""
    if not isinstance(doc, list):
        raise EpisodeFileError("bad interventions attribute: not a JSON list")
    if len(doc) > limits.max_segments:
        raise EpisodeFileError(f"{len(doc)} intervention segments, more than {limits.max_segments}")
    segments = []
    for i, item in enumerate(doc):
        if not isinstance(item, dict):
            raise EpisodeFileError(f"bad interventions attribute: segment {i} is not an object")
        unknown = set(item) - _SEGMENT_KEYS
        if unknown:
            raise EpisodeFileError(f"bad interventions attribute: segment {i} has unknown fields "
                                   f"{_short(sorted(unknown))}")
        missing = {"start", "end", "source"} - set(item)
        if missing:
            raise EpisodeFileError(f"bad interventions attribute: segment {i} lacks {sorted(missing)}")
        segments.append(Segment(start=item["start"], end=item["end"], source=item["source"],
                                operator=item.get("operator", ""), reason=item.get("reason", ""),
                                lease=item.get("lease")))
    check_segments(segments, steps, limits)
    return segments


def check_segments(segments: list[Segment], steps: int, limits: Limits = DEFAULT_LIMITS) -> None:
    """Types and ranges of intervention segments; they must lie in [0, steps) and not overlap."""
    if len(segments) > limits.max_segments:
        raise EpisodeFileError(f"{len(segments)} intervention segments, more than {limits.max_segments}")
    for i, seg in enumerate(segments):
        if type(seg.start) is not int or type(seg.end) is not int:
            raise EpisodeFileError(f"intervention segment {i}: start and end must be integers")
        if not (0 <= seg.start < seg.end <= steps):
            raise EpisodeFileError(f"intervention segment [{seg.start}, {seg.end}) outside the episode "
                                   f"[0, {steps})")
        if type(seg.source) is not str or seg.source not in SEGMENT_SOURCES:
            raise EpisodeFileError(f"intervention segment {i}: source {_short(seg.source)} is not one of "
                                   f"{sorted(SEGMENT_SOURCES)}")
        for name, most in (("operator", 150), ("reason", 500)):
            value = getattr(seg, name)
            if type(value) is not str:
                raise EpisodeFileError(f"intervention segment {i}: {name} must be a string")
            _check_text(f"intervention segment {i}: {name}", value, 4 * most)
            if len(value) > most:
                raise EpisodeFileError(f"intervention segment {i}: {name} has more than {most} characters")
        if seg.lease is not None and (type(seg.lease) is not int or seg.lease < 1):
            raise EpisodeFileError(f"intervention segment {i}: lease must be null or an integer >= 1")
    ordered = sorted(segments, key=lambda s: s.start)
    for before, after in zip(ordered, ordered[1:]):
        if after.start < before.end:
            raise EpisodeFileError(f"intervention segments [{before.start}, {before.end}) and "
                                   f"[{after.start}, {after.end}) overlap")


def check_control_source(codes: np.ndarray, segments: list[Segment]) -> None:
    """``control_source`` codes must be 0/1/2 and agree with the segments: a step inside an "operator" segment has
    code 1, inside a "sim_operator" one code 2, outside every segment 0 (the policy)."""
    codes = np.asarray(codes)
    bad = np.flatnonzero((codes < 0) | (codes > max(SEGMENT_SOURCES.values())))
    if bad.size:
        raise EpisodeFileError(f"control_source[{bad[0]}] is {int(codes[bad[0]])}: expected 0, 1 or 2")
    expected = np.full(codes.shape[0], POLICY_CODE, dtype=np.uint8)
    for seg in segments:
        expected[seg.start:seg.end] = SEGMENT_SOURCES[seg.source]
    wrong = np.flatnonzero(expected != codes)
    if wrong.size:
        i = int(wrong[0])
        raise EpisodeFileError(f"control_source disagrees with the interventions: step {i} has code "
                               f"{int(codes[i])}, the interventions say {int(expected[i])}")


# ---------------------------------------------------------------------------------------------- structure checks

_FILTER_NAMES = {1: "gzip", 2: "shuffle", 3: "fletcher32", 4: "szip", 5: "nbit", 6: "scaleoffset", LZF_FILTER: "lzf"}


def inspect_file(path: str | os.PathLike, limits: Limits = DEFAULT_LIMITS) -> dict[str, Any]:
    """Validate an untrusted episode file and return its metadata; raises ``EpisodeFileError`` and nothing else.

    The result is ``EpisodeReader.meta`` with ``segments`` as plain dicts, so it is JSON-serialisable:
    the ``ATTRIBUTES``, the ``OPTIONAL_ATTRIBUTES`` (defaults filled in), ``steps``, ``segments``, ``image_shape``
    (H, W, 3), ``cameras`` (the more cameras: name -> (H, W, 3); empty for most files), ``state_dim``, ``action_dim``, ``decoded_bytes`` (all datasets uncompressed) and ``file_bytes``."""
    f = _open(Path(path))
    try:
        meta = _inspect(f, limits)
    finally:
        try:
            f.close()
        except Exception:  # a hostile file may fail to close cleanly; the result stands
            pass
    meta["segments"] = [dataclasses.asdict(s) for s in meta["segments"]]
    return meta


def _open(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except Exception as exc:
        raise EpisodeFileError(f"not an HDF5 file: {str(exc)[:200]}") from None


def _inspect(f: h5py.File, limits: Limits) -> dict[str, Any]:
    """All checks on an open file; any exception of h5py / numpy becomes an ``EpisodeFileError``."""
    try:
        return _inspect_unchecked(f, limits)
    except EpisodeFileError:
        raise
    except Exception as exc:  # untrusted bytes: whatever libhdf5 or numpy throws, the file is at fault
        raise EpisodeFileError(f"unreadable episode file: {type(exc).__name__}: {str(exc)[:200]}") from None


def _inspect_unchecked(f: h5py.File, limits: Limits) -> dict[str, Any]:
    file_size = _file_size(f)
    attrs = _read_root_attributes(f, limits)
    check_attribute_values(attrs, limits)
    steps = attrs["steps"]
    datasets = _datasets(f, attrs["camera"])
    decoded = 0
    for name, ds in datasets.items():
        decoded += _check_dataset(name, ds, steps, file_size, limits)
    shapes = {name: ds.shape for name, ds in datasets.items()}
    _check_dims(shapes[IMAGE], shapes["observation/state"], shapes["action"], limits)
    cameras = {name[len(CAMERAS) + 1:]: tuple(int(n) for n in shape[1:])
               for name, shape in shapes.items() if _is_camera(name)}
    for name, shape in cameras.items():
        _check_image_shape((steps, *shape), limits, f"camera {name!r}")
    if decoded > limits.max_decoded_bytes:
        raise EpisodeFileError(f"the datasets take {decoded} bytes uncompressed, more than the "
                               f"{limits.max_decoded_bytes} allowed")
    # The structure is sound: the small 1-D columns may be read (at most max_steps bytes each).
    successes = datasets["success"][()]
    if successes.view(np.uint8).max(initial=0) > 1:
        raise EpisodeFileError("dataset 'success' holds values other than 0 and 1")
    segments = parse_interventions(attrs.get("interventions", "[]"), steps, limits)
    check_control_source(datasets["control_source"][()], segments)
    meta: dict[str, Any] = {key: attrs[key] for key in ATTRIBUTES}
    meta.update({key: attrs.get(key, default) for key, default in OPTIONAL_ATTRIBUTES.items()})
    meta.update(
        steps=steps,
        segments=segments,
        image_shape=tuple(int(n) for n in shapes[IMAGE][1:]),
        cameras=cameras,
        state_dim=int(shapes["observation/state"][1]),
        action_dim=int(shapes["action"][1]),
        decoded_bytes=int(decoded),
        file_bytes=int(file_size),
    )
    return meta


def _file_size(f: h5py.File) -> int:
    """The size of the file HDF5 has open (fstat of its descriptor: no race with the path)."""
    try:
        return os.fstat(f.id.get_vfd_handle()).st_size
    except (TypeError, ValueError, OSError):
        return int(f.id.get_filesize())


def _read_root_attributes(f: h5py.File, limits: Limits) -> dict[str, Any]:
    attrs = f.attrs
    count = len(attrs)
    if count > len(ALL_ATTRIBUTES):
        raise EpisodeFileError(f"the file has {count} attributes; the format has {len(ALL_ATTRIBUTES)}")
    result: dict[str, Any] = {}
    for key in ("format", "format_version"):  # first, so that a foreign file is named as such
        if key not in attrs:
            raise EpisodeFileError(f"missing format attribute {FORMAT!r}" if key == "format"
                                   else "missing attribute 'format_version'")
        result[key] = _read_attribute(attrs, key, limits)
    if result["format"] != FORMAT:
        raise EpisodeFileError(f"missing format attribute {FORMAT!r}")
    if type(result["format_version"]) is not int or result["format_version"] != FORMAT_VERSION:
        raise EpisodeFileError(f"unsupported format_version {_short(result['format_version'])}")
    names = list(attrs)
    unknown = [n for n in names if n not in ALL_ATTRIBUTES]
    if unknown:
        raise EpisodeFileError(f"unknown attribute {_short(unknown[0])} (the format has no such attribute)")
    for key in names:
        if key not in result:
            result[key] = _read_attribute(attrs, key, limits)
    return result


def _read_attribute(attrs: h5py.AttributeManager, key: str, limits: Limits) -> Any:
    """One root attribute as a Python value; its shape, type and stored size are checked before it is read."""
    kind = ALL_ATTRIBUTES[key]
    max_bytes = limits.max_interventions_bytes if key == "interventions" else limits.max_attribute_bytes
    aid = attrs.get_id(key)
    if aid.get_space().get_simple_extent_type() != h5py.h5s.SCALAR:
        raise EpisodeFileError(f"attribute {key!r} must be a scalar, not an array")
    tid = aid.get_type()
    cls = tid.get_class()
    if kind is str:
        if cls != h5py.h5t.STRING:
            raise EpisodeFileError(f"attribute {key!r} must be a string")
        if not tid.is_variable_str() and tid.get_size() > max_bytes:
            raise EpisodeFileError(f"attribute {key!r} takes {tid.get_size()} bytes, more than {max_bytes}")
        value = attrs[key]
        if isinstance(value, (bytes, np.bytes_)):
            try:
                value = bytes(value).decode("utf-8")
            except UnicodeDecodeError:
                raise EpisodeFileError(f"attribute {key!r} is not valid UTF-8") from None
        if not isinstance(value, str):
            raise EpisodeFileError(f"attribute {key!r} must be a string")
        value = str(value)
        _check_text(f"attribute {key!r}", value, max_bytes)
        return value
    if kind is bool:
        if cls != h5py.h5t.ENUM or aid.dtype != np.bool_:
            raise EpisodeFileError(f"attribute {key!r} must be a bool")
        return bool(attrs[key])
    if kind is int:
        if cls != h5py.h5t.INTEGER or tid.get_size() > 8:
            raise EpisodeFileError(f"attribute {key!r} must be an integer")
        return int(attrs[key])
    if cls != h5py.h5t.FLOAT or tid.get_size() > 8:
        raise EpisodeFileError(f"attribute {key!r} must be a float")
    return float(attrs[key])


def _is_camera(name: str) -> bool:
    return name.startswith(CAMERAS + "/")


def _is_image(name: str) -> bool:
    return name == IMAGE or _is_camera(name)


def _datasets(f: h5py.File, primary_camera: str) -> dict[str, h5py.Dataset]:
    """The schema's datasets, found through hard links only; every link is inspected before it is followed. The
    more-cameras group is optional, its members are the cameras it names (``check_camera_names``)."""
    found: dict[str, Any] = {}
    seen_objects: set[tuple[int, int]] = set()

    def expected_members(group: h5py.Group, path: str) -> set[str]:
        if path == "observation" and "cameras" in group:  # a name lookup: nothing is followed yet
            return GROUPS[path] | {"cameras"}
        if path == CAMERAS:
            count = len(group)
            if not 1 <= count <= MAX_EXTRA_CAMERAS:
                raise EpisodeFileError(f"group '/{CAMERAS}' has {count} members; the format allows 1 to "
                                       f"{MAX_EXTRA_CAMERAS} cameras")
            names = list(group)
            check_camera_names(names, primary_camera)
            return set(names)
        return GROUPS[path]

    def members(group: h5py.Group, path: str) -> None:
        expected = expected_members(group, path)
        count = len(group)
        names = list(group) if count <= 4 * len(expected) else []
        for name in names:
            if name not in expected:
                raise EpisodeFileError(f"unexpected member {_short('/' + path + '/' + name if path else '/' + name)}"
                                       f" (the format has no such group or dataset)")
        if count != len(expected) or not names:
            missing = sorted(expected - set(names))
            if count > len(expected) or not missing:
                raise EpisodeFileError(f"group '/{path}' has {count} members; the format has {len(expected)}")
            full = f"{path}/{missing[0]}" if path else missing[0]
            raise EpisodeFileError(f"missing {'group' if full in GROUPS else 'dataset'} {full!r}")
        for name in sorted(names):
            full = f"{path}/{name}" if path else name
            try:
                link = group.get(name, getlink=True)
            except (TypeError, KeyError) as exc:
                raise EpisodeFileError(f"'/{full}' is an unsupported kind of link ({exc})") from None
            if not isinstance(link, h5py.HardLink):
                kind = {h5py.SoftLink: "a soft link", h5py.ExternalLink: "an external link"}.get(type(link), "a link")
                raise EpisodeFileError(f"'/{full}' is {kind}; only plain (hard-linked) groups and datasets are "
                                       f"allowed")
            try:
                obj = group[name]
            except Exception as exc:  # libhdf5 checks the object header (and a contiguous dataset's extent)
                raise EpisodeFileError(f"'/{full}' cannot be opened: {str(exc)[:200]}") from None
            info = h5py.h5o.get_info(obj.id)
            if (info.fileno, info.addr) in seen_objects:
                raise EpisodeFileError(f"'/{full}' is another name of an object already seen")
            seen_objects.add((info.fileno, info.addr))
            if len(obj.attrs):
                raise EpisodeFileError(f"'/{full}' has attributes; only the root group has any")
            if full in GROUPS or full == CAMERAS:
                if not isinstance(obj, h5py.Group):
                    raise EpisodeFileError(f"'/{full}' must be a group")
                members(obj, full)
            elif not isinstance(obj, h5py.Dataset):
                raise EpisodeFileError(f"missing dataset {full!r} ('/{full}' is not a dataset)")
            else:
                found[full] = obj

    members(f, "")
    return {**{name: found[name] for name in DATASETS}, **{name: found[name] for name in sorted(found)
                                                            if _is_camera(name)}}


def _check_dataset(name: str, ds: h5py.Dataset, steps: int, file_size: int, limits: Limits) -> int:
    """Type, shape, layout, filters and storage of one dataset, from its header only. Returns its decoded size."""
    dtype, ndim = DATASETS[IMAGE if _is_camera(name) else name]
    dsid = ds.id
    space = dsid.get_space()
    if space.get_simple_extent_type() != h5py.h5s.SIMPLE:
        raise EpisodeFileError(f"dataset {name!r} is not an array (null or scalar dataspace)")
    shape = tuple(int(n) for n in space.shape)
    tid = dsid.get_type()
    if tid.committed():
        raise EpisodeFileError(f"dataset {name!r} uses a named (user-defined) datatype")
    try:
        actual = ds.dtype
    except Exception:
        actual = "an unsupported type"
    if actual != dtype or len(shape) != ndim or shape[0] != steps:
        raise EpisodeFileError(f"dataset {name!r} is {actual}{shape}, expected {dtype} with {steps} rows "
                               f"({ndim} dimensions)")
    if not tid.equal(h5py.h5t.py_create(dtype)):
        raise EpisodeFileError(f"dataset {name!r} is not stored as little-endian {dtype}")
    if any(n < 1 for n in shape):
        raise EpisodeFileError(f"dataset {name!r} has an empty dimension: {shape}")
    itemsize = dtype.itemsize
    nbytes = math.prod(shape) * itemsize
    if nbytes > limits.max_decoded_bytes:
        raise EpisodeFileError(f"dataset {name!r} declares {nbytes} bytes, more than the "
                               f"{limits.max_decoded_bytes} allowed")

    dcpl = dsid.get_create_plist()
    if dcpl.get_external_count():
        raise EpisodeFileError(f"dataset {name!r} uses external raw storage (data in another file); refused")
    layout = dcpl.get_layout()
    if layout == h5py.h5d.VIRTUAL:
        raise EpisodeFileError(f"dataset {name!r} is a virtual dataset (data mapped from other datasets); refused")
    if layout == h5py.h5d.COMPACT:
        raise EpisodeFileError(f"dataset {name!r} has the compact layout; the format uses contiguous or chunked "
                               f"storage only")
    if layout not in (h5py.h5d.CONTIGUOUS, h5py.h5d.CHUNKED):
        raise EpisodeFileError(f"dataset {name!r} has an unknown storage layout {layout}")
    filters = [dcpl.get_filter(i) for i in range(dcpl.get_nfilters())]
    codes = [int(flt[0]) for flt in filters]
    allowed = ([], [LZF_FILTER]) if _is_image(name) else ([],)
    if codes not in allowed:
        names = ", ".join(_FILTER_NAMES.get(c, f"unknown filter {c}") for c in codes)
        raise EpisodeFileError(f"dataset {name!r} uses the filter(s) {names}; the format allows "
                               f"{'LZF or no filter on images' if _is_image(name) else 'no filter'} here")

    if layout == h5py.h5d.CONTIGUOUS:
        if _is_image(name):
            raise EpisodeFileError(f"dataset {name!r} must be chunked one frame per chunk")
        if codes:
            raise EpisodeFileError(f"dataset {name!r} is contiguous but has a filter pipeline")
        offset, stored = dsid.get_offset(), dsid.get_storage_size()
        if offset is None or stored != nbytes:
            raise EpisodeFileError(f"dataset {name!r} declares {nbytes} bytes but the file stores {stored} "
                                   f"(not fully allocated)")
        if offset < 0 or offset + nbytes > file_size:
            raise EpisodeFileError(f"dataset {name!r} lies outside the file ({nbytes} bytes at offset {offset}, "
                                   f"file of {file_size} bytes)")
        return nbytes

    chunks = tuple(int(n) for n in dcpl.get_chunk())
    if len(chunks) != ndim or any(c < 1 for c in chunks):
        raise EpisodeFileError(f"dataset {name!r} has invalid chunks {chunks}")
    if _is_image(name) and chunks != (1, *shape[1:]):
        raise EpisodeFileError(f"dataset {name!r} has chunks {chunks}, expected one frame per chunk "
                               f"{(1, *shape[1:])}")
    chunk_bytes = math.prod(chunks) * itemsize
    if chunk_bytes > limits.max_chunk_bytes:
        raise EpisodeFileError(f"dataset {name!r} has chunks of {chunk_bytes} bytes, more than the "
                               f"{limits.max_chunk_bytes} allowed")
    n_chunks = math.prod(-(-s // c) for s, c in zip(shape, chunks))
    if n_chunks > steps:
        raise EpisodeFileError(f"dataset {name!r} has {n_chunks} chunks for {steps} steps (chunks {chunks} are "
                               f"smaller than a row)")
    compressed = bool(codes)
    if compressed:
        values = tuple(filters[0][2])
        # h5py's LZF filter sizes its decompression buffer from cd_values[2], the raw chunk size.
        if len(values) > 3 or (len(values) == 3 and values[2] != chunk_bytes):
            raise EpisodeFileError(f"dataset {name!r}: LZF parameters {values} do not match its chunks")
    _check_chunks(name, dsid, shape, chunks, n_chunks, chunk_bytes, compressed, file_size, limits)
    return n_chunks * chunk_bytes


def _check_chunks(name: str, dsid: h5py.h5d.DatasetID, shape: tuple, chunks: tuple, n_chunks: int, chunk_bytes: int,
                  compressed: bool, file_size: int, limits: Limits) -> None:
    """Every chunk written, once, inside the file, no larger than it can be: one pass over the chunk index."""
    seen: set[tuple[int, ...]] = set()
    problems: list[str] = []
    most = chunk_bytes + limits.chunk_slack_bytes if compressed else chunk_bytes

    def visit(info) -> Optional[bool]:
        offset = tuple(info.chunk_offset)
        if len(seen) >= n_chunks:
            problems.append(f"more than the {n_chunks} chunks it can have are stored")
        elif len(offset) != len(shape) or any(o < 0 or o >= s or o % c for o, s, c in zip(offset, shape, chunks)):
            problems.append(f"a chunk at {offset} lies outside the dataset")
        elif offset in seen:
            problems.append(f"the chunk at {offset} is stored twice")
        elif info.byte_offset is None or info.byte_offset < 0 or info.size < 1 \
                or info.byte_offset + info.size > file_size:
            problems.append(f"the chunk at {offset} lies outside the file")
        elif info.filter_mask == 0 and info.size > most:
            problems.append(f"the chunk at {offset} stores {info.size} bytes, more than its {chunk_bytes} raw bytes")
        elif info.filter_mask not in (0, 1) or (info.filter_mask == 1 and not compressed):
            problems.append(f"the chunk at {offset} skips filters (filter mask {info.filter_mask})")
        elif info.filter_mask == 1 and info.size != chunk_bytes:
            # h5py's LZF is an optional filter: an incompressible chunk is stored raw, with the filter skipped.
            problems.append(f"the chunk at {offset} is stored unfiltered with {info.size} bytes, not {chunk_bytes}")
        else:
            seen.add(offset)
            return None
        return True  # stop the iteration

    dsid.chunk_iter(visit)
    if problems:
        raise EpisodeFileError(f"dataset {name!r}: {problems[0]}")
    if len(seen) != n_chunks:
        raise EpisodeFileError(f"dataset {name!r} has {len(seen)} of its {n_chunks} chunks written: its declared "
                               f"size is not backed by the file")


# ---------------------------------------------------------------------------------------------- reader


@dataclasses.dataclass(frozen=True)
class FrameLayout:
    """The byte layout of one episode file's per-step data (EpisodeReader.frame_layout): what reading a step costs
    without HDF5 is one pread per column. ``raw[i]``: image chunk i is stored uncompressed, else LZF."""

    file_size: int
    frame_shape: tuple[int, ...]
    offsets: np.ndarray  # int64 [steps]: file offset of each image chunk
    sizes: np.ndarray  # uint32 [steps]: its stored size
    raw: np.ndarray  # bool [steps]
    state_offset: int  # float32 [steps, state_dim], C order
    state_dim: int
    action_offset: int  # float32 [steps, action_dim], C order
    action_dim: int
    cameras: dict[str, "ImageChunks"] = dataclasses.field(default_factory=dict)  # the more cameras' chunks, by name

    def chunks(self, camera: Optional[str] = None) -> "ImageChunks":
        """The image chunks of the primary camera (None) or of a more camera."""
        if camera is None:
            return ImageChunks(self.frame_shape, self.offsets, self.sizes, self.raw)
        return self.cameras[camera]


@dataclasses.dataclass(frozen=True)
class ImageChunks:
    """One camera's frames in the file: ``offsets[i]`` / ``sizes[i]`` of chunk i, ``raw[i]`` stored uncompressed."""

    frame_shape: tuple[int, ...]
    offsets: np.ndarray
    sizes: np.ndarray
    raw: np.ndarray


def _image_chunks(image: h5py.Dataset, steps: int) -> Optional[ImageChunks]:
    if image.chunks != (1, *image.shape[1:]) or image.dtype != np.uint8 or image.compression not in (None, "lzf"):
        return None
    offsets = np.full(steps, -1, np.int64)
    sizes = np.zeros(steps, np.uint32)
    raw = np.full(steps, image.compression is None)

    def visit(info) -> None:  # StoreInfo(chunk_offset, filter_mask, byte_offset, size)
        i = info.chunk_offset[0]
        offsets[i], sizes[i] = info.byte_offset, info.size
        raw[i] |= info.filter_mask != 0  # LZF skipped (a chunk it could not shrink is stored as it is)

    image.id.chunk_iter(visit)
    if (offsets < 0).any():
        return None  # a frame without a chunk (never written): nothing to read directly
    return ImageChunks(tuple(image.shape[1:]), offsets, sizes, raw)


class EpisodeReader:
    """Lazy, read-only access to one episode file. Opening validates the file like ``inspect_file`` (attributes,
    dataset headers, chunk index, and the small control_source / success columns) but reads no frame.

    Use as a context manager, or call ``close()``. ``frame(i)`` reads one step; ``load()`` reads everything.
    ``meta`` is ``inspect_file``'s result with ``segments`` as ``Segment`` objects.
    """

    def __init__(self, path: str | os.PathLike, limits: Limits = DEFAULT_LIMITS):
        self.path = Path(path)
        self._f = _open(self.path)
        try:
            self.meta = _inspect(self._f, limits)
        except BaseException:
            self._f.close()
            raise

    @property
    def steps(self) -> int:
        return self.meta["steps"]

    def frame(self, i: int) -> dict[str, Any]:
        """One step, reading only that frame's chunk of the image dataset."""
        if not 0 <= i < self.steps:
            raise IndexError(i)
        f = self._f
        return {
            "image": f["observation/image"][i],
            "cameras": {name: f[f"{CAMERAS}/{name}"][i] for name in self.meta["cameras"]},
            "state": f["observation/state"][i],
            "action": f["action"][i],
            "control_source": int(f["control_source"][i]),
            "reward": float(f["reward"][i]),
            "success": bool(f["success"][i]),
            "timestamp": float(f["timestamp"][i]),
        }

    def column(self, name: str, start: int = 0, stop: Optional[int] = None) -> np.ndarray:
        """A slice of one dataset, e.g. ``column("action", t, t + horizon)`` for an action chunk, or
        ``column("observation/cameras/gripperPOV")`` for a more camera's frames."""
        if name not in DATASETS and not (_is_camera(name) and name[len(CAMERAS) + 1:] in self.meta["cameras"]):
            raise KeyError(f"no dataset {name!r} in the episode format")
        return self._f[name][start:stop]

    def load(self) -> EpisodeData:
        f = self._f
        return EpisodeData(
            meta={k: self.meta[k] for k in (*ATTRIBUTES, *(k for k in OPTIONAL_ATTRIBUTES if k in f.attrs))},
            images=f["observation/image"][:],
            states=f["observation/state"][:],
            actions=f["action"][:],
            control_source=f["control_source"][:],
            rewards=f["reward"][:],
            successes=f["success"][:],
            timestamps=f["timestamp"][:],
            segments=list(self.meta["segments"]),
            cameras={name: f[f"{CAMERAS}/{name}"][:] for name in self.meta["cameras"]},
        )

    def camera_dataset(self, camera: str) -> str:
        """The dataset that holds the frames of ``camera`` (the primary's or a more camera's name); KeyError naming
        the cameras this episode has otherwise."""
        if camera == self.meta["camera"]:
            return IMAGE
        if camera in self.meta["cameras"]:
            return f"{CAMERAS}/{camera}"
        raise KeyError(f"camera {camera!r} was not recorded in this episode (it has "
                       f"{', '.join([self.meta['camera'], *self.meta['cameras']])})")

    def frame_layout(self) -> Optional["FrameLayout"]:
        """Where each step's bytes lie in the file, for a reader that fetches single steps without HDF5 (the
        learner's loader, learner/buffer.py): every image chunk's byte offset and size (of every camera), and the
        offsets of the contiguous state and action columns. None when this file is not laid out that way (then read
        through HDF5)."""
        state, action = self._f["observation/state"], self._f["action"]
        if (state.chunks is not None or action.chunks is not None or state.dtype != np.float32
                or action.dtype != np.float32 or self.steps == 0):
            return None
        state_offset, action_offset = state.id.get_offset(), action.id.get_offset()
        primary = _image_chunks(self._f[IMAGE], self.steps)
        cameras = {name: _image_chunks(self._f[f"{CAMERAS}/{name}"], self.steps) for name in self.meta["cameras"]}
        if state_offset is None or action_offset is None or primary is None or None in cameras.values():
            return None
        return FrameLayout(file_size=self.path.stat().st_size, frame_shape=primary.frame_shape,
                           offsets=primary.offsets, sizes=primary.sizes, raw=primary.raw,
                           state_offset=int(state_offset), state_dim=int(state.shape[1]),
                           action_offset=int(action_offset), action_dim=int(action.shape[1]), cameras=cameras)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "EpisodeReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
