"""Episodes: their records over the robot socket (``episode.started`` / ``episode.ended``) and the HTTP ingest of
their payloads (resumable, idempotent by episode UUID, verified by sha256 and by the payload checker before anything
reads it; docs/protocol.md "HTTP ingest").
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import IntegrityError, transaction
from django.utils import timezone

from . import protocol, tasking
from .episode_file import EpisodeReader
from .exceptions import (
    ChecksumMismatch,
    EpisodeConflict,
    EpisodeNotFound,
    ForbiddenEpisode,
    InvalidPayload,
    OffsetMismatch,
    PayloadTooLarge,
    SopError,
    UnknownTask,
    UploadNotOpen,
)
from .models import Episode, InterventionSegment, Robot, Task
from .protocol import ControlSource, Outcome, RobotState, Split
from .values import db_count, db_version, from_unix

log = logging.getLogger(__name__)

HASH_BLOCK = 1024 * 1024


# ---------------------------------------------------------------- episodes over the socket


def episode_started(robot: Robot, msg: protocol.EpisodeStarted) -> Episode:
    """Record an episode the robot began (status recording). Idempotent; another robot's id is refused."""
    task = Task.objects.filter(name=msg.task).first()
    if task is None:
        raise UnknownTask(f"unknown task {msg.task!r}")
    episode, _ = Episode.objects.get_or_create(  # get_or_create survives two robots racing on one id
        id=msg.episode_id,
        defaults=dict(
            robot=robot,
            task=task,
            prompt=msg.prompt[:500],
            policy_version=db_version(msg.policy_version),
            policy_name=msg.policy[:100],
            split=msg.split,
            started_at=from_unix(msg.started_at, "started_at"),
            status=Episode.Status.RECORDING,
        ),
    )
    if episode.robot_id != robot.pk:
        _refuse(robot, episode)
    Robot.objects.filter(pk=robot.pk).update(
        current_episode=msg.episode_id,
        current_task=task,
        current_prompt=msg.prompt[:500],
        current_step=0,
        state=RobotState.RUNNING.value,
        last_seen=timezone.now(),
    )
    return episode


def episode_ended(robot: Robot, msg: protocol.EpisodeEnded) -> protocol.TaskAssigned:
    """Record the end of an episode; returns the robot's next assignment."""
    with transaction.atomic():
        episode = Episode.objects.select_for_update().filter(pk=msg.episode_id).first()
        if episode is None:
            # Its episode.started was lost (e.g. sent while the server restarted): the upload will create it.
            log.info("robot %s ended episode %s, which was never announced", robot.name, msg.episode_id)
        elif episode.robot_id != robot.pk:
            _refuse(robot, episode)
        elif episode.status == Episode.Status.RECORDING:  # once an upload is open, the payload's metadata wins
            episode.ended_at = from_unix(msg.ended_at, "ended_at")
            episode.steps = db_count(msg.steps)
            episode.outcome = msg.outcome
            episode.success = msg.outcome == Outcome.SUCCESS.value
            episode.outcome_source = "robot"
            episode.intervention_count = db_count(msg.interventions)
            episode.intervention_steps = db_count(msg.intervention_steps)
            episode.save()
        Robot.objects.filter(pk=robot.pk).update(current_episode=None, current_step=0, last_seen=timezone.now())
        return tasking.assign(robot)


# ---------------------------------------------------------------- payload ingest (HTTP data plane)


def partial_path(episode_id) -> Path:
    return Path(settings.PAYLOAD_DIR) / "partial" / f"{episode_id}.part"


def stored_path(episode_id) -> Path:
    """Where a verified payload lives, relative to PAYLOAD_DIR (fanned out so no directory grows huge)."""
    return Path("episodes") / str(episode_id)[:2] / f"{episode_id}.h5"


def open_upload(robot: Robot, meta: dict[str, Any]) -> tuple[Episode, bool]:
    """Announce an episode payload (``meta`` as validated by serializers.EpisodeAnnouncementSerializer).

    Idempotent on the episode UUID. Returns the episode (its ``received_bytes`` is where the upload resumes) and
    whether it was created. Already verified with the same sha256: returned as is. Verified with another sha256:
    EpisodeConflict. Not verified and the size or sha256 changed: the upload starts again from 0.
    """
    size, sha256 = meta["size"], meta["sha256"]
    if size > settings.SOP_MAX_EPISODE_BYTES:
        raise PayloadTooLarge(f"episode of {size} bytes exceeds the limit of {settings.SOP_MAX_EPISODE_BYTES}")
    task = Task.objects.filter(name=meta["task"]).first()
    if task is None:
        raise UnknownTask(f"unknown task {meta['task']!r}")
    fields = _announced_fields(meta, task)
    with transaction.atomic():
        episode = Episode.objects.select_for_update().filter(pk=meta["id"]).first()
        if episode is None:
            try:
                with transaction.atomic():
                    episode = Episode.objects.create(
                        id=meta["id"], robot=robot, status=Episode.Status.UPLOADING,
                        payload_size=size, payload_sha256=sha256, **fields,
                    )
                partial_path(episode.id).unlink(missing_ok=True)
                return episode, True
            except IntegrityError:  # a concurrent announcement created it between our SELECT and INSERT
                episode = Episode.objects.select_for_update().get(pk=meta["id"])
        if episode.robot_id != robot.pk:
            _refuse(robot, episode)
        if episode.status == Episode.Status.VERIFIED:
            if episode.payload_sha256 == sha256:
                return episode, False
            raise EpisodeConflict(f"episode {episode.id} is stored with sha256 {episode.payload_sha256}")
        if (episode.status, episode.payload_size, episode.payload_sha256) == (Episode.Status.UPLOADING, size, sha256):
            episode.received_bytes = _partial_bytes(episode)
        else:
            # The first announcement after episode.started, a retry after a rejected upload, or new content.
            partial_path(episode.id).unlink(missing_ok=True)
            episode.status = Episode.Status.UPLOADING
            episode.payload_size, episode.payload_sha256, episode.received_bytes = size, sha256, 0
            episode.error = ""
        for name, value in fields.items():
            setattr(episode, name, value)
        episode.save()
    return episode, False


def append_upload(robot: Robot, episode_id, offset: int, data: bytes) -> Episode:
    """Append one chunk at ``offset`` (which must equal the bytes received so far). The chunk that completes the
    payload triggers verification: sha256, then the episode file schema, then the file is moved into the store.

    A failed verification discards the partial bytes, marks the episode rejected and raises (ChecksumMismatch /
    InvalidPayload); the robot keeps its copy and uploads again from 0.
    """
    if len(data) > settings.SOP_MAX_UPLOAD_CHUNK_BYTES:
        raise PayloadTooLarge(f"chunk of {len(data)} bytes exceeds {settings.SOP_MAX_UPLOAD_CHUNK_BYTES}")
    failure: Optional[SopError] = None
    with transaction.atomic():
        # The row lock serialises PUTs of one episode: two requests at the same offset would otherwise both pass
        # the offset check and append the same bytes twice.
        episode = Episode.objects.select_for_update().filter(pk=episode_id).first()
        if episode is None:
            raise EpisodeNotFound()
        if episode.robot_id != robot.pk:
            _refuse(robot, episode)
        if episode.status == Episode.Status.VERIFIED:
            return episode  # a retried last chunk whose reply was lost: nothing left to do
        if episode.status == Episode.Status.RECORDING:
            raise UploadNotOpen()
        received = _partial_bytes(episode)
        if offset != received:
            raise OffsetMismatch(f"Upload-Offset is {offset}, the server has {received} bytes", offset=received)
        if offset + len(data) > episode.payload_size:
            end, size = offset + len(data), episode.payload_size
            raise PayloadTooLarge(f"chunk ends at byte {end}, past the announced size {size}")
        if data:
            _write_chunk(partial_path(episode.id), offset, data)
        episode.status = Episode.Status.UPLOADING  # also resumes a rejected episode re-sent from 0
        episode.received_bytes = offset + len(data)
        if episode.received_bytes == episode.payload_size:
            failure = _verify(episode)
        episode.save()
    if failure is not None:
        raise failure  # after the commit: the rejected state is stored
    return episode


def cleanup_stale_uploads() -> int:
    """Delete partial uploads untouched for SOP_STALE_UPLOAD_HOURS; their episodes restart from 0. Returns the count."""
    cutoff = time.time() - settings.SOP_STALE_UPLOAD_HOURS * 3600
    removed = 0
    for path in sorted((Path(settings.PAYLOAD_DIR) / "partial").glob("*.part")):
        if not _older_than(path, cutoff):
            continue
        try:
            episode_id = uuid.UUID(path.stem)
        except ValueError:
            path.unlink(missing_ok=True)  # not ours to keep
            removed += 1
            continue
        with transaction.atomic():
            episode = Episode.objects.select_for_update().filter(pk=episode_id).first()
            if not _older_than(path, cutoff):  # a PUT appended while we waited for the lock
                continue
            path.unlink(missing_ok=True)
            removed += 1
            if episode is not None and episode.status == Episode.Status.UPLOADING:
                episode.received_bytes = 0
                episode.error = "upload abandoned: partial bytes discarded"
                episode.save(update_fields=["received_bytes", "error"])
    if removed:
        log.info("removed %d stale partial upload(s)", removed)
    return removed



# ---------------------------------------------------------------- helpers


def _announced_fields(meta: dict[str, Any], task: Task) -> dict[str, Any]:
    """Episode metadata as announced; verification replaces it with the payload's own."""
    segments = meta.get("interventions") or []
    return dict(
        task=task,
        prompt=meta.get("prompt", "")[:500],
        policy_name=meta.get("policy", "")[:100],
        policy_version=db_version(meta.get("policy_version")),
        split=meta["split"],
        started_at=from_unix(meta["started_at"], "started_at"),
        ended_at=from_unix(meta["ended_at"], "ended_at") if meta.get("ended_at") is not None else None,
        steps=db_count(meta.get("steps", 0)),
        outcome=meta.get("outcome", ""),
        success=meta.get("success"),
        outcome_source="robot",
        control_hz=meta.get("control_hz", 0.0),
        intervention_count=len(segments),
        intervention_steps=db_count(sum(s["end"] - s["start"] for s in segments)),
    )


def _partial_bytes(episode: Episode) -> int:
    """How many bytes of the upload the server really has, reconciling the row with the partial file."""
    path = partial_path(episode.id)
    on_disk = path.stat().st_size if path.exists() else 0
    if on_disk == episode.received_bytes:
        return on_disk
    if on_disk > episode.received_bytes:
        # Bytes written by a PUT whose transaction did not commit: they were never acknowledged.
        os.truncate(path, episode.received_bytes)
        return episode.received_bytes
    # The partial file was cleaned up or lost: start again.
    path.unlink(missing_ok=True)
    return 0


def _write_chunk(path: Path, offset: int, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "r+b" if path.exists() else "w+b") as fh:
        fh.seek(offset)
        fh.write(data)
        fh.truncate()
        fh.flush()
        os.fsync(fh.fileno())  # acknowledged bytes survive a crash


def _verify(episode: Episode) -> Optional[SopError]:
    """Check and store a complete upload. Returns the error (episode marked rejected) or None (verified)."""
    path = partial_path(episode.id)
    digest = _sha256(path)
    if digest != episode.payload_sha256:
        return _reject(episode, ChecksumMismatch(
            f"sha256 of the received bytes is {digest}, announced {episode.payload_sha256}: upload again from 0",
            offset=0,
        ))
    try:
        with EpisodeReader(path) as reader:
            meta = reader.meta
        meta = _payload_fields(meta, episode)
    except Exception as exc:  # untrusted bytes: any parse failure is the payload's fault, not the server's
        return _reject(episode, InvalidPayload(f"invalid episode file: {exc}", offset=0))
    segments = meta.pop("segments")
    dest = Path(settings.PAYLOAD_DIR) / stored_path(episode.id)
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(path, dest)  # atomic: the store never holds half a file
    for name, value in meta.items():
        setattr(episode, name, value)
    episode.payload_path = str(stored_path(episode.id))
    episode.status = Episode.Status.VERIFIED
    episode.verified_at = timezone.now()
    episode.error = ""
    _store_segments(episode, segments)
    log.info("episode %s of robot %s verified (%d steps, %s)", episode.id, episode.robot_id, episode.steps,
             episode.outcome)
    return None


def _payload_fields(meta: dict[str, Any], episode: Episode) -> dict[str, Any]:
    """Episode fields from a payload's own metadata; raises ValueError when it contradicts the upload."""
    if meta["episode_id"] != str(episode.id):
        raise ValueError(f"the file is episode {meta['episode_id']!r}, uploaded as {episode.id}")
    if meta["outcome"] not in {o.value for o in Outcome}:
        raise ValueError(f"outcome {meta['outcome']!r} is not one of {[o.value for o in Outcome]}")
    if meta["split"] not in {s.value for s in Split}:
        raise ValueError(f"split {meta['split']!r} is not one of {[s.value for s in Split]}")
    segments = meta["segments"]
    sources = {ControlSource.OPERATOR.value, ControlSource.SIM_OPERATOR.value}
    for seg in segments:
        if seg.source not in sources:
            raise ValueError(f"intervention source {seg.source!r} is not one of {sorted(sources)}")
    # An operator's label (docs/console.md "Label") travels in the payload: who decided the outcome, and which user.
    outcome_source = "operator" if meta.get("outcome_source") == "operator" else "robot"
    outcome_by_name = str(meta.get("outcome_by") or "")[:150] if outcome_source == "operator" else ""
    outcome_by = (get_user_model().objects.filter(username=outcome_by_name).first() if outcome_by_name else None)
    return dict(
        steps=db_count(meta["steps"]),
        outcome=meta["outcome"],
        success=bool(meta["success"]),
        outcome_source=outcome_source,
        outcome_by=outcome_by,
        image_shape=[int(n) for n in meta["image_shape"]],
        control_hz=float(meta["control_hz"]),
        split=meta["split"],
        prompt=meta["prompt"][:500],
        policy_name=meta["policy"][:100],
        policy_version=db_version(meta["policy_version"]),
        started_at=from_unix(meta["started_at"], "started_at"),
        ended_at=from_unix(meta["ended_at"], "ended_at"),
        intervention_count=len(segments),
        intervention_steps=sum(s.end - s.start for s in segments),
        segments=segments,
    )


def _store_segments(episode: Episode, segments) -> None:
    names = {s.operator for s in segments if s.operator}
    users = {u.get_username(): u for u in get_user_model().objects.filter(username__in=names)} if names else {}
    episode.segments.all().delete()
    InterventionSegment.objects.bulk_create(
        InterventionSegment(
            episode=episode, start_step=s.start, end_step=s.end, source=s.source,
            operator=users.get(s.operator), operator_name=s.operator[:150], reason=str(s.reason)[:500],
        )
        for s in segments
    )


def _reject(episode: Episode, error: SopError) -> SopError:
    partial_path(episode.id).unlink(missing_ok=True)
    episode.status = Episode.Status.REJECTED
    episode.received_bytes = 0
    episode.error = str(error.detail)[:500]
    log.warning("episode %s of robot %s rejected: %s", episode.id, episode.robot_id, error.detail)
    return error


def _refuse(robot: Robot, episode: Episode):
    log.warning("robot %s (id %s) tried to use episode %s of robot id %s", robot.name, robot.pk, episode.pk,
                episode.robot_id)
    raise ForbiddenEpisode()




def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _older_than(path: Path, cutoff: float) -> bool:
    try:
        return path.stat().st_mtime <= cutoff
    except FileNotFoundError:
        return False
