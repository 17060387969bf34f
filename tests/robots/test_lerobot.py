"""LeRobotDataset v3.0 export and import (robots/lerobot.py, docs/lerobot.md).

The export is read back by a reader of this file's own, written against the v3 layout with pyarrow and PyAV only
(not robots.lerobot's): info.json's path templates, the episodes metadata's row ranges and video timestamps, and
frames looked up the way lerobot's decoder does (frame time within 1e-4 s of from_timestamp + timestamp).
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
import time
import uuid
from pathlib import Path

import av
import numpy as np
import pyarrow.parquet as pq
import pytest
from django.conf import settings
from django.core.management import CommandError, call_command

from robots import fleet, ingest, lerobot
from robots.agent.spool import sha256_of, upload_metadata
from robots.episode_file import SEGMENT_SOURCES, EpisodeData, EpisodeReader, Segment, write_episode
from robots.models import Episode, Task

pytestmark = pytest.mark.django_db

STATE, ACTION, SIZE = 39, 4, 32
LEROBOT_TOLERANCE_S = 1e-4  # LeRobotDataset's default tolerance_s


# ---------------------------------------------------------------------------------------------- the fleet's episodes


def smooth_images(steps: int, seed: int, size: int = SIZE) -> np.ndarray:
    """Camera-like frames: smooth shapes that move, so a lossy codec keeps them close."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, 3)
    frames = []
    for t in range(steps):
        cx, cy = size / 2 + 6 * math.cos(0.3 * t + phase[0]), size / 2 + 6 * math.sin(0.2 * t + phase[1])
        blob = 90 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 40.0)
        base = [60 + 40 * np.sin(xx / 9 + phase[c]) + 30 * np.cos(yy / 11 + t * 0.05) for c in range(3)]
        frames.append(np.stack([base[0] + blob, base[1] + 0.5 * blob, base[2]], -1))
    return np.clip(np.stack(frames), 0, 255).astype(np.uint8)


def make_episode(*, task: str, robot: str, split: str = "online", outcome: str = "success", version: int = 3,
                 steps: int = 12, segments: list[Segment] | None = None, prompt: str = "open the drawer",
                 seed: int = 0, control_hz: float = 10.0, state_dim: int = STATE, size: int = SIZE,
                 images: np.ndarray | None = None) -> EpisodeData:
    rng = np.random.default_rng(seed)
    source = np.zeros(steps, np.uint8)
    for s in segments or []:
        source[s.start:s.end] = SEGMENT_SOURCES[s.source]
    now = time.time() - 100 + seed
    return EpisodeData(
        meta={"episode_id": str(uuid.UUID(int=int(rng.integers(2**62)), version=4)), "robot": robot, "task": task,
              "env_id": f"{task}-v3", "prompt": prompt, "policy": f"v{version}" if version >= 0 else "scripted-expert",
              "policy_version": version, "split": split, "outcome": outcome, "success": outcome == "success",
              "started_at": now, "ended_at": now + steps / control_hz, "control_hz": control_hz, "camera": "corner3"},
        images=smooth_images(steps, seed, size) if images is None else images,
        states=rng.standard_normal((steps, state_dim)).astype(np.float32),
        actions=rng.uniform(-1, 1, (steps, ACTION)).astype(np.float32),
        control_source=source,
        rewards=rng.uniform(0, 10, steps).astype(np.float32),
        successes=np.arange(steps) >= steps - 2 if outcome == "success" else np.zeros(steps, bool),
        timestamps=np.cumsum(rng.uniform(0.09, 0.11, steps)) - 0.1,  # measured, not nominal
        segments=segments or [],
    )


def ingest_episode(tmp_path: Path, robot, data: EpisodeData) -> Episode:
    """Through the upload services, as a robot's uploader does."""
    path = tmp_path / f"{data.meta['episode_id']}.h5"
    write_episode(path, data)
    with EpisodeReader(path) as reader:
        body = upload_metadata(reader.meta, reader.meta["segments"], reader.steps, path.stat().st_size,
                               sha256_of(path))
    payload = path.read_bytes()
    episode, _ = ingest.open_upload(robot, body)
    episode = ingest.append_upload(robot, episode.id, 0, payload)
    assert episode.status == Episode.Status.VERIFIED, episode.error
    return episode


@pytest.fixture
def fleet_episodes(payload_dir, tmp_path):
    """Two tasks, two robots, policy versions 3 and 4, an offline demonstration, interventions of both kinds, and an
    upload that never finished (not verified: never exported). Returns {episode id: EpisodeData}."""
    Task.objects.create(name="drawer-open", env_id="drawer-open-v3", prompts=["open the drawer"], max_steps=150)
    Task.objects.create(name="reach", env_id="reach-v3", prompts=["reach the goal"], max_steps=150)
    sim1, _ = fleet.register_robot("sim-01")
    sim2, _ = fleet.register_robot("sim-02")
    specs = [
        (sim1, {"task": "drawer-open", "robot": "sim-01", "version": 3, "steps": 14, "seed": 1,
                "segments": [Segment(3, 7, "operator", "alice", "stuck", None)]}),
        (sim2, {"task": "drawer-open", "robot": "sim-02", "version": 4, "steps": 11, "seed": 2, "outcome": "timeout",
                "segments": [Segment(5, 9, "sim_operator", "", "stalled")], "prompt": "pull the drawer out"}),
        (sim1, {"task": "reach", "robot": "sim-01", "version": 4, "steps": 9, "seed": 3, "prompt": "reach the goal"}),
        (sim2, {"task": "drawer-open", "robot": "sim-02", "split": "offline", "version": -1, "steps": 10, "seed": 4}),
        (sim2, {"task": "reach", "robot": "sim-02", "split": "eval", "version": 3, "steps": 8, "seed": 5,
                "outcome": "failure", "prompt": "reach the goal"}),
    ]
    episodes = {}
    for robot, spec in specs:
        data = make_episode(**spec)
        episodes[ingest_episode(tmp_path, robot, data).id] = data
    unfinished = make_episode(task="reach", robot="sim-01", seed=6)
    path = tmp_path / "unfinished.h5"
    write_episode(path, unfinished)
    with EpisodeReader(path) as reader:
        body = upload_metadata(reader.meta, [], reader.steps, path.stat().st_size, sha256_of(path))
    ingest.open_upload(sim1, body)  # announced, no bytes: status uploading
    return episodes


# ---------------------------------------------------------------------------------------------- an independent reader


def read_v3(root: Path) -> dict:
    """A v3 dataset as {info, tasks, episodes: [{row, columns, frames}]}, following the format's own pointers."""
    info = json.loads((root / "meta/info.json").read_text())
    tasks_table = pq.read_table(root / "meta/tasks.parquet")
    tasks = dict(zip(tasks_table.column("task_index").to_pylist(), tasks_table.column("task").to_pylist()))
    rows = []
    for path in sorted((root / "meta/episodes").glob("chunk-*/file-*.parquet")):
        rows += pq.read_table(path).to_pylist()
    rows.sort(key=lambda r: r["episode_index"])
    video_keys = [k for k, ft in info["features"].items() if ft["dtype"] == "video"]
    episodes = []
    for row in rows:
        data_path = root / info["data_path"].format(chunk_index=row["data/chunk_index"],
                                                    file_index=row["data/file_index"])
        table = pq.read_table(data_path).to_pylist()
        frames_rows = [r for r in table if row["dataset_from_index"] <= r["index"] < row["dataset_to_index"]]
        columns = {key: np.array([r[key] for r in frames_rows]) for key in frames_rows[0]}
        frames = {}
        for key in video_keys:
            video = root / info["video_path"].format(video_key=key, chunk_index=row[f"videos/{key}/chunk_index"],
                                                     file_index=row[f"videos/{key}/file_index"])
            frames[key] = decode_like_lerobot(video, row[f"videos/{key}/from_timestamp"] + columns["timestamp"])
        episodes.append({"row": row, "columns": columns, "frames": frames})
    return {"info": info, "tasks": tasks, "episodes": episodes}


def decode_like_lerobot(path: Path, query: np.ndarray) -> np.ndarray:
    """lerobot's decode_video_frames_pyav: seek to the keyframe before the first time, decode forward, and take for
    each queried time the frame within tolerance_s of it."""
    loaded, times = [], []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        container.seek(round(float(query[0]) / stream.time_base) - 1, backward=True, any_frame=False, stream=stream)
        for frame in container.decode(stream):
            t = float(frame.pts * stream.time_base)
            loaded.append(frame.to_ndarray(format="rgb24"))
            times.append(t)
            if t >= query[-1]:
                break
    times = np.array(times)
    nearest = np.abs(query[:, None] - times[None, :]).argmin(axis=1)
    assert np.abs(times[nearest] - query).max() <= LEROBOT_TOLERANCE_S, (times, query)
    assert len(set(nearest.tolist())) == len(query)  # one frame per query, none twice
    return np.stack([loaded[i] for i in nearest])


def mean_abs_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def export(out: Path, *args) -> str:
    call_command("export_lerobot", str(out), *args)
    return str(out)


# ---------------------------------------------------------------------------------------------- export


def test_the_export_has_the_v3_layout_and_metadata(fleet_episodes, tmp_path):
    out = tmp_path / "ds"
    call_command("export_lerobot", str(out))
    verified = Episode.objects.filter(status=Episode.Status.VERIFIED)
    assert verified.count() == 5

    info = json.loads((out / "meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0"
    assert info["fps"] == 10 and info["robot_type"] == "sop-metaworld"
    assert info["total_episodes"] == 5 and info["splits"] == {"train": "0:5"}
    assert info["total_frames"] == sum(d.steps for d in fleet_episodes.values()) == 52
    assert info["total_tasks"] == 3  # the prompts: open the drawer, pull the drawer out, reach the goal
    assert info["chunks_size"] == 1000
    assert info["data_files_size_in_mb"] == 100 and info["video_files_size_in_mb"] == 200
    assert info["data_path"] == "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
    assert info["video_path"] == "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"

    features = info["features"]
    expected = {
        "observation.state": ("float32", [STATE]), "action": ("float32", [ACTION]),
        "observation.images.corner3": ("video", [SIZE, SIZE, 3]), "control_source": ("int64", [1]),
        "intervention": ("bool", [1]), "policy_version": ("int64", [1]), "episode_success": ("bool", [1]),
        "next.reward": ("float32", [1]), "next.success": ("bool", [1]), "timestamp": ("float32", [1]),
        "frame_index": ("int64", [1]), "episode_index": ("int64", [1]), "index": ("int64", [1]),
        "task_index": ("int64", [1]),
    }
    assert {k: (ft["dtype"], ft["shape"]) for k, ft in features.items()} == expected
    assert features["observation.state"]["names"][:4] == ["hand_x", "hand_y", "hand_z", "gripper_distance"]
    assert len(features["observation.state"]["names"]) == STATE
    assert features["observation.state"]["names"][-3:] == ["goal_x", "goal_y", "goal_z"]
    assert features["action"]["names"] == ["delta_x", "delta_y", "delta_z", "gripper"]
    assert features["control_source"]["names"] == ["policy", "operator", "sim_operator"]
    video = features["observation.images.corner3"]
    assert video["names"] == ["height", "width", "channels"]
    assert video["info"]["video.codec"] in ("h264", "mpeg4") and video["info"]["video.pix_fmt"] == "yuv420p"
    assert (video["info"]["video.height"], video["info"]["video.width"]) == (SIZE, SIZE)
    assert video["info"]["video.fps"] == 10 and video["info"]["video.channels"] == 3
    assert video["info"]["has_audio"] is False and video["info"]["video.is_depth_map"] is False

    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        "data/chunk-000/file-000.parquet", "meta/episodes/chunk-000/file-000.parquet", "meta/info.json",
        "meta/stats.json", "meta/tasks.parquet", "videos/observation.images.corner3/chunk-000/file-000.mp4"]

    # tasks.parquet: lerobot's pandas DataFrame indexed by the task string, with a task_index column
    tasks = pq.read_table(out / "meta/tasks.parquet")
    assert json.loads(tasks.schema.metadata[b"pandas"])["index_columns"] == ["task"]
    assert sorted(tasks.column("task").to_pylist()) == ["open the drawer", "pull the drawer out", "reach the goal"]
    assert sorted(tasks.column("task_index").to_pylist()) == [0, 1, 2]

    episodes = pq.read_table(out / "meta/episodes/chunk-000/file-000.parquet")
    for column in ("episode_index", "tasks", "length", "data/chunk_index", "data/file_index", "dataset_from_index",
                   "dataset_to_index", "videos/observation.images.corner3/chunk_index",
                   "videos/observation.images.corner3/file_index", "videos/observation.images.corner3/from_timestamp",
                   "videos/observation.images.corner3/to_timestamp", "meta/episodes/chunk_index",
                   "meta/episodes/file_index", "stats/observation.state/mean", "stats/action/q99",
                   "stats/observation.images.corner3/std", "stats/index/count", "sop/episode_id", "sop/robot",
                   "sop/split", "sop/outcome", "sop/policy_version"):
        assert column in episodes.column_names, column
    rows = episodes.to_pylist()
    assert [r["episode_index"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[0]["dataset_from_index"] == 0
    for before, after in itertools.pairwise(rows):  # contiguous frame ranges and video time ranges in one file each
        assert after["dataset_from_index"] == before["dataset_to_index"]
        assert after["videos/observation.images.corner3/from_timestamp"] == pytest.approx(
            before["videos/observation.images.corner3/to_timestamp"])
    for row in rows:
        source = fleet_episodes[uuid.UUID(row["sop/episode_id"])]
        assert row["length"] == source.steps == row["dataset_to_index"] - row["dataset_from_index"]
        assert row["tasks"] == [source.meta["prompt"]]
        assert (row["videos/observation.images.corner3/to_timestamp"]
                - row["videos/observation.images.corner3/from_timestamp"]) == pytest.approx(source.steps / 10)
        assert row["sop/policy_version"] == source.meta["policy_version"]
        assert row["stats/observation.state/mean"] == pytest.approx(source.states.mean(axis=0).tolist(), abs=1e-6)
        assert row["stats/index/count"] == [source.steps]

    # stats.json: per feature over every frame; images per channel in [0, 1]
    stats = json.loads((out / "meta/stats.json").read_text())
    assert set(stats) == set(features)
    states = np.concatenate([d.states for d in fleet_episodes.values()]).astype(np.float64)
    s = stats["observation.state"]
    assert set(s) == {"min", "max", "mean", "std", "count", "q01", "q10", "q50", "q90", "q99"}
    assert s["count"] == [52]
    assert np.allclose(s["mean"], states.mean(axis=0), atol=1e-6)
    assert np.allclose(s["std"], states.std(axis=0), atol=1e-6)
    assert s["min"] == pytest.approx(states.min(axis=0).tolist())
    assert s["max"] == pytest.approx(states.max(axis=0).tolist())
    images = np.concatenate([d.images for d in fleet_episodes.values()]).astype(np.float64) / 255
    im = stats["observation.images.corner3"]
    assert np.array(im["mean"]).shape == (3, 1, 1) and im["count"] == [52]
    assert np.allclose(np.array(im["mean"]).reshape(3), images.reshape(-1, 3).mean(axis=0), atol=1e-9)
    assert np.allclose(np.array(im["std"]).reshape(3), images.reshape(-1, 3).std(axis=0), atol=1e-9)
    assert stats["intervention"]["mean"] == pytest.approx([8 / 52])


def test_the_export_reads_back_frame_by_frame(fleet_episodes, tmp_path):
    out = Path(export(tmp_path / "ds"))
    dataset = read_v3(out)
    assert len(dataset["episodes"]) == 5
    index = 0
    for k, episode in enumerate(dataset["episodes"]):
        row, cols = episode["row"], episode["columns"]
        db = Episode.objects.get(pk=row["sop/episode_id"])
        source = fleet_episodes[db.id]
        t = source.steps
        assert row["sop/task"] == db.task.name and row["sop/robot"] == db.robot.name and row["sop/split"] == db.split
        np.testing.assert_array_equal(np.stack(cols["observation.state"]).astype(np.float32), source.states)
        np.testing.assert_array_equal(np.stack(cols["action"]).astype(np.float32), source.actions)
        np.testing.assert_array_equal(cols["next.reward"].astype(np.float32), source.rewards)
        np.testing.assert_array_equal(cols["next.success"], source.successes)
        np.testing.assert_array_equal(cols["control_source"], source.control_source.astype(np.int64))
        np.testing.assert_array_equal(cols["intervention"], source.control_source != 0)
        assert cols["intervention"].sum() == sum(s.end - s.start for s in source.segments)
        assert (cols["policy_version"] == source.meta["policy_version"]).all()
        assert (cols["episode_success"] == (db.outcome == "success")).all()
        np.testing.assert_array_equal(cols["frame_index"], np.arange(t))
        np.testing.assert_array_equal(cols["episode_index"], np.full(t, k))
        np.testing.assert_array_equal(cols["index"], np.arange(index, index + t))
        np.testing.assert_array_equal(cols["timestamp"], (np.arange(t) / 10).astype(np.float32))
        assert {dataset["tasks"][i] for i in cols["task_index"]} == {source.meta["prompt"]}
        frames = episode["frames"]["observation.images.corner3"]
        assert frames.shape == source.images.shape  # exactly one decoded frame per step
        errors = [mean_abs_error(a, b) for a, b in zip(frames, source.images)]
        assert max(errors) < 6, errors
        index += t
    # the labels the console shows are in the data: one operator and one simulated-operator intervention
    sources = np.concatenate([e["columns"]["control_source"] for e in dataset["episodes"]])
    assert (sources == 1).sum() == 4 and (sources == 2).sum() == 4


def test_each_episode_starts_on_a_keyframe(fleet_episodes, tmp_path):
    """An episode's frames decode without its predecessor in the file (as lerobot's concatenated files do)."""
    out = Path(export(tmp_path / "ds"))
    rows = pq.read_table(out / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    starts = {round(r["videos/observation.images.corner3/from_timestamp"] * 10) for r in rows}
    with av.open(str(out / "videos/observation.images.corner3/chunk-000/file-000.mp4")) as container:
        keys = [round(float(p.pts * p.time_base) * 10) for p in container.demux(video=0) if p.is_keyframe]
    assert starts <= set(keys)


def test_filters_select_the_episodes(fleet_episodes, tmp_path):
    def exported(*args) -> set[uuid.UUID]:
        out = tmp_path / f"ds-{uuid.uuid4().hex[:6]}"
        call_command("export_lerobot", str(out), *args)
        rows = pq.read_table(out / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
        return {uuid.UUID(r["sop/episode_id"]) for r in rows}

    every = Episode.objects.filter(status=Episode.Status.VERIFIED)
    assert exported("--tasks", "reach") == set(every.filter(task__name="reach").values_list("id", flat=True))
    assert len(exported("--tasks", "reach")) == 2
    assert exported("--split", "offline") == set(every.filter(split="offline").values_list("id", flat=True))
    assert exported("--versions", "4") == set(every.filter(policy_version=4).values_list("id", flat=True))
    assert len(exported("--versions", "3,4")) == 4  # not the demonstration, which ran no checkpoint
    assert exported("--robots", "sim-01", "--tasks", "drawer-open", "--split", "online") == set(
        every.filter(robot__name="sim-01", task__name="drawer-open", split="online").values_list("id", flat=True))


def test_the_export_command_refuses_what_it_cannot_do(fleet_episodes, tmp_path):
    with pytest.raises(CommandError, match="unknown task"):
        call_command("export_lerobot", str(tmp_path / "a"), "--tasks", "no-such-task")
    with pytest.raises(CommandError, match="unknown robot"):
        call_command("export_lerobot", str(tmp_path / "a"), "--robots", "nobody")
    with pytest.raises(CommandError, match="integers"):
        call_command("export_lerobot", str(tmp_path / "a"), "--versions", "three")
    with pytest.raises(CommandError, match="no verified episodes"):
        call_command("export_lerobot", str(tmp_path / "a"), "--tasks", "reach", "--split", "offline")
    assert not (tmp_path / "a").exists()

    not_a_dataset = tmp_path / "notes"
    not_a_dataset.mkdir()
    (not_a_dataset / "keep.txt").write_text("mine")
    with pytest.raises(CommandError, match="not empty"):
        call_command("export_lerobot", str(not_a_dataset), "--tasks", "reach")
    with pytest.raises(CommandError, match="not a LeRobot dataset"):
        call_command("export_lerobot", str(not_a_dataset), "--tasks", "reach", "--overwrite")
    assert (not_a_dataset / "keep.txt").read_text() == "mine"

    out = Path(export(tmp_path / "ds", "--tasks", "reach"))
    with pytest.raises(CommandError, match="--overwrite"):
        call_command("export_lerobot", str(out), "--tasks", "drawer-open")
    call_command("export_lerobot", str(out), "--tasks", "drawer-open", "--overwrite")
    assert json.loads((out / "meta/info.json").read_text())["total_episodes"] == 3

    # one fps per dataset: a demonstration recorded "as fast as possible" does not mix with 10 Hz episodes
    sim, _ = fleet.register_robot("sim-03")
    ingest_episode(tmp_path, sim, make_episode(task="reach", robot="sim-03", seed=9, control_hz=1000.0))
    with pytest.raises(CommandError, match=r"different control rates: 10 Hz \(2 episodes\), 1000 Hz \(1 episodes\)"):
        call_command("export_lerobot", str(tmp_path / "b"), "--tasks", "reach")
    call_command("export_lerobot", str(tmp_path / "b"), "--tasks", "reach", "--fps", "10")
    assert json.loads((tmp_path / "b/meta/info.json").read_text())["total_episodes"] == 3
    assert not list(tmp_path.glob(".*partial*"))


def test_files_roll_over_by_size_and_chunk(payload_dir, tmp_path):
    """Wide states fill a 1 MB data file in two episodes; with 2 files per chunk the fifth file is chunk-001's."""
    Task.objects.create(name="wide", env_id="wide-v0", prompts=["do it"])
    robot, _ = fleet.register_robot("sim-01")
    sources = {}
    for seed in range(5):
        data = make_episode(task="wide", robot="sim-01", seed=seed, steps=25, state_dim=4096, size=16)
        data.meta["env_id"] = "wide-v0"
        sources[ingest_episode(tmp_path, robot, data).id] = data
    episodes = Episode.objects.filter(task__name="wide").order_by("started_at")
    out = tmp_path / "ds"
    summary = lerobot.export_dataset(episodes, out, data_files_size_in_mb=1, chunks_size=2)
    data_files = sorted(str(p.relative_to(out)) for p in (out / "data").rglob("*.parquet"))
    assert data_files == ["data/chunk-000/file-000.parquet", "data/chunk-000/file-001.parquet",
                          "data/chunk-001/file-000.parquet"]
    assert all((out / f).stat().st_size < 1024**2 for f in data_files)
    info = json.loads((out / "meta/info.json").read_text())
    assert info["data_files_size_in_mb"] == 1 and info["chunks_size"] == 2 and info["robot_type"] == "sop"
    assert info["features"]["observation.state"]["names"][:2] == ["state_0", "state_1"]
    dataset = read_v3(out)
    assert [(e["row"]["data/chunk_index"], e["row"]["data/file_index"]) for e in dataset["episodes"]] == [
        (0, 0), (0, 0), (0, 1), (0, 1), (1, 0)]
    assert len({(e["row"]["meta/episodes/chunk_index"], e["row"]["meta/episodes/file_index"])
                for e in dataset["episodes"]}) > 1  # the per-episode stats of 4096 values roll over too
    for e in dataset["episodes"]:
        source = sources[uuid.UUID(e["row"]["sop/episode_id"])]
        np.testing.assert_array_equal(np.stack(e["columns"]["observation.state"]).astype(np.float32), source.states)
        assert e["frames"]["observation.images.corner3"].shape == source.images.shape
    assert summary["files"] == len([p for p in out.rglob("*") if p.is_file()])


def test_video_files_roll_over_and_restart_their_timestamps(payload_dir, tmp_path):
    """Noise frames hardly compress: about 0.43 MB an episode of 40 128x128 frames, so a 1 MB video file takes two
    episodes and the third starts the next file."""
    Task.objects.create(name="drawer-open", env_id="drawer-open-v3", prompts=["open the drawer"])
    robot, _ = fleet.register_robot("sim-01")
    rng = np.random.default_rng(0)
    for seed in range(3):
        noise = rng.integers(0, 256, (40, 128, 128, 3), dtype=np.uint8)
        ingest_episode(tmp_path, robot, make_episode(task="drawer-open", robot="sim-01", seed=seed, steps=40,
                                                     images=noise))
    out = tmp_path / "ds"
    lerobot.export_dataset(Episode.objects.order_by("started_at"), out, video_files_size_in_mb=1)
    videos = out / "videos/observation.images.corner3/chunk-000"
    assert sorted(p.name for p in videos.iterdir()) == ["file-000.mp4", "file-001.mp4"]
    assert (videos / "file-000.mp4").stat().st_size < 1024**2
    dataset = read_v3(out)  # decodes every frame at from_timestamp + timestamp, within 1e-4 s
    rows = [e["row"] for e in dataset["episodes"]]
    assert [r["videos/observation.images.corner3/file_index"] for r in rows] == [0, 0, 1]
    assert [r["videos/observation.images.corner3/from_timestamp"] for r in rows] == [0.0, 4.0, 0.0]
    assert [r["data/file_index"] for r in rows] == [0, 0, 0]  # the data stayed in one file
    assert all(e["frames"]["observation.images.corner3"].shape == (40, 128, 128, 3) for e in dataset["episodes"])


# ---------------------------------------------------------------------------------------------- import


def test_an_export_imports_back_as_offline_demonstrations_once(fleet_episodes, tmp_path):
    out = Path(export(tmp_path / "ds", "--tasks", "drawer-open"))
    Task.objects.create(name="drawer-open-2", env_id="drawer-open-v3", prompts=["open it"])
    call_command("import_lerobot", str(out), "--task", "drawer-open-2")

    imported = Episode.objects.filter(task__name="drawer-open-2")
    assert imported.count() == 3
    by_exported = {uuid.UUID(r["sop/episode_id"]): r for r in
                   pq.read_table(out / "meta/episodes/chunk-000/file-000.parquet").to_pylist()}
    matched = set()
    for episode in imported:
        assert episode.status == Episode.Status.VERIFIED and episode.split == "offline"
        assert episode.policy_version is None and episode.robot.name == "demo-collector"
        assert episode.control_hz == 10.0
        with EpisodeReader(settings.PAYLOAD_DIR / episode.payload_path) as reader:
            data = reader.load()
        original_id = next(i for i in by_exported if np.array_equal(fleet_episodes[i].states, data.states))
        original = fleet_episodes[original_id]
        matched.add(original_id)
        np.testing.assert_array_equal(data.actions, original.actions)
        np.testing.assert_array_equal(data.rewards, original.rewards)
        np.testing.assert_array_equal(data.successes, original.successes)
        np.testing.assert_array_equal(data.control_source, original.control_source)
        assert [(s.start, s.end, s.source) for s in data.segments] == [
            (s.start, s.end, s.source) for s in original.segments]
        assert episode.intervention_steps == sum(s.end - s.start for s in original.segments)
        assert data.images.shape == original.images.shape
        assert max(mean_abs_error(a, b) for a, b in zip(data.images, original.images)) < 6
        assert data.meta["prompt"] == original.meta["prompt"] and data.meta["camera"] == "corner3"
        assert episode.outcome == ("success" if original.meta["outcome"] == "success" else "failure")
        np.testing.assert_allclose(data.timestamps, np.arange(original.steps) / 10, atol=1e-6)
    assert matched == set(by_exported)

    ids = set(imported.values_list("id", flat=True))
    call_command("import_lerobot", str(out), "--task", "drawer-open-2")
    assert set(Episode.objects.filter(task__name="drawer-open-2").values_list("id", flat=True)) == ids
    # the same dataset for another task is another set of demonstrations
    Task.objects.create(name="drawer-open-3", env_id="drawer-open-v3", prompts=["open it"])
    summary = lerobot.import_dataset(out, Task.objects.get(name="drawer-open-3"), limit=1)
    assert summary["imported"] == 1 and summary["already"] == 0
    assert not set(summary["episode_ids"]) & {str(i) for i in ids}


def test_the_module_reader_agrees_with_the_independent_one(fleet_episodes, tmp_path):
    out = Path(export(tmp_path / "ds", "--tasks", "reach"))
    ours = list(lerobot.read_dataset(out))
    theirs = read_v3(out)["episodes"]
    assert [e.index for e in ours] == [e["row"]["episode_index"] for e in theirs]
    for mine, other in zip(ours, theirs):
        assert mine.task == "reach the goal"
        np.testing.assert_array_equal(mine.columns["observation.state"],
                                      np.stack(other["columns"]["observation.state"]))
        np.testing.assert_array_equal(mine.frames("observation.images.corner3"),
                                      other["frames"]["observation.images.corner3"])


def test_bad_datasets_are_refused_with_clear_errors(fleet_episodes, tmp_path):
    Task.objects.create(name="target", env_id="drawer-open-v3", prompts=["open it"])

    def refused(path, match, *args):
        with pytest.raises(CommandError, match=match):
            call_command("import_lerobot", str(path), "--task", "target", *args)

    refused(tmp_path / "missing", "is not a directory")
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", "is not a LeRobot dataset: it has no meta/info.json")
    with pytest.raises(CommandError, match="unknown task 'nope'"):
        call_command("import_lerobot", str(tmp_path / "empty"), "--task", "nope")

    out = Path(export(tmp_path / "ds", "--tasks", "drawer-open"))
    old = tmp_path / "old"
    shutil.copytree(out, old)
    info = json.loads((old / "meta/info.json").read_text())
    (old / "meta/info.json").write_text(json.dumps({**info, "codebase_version": "v2.1"}))
    refused(old, r"codebase_version 'v2.1' is not supported")

    refused(out, r"no camera 'front'; its cameras: observation.images.corner3", "--camera", "front=corner3")
    refused(out, "expected DATASET_KEY=SOP_CAMERA", "--camera", "corner3")
    refused(out, r"state feature 'action' has 4 values, but task target takes 39 \(Meta-World's drawer-open-v3",
            "--state-key", "action")
    refused(out, r"no state feature 'observation.joints'; its numeric vector features: observation.state \[39\], "
                 r"action \[4\]", "--state-key", "observation.joints")

    two = tmp_path / "two-cameras"
    shutil.copytree(out, two)
    info = json.loads((two / "meta/info.json").read_text())
    info["features"]["observation.images.wrist"] = {"dtype": "image", "shape": [SIZE, SIZE, 3],
                                                    "names": ["height", "width", "channels"]}
    (two / "meta/info.json").write_text(json.dumps(info))
    refused(two, r"2 cameras \(observation.images.corner3, observation.images.wrist\).*--camera")
    refused(two, "is the primary camera", "--camera", "corner3=a", "--camera", "wrist=a")

    # a state of the wrong width for the task: 38 values where Meta-World has 39
    Task.objects.create(name="narrow", env_id="narrow-v0", prompts=["x"])
    robot, _ = fleet.register_robot("sim-09")
    data = make_episode(task="narrow", robot="sim-09", seed=7, state_dim=38)
    data.meta["env_id"] = "narrow-v0"
    ingest_episode(tmp_path, robot, data)
    narrow = Path(export(tmp_path / "narrow", "--tasks", "narrow"))
    refused(narrow, r"state feature 'observation.state' has 38 values, but task target takes 39")
    assert not Episode.objects.filter(task__name="target").exists()

    # a data file that lost rows
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    table = pq.read_table(broken / "data/chunk-000/file-000.parquet")
    pq.write_table(table.slice(0, table.num_rows - 1), broken / "data/chunk-000/file-000.parquet")
    refused(broken, r"holds \d+ of its rows")
    assert not Episode.objects.filter(task__name="target").exists()  # checked before anything was stored


def test_more_cameras_export_as_videos_of_their_own_and_import_back(payload_dir, tmp_path):
    """An episode recorded with a wrist camera beside the scene camera: one video feature per camera in the dataset
    (an independent v3 reader decodes both), and an import that maps both gives an episode with both again."""
    Task.objects.create(name="drawer-open", env_id="drawer-open-v3", prompts=["open the drawer"], max_steps=150)
    robot, _ = fleet.register_robot("sim-01")
    sources = []
    for seed in (1, 2):
        data = make_episode(task="drawer-open", robot="sim-01", seed=seed, steps=10)
        data.cameras = {"gripperPOV": smooth_images(10, seed + 10, 16)}  # its own size
        ingest_episode(tmp_path, robot, data)
        sources.append(data)
    assert Episode.objects.get(pk=sources[0].meta["episode_id"]).cameras == ["corner3", "gripperPOV"]
    out = Path(export(tmp_path / "ds", "--tasks", "drawer-open"))
    info = json.loads((out / "meta/info.json").read_text())
    assert info["features"]["observation.images.gripperPOV"]["shape"] == [16, 16, 3]
    assert info["features"]["observation.images.corner3"]["shape"] == [SIZE, SIZE, 3]
    theirs = read_v3(out)["episodes"]
    for episode in theirs:
        source = next(s for s in sources if s.meta["episode_id"] == episode["row"]["sop/episode_id"])
        wrist = episode["frames"]["observation.images.gripperPOV"]
        assert wrist.shape == source.cameras["gripperPOV"].shape
        assert max(mean_abs_error(a, b) for a, b in zip(wrist, source.cameras["gripperPOV"])) < 6

    Task.objects.create(name="drawer-open-2", env_id="drawer-open-v3", prompts=["open it"])
    call_command("import_lerobot", str(out), "--task", "drawer-open-2", "--camera", "corner3=corner3",
                 "--camera", "observation.images.gripperPOV=wrist")
    for episode in Episode.objects.filter(task__name="drawer-open-2"):
        assert episode.cameras == ["corner3", "wrist"]
        with EpisodeReader(settings.PAYLOAD_DIR / episode.payload_path) as reader:
            data = reader.load()
        source = next(s for s in sources if np.array_equal(s.states, data.states))
        assert data.cameras["wrist"].shape == source.cameras["gripperPOV"].shape
        assert max(mean_abs_error(a, b) for a, b in zip(data.cameras["wrist"], source.cameras["gripperPOV"])) < 6
