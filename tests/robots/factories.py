"""Tiny episode payloads for tests: 5 steps of 8x8 images, written with the real episode_file writer."""

from __future__ import annotations

import hashlib
import time
import uuid
from pathlib import Path

import numpy as np

from robots import episode_file
from robots.episode_file import EpisodeData, Segment


def episode_data(episode_id: str | None = None, *, steps: int = 5, task: str = "drawer-open", robot: str = "sim-01",
                 outcome: str = "success", split: str = "online", segments: list[Segment] | None = None,
                 policy_version: int = 3) -> EpisodeData:
    rng = np.random.default_rng(0)
    now = time.time()
    control_source = np.zeros(steps, dtype=np.uint8)  # consistent with the segments, as the agent's recorder writes
    for segment in segments or []:
        control_source[segment.start:segment.end] = episode_file.SEGMENT_SOURCES[segment.source]
    return EpisodeData(
        meta={
            "episode_id": episode_id or str(uuid.uuid4()), "robot": robot, "task": task, "env_id": f"{task}-v3",
            "prompt": "open the drawer", "policy": f"v{policy_version}", "policy_version": policy_version,
            "split": split, "outcome": outcome, "success": outcome == "success", "started_at": now - 2.0,
            "ended_at": now, "control_hz": 10.0, "camera": "corner3",
        },
        images=rng.integers(0, 255, size=(steps, 8, 8, 3), dtype=np.uint8),
        states=rng.standard_normal((steps, 4)).astype(np.float32),
        actions=rng.standard_normal((steps, 4)).astype(np.float32),
        control_source=control_source,
        rewards=np.linspace(0, 1, steps, dtype=np.float32),
        successes=np.arange(steps) == steps - 1,
        timestamps=np.arange(steps, dtype=np.float64) / 10.0,
        segments=segments or [],
    )


def episode_bytes(tmp_path: Path, data: EpisodeData) -> bytes:
    path = tmp_path / f"{data.meta['episode_id']}.h5"
    episode_file.write_episode(path, data)
    return path.read_bytes()


def announcement(data: EpisodeData, payload: bytes, **overrides) -> dict:
    """The JSON body of POST /api/robot/episodes/ for this episode, as the agent sends it."""
    meta = data.meta
    body = {
        "id": meta["episode_id"], "task": meta["task"], "prompt": meta["prompt"], "policy": meta["policy"],
        "policy_version": meta["policy_version"], "split": meta["split"], "started_at": meta["started_at"],
        "ended_at": meta["ended_at"], "steps": data.steps, "outcome": meta["outcome"], "success": meta["success"],
        "control_hz": meta["control_hz"], "camera": meta["camera"], "size": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
        "interventions": [
            {"start": s.start, "end": s.end, "source": s.source, "operator": s.operator, "reason": s.reason}
            for s in data.segments
        ],
    }
    body.update(overrides)
    return body


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}
