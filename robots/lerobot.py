"""LeRobotDataset v3.0: export verified episodes as a dataset, read one back, import one as offline demonstrations.

The format (huggingface/lerobot, ``codebase_version`` ``v3.0``; docs/lerobot.md):

    meta/info.json                                      schema (features), fps, counts, path templates
    meta/stats.json                                     per feature min/max/mean/std/count/q01..q99 over all frames
    meta/tasks.parquet                                  the task strings (the prompts) and their task_index
    meta/episodes/chunk-000/file-000.parquet            one row per episode: length, task, where its rows and video
                                                        frames are, its stats, and SOP's own columns ``sop/*``
    data/chunk-000/file-000.parquet                     one row per frame, many episodes per file
    videos/<video_key>/chunk-000/file-000.mp4           the camera frames of many episodes, one after the other

Files roll over to ``file-001`` ... when they would pass ``data_files_size_in_mb`` / ``video_files_size_in_mb``,
and to ``chunk-001`` after ``chunks_size`` files. Written with pyarrow and PyAV only: the ``lerobot`` package is not
a dependency. Frame ``i`` of an episode lies at ``from_timestamp + i / fps`` in its video file, which is what
lerobot's readers ask the decoder for.

``read_dataset`` is a reader of its own: it follows ``meta/info.json``'s path templates and the episodes metadata,
so it reads datasets made by lerobot too. ``import_dataset`` turns a dataset into offline demonstrations of a task,
ingested like ``collect_demos`` does (episode files through ``ingest.open_upload`` / ``append_upload``).
"""

from __future__ import annotations

import dataclasses
import fractions
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .episode_file import (
    SEGMENT_SOURCES,
    EpisodeData,
    EpisodeFileError,
    EpisodeReader,
    Segment,
    check_camera_names,
    write_episode,
)

log = logging.getLogger(__name__)

CODEBASE_VERSION = "v3.0"
DEFAULT_CHUNK_SIZE = 1000  # files per chunk directory
DEFAULT_DATA_FILE_SIZE_IN_MB = 100
DEFAULT_VIDEO_FILE_SIZE_IN_MB = 200

INFO_PATH = "meta/info.json"
STATS_PATH = "meta/stats.json"
TASKS_PATH = "meta/tasks.parquet"
EPISODES_DIR = "meta/episodes"
CHUNK_FILE_PATTERN = "chunk-{chunk_index:03d}/file-{file_index:03d}"
EPISODES_PATH = EPISODES_DIR + "/" + CHUNK_FILE_PATTERN + ".parquet"
DATA_PATH = "data/" + CHUNK_FILE_PATTERN + ".parquet"
VIDEO_PATH = "videos/{video_key}/" + CHUNK_FILE_PATTERN + ".mp4"

IMAGE_PREFIX = "observation.images."
STATE_KEY = "observation.state"
ACTION_KEY = "action"
CONTROL_SOURCE_NAMES = ["policy", "operator", "sim_operator"]  # index = the code of docs/episode_format.md

# lerobot.utils.constants.DEFAULT_FEATURES
DEFAULT_FEATURES = {
    "timestamp": {"dtype": "float32", "shape": [1], "names": None},
    "frame_index": {"dtype": "int64", "shape": [1], "names": None},
    "episode_index": {"dtype": "int64", "shape": [1], "names": None},
    "index": {"dtype": "int64", "shape": [1], "names": None},
    "task_index": {"dtype": "int64", "shape": [1], "names": None},
}

QUANTILES = (0.01, 0.10, 0.50, 0.90, 0.99)  # lerobot's DEFAULT_QUANTILES: stats keys q01 q10 q50 q90 q99
QUANTILE_KEYS = tuple(f"q{round(q * 100):02d}" for q in QUANTILES)

VIDEO_GOP = 2  # a keyframe every 2 frames (lerobot's default "g"): a seek decodes at most one extra frame
VIDEO_CRF = 18
VIDEO_PRESET = "veryfast"
VIDEO_PIX_FMT = "yuv420p"

ROBOT_TYPE = "sop-metaworld"
IMPORT_ROBOT = "demo-collector"  # collect_demos' robot: offline demonstrations come from it
IMPORT_POLICY = "lerobot-import"  # the "policy" attribute of an imported demonstration
UPLOAD_CHUNK = 8 * 1024 * 1024
_ID_NAMESPACE = uuid.UUID("6f3c1f0e-5b7a-4c1e-9a53-6c1e2b7d0a41")  # uuid5 namespace of imported episode ids

# Meta-World's 39-d goal-observable state (learner/config.py describes the same layout)
_OBJECT = ("x", "y", "z", "q0", "q1", "q2", "q3")
_NOW = ["hand_x", "hand_y", "hand_z", "gripper_distance", *(f"obj1_{n}" for n in _OBJECT),
        *(f"obj2_{n}" for n in _OBJECT)]
METAWORLD_STATE_NAMES = [*_NOW, *(f"prev_{n}" for n in _NOW), "goal_x", "goal_y", "goal_z"]
METAWORLD_ACTION_NAMES = ["delta_x", "delta_y", "delta_z", "gripper"]
METAWORLD_DIMS = (len(METAWORLD_STATE_NAMES), len(METAWORLD_ACTION_NAMES))  # (39, 4)

Progress = Callable[[int, int], None] | None  # called with (done, total) after each episode


class LeRobotError(ValueError):
    """A dataset that cannot be written or read as asked; the message says what is wrong."""


def is_metaworld(env_id: str) -> bool:
    """SOP's simulated robots run Meta-World v3 environments (robots/agent/environment.py), named ``<task>-v3``."""
    return env_id.endswith("-v3")


# ==================================================================================================== export


def export_dataset(episodes: Iterable, out_dir: str | os.PathLike, *, fps: int | None = None, progress: Progress = None,
                   robot_type: str | None = None, crf: int = VIDEO_CRF, chunks_size: int = DEFAULT_CHUNK_SIZE,
                   data_files_size_in_mb: int = DEFAULT_DATA_FILE_SIZE_IN_MB,
                   video_files_size_in_mb: int = DEFAULT_VIDEO_FILE_SIZE_IN_MB) -> dict[str, Any]:
    """Write verified ``robots.models.Episode`` rows as a LeRobotDataset v3.0 in ``out_dir`` (absent or empty).

    ``fps``: the dataset's frame rate; default the episodes' ``control_hz``, which must then be one integer rate.
    ``robot_type``: default ``sop-metaworld`` when every episode ran a Meta-World environment, else ``sop``.
    The dataset is written beside ``out_dir`` and moved there when complete: a failed export leaves nothing.
    Returns a summary: episodes, frames, tasks, files, bytes, fps, cameras, path."""
    from . import ingest
    from .models import Episode

    episodes = list(episodes)
    if not episodes:
        raise LeRobotError("no episodes to export")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LeRobotError(f"{out} exists and is not an empty directory")
    for name, value in (("chunks_size", chunks_size), ("data_files_size_in_mb", data_files_size_in_mb),
                        ("video_files_size_in_mb", video_files_size_in_mb)):
        if type(value) is not int or value < 1:
            raise LeRobotError(f"{name} must be a positive integer, got {value!r}")
    if type(crf) is not int or not 0 <= crf <= 51:
        raise LeRobotError(f"crf must be an integer from 0 (best) to 51, got {crf!r}")

    # Pass 1: every file's header, so that nothing is encoded before the whole export is known to fit one schema.
    plan = []
    for ep in episodes:
        if ep.status != Episode.Status.VERIFIED:
            raise LeRobotError(f"episode {ep.id} is {ep.status}, not verified: only verified episodes are exported")
        try:
            path = ingest.payload_file(ep)
            with EpisodeReader(path) as reader:
                meta = reader.meta
        except Exception as exc:  # noqa: BLE001 - storage errors, a damaged cache copy: whatever it is, say which
            raise LeRobotError(f"episode {ep.id}: its payload cannot be read: {exc}") from None
        plan.append((ep, path, meta))
    fps = _export_fps(plan, fps)
    layout = _export_layout(plan)

    features = _export_features(layout)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        writer = _DatasetWriter(tmp, features, fps, layout["cameras"], crf=crf, chunks_size=chunks_size,
                                data_bytes=data_files_size_in_mb * 1024**2,
                                video_bytes=video_files_size_in_mb * 1024**2)
        for k, (ep, path, meta) in enumerate(plan):
            with EpisodeReader(path) as reader:
                data = reader.load()
            writer.add_episode(k, ep, data)
            if progress:
                progress(k + 1, len(plan))
        if robot_type is None:
            robot_type = ROBOT_TYPE if layout["metaworld"] else "sop"
        info = writer.finish(robot_type=robot_type, chunks_size=chunks_size,
                             data_files_size_in_mb=data_files_size_in_mb,
                             video_files_size_in_mb=video_files_size_in_mb)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = [p for p in out.rglob("*") if p.is_file()]
    return {
        "path": str(out), "episodes": info["total_episodes"], "frames": info["total_frames"],
        "tasks": info["total_tasks"], "fps": fps, "cameras": [IMAGE_PREFIX + c for c, _ in layout["cameras"]],
        "files": len(files),
        "bytes": sum(p.stat().st_size for p in files),
    }


def _export_fps(plan: list, fps: int | None) -> int:
    if fps is not None:
        if type(fps) is not int or fps < 1:
            raise LeRobotError(f"fps must be a positive integer, got {fps!r}")
        return fps
    rates: dict[float, int] = {}
    for _, _, meta in plan:
        rates[meta["control_hz"]] = rates.get(meta["control_hz"], 0) + 1
    if len(rates) > 1:
        listed = ", ".join(f"{rate:g} Hz ({n} episodes)" for rate, n in sorted(rates.items()))
        raise LeRobotError(f"the episodes were recorded at different control rates: {listed}. A LeRobot dataset has "
                           f"one fps: export the rates separately, or give the rate to label them all with (--fps)")
    (rate,) = rates
    if rate != round(rate):
        raise LeRobotError(f"the episodes' control rate {rate:g} Hz is not a whole number; LeRobot datasets have an "
                           f"integer fps: give one (--fps)")
    return round(rate)


def _export_layout(plan: list) -> dict[str, Any]:
    """The shapes every exported episode must share (a dataset has one schema)."""
    def one(what: str, key: Callable[[dict], Any]) -> Any:
        values: dict[Any, list] = {}
        for ep, _, meta in plan:
            values.setdefault(key(meta), []).append(str(ep.id))
        if len(values) > 1:
            listed = "; ".join(f"{value} ({len(ids)} episodes, e.g. {ids[0]})" for value, ids in values.items())
            raise LeRobotError(f"the episodes differ in {what}: {listed}. A dataset has one schema: export them "
                               f"separately (filter by --tasks / --robots)")
        return next(iter(values))

    # every camera, the primary first, with its frame size: the same in every episode
    cameras = one("cameras", lambda m: ((m["camera"], tuple(m["image_shape"])),
                                        *sorted((name, tuple(shape)) for name, shape in m["cameras"].items())))
    for camera, (h, w, _) in cameras:
        if not camera or "/" in camera:
            raise LeRobotError(f"camera name {camera!r} cannot name a LeRobot feature (empty or containing '/')")
        if h % 2 or w % 2:
            raise LeRobotError(f"{camera} images of {h}x{w}: the {VIDEO_PIX_FMT} video encoding needs even heights "
                               f"and widths")
    camera, image_shape = cameras[0]
    state_dim = one("state width", lambda m: m["state_dim"])
    action_dim = one("action width", lambda m: m["action_dim"])
    metaworld = all(is_metaworld(meta["env_id"]) for _, _, meta in plan)
    return {"camera": camera, "video_key": IMAGE_PREFIX + camera, "image_shape": image_shape, "state_dim": state_dim,
            "action_dim": action_dim, "metaworld": metaworld, "cameras": list(cameras)}


def _export_features(layout: dict[str, Any]) -> dict[str, dict]:
    s, a = layout["state_dim"], layout["action_dim"]
    mw = layout["metaworld"]
    return {
        STATE_KEY: {"dtype": "float32", "shape": [s], "names": (
            METAWORLD_STATE_NAMES if mw and s == METAWORLD_DIMS[0] else [f"state_{i}" for i in range(s)])},
        ACTION_KEY: {"dtype": "float32", "shape": [a], "names": (
            METAWORLD_ACTION_NAMES if mw and a == METAWORLD_DIMS[1] else [f"action_{i}" for i in range(a)])},
        **{IMAGE_PREFIX + camera: {"dtype": "video", "shape": list(shape), "names": ["height", "width", "channels"],
                                   "info": None}  # filled from the written video (as lerobot's get_video_info does)
           for camera, shape in layout["cameras"]},
        "control_source": {"dtype": "int64", "shape": [1], "names": list(CONTROL_SOURCE_NAMES)},
        "intervention": {"dtype": "bool", "shape": [1], "names": None},
        "policy_version": {"dtype": "int64", "shape": [1], "names": None},
        "episode_success": {"dtype": "bool", "shape": [1], "names": None},
        "next.reward": {"dtype": "float32", "shape": [1], "names": None},
        "next.success": {"dtype": "bool", "shape": [1], "names": None},
        **json.loads(json.dumps(DEFAULT_FEATURES)),
    }


_ARROW_TYPES = {"float32": pa.float32(), "float64": pa.float64(), "int64": pa.int64(), "bool": pa.bool_()}


def _arrow_type(ft: dict) -> pa.DataType:
    """What datasets.Features makes of a feature: a scalar for shape (1,), else a fixed-size list."""
    base = _ARROW_TYPES[ft["dtype"]]
    return base if list(ft["shape"]) == [1] else pa.list_(base, int(ft["shape"][0]))


class _RollingParquet:
    """Parquet files under a chunk/file template, one row group per ``write``; the next file starts when this one
    would pass ``limit`` bytes on disk (its size so far plus the new table at the file's compression ratio so far,
    as lerobot estimates it), a new chunk after ``chunks_size`` files."""

    def __init__(self, root: Path, template: str, limit: int, chunks_size: int):
        self.root, self.template, self.limit, self.chunks_size = root, template, limit, chunks_size
        self.chunk = self.file = 0
        self.writer: pq.ParquetWriter | None = None
        self.sink: pa.NativeFile | None = None
        self.size = self.memory = 0  # bytes in the file so far; the same rows in memory

    def place(self, nbytes: int) -> tuple[int, int]:
        """The (chunk, file) the next table (``nbytes`` in memory) goes to, rolling over first when needed."""
        if self.memory and self.size + nbytes * self.size / self.memory >= self.limit:
            self.close()
            self.chunk, self.file = _next_file(self.chunk, self.file, self.chunks_size)
        return self.chunk, self.file

    def write(self, table: pa.Table) -> None:
        if self.writer is None:
            path = self.root / self.template.format(chunk_index=self.chunk, file_index=self.file)
            path.parent.mkdir(parents=True, exist_ok=True)
            self.sink = pa.OSFile(str(path), "wb")
            # Dictionary encoding for the integer and boolean columns only: measured floats are all distinct, and
            # a dictionary of them (plus its indices) takes half as much again as the plain values.
            dictionary = [f.name for f in table.schema if not _floating(f.type)]
            self.writer = pq.ParquetWriter(self.sink, table.schema, compression="snappy", use_dictionary=dictionary)
        self.writer.write_table(table)  # a whole row group: its bytes are in the file now
        self.size = self.sink.tell()
        self.memory += table.nbytes

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.sink.close()
        self.writer = self.sink = None
        self.size = self.memory = 0


def _floating(kind: pa.DataType) -> bool:
    while pa.types.is_list(kind) or pa.types.is_fixed_size_list(kind) or pa.types.is_large_list(kind):
        kind = kind.value_type
    return pa.types.is_floating(kind)


def _next_file(chunk: int, file: int, chunks_size: int) -> tuple[int, int]:
    """lerobot's update_chunk_file_indices."""
    return (chunk + 1, 0) if file == chunks_size - 1 else (chunk, file + 1)


def _video_codec() -> str:
    """The encoder robots/pages.py uses for replays: libx264 where PyAV has it, else MPEG-4 part 2."""
    import av

    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


class _RollingVideo:
    """One camera's MP4 files: episodes are appended to one continuous stream (frame ``n`` of the file at ``n/fps``,
    each episode starting on a keyframe), and a new file starts when this one would pass ``limit`` bytes."""

    def __init__(self, root: Path, video_key: str, fps: int, shape: tuple, crf: int, limit: int, chunks_size: int):
        self.root, self.video_key, self.fps, self.shape = root, video_key, fps, shape
        self.crf, self.limit, self.chunks_size = crf, limit, chunks_size
        self.codec = _video_codec()
        self.chunk = self.file = 0
        self.container = self.stream = None
        self.frames = self.bytes = 0
        self.first_path: Path | None = None
        self.options: dict[str, str] = {}
        self.time_base = fractions.Fraction(1, fps)  # of the frames we hand the encoder: frame n of a file at n/fps

    def add_episode(self, images: np.ndarray) -> dict[str, Any]:
        import av

        t = len(images)
        if self.frames and self.bytes + self.bytes / self.frames * t >= self.limit:
            self.close()
            self.chunk, self.file = _next_file(self.chunk, self.file, self.chunks_size)
        if self.container is None:
            self._open()
        start = self.frames
        for i, image in enumerate(images):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            frame.pts = start + i
            frame.time_base = self.time_base  # not the stream's: the muxer changes that once the file starts
            if i == 0:
                frame.pict_type = av.video.frame.PictureType.I  # every episode is decodable on its own
            self._mux(self.stream.encode(frame))
        self.frames += t
        return {
            f"videos/{self.video_key}/chunk_index": self.chunk,
            f"videos/{self.video_key}/file_index": self.file,
            f"videos/{self.video_key}/from_timestamp": start / self.fps,
            f"videos/{self.video_key}/to_timestamp": (start + t) / self.fps,
        }

    def _open(self) -> None:
        import av

        path = self.root / VIDEO_PATH.format(video_key=self.video_key, chunk_index=self.chunk, file_index=self.file)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.first_path = self.first_path or path
        h, w, _ = self.shape
        self.container = av.open(str(path), mode="w", format="mp4", options={"movflags": "+faststart"})
        if self.codec == "libx264":
            # bf=0: frames are stored in presentation order, so each packet's time is its frame's time
            self.options = {"g": str(VIDEO_GOP), "crf": str(self.crf), "preset": VIDEO_PRESET, "bf": "0"}
        else:
            self.options = {"g": str(VIDEO_GOP), "qscale": "2"}
        stream = self.container.add_stream(self.codec, rate=self.fps, options=dict(self.options))
        stream.width, stream.height, stream.pix_fmt = w, h, VIDEO_PIX_FMT
        stream.time_base = self.time_base
        if self.codec != "libx264":
            stream.bit_rate = max(2_000_000, h * w * self.fps * 2)
        self.stream = stream
        self.frames = self.bytes = 0

    def _mux(self, packets) -> None:
        for packet in packets:
            self.bytes += packet.size
            self.container.mux(packet)

    def close(self) -> None:
        if self.container is not None:
            self._mux(self.stream.encode())
            self.container.close()
        self.container = self.stream = None
        self.frames = self.bytes = 0

    def info(self) -> dict[str, Any]:
        """The feature's ``info``, probed from the first file like lerobot's get_video_info, plus the encoder
        settings lerobot records as ``video.<field>``."""
        import av

        with av.open(str(self.first_path)) as container:
            stream = container.streams.video[0]
            info = {
                "video.height": stream.height, "video.width": stream.width,
                "video.codec": stream.codec_context.codec.canonical_name if hasattr(stream.codec_context, "codec")
                else stream.codec_context.name,
                "video.pix_fmt": stream.pix_fmt, "video.is_depth_map": False,
                "video.fps": int(stream.base_rate or self.fps), "video.channels": 3,
                "has_audio": bool(container.streams.audio),
            }
        info.update({"video.g": VIDEO_GOP, "video.crf": self.crf if self.codec == "libx264" else None,
                     "video.preset": VIDEO_PRESET if self.codec == "libx264" else None, "is_depth_map": False})
        return info


class _DatasetWriter:
    def __init__(self, root: Path, features: dict, fps: int, cameras: list, *, crf: int, chunks_size: int,
                 data_bytes: int, video_bytes: int):
        self.root, self.features, self.fps = root, features, fps
        self.primary = cameras[0][0]
        self.chunks_size, self.data_bytes = chunks_size, data_bytes
        self.data = _RollingParquet(root, DATA_PATH, data_bytes, chunks_size)
        self.videos = {camera: _RollingVideo(root, IMAGE_PREFIX + camera, fps, tuple(shape), crf, video_bytes,
                                             chunks_size) for camera, shape in cameras}
        self.columns = [k for k, ft in features.items() if ft["dtype"] != "video"]
        self.schema = pa.schema([(k, _arrow_type(features[k])) for k in self.columns])
        self.tasks: dict[str, int] = {}
        self.rows: list[dict[str, Any]] = []  # episodes metadata
        self.stats: list[dict[str, dict]] = []
        self.frames = 0

    def add_episode(self, k: int, ep, data: EpisodeData) -> None:
        t = data.steps
        prompt = data.meta["prompt"]
        task_index = self.tasks.setdefault(prompt, len(self.tasks))
        outcome = ep.outcome or data.meta["outcome"]  # the row: a console relabel changes it, not the file
        version = int(data.meta["policy_version"])
        source = data.control_source.astype(np.int64)
        frame_index = np.arange(t, dtype=np.int64)
        columns = {
            STATE_KEY: data.states.astype(np.float32),
            ACTION_KEY: data.actions.astype(np.float32),
            "control_source": source,
            "intervention": source != 0,
            "policy_version": np.full(t, version, np.int64),
            "episode_success": np.full(t, outcome == "success"),
            "next.reward": data.rewards.astype(np.float32),
            "next.success": data.successes.astype(bool),
            "timestamp": (frame_index / self.fps).astype(np.float32),
            "frame_index": frame_index,
            "episode_index": np.full(t, k, np.int64),
            "index": self.frames + frame_index,
            "task_index": np.full(t, task_index, np.int64),
        }
        table = pa.Table.from_arrays([_arrow_column(columns[c], self.schema.field(c).type) for c in self.columns],
                                     schema=self.schema)
        chunk, file = self.data.place(table.nbytes)
        self.data.write(table)
        stats = {name: vector_stats(values) for name, values in columns.items()}
        video_meta = {}
        for camera, video in self.videos.items():
            frames = data.images if camera == self.primary else data.cameras[camera]
            video_meta.update(video.add_episode(frames))
            stats[video.video_key] = image_stats(frames)
        self.stats.append(stats)
        self.rows.append({
            "episode_index": k, "tasks": [prompt], "length": t,
            "data/chunk_index": chunk, "data/file_index": file,
            "dataset_from_index": self.frames, "dataset_to_index": self.frames + t,
            **video_meta,
            **{f"stats/{name}/{key}": _jsonable(value) for name, s in stats.items() for key, value in s.items()},
            # SOP's own columns (lerobot reads only the columns it knows)
            "sop/episode_id": str(ep.id), "sop/task": ep.task.name, "sop/env_id": data.meta["env_id"],
            "sop/robot": ep.robot.name, "sop/split": ep.split, "sop/outcome": outcome,
            "sop/policy": data.meta["policy"], "sop/policy_version": version,
            "sop/started_at": float(data.meta["started_at"]), "sop/control_hz": float(data.meta["control_hz"]),
            "sop/camera": data.meta["camera"], "sop/intervention_steps": int((source != 0).sum()),
        })
        self.frames += t

    def finish(self, **settings) -> dict[str, Any]:
        self.data.close()
        for video in self.videos.values():
            video.close()
            self.features[video.video_key]["info"] = video.info()
        self._write_episodes()
        self._write_tasks()
        stats = {name: _jsonable_stats(s) for name, s in aggregate_stats(self.stats).items()}
        _write_json(self.root / STATS_PATH, stats)
        n = len(self.rows)
        info = {
            "codebase_version": CODEBASE_VERSION,
            "robot_type": settings["robot_type"],
            "total_episodes": n,
            "total_frames": self.frames,
            "total_tasks": len(self.tasks),
            "chunks_size": settings["chunks_size"],
            "data_files_size_in_mb": settings["data_files_size_in_mb"],
            "video_files_size_in_mb": settings["video_files_size_in_mb"],
            "fps": self.fps,
            "splits": {"train": f"0:{n}"},
            "data_path": DATA_PATH,
            "video_path": VIDEO_PATH,
            "features": self.features,
        }
        _write_json(self.root / INFO_PATH, info)
        return info

    def _write_episodes(self) -> None:
        """One row per episode, rolled over like the data files; each row says which file it is in."""
        rows = [{**row, "meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0} for row in self.rows]
        schema = pa.Table.from_pylist(rows[:1]).schema
        files = _RollingParquet(self.root, EPISODES_PATH, self.data_bytes, self.chunks_size)
        for row in rows:
            nbytes = pa.Table.from_pylist([row], schema=schema).nbytes
            row["meta/episodes/chunk_index"], row["meta/episodes/file_index"] = files.place(nbytes)
            files.write(pa.Table.from_pylist([row], schema=schema))
        files.close()

    def _write_tasks(self) -> None:
        """A DataFrame indexed by the task string with a task_index column, as lerobot's pandas ``to_parquet``
        writes it (the index is the column ``task``; the ``pandas`` schema metadata makes it the index again)."""
        tasks = sorted(self.tasks.items(), key=lambda item: item[1])
        pandas_meta = {
            "index_columns": ["task"],
            "column_indexes": [{"name": None, "field_name": None, "pandas_type": "unicode", "numpy_type": "object",
                                "metadata": {"encoding": "UTF-8"}}],
            "columns": [
                {"name": "task_index", "field_name": "task_index", "pandas_type": "int64", "numpy_type": "int64",
                 "metadata": None},
                {"name": "task", "field_name": "task", "pandas_type": "unicode", "numpy_type": "object",
                 "metadata": None},
            ],
            "creator": {"library": "pyarrow", "version": pa.__version__},
            "pandas_version": "2.2.3",
        }
        schema = pa.schema([("task_index", pa.int64()), ("task", pa.string())],
                           metadata={b"pandas": json.dumps(pandas_meta).encode()})
        table = pa.table({"task_index": [i for _, i in tasks], "task": [task for task, _ in tasks]}, schema=schema)
        path = self.root / TASKS_PATH
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)


def _arrow_column(values: np.ndarray, kind: pa.DataType) -> pa.Array:
    if pa.types.is_fixed_size_list(kind):
        flat = pa.array(np.ascontiguousarray(values).reshape(-1), type=kind.value_type)
        return pa.FixedSizeListArray.from_arrays(flat, kind.list_size)
    return pa.array(values, type=kind)


# ---------------------------------------------------------------------------------------------- stats
# The layout of lerobot's compute_stats: per feature min, max, mean, std (population), count and the quantiles
# q01..q99; a vector feature has one value per dimension, a scalar feature a list of one, an image feature one value
# per channel as [[[r]], [[g]], [[b]]] in [0, 1]; count is [frames].


def vector_stats(values: np.ndarray) -> dict[str, np.ndarray]:
    arr = np.asarray(values).astype(np.float64).reshape(len(values), -1)
    stats = {"min": arr.min(axis=0), "max": arr.max(axis=0), "mean": arr.mean(axis=0), "std": arr.std(axis=0),
             "count": np.array([len(arr)])}
    for key, q in zip(QUANTILE_KEYS, np.quantile(arr, QUANTILES, axis=0)):
        stats[key] = q
    return stats


def image_stats(images: np.ndarray) -> dict[str, np.ndarray]:
    """Per-channel statistics of uint8 frames [T, H, W, C] over every pixel, exact (from 256-bin histograms)."""
    channels = images.shape[-1]
    hist = np.stack([np.bincount(images[..., c].reshape(-1), minlength=256) for c in range(channels)])
    hist = hist.astype(np.float64)
    levels = np.arange(256, dtype=np.float64)
    n = hist.sum(axis=1)
    mean = hist @ levels / n
    std = np.sqrt(np.maximum(hist @ levels**2 / n - mean**2, 0.0))
    nonzero = hist > 0
    cdf = np.cumsum(hist, axis=1)
    stats = {
        "min": nonzero.argmax(axis=1).astype(np.float64), "max": 255.0 - nonzero[:, ::-1].argmax(axis=1),
        "mean": mean, "std": std,
    }
    for key, q in zip(QUANTILE_KEYS, QUANTILES):
        stats[key] = np.array([np.searchsorted(cdf[c], q * n[c]) for c in range(channels)], dtype=np.float64)
    stats = {key: (value / 255.0).reshape(channels, 1, 1) for key, value in stats.items()}
    stats["count"] = np.array([len(images)])
    return stats


def aggregate_stats(stats_list: list[dict[str, dict]]) -> dict[str, dict[str, np.ndarray]]:
    """lerobot's aggregate_stats: count-weighted means, pooled variances, min of mins, max of maxes; a quantile is
    bounded by the episodes' (min of them up to q50, max above)."""
    result = {}
    for name in stats_list[0]:
        items = [s[name] for s in stats_list]
        counts = np.stack([s["count"] for s in items]).astype(np.float64)
        means = np.stack([s["mean"] for s in items])
        variances = np.stack([s["std"] ** 2 for s in items])
        total = counts.sum(axis=0)
        while counts.ndim < means.ndim:
            counts = counts[..., None]
        mean = (means * counts).sum(axis=0) / total
        variance = ((variances + (means - mean) ** 2) * counts).sum(axis=0) / total
        agg = {"min": np.min(np.stack([s["min"] for s in items]), axis=0),
               "max": np.max(np.stack([s["max"] for s in items]), axis=0),
               "mean": mean, "std": np.sqrt(variance), "count": total.astype(np.int64)}
        for key in QUANTILE_KEYS:
            values = np.stack([s[key] for s in items])
            agg[key] = values.min(axis=0) if int(key[1:]) <= 50 else values.max(axis=0)
        result[name] = agg
    return result


def _jsonable(value: np.ndarray) -> Any:
    return value.tolist()


def _jsonable_stats(stats: dict[str, np.ndarray]) -> dict[str, Any]:
    return {key: value.tolist() for key, value in stats.items()}


def _write_json(path: Path, doc: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=4, ensure_ascii=False) + "\n")


# ==================================================================================================== reading


@dataclasses.dataclass
class DatasetMeta:
    """A v3 dataset's metadata, checked: ``info`` (meta/info.json), ``tasks`` (task_index -> string) and
    ``episodes`` (the meta/episodes rows without their stats, ordered by episode_index)."""

    root: Path
    info: dict[str, Any]
    tasks: dict[int, str]
    episodes: list[dict[str, Any]]

    @property
    def features(self) -> dict[str, dict]:
        return self.info["features"]

    @property
    def fps(self) -> float:
        return float(self.info["fps"])

    @property
    def camera_keys(self) -> list[str]:
        return [k for k, ft in self.features.items() if ft.get("dtype") in ("video", "image")]

    def path(self, template_key: str, **fields) -> Path:
        """A file named by one of info.json's path templates; never outside the dataset."""
        template = self.info.get(template_key)
        if not isinstance(template, str):
            raise LeRobotError(f"{INFO_PATH} has no {template_key!r} path template")
        try:
            relative = template.format(**fields)
        except (KeyError, IndexError, ValueError, TypeError) as exc:
            raise LeRobotError(f"{INFO_PATH}: the {template_key} template {template!r} cannot be filled: "
                               f"{exc!r}") from None
        path = (self.root / relative).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise LeRobotError(f"{INFO_PATH}: {template_key} {relative!r} points outside the dataset")
        return path


@dataclasses.dataclass
class DatasetEpisode:
    """One episode as read back: ``columns`` holds every data column ([T] or [T, n]); ``frames(key)`` decodes a
    camera feature to uint8 [T, H, W, 3]."""

    index: int
    length: int
    task: str  # the task string of its first frame
    meta: dict[str, Any]  # its episodes-metadata row
    columns: dict[str, np.ndarray]
    dataset: DatasetMeta

    def frames(self, key: str) -> np.ndarray:
        ft = self.dataset.features.get(key)
        if ft is None or ft.get("dtype") not in ("video", "image"):
            raise LeRobotError(f"{key!r} is not a camera of the dataset (cameras: {self.dataset.camera_keys})")
        if ft["dtype"] == "image":
            return _decode_images(self, key)
        return _decode_video(self, key)


def open_dataset(root: str | os.PathLike) -> DatasetMeta:
    """Read and check a dataset's metadata (info.json, tasks, episodes); LeRobotError says what is wrong."""
    root = Path(root)
    if not root.is_dir():
        raise LeRobotError(f"{root} is not a directory")
    info_path = root / INFO_PATH
    if not info_path.is_file():
        raise LeRobotError(f"{root} is not a LeRobot dataset: it has no {INFO_PATH}")
    try:
        info = json.loads(info_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise LeRobotError(f"{info_path} is not valid JSON: {exc}") from None
    if not isinstance(info, dict):
        raise LeRobotError(f"{info_path} is not a JSON object")
    version = info.get("codebase_version")
    if not isinstance(version, str) or not version.startswith("v3."):
        raise LeRobotError(f"{info_path}: codebase_version {version!r} is not supported: only LeRobotDataset v3.x "
                           f"(lerobot converts v2.1 datasets with lerobot.scripts.convert_dataset_v21_to_v30)")
    fps = info.get("fps")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps <= 1000:
        raise LeRobotError(f"{info_path}: fps {fps!r} is not a rate in (0, 1000]")
    features = info.get("features")
    if not isinstance(features, dict) or not features:
        raise LeRobotError(f"{info_path} has no features")
    for key, ft in features.items():
        if not isinstance(ft, dict) or not isinstance(ft.get("dtype"), str) or not isinstance(ft.get("shape"), list):
            raise LeRobotError(f"{info_path}: feature {key!r} has no dtype and shape")
    meta = DatasetMeta(root=root, info=info, tasks=_read_tasks(root), episodes=[])
    meta.episodes = _read_episodes(meta)
    return meta


def read_dataset(root: str | os.PathLike, *, limit: int | None = None) -> Iterator[DatasetEpisode]:
    """The episodes of a v3 dataset in episode_index order, their data columns read; frames decode on demand."""
    return iter_episodes(open_dataset(root), limit=limit)


def iter_episodes(meta: DatasetMeta, *, limit: int | None = None) -> Iterator[DatasetEpisode]:
    current: tuple[Path | None, pa.Table | None] = (None, None)
    for row in meta.episodes[:limit]:
        path = meta.path("data_path", chunk_index=row["data/chunk_index"], file_index=row["data/file_index"])
        if current[0] != path:
            if not path.is_file():
                raise LeRobotError(f"episode {row['episode_index']}: its data file {path} is missing")
            try:
                current = (path, pq.read_table(path))
            except (OSError, pa.ArrowException) as exc:
                raise LeRobotError(f"{path} is not a readable parquet file: {exc}") from None
        columns = _episode_columns(meta, row, current[1], path)
        task_index = columns.get("task_index")
        if task_index is not None and int(task_index[0]) in meta.tasks:
            task = meta.tasks[int(task_index[0])]
        else:
            task = (row.get("tasks") or [""])[0]
        yield DatasetEpisode(index=row["episode_index"], length=row["length"], task=task, meta=row, columns=columns,
                             dataset=meta)


def _read_tasks(root: Path) -> dict[int, str]:
    path = root / TASKS_PATH
    if not path.is_file():
        raise LeRobotError(f"{root} is not a complete LeRobot dataset: it has no {TASKS_PATH}")
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise LeRobotError(f"{path} is not a readable parquet file: {exc}") from None
    # pandas stores the index (the task string) as the column "task" (named index) or "__index_level_0__"
    name = next((n for n in ("task", "__index_level_0__") if n in table.column_names), None)
    if "task_index" not in table.column_names or name is None:
        raise LeRobotError(f"{path} has columns {table.column_names}; expected task_index and task")
    return {int(i): str(t) for i, t in zip(table.column("task_index").to_pylist(), table.column(name).to_pylist())}


def _read_episodes(meta: DatasetMeta) -> list[dict[str, Any]]:
    files = sorted((meta.root / EPISODES_DIR).glob("*/*.parquet"))
    if not files:
        raise LeRobotError(f"{meta.root} has no episode metadata ({EPISODES_DIR}/chunk-*/file-*.parquet)")
    required = ["episode_index", "length", "dataset_from_index", "dataset_to_index", "data/chunk_index",
                "data/file_index"]
    for key, ft in meta.features.items():
        if ft["dtype"] == "video":
            required += [f"videos/{key}/{name}" for name in ("chunk_index", "file_index", "from_timestamp",
                                                             "to_timestamp")]
    rows = []
    for path in files:
        try:
            names = [n for n in pq.read_schema(path).names if not n.startswith("stats/")]
            table = pq.read_table(path, columns=names)
        except (OSError, pa.ArrowException) as exc:
            raise LeRobotError(f"{path} is not a readable parquet file: {exc}") from None
        missing = [c for c in required if c not in table.column_names]
        if missing:
            raise LeRobotError(f"{path} lacks the episode columns {missing}")
        rows += table.to_pylist()
    rows.sort(key=lambda r: r["episode_index"])
    for row in rows:
        numbers = [row[c] for c in required if not c.endswith("_timestamp")]
        if not all(isinstance(n, int) and n >= 0 for n in numbers):
            raise LeRobotError(f"episode row {row.get('episode_index')!r}: {', '.join(required)} must be integers >= 0")
        if not (row["length"] >= 1 and row["dataset_to_index"] - row["dataset_from_index"] == row["length"]):
            raise LeRobotError(f"episode {row['episode_index']}: length {row['length']} does not match its rows "
                               f"[{row['dataset_from_index']}, {row['dataset_to_index']})")
    return rows


def _episode_columns(meta: DatasetMeta, row: dict, table: pa.Table, path: Path) -> dict[str, np.ndarray]:
    ep, start, stop = row["episode_index"], row["dataset_from_index"], row["dataset_to_index"]
    if "index" in table.column_names:
        index = table.column("index")
        rows = table.filter(pc.and_(pc.greater_equal(index, start), pc.less(index, stop)))
    elif "episode_index" in table.column_names:
        rows = table.filter(pc.equal(table.column("episode_index"), ep))
    else:
        raise LeRobotError(f"{path} has neither an index nor an episode_index column")
    if rows.num_rows != row["length"]:
        raise LeRobotError(f"episode {ep}: {path} holds {rows.num_rows} of its rows [{start}, {stop}), expected "
                           f"{row['length']}")
    if "frame_index" in rows.column_names:
        order = np.argsort(rows.column("frame_index").to_numpy(), kind="stable")
        rows = rows.take(pa.array(order))
        if not np.array_equal(rows.column("frame_index").to_numpy(), np.arange(row["length"])):
            raise LeRobotError(f"episode {ep}: frame_index is not 0..{row['length'] - 1}")
    if "episode_index" in rows.column_names and not (rows.column("episode_index").to_numpy() == ep).all():
        raise LeRobotError(f"episode {ep}: its rows [{start}, {stop}) in {path} belong to other episodes")
    columns = {}
    for name in rows.column_names:
        ft = meta.features.get(name)
        if ft is not None and ft["dtype"] in ("video", "image", "string", "language"):
            continue
        columns[name] = _to_numpy(rows.column(name), name)
    return columns


def _to_numpy(column: pa.ChunkedArray, name: str) -> np.ndarray:
    column = column.combine_chunks()
    kind = column.type
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        lengths = set(pc.list_value_length(column).to_pylist())
        if len(lengths) != 1 or None in lengths:
            raise LeRobotError(f"column {name!r} holds lists of different lengths {sorted(map(str, lengths))}")
        values = pc.list_flatten(column)
        if not (pa.types.is_integer(values.type) or pa.types.is_floating(values.type)
                or pa.types.is_boolean(values.type)):
            return np.array(column.to_pylist(), dtype=object)
        return values.to_numpy(zero_copy_only=False).reshape(len(column), lengths.pop())
    if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind):
        return column.to_numpy(zero_copy_only=False)
    return np.array(column.to_pylist(), dtype=object)


def _frame_times(episode: DatasetEpisode) -> np.ndarray:
    """Where each frame of the episode lies in its video, relative to from_timestamp: the timestamp column (what
    lerobot queries), or frame_index / fps."""
    if "timestamp" in episode.columns:
        times = episode.columns["timestamp"].astype(np.float64).reshape(-1)
    else:
        times = np.arange(episode.length) / episode.dataset.fps
    if len(times) > 1 and not (np.diff(times) > 0).all():
        raise LeRobotError(f"episode {episode.index}: its timestamps do not increase")
    return times


def _decode_video(episode: DatasetEpisode, key: str) -> np.ndarray:
    import av

    row, meta = episode.meta, episode.dataset
    path = meta.path("video_path", video_key=key, chunk_index=row[f"videos/{key}/chunk_index"],
                     file_index=row[f"videos/{key}/file_index"])
    if not path.is_file():
        raise LeRobotError(f"episode {episode.index}: its video {path} is missing")
    query = float(row[f"videos/{key}/from_timestamp"]) + _frame_times(episode)
    tolerance = 0.4 / meta.fps  # less than half a frame: no frame can answer two queries
    frames: list[np.ndarray | None] = [None] * episode.length
    distance = np.full(episode.length, np.inf)
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            container.seek(max(0, math.floor(query[0] / stream.time_base) - 1), backward=True, any_frame=False,
                           stream=stream)
            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                t = float(frame.pts * stream.time_base)
                if t > query[-1] + tolerance:
                    break
                i = int(np.clip(np.searchsorted(query, t), 1, len(query) - 1)) if len(query) > 1 else 0
                if len(query) > 1 and abs(query[i - 1] - t) <= abs(query[i] - t):
                    i -= 1
                d = abs(query[i] - t)
                if d <= tolerance and d < distance[i]:
                    frames[i], distance[i] = frame.to_ndarray(format="rgb24"), d
    except (av.FFmpegError, OSError) as exc:
        raise LeRobotError(f"episode {episode.index}: {path} cannot be decoded: {exc}") from None
    missing = [i for i, f in enumerate(frames) if f is None]
    if missing:
        raise LeRobotError(f"episode {episode.index}: {path} has no frame near t={query[missing[0]]:.4f}s (frame "
                           f"{missing[0]}; {len(missing)} of {episode.length} frames missing)")
    return np.stack(frames)


def _decode_images(episode: DatasetEpisode, key: str) -> np.ndarray:
    """An ``image`` feature: PNG/JPEG bytes in the data file (a struct of bytes and path, datasets.Image)."""
    import io

    from PIL import Image

    row, meta = episode.meta, episode.dataset
    path = meta.path("data_path", chunk_index=row["data/chunk_index"], file_index=row["data/file_index"])
    table = pq.read_table(path, columns=[key, "index"])
    rows = table.filter(pc.and_(pc.greater_equal(table.column("index"), row["dataset_from_index"]),
                                pc.less(table.column("index"), row["dataset_to_index"])))
    order = np.argsort(rows.column("index").to_numpy())
    images = []
    for item in (rows.column(key).to_pylist()[i] for i in order):
        data = item.get("bytes") if isinstance(item, dict) else None
        if not data:
            raise LeRobotError(f"episode {episode.index}: image feature {key!r} has a frame without embedded bytes")
        with Image.open(io.BytesIO(data)) as image:
            images.append(np.asarray(image.convert("RGB")))
    return np.stack(images)


# ==================================================================================================== import


def task_dimensions(task) -> tuple[int, int, str] | None:
    """(state width, action width, where that comes from) that a task's episodes have: those of its stored
    episodes, else Meta-World's for a Meta-World environment; None when nothing says."""
    from . import ingest
    from .models import Episode

    stored = Episode.objects.filter(task=task, status=Episode.Status.VERIFIED).order_by("-verified_at").first()
    if stored is not None:
        try:
            with EpisodeReader(ingest.payload_file(stored)) as reader:
                return reader.meta["state_dim"], reader.meta["action_dim"], f"the stored episodes of task {task.name}"
        except Exception as exc:  # noqa: BLE001 - then the environment decides, as for a task without episodes
            log.warning("cannot read stored episode %s of task %s: %s", stored.id, task.name, exc)
    if is_metaworld(task.env_id):
        return (*METAWORLD_DIMS, f"Meta-World's {task.env_id} (task {task.name})")
    return None


@dataclasses.dataclass(frozen=True)
class ImportPlan:
    camera_key: str  # the dataset feature
    camera: str  # the SOP camera name it becomes
    state_key: str
    action_key: str
    extra: tuple[tuple[str, str], ...] = ()  # more cameras: (dataset feature, SOP camera name), recorded beside it


def plan_import(meta: DatasetMeta, task, *, camera_map: dict[str, str] | None = None,
                state_key: str = STATE_KEY, action_key: str = ACTION_KEY) -> ImportPlan:
    """Which dataset features become the episode's cameras (the first mapped one its primary camera, the others more
    cameras), state and action; LeRobotError when one cannot."""
    cameras = meta.camera_keys
    extra: list[tuple[str, str]] = []
    if camera_map:
        resolved = {}
        for key, name in camera_map.items():
            full = key if key in meta.features else IMAGE_PREFIX + key
            if full not in cameras:
                raise LeRobotError(f"the dataset has no camera {key!r}; its cameras: {', '.join(cameras) or 'none'}")
            resolved[full] = name
        (camera_key, camera), *extra = resolved.items()
        try:
            check_camera_names([name for _, name in extra], camera)
        except EpisodeFileError as exc:
            raise LeRobotError(f"--camera: {exc}") from None
        if len({name for _, name in extra}) != len(extra):
            raise LeRobotError("--camera: two dataset cameras map to one SOP camera name")
    elif len(cameras) == 1:
        camera_key = cameras[0]
        camera = camera_key.removeprefix(IMAGE_PREFIX)
    elif not cameras:
        raise LeRobotError("the dataset has no camera (no video or image feature); SOP episodes need one")
    else:
        raise LeRobotError(f"the dataset has {len(cameras)} cameras ({', '.join(cameras)}): name the ones to import "
                           f"with --camera KEY=NAME, the primary first (camera_map)")
    if not camera or len(camera) > 100 or "\x00" in camera:
        raise LeRobotError(f"camera name {camera!r} must have 1 to 100 characters")
    for key in (camera_key, *(k for k, _ in extra)):
        shape = list(meta.features[key]["shape"])
        if len(shape) != 3 or 3 not in (shape[0], shape[2]):
            raise LeRobotError(f"camera {key!r} has shape {shape}; SOP episodes take RGB frames [H, W, 3]")
        height, width = (shape[0], shape[1]) if shape[2] == 3 else (shape[1], shape[2])
        if not (1 <= height <= 1024 and 1 <= width <= 1024):
            raise LeRobotError(f"camera {key!r} has {height}x{width} frames; SOP episodes take at most 1024x1024")

    dims = task_dimensions(task)
    for role, key, index in (("state", state_key, 0), ("action", action_key, 1)):
        ft = meta.features.get(key)
        candidates = [k for k, f in meta.features.items()
                      if f["dtype"].startswith("float") and len(f["shape"]) == 1 and k not in DEFAULT_FEATURES]
        listed = ", ".join(f"{k} {meta.features[k]['shape']}" for k in candidates) or "none"
        if ft is None:
            raise LeRobotError(f"the dataset has no {role} feature {key!r}; its numeric vector features: {listed}")
        if not ft["dtype"].startswith("float") or len(ft["shape"]) != 1:
            raise LeRobotError(f"{role} feature {key!r} is {ft['dtype']} {ft['shape']}, not a float vector; "
                               f"candidates: {listed}")
        width = int(ft["shape"][0])
        if dims is not None and width != dims[index]:
            raise LeRobotError(f"{role} feature {key!r} has {width} values, but task {task.name} takes {dims[index]} "
                               f"({dims[2]}); the dataset's float vector features: {listed}")
    return ImportPlan(camera_key=camera_key, camera=camera, state_key=state_key, action_key=action_key,
                      extra=tuple(extra))


def imported_episode_id(task, episode: DatasetEpisode, plan: ImportPlan) -> str:
    """A UUID derived from what the episode is (the task it goes to, its state, action and timing columns, its
    camera and task string): the same episode imported again gets the same id, which the ingest is idempotent on,
    whichever export or --limit it came from."""
    digest = hashlib.sha256()
    for part in (task.name, plan.camera_key, episode.task, *(key for key, _ in plan.extra)):
        digest.update(part.encode() + b"\x00")
    for key in (plan.state_key, plan.action_key, "timestamp"):
        if key in episode.columns:
            digest.update(np.ascontiguousarray(episode.columns[key]).tobytes())
    return str(uuid.uuid5(_ID_NAMESPACE, digest.hexdigest()))


def episode_data_from(episode: DatasetEpisode, plan: ImportPlan, task, *, episode_id: str, robot: str,
                      started_at: float) -> EpisodeData:
    """An offline demonstration, as collect_demos records one: split offline, no checkpoint (policy_version -1);
    who drove each step from the dataset's control_source where it has one (else the demonstrator, code 0)."""
    t, cols, idx = episode.length, episode.columns, episode.index
    views = {}
    for key, name in ((plan.camera_key, plan.camera), *plan.extra):
        frames = episode.frames(key)
        if frames.ndim != 4 or frames.shape[0] != t or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise LeRobotError(f"episode {idx}: camera {key!r} decoded to {frames.dtype} {frames.shape}, "
                               f"expected uint8 [{t}, H, W, 3]")
        views[name] = frames
    images = views.pop(plan.camera)
    states, actions = _float_matrix(cols, plan.state_key, t, idx), _float_matrix(cols, plan.action_key, t, idx)
    if "control_source" in cols:
        source = np.asarray(cols["control_source"]).reshape(-1)
        if source.dtype.kind not in "iub" or source.min() < 0 or source.max() > 2:
            raise LeRobotError(f"episode {idx}: control_source holds values outside 0 (policy), 1 (operator), "
                               f"2 (simulated operator)")
        source = source.astype(np.uint8)
    else:
        source = np.zeros(t, np.uint8)
    rewards = _column(cols, "next.reward", t, np.float32, 0.0)
    successes = _column(cols, "next.success", t, bool, False)
    if "timestamp" in cols:
        times = np.asarray(cols["timestamp"], dtype=np.float64).reshape(-1)
        times = times - times[0]
    else:
        times = np.arange(t) / episode.dataset.fps
    if not np.isfinite(times).all():
        raise LeRobotError(f"episode {idx}: its timestamps are not finite numbers")
    success = bool(np.asarray(cols["episode_success"]).reshape(-1)[0]) if "episode_success" in cols else True
    prompt = (episode.task or (task.prompts[0] if task.prompts else task.name))[:500]
    return EpisodeData(
        meta={
            "episode_id": episode_id, "robot": robot, "task": task.name, "env_id": task.env_id, "prompt": prompt,
            "policy": IMPORT_POLICY, "policy_version": -1, "split": "offline",
            "outcome": "success" if success else "failure", "success": success,
            "started_at": started_at, "ended_at": started_at + max(0.0, float(times[-1])),
            "control_hz": float(episode.dataset.fps), "camera": plan.camera,
        },
        images=images, states=states, actions=actions, control_source=source, rewards=rewards,
        successes=successes, timestamps=times, segments=_segments(source), cameras=views,
    )


def _float_matrix(cols: dict, key: str, t: int, idx: int) -> np.ndarray:
    values = np.asarray(cols[key])
    if values.ndim != 2 or values.shape[0] != t:
        raise LeRobotError(f"episode {idx}: {key!r} is {values.shape}, expected [{t}, n]")
    values = values.astype(np.float32)
    if not np.isfinite(values).all():
        raise LeRobotError(f"episode {idx}: {key!r} holds values that are not finite numbers")
    return values


def _column(cols: dict, key: str, t: int, dtype, default) -> np.ndarray:
    if key not in cols:
        return np.full(t, default, dtype=dtype)
    return np.asarray(cols[key]).reshape(t).astype(dtype)


def _segments(source: np.ndarray) -> list[Segment]:
    """Runs of steps not driven by the policy, as the agent's recorder makes them."""
    names = {code: name for name, code in SEGMENT_SOURCES.items()}
    segments: list[Segment] = []
    for i, code in enumerate(source.tolist()):
        if code == 0:
            continue
        if segments and segments[-1].end == i and segments[-1].source == names[code]:
            segments[-1].end = i + 1
        else:
            segments.append(Segment(i, i + 1, names[code], "", "imported from a LeRobot dataset"))
    return segments


def import_dataset(root: str | os.PathLike, task, *, camera_map: dict[str, str] | None = None,
                   state_key: str = STATE_KEY, action_key: str = ACTION_KEY, progress: Progress = None,
                   limit: int | None = None, robot_name: str = IMPORT_ROBOT) -> dict[str, Any]:
    """Import a LeRobotDataset v3 as offline demonstrations of ``task`` (a ``robots.models.Task``), uploaded as
    robot ``robot_name`` through the ingest services like ``collect_demos``. Idempotent: an episode imported
    before (same task, same content) is not stored twice. Returns a summary: imported, already, frames, episode_ids."""
    from . import fleet
    from .agent.spool import sha256_of, upload_metadata
    from .exceptions import SopError
    from .models import Episode

    if limit is not None and limit < 1:
        raise LeRobotError(f"limit must be at least 1, got {limit}")
    meta = open_dataset(root)
    plan = plan_import(meta, task, camera_map=camera_map, state_key=state_key, action_key=action_key)
    for _ in iter_episodes(meta, limit=limit):
        pass  # every episode's rows are read and checked before anything is stored
    try:
        robot = fleet.recorder(robot_name)
    except ValueError as exc:
        raise LeRobotError(str(exc)) from None
    total = len(meta.episodes[:limit])
    summary = {"imported": 0, "already": 0, "frames": 0, "episode_ids": [], "camera": plan.camera,
               "camera_key": plan.camera_key}
    with tempfile.TemporaryDirectory(prefix="sop-lerobot-import-") as tmp:
        for done, episode in enumerate(iter_episodes(meta, limit=limit), start=1):
            episode_id = imported_episode_id(task, episode, plan)
            summary["episode_ids"].append(episode_id)
            if Episode.objects.filter(pk=episode_id, status=Episode.Status.VERIFIED).exists():
                summary["already"] += 1  # imported before: the ingest would answer with the stored episode
            else:
                data = episode_data_from(episode, plan, task, episode_id=episode_id, robot=robot.name,
                                         started_at=time.time())
                path = Path(tmp) / f"{episode_id}.h5"
                try:
                    write_episode(path, data)
                    with EpisodeReader(path) as reader:
                        body = upload_metadata(reader.meta, reader.meta["segments"], reader.steps,
                                               path.stat().st_size, sha256_of(path))
                except EpisodeFileError as exc:
                    raise LeRobotError(f"episode {episode.index} does not make a valid SOP episode: {exc}") from None
                try:
                    _upload(robot, body, path.read_bytes())
                except SopError as exc:
                    raise LeRobotError(f"episode {episode.index} was refused by the ingest: "
                                       f"{getattr(exc, 'detail', exc)}") from None
                finally:
                    path.unlink(missing_ok=True)
                summary["imported"] += 1
                summary["frames"] += episode.length
            if progress:
                progress(done, total)
    return summary


def _upload(robot, body: dict, data: bytes) -> None:
    """collect_demos' ingest: announce, then append until verified."""
    from . import ingest
    from .models import Episode

    episode, _ = ingest.open_upload(robot, body)
    offset = episode.received_bytes
    while offset < len(data) and episode.status != Episode.Status.VERIFIED:
        episode = ingest.append_upload(robot, episode.id, offset, data[offset:offset + UPLOAD_CHUNK])
        offset = episode.received_bytes
    if episode.status != Episode.Status.VERIFIED:
        raise LeRobotError(f"episode {episode.id} is {episode.status} after its upload: {episode.error}")


def parse_camera_map(values: Iterable[str]) -> dict[str, str]:
    """``--camera dataset_key=sop_camera`` options as a dict."""
    result = {}
    for value in values:
        key, sep, name = value.partition("=")
        if not sep or not key.strip() or not name.strip():
            raise LeRobotError(f"--camera {value!r}: expected DATASET_KEY=SOP_CAMERA, e.g. "
                               f"observation.images.front=corner3")
        result[key.strip()] = name.strip()
    return result


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
