"""The robot's durable episode spool: the directory layout, the upload sidecar, and recovery after a crash.

    <spool>/<id>.h5         the episode payload (episode_file.write_episode: temp file + fsync + rename)
    <spool>/<id>.json       its upload metadata, written LAST (temp + rename): its presence marks a complete entry
    <spool>/rejected/       entries the server refused for good (HTTP 413), kept for a human to look at

An entry leaves the spool only when the server has answered ``verified`` for it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

from robots import episode_file

log = logging.getLogger(__name__)


def sha256_of(path: Path, block: int = 1024 * 1024) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def upload_metadata(meta: dict[str, Any], segments: list[episode_file.Segment], steps: int, size: int, sha256: str):
    """The body of ``POST /api/robot/episodes/``, built from the episode file's attributes."""
    version = int(meta["policy_version"])
    return {
        "id": meta["episode_id"],
        "task": meta["task"],
        "prompt": meta["prompt"],
        "policy": meta["policy"],
        "policy_version": None if version < 0 else version,  # the file stores -1 for "not a checkpoint"
        "split": meta["split"],
        "started_at": float(meta["started_at"]),
        "ended_at": float(meta["ended_at"]),
        "steps": int(steps),
        "outcome": meta["outcome"],
        "success": bool(meta["success"]),
        "control_hz": float(meta["control_hz"]),
        "camera": meta["camera"],
        "size": int(size),
        "sha256": sha256,
        "interventions": [dataclasses.asdict(s) for s in segments],
    }


class Spool:
    """Paths and atomic sidecar writes for one spool directory. Safe to share between the writer and uploader
    threads: the writer only adds entries, the uploader only removes or moves complete ones."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.rejected = self.root / "rejected"
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def payload(self, episode_id: str) -> Path:
        return self.root / f"{episode_id}.h5"

    def sidecar(self, episode_id: str) -> Path:
        return self.root / f"{episode_id}.json"

    def write_sidecar(self, episode_id: str, metadata: dict[str, Any]) -> None:
        path = self.sidecar(episode_id)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as fh:
            json.dump(metadata, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    def read_sidecar(self, episode_id: str) -> dict[str, Any]:
        with open(self.sidecar(episode_id)) as fh:
            return json.load(fh)

    def seal(self, episode_id: str) -> dict[str, Any]:
        """Hash the written payload and write its sidecar: the entry becomes complete (uploadable)."""
        path = self.payload(episode_id)
        with episode_file.EpisodeReader(path) as reader:
            meta, segments, steps = reader.meta, reader.meta["segments"], reader.steps
        metadata = upload_metadata(meta, segments, steps, path.stat().st_size, sha256_of(path))
        self.write_sidecar(episode_id, metadata)
        return metadata

    def complete_entries(self) -> list[str]:
        """Ids of complete entries, oldest episode first."""
        entries = []
        for sidecar in self.root.glob("*.json"):
            episode_id = sidecar.stem
            if not self.payload(episode_id).exists():
                continue
            try:
                ended = float(self.read_sidecar(episode_id).get("ended_at", 0.0))
            except (OSError, ValueError):
                ended = 0.0
            entries.append((ended, episode_id))
        return [episode_id for _, episode_id in sorted(entries)]

    def recover(self) -> list[str]:
        """Run once at start-up, before the writer thread: clean up after a crash and return the complete entries.

        Temp files are half-written and go. A payload without a sidecar is a whole file (the rename is atomic) whose
        sidecar was never written: seal it now. A sidecar without a payload was already uploaded: it goes.
        """
        for tmp in self.root.glob("*.tmp"):
            log.warning("removing half-written %s", tmp.name)
            tmp.unlink(missing_ok=True)
        for payload in self.root.glob("*.h5"):
            if not self.sidecar(payload.stem).exists():
                try:
                    self.seal(payload.stem)
                    log.info("sealed %s, spooled before a crash", payload.name)
                except (episode_file.EpisodeFileError, OSError, KeyError) as exc:
                    log.error("cannot read spooled %s (%s): moving it to rejected/", payload.name, exc)
                    self._move_to_rejected(payload)
        for sidecar in self.root.glob("*.json"):
            if not self.payload(sidecar.stem).exists():
                sidecar.unlink(missing_ok=True)
        return self.complete_entries()

    def remove(self, episode_id: str) -> None:
        """Delete an entry. Only for entries the server has verified. The sidecar goes first: a crash in between
        leaves a payload that ``recover`` seals and the server answers ``verified`` again (uploads are idempotent)."""
        self.sidecar(episode_id).unlink(missing_ok=True)
        self.payload(episode_id).unlink(missing_ok=True)

    def reject(self, episode_id: str) -> Path:
        """Move an entry to ``rejected/``: out of the upload queue, but the data is kept."""
        for path in (self.payload(episode_id), self.sidecar(episode_id)):
            self._move_to_rejected(path)
        return self.rejected / self.payload(episode_id).name

    def _move_to_rejected(self, path: Path) -> None:
        with self._lock:
            self.rejected.mkdir(exist_ok=True)
        if path.exists():
            os.replace(path, self.rejected / path.name)

    def pending_count(self) -> int:
        return len(self.complete_entries())

    def __repr__(self) -> str:
        return f"Spool({str(self.root)!r})"
