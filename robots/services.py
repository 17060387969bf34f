"""State changes of the fleet. Every door (robot socket, API, admin, management commands, Celery) calls one of these.

Broadcasts to robot sockets go through the channel layer inside ``transaction.on_commit``, so a socket never hears
about a change that was rolled back. Channel-layer event types reuse the protocol's dotted names.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import random
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import IntegrityError, transaction
from django.db.models import Q, Subquery
from django.utils import timezone

from . import auth, catalog, protocol
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
from .models import AuditEvent, Episode, InterventionSegment, Robot, Task, TaskAssignment, validate_name
from .protocol import ControlSource, Outcome, RobotState, Split

log = logging.getLogger(__name__)

FLEET_GROUP = "robots.fleet"  # every robot socket joins it: fleet-wide broadcasts (policy.updated)
CONSOLE_GROUP = "console.fleet"  # every console socket joins it: robot.state, robot.removed, lease (docs/console.md)
ROBOT_REVOKED = "robot.revoked"  # channel-layer event: every socket of the robot closes (4003)
MAX_DB_INT = 2**31 - 1  # PositiveIntegerField on PostgreSQL; protocol ints are unbounded
HASH_BLOCK = 1024 * 1024


# ---------------------------------------------------------------- tokens


def register_robot(name: str) -> tuple[Robot, str]:
    """Create a robot, or rotate the token of an existing one (which also lifts a revocation).

    Returns the robot and its new raw token: the only time the token exists outside the robot. Sockets opened with
    a previous token are closed.
    """
    validate_name(name)
    token = auth.generate_token()
    with transaction.atomic():
        robot = Robot.objects.select_for_update().filter(name=name).first()
        rotated = robot is not None and robot.token_hash is not None
        robot = robot or Robot(name=name)
        robot.token_hash = auth.hash_token(token)
        robot.token_prefix = auth.shown_prefix(token)
        robot.token_created_at = timezone.now()
        robot.revoked_at = None
        robot.save()
        _audit("robot.token_issued", robot=robot, detail={"token_prefix": robot.token_prefix, "rotated": rotated})
        if rotated:
            _group_send_on_commit(robot.group_name, ROBOT_REVOKED)
    return robot, token


def revoke_robot(robot: Robot, actor=None) -> Robot:
    """Invalidate the robot's token and close every live socket of it at once.

    The socket close rides on one channel-layer message; each heartbeat re-checks the token as well (robot_status),
    so a lost message delays the close by one heartbeat at most.
    """
    with transaction.atomic():
        prefix = Robot.objects.filter(pk=robot.pk).values_list("token_prefix", flat=True).first()
        Robot.objects.filter(pk=robot.pk).update(token_hash=None, revoked_at=timezone.now())
        _audit("robot.token_revoked", robot=robot, actor=actor, detail={"token_prefix": prefix or ""})
        # one commit hook: the robot's sockets close, and the consoles drop its tile
        _group_sends_on_commit([(robot.group_name, {"type": ROBOT_REVOKED}),
                                (CONSOLE_GROUP, {"type": "robot.removed", "robot": robot.name})])
    robot.refresh_from_db()
    return robot


# ---------------------------------------------------------------- live state (the robot socket)


def robot_connected(robot: Robot, token_hash: str) -> Optional[dt.datetime]:
    """Mark the robot connected. Returns the connection's ``connected_at`` (its key for robot_disconnected), or
    None when the token was revoked since the handshake authenticated it (the socket must then be refused).

    The socket joins the robot's group before calling this, so a revocation is either seen here or delivered
    to the socket as an event: there is no window where it is missed.
    """
    now = timezone.now()
    updated = Robot.objects.filter(pk=robot.pk, token_hash=token_hash, revoked_at__isnull=True).update(
        connected=True, connected_at=now, last_seen=now, state=RobotState.IDLE.value
    )
    return now if updated else None


def robot_hello(robot: Robot, msg: protocol.Hello) -> list[protocol.Message]:
    """Record what the agent reports about itself; answer ``welcome``, a ``task.assigned`` and, when the robot
    runs another policy than the published one, the current ``policy.updated``."""
    Robot.objects.filter(pk=robot.pk).update(
        connected=True,
        last_seen=timezone.now(),
        agent_version=msg.agent_version[:50],
        capabilities=msg.capabilities,
        policy_version=_version(msg.policy_version),
        policy_name=msg.policy[:100],
        spool_pending=_count(msg.spool_pending),
    )
    replies: list[protocol.Message] = [
        protocol.Welcome(robot=robot.name, heartbeat_s=settings.SOP_HEARTBEAT_S, server_time=time.time()),
        _assign(robot),
    ]
    policy = _policy_source() if _policy_source else None
    if policy is not None and policy.version != msg.policy_version:
        replies.append(policy)
    replies.extend(_control_state(robot))
    return replies


def _control_state(robot: Robot) -> list[protocol.Message]:
    """What a (re)connecting robot must obey at once: the e-stop latch and a takeover lease that is still active."""
    from .models import ControlLease

    replies: list[protocol.Message] = []
    latch = Robot.objects.filter(pk=robot.pk).values("estopped", "estopped_by").first()
    if latch and latch["estopped"]:
        replies.append(protocol.ControlEstop(engaged=True, by=latch["estopped_by"]))
    lease = ControlLease.objects.filter(robot_id=robot.pk, ended_at__isnull=True).first()
    if lease is not None:
        replies.append(protocol.ControlTakeover(lease=lease.pk, operator=lease.operator_name, reason=lease.reason))
    return replies


def robot_status(robot: Robot, msg: protocol.Status, token_hash: str) -> bool:
    """Store a heartbeat. Returns False when the socket's token is no longer valid (revoked or rotated)."""
    if msg.state == RobotState.OFFLINE.value:
        raise SopError("state 'offline' is set by the server, not reported by robots")
    fields: dict[str, Any] = dict(
        connected=True,
        last_seen=timezone.now(),
        state=msg.state,
        current_episode=msg.episode_id,
        current_step=_count(msg.step),
        control_source=msg.control_source,
        loop_hz=msg.loop_hz,
        loop_p99_ms=msg.loop_p99_ms,
        policy_version=_version(msg.policy_version),
        policy_name=msg.policy[:100],
        spool_pending=_count(msg.spool_pending),
        policy_error=msg.policy_error[:300],
        deadman=msg.deadman,
        operator_name=msg.operator[:150],
        video_fps=msg.video_fps,
        viewers=_count(msg.viewers),
    )
    if msg.task is not None:
        fields["current_task"] = Subquery(Task.objects.filter(name=msg.task).values("pk")[:1])
    # Filtering on the token makes every heartbeat a revocation check for free: no row updated = token gone.
    return Robot.objects.filter(pk=robot.pk, token_hash=token_hash, revoked_at__isnull=True).update(**fields) == 1


def robot_disconnected(robot: Robot, connected_at: dt.datetime) -> bool:
    """Mark the robot offline; its takeover lease ends (robot_offline). Returns whether it went offline."""
    from . import control

    # A robot that reconnects before its old socket notices the drop has two sockets for a moment: only the
    # connection that is still the latest one (same connected_at) may mark the robot offline.
    offline = Robot.objects.filter(pk=robot.pk, connected_at=connected_at).update(
        connected=False, state=RobotState.OFFLINE.value, deadman=False, video_fps=0.0, viewers=0
    ) == 1
    if offline:
        control.end_leases_for_robot(robot.pk)
    return offline


def mark_silent_robots_offline() -> int:
    """Robots whose last heartbeat is older than SOP_ROBOT_SILENT_S are shown offline (e.g. after a web node died);
    their takeover leases end."""
    from . import control

    cutoff = timezone.now() - dt.timedelta(seconds=settings.SOP_ROBOT_SILENT_S)
    silent = Robot.objects.filter(connected=True).filter(Q(last_seen__lt=cutoff) | Q(last_seen__isnull=True))
    ids = list(silent.values_list("pk", flat=True))
    count = Robot.objects.filter(pk__in=ids).filter(Q(last_seen__lt=cutoff) | Q(last_seen__isnull=True)).update(
        connected=False, state=RobotState.OFFLINE.value, deadman=False, video_fps=0.0, viewers=0
    )
    for robot_id in ids:
        control.end_leases_for_robot(robot_id)
        control.broadcast_state_on_commit(robot_id)
    return count


# ---------------------------------------------------------------- task assignment


def next_assignment(robot: Robot) -> protocol.TaskAssigned:
    """Pick what the robot runs next: a weighted choice among its own assignments, else the fleet-wide mix
    (robot=None), else any enabled task; a random prompt of that task. ``task=None`` when no task is enabled."""
    entries: list[TaskAssignment] = []
    base = TaskAssignment.objects.filter(task__enabled=True, weight__gt=0).select_related("task")
    for mix in (base.filter(robot=robot), base.filter(robot__isnull=True)):
        entries = list(mix)
        if entries:
            break
    if entries:
        chosen = random.choices(entries, weights=[e.weight for e in entries])[0]
        task, split = chosen.task, chosen.split
    else:
        task, split = Task.objects.filter(enabled=True).order_by("?").first(), Split.ONLINE.value
    if task is None:
        return protocol.TaskAssigned(task=None)
    prompts = [p for p in task.prompts if isinstance(p, str) and p.strip()] if isinstance(task.prompts, list) else []
    return protocol.TaskAssigned(
        task=task.name,
        env_id=task.env_id,
        prompt=(random.choice(prompts) if prompts else task.name.replace("-", " "))[:500],
        max_steps=max(1, task.max_steps),
        split=split,
    )


def reassign_robot(robot: Robot) -> protocol.TaskAssigned:
    """Choose a new assignment now and push it to the robot's live socket(s) (it applies from the next episode)."""
    with transaction.atomic():
        assignment = _assign(robot)
        _group_send_on_commit(robot.group_name, assignment.TYPE.value, message=assignment.to_dict())
    return assignment


def add_catalog_tasks(specs: list[catalog.TaskSpec]) -> list[tuple[Task, bool]]:
    """Create or update tasks from catalog entries (idempotent). ``enabled`` is left as an operator set it."""
    results = []
    with transaction.atomic():
        for spec in specs:
            task, created = Task.objects.update_or_create(
                name=spec.name,
                defaults=dict(
                    env_id=spec.env_id,
                    prompts=list(spec.prompts),
                    max_steps=spec.max_steps,
                    description=spec.description,
                ),
            )
            results.append((task, created))
    return results


# ---------------------------------------------------------------- checkpoints -> fleet

_policy_source: Optional[Callable[[], Optional[protocol.PolicyUpdated]]] = None


def set_policy_source(source: Optional[Callable[[], Optional[protocol.PolicyUpdated]]]) -> None:
    """Register the function that returns the currently published policy (the learner app does, in ready()).

    A robot that says hello with another policy version is sent it, so robots started after a publication catch up.
    """
    global _policy_source
    _policy_source = source


def announce_policy(message: protocol.PolicyUpdated) -> None:
    """Tell every connected robot about a new checkpoint (after the surrounding transaction commits)."""
    _group_send_on_commit(FLEET_GROUP, message.TYPE.value, message=message.to_dict())


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
            policy_version=_version(msg.policy_version),
            policy_name=msg.policy[:100],
            split=msg.split,
            started_at=_from_unix(msg.started_at, "started_at"),
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
            episode.ended_at = _from_unix(msg.ended_at, "ended_at")
            episode.steps = _count(msg.steps)
            episode.outcome = msg.outcome
            episode.success = msg.outcome == Outcome.SUCCESS.value
            episode.outcome_source = "robot"
            episode.intervention_count = _count(msg.interventions)
            episode.intervention_steps = _count(msg.intervention_steps)
            episode.save()
        Robot.objects.filter(pk=robot.pk).update(current_episode=None, current_step=0, last_seen=timezone.now())
        return _assign(robot)


# ---------------------------------------------------------------- episode ingest (HTTP data plane)


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


def _assign(robot: Robot) -> protocol.TaskAssigned:
    assignment = next_assignment(robot)
    Robot.objects.filter(pk=robot.pk).update(
        current_task=Task.objects.filter(name=assignment.task).first() if assignment.task else None,
        current_prompt=assignment.prompt,
    )
    return assignment


def _announced_fields(meta: dict[str, Any], task: Task) -> dict[str, Any]:
    """Episode metadata as announced; verification replaces it with the payload's own."""
    segments = meta.get("interventions") or []
    return dict(
        task=task,
        prompt=meta.get("prompt", "")[:500],
        policy_name=meta.get("policy", "")[:100],
        policy_version=_version(meta.get("policy_version")),
        split=meta["split"],
        started_at=_from_unix(meta["started_at"], "started_at"),
        ended_at=_from_unix(meta["ended_at"], "ended_at") if meta.get("ended_at") is not None else None,
        steps=_count(meta.get("steps", 0)),
        outcome=meta.get("outcome", ""),
        success=meta.get("success"),
        outcome_source="robot",
        control_hz=meta.get("control_hz", 0.0),
        intervention_count=len(segments),
        intervention_steps=_count(sum(s["end"] - s["start"] for s in segments)),
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
        steps=_count(meta["steps"]),
        outcome=meta["outcome"],
        success=bool(meta["success"]),
        outcome_source=outcome_source,
        outcome_by=outcome_by,
        image_shape=[int(n) for n in meta["image_shape"]],
        control_hz=float(meta["control_hz"]),
        split=meta["split"],
        prompt=meta["prompt"][:500],
        policy_name=meta["policy"][:100],
        policy_version=_version(meta["policy_version"]),
        started_at=_from_unix(meta["started_at"], "started_at"),
        ended_at=_from_unix(meta["ended_at"], "ended_at"),
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


def _audit(action: str, *, robot: Optional[Robot] = None, actor=None, detail: Optional[dict] = None) -> AuditEvent:
    user = actor if getattr(actor, "is_authenticated", False) and getattr(actor, "pk", None) else None
    return AuditEvent.objects.create(
        action=action,
        robot=robot,
        actor=user,
        actor_name=user.get_username() if user else "system",
        detail=detail or {},
    )


def _group_send_on_commit(group: str, event_type: str, **payload) -> None:
    def send():
        async_to_sync(get_channel_layer().group_send)(group, {"type": event_type, **payload})

    # robust: the change is committed whatever happens to the broadcast; a failure is logged, not raised.
    transaction.on_commit(send, robust=True)


def _group_sends_on_commit(events: list[tuple[str, dict]]) -> None:
    """Several group sends after the commit, in order, as one hook."""

    def send():
        layer = get_channel_layer()
        for group, event in events:
            async_to_sync(layer.group_send)(group, event)

    transaction.on_commit(send, robust=True)


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


def _from_unix(value: float, name: str) -> dt.datetime:
    try:
        return dt.datetime.fromtimestamp(float(value), tz=dt.timezone.utc)
    except (OverflowError, OSError, ValueError):
        raise SopError(f"{name} is not a valid unix time: {value!r}") from None


def _version(value: Optional[int]) -> Optional[int]:
    """A checkpoint version for the database: None for 'not a checkpoint' (the episode file writes -1)."""
    return value if value is not None and 0 <= value <= MAX_DB_INT else None


def _count(value: int) -> int:
    return max(0, min(int(value), MAX_DB_INT))


# ---------------------------------------------------------------- console: tasks, task mixes, relabels


def save_task(task: Task, *, actor=None, created: bool = False) -> Task:
    """Save a task edited in the console (validated by the caller), audit it, and re-send the assignment of connected
    robots that run it, so that a new prompt, step limit or a disabled task applies from their next episode."""
    with transaction.atomic():
        task.save()
        _audit("task_saved", actor=actor, detail={
            "task": task.name, "created": created, "env_id": task.env_id, "enabled": task.enabled,
            "max_steps": task.max_steps, "prompts": len(task.prompts)})
        for robot in Robot.objects.filter(current_task=task, connected=True):
            reassign_robot(robot)
    return task


def set_assignments(robot: Optional[Robot], entries: dict[Task, tuple[float, str]], *, actor=None) -> list[TaskAssignment]:
    """Replace a task mix: the robot's own (``robot``) or the fleet-wide one (``robot=None``). ``entries`` maps
    tasks to (weight, split); weights <= 0 leave the task out. Connected robots that the mix applies to are sent a
    new assignment, which they run from their next episode."""
    rows = [(t, float(w), s) for t, (w, s) in entries.items() if w and float(w) > 0]
    for _, _, split in rows:
        if split not in {s.value for s in Split}:
            raise SopError(f"unknown split {split!r}")
    with transaction.atomic():
        scope = TaskAssignment.objects.filter(robot=robot) if robot else TaskAssignment.objects.filter(robot__isnull=True)
        before = {a.task.name: [a.weight, a.split] for a in scope.select_related("task")}
        scope.delete()
        saved = TaskAssignment.objects.bulk_create(
            [TaskAssignment(robot=robot, task=t, weight=w, split=s) for t, w, s in rows])
        after = {t.name: [w, s] for t, w, s in rows}
        if before == after:
            return saved
        _audit("assignments_saved", robot=robot, actor=actor,
               detail={"scope": robot.name if robot else "fleet", "before": before, "after": after})
        if robot is not None:
            targets = Robot.objects.filter(pk=robot.pk)
        else:  # robots without a mix of their own follow the fleet-wide one
            targets = Robot.objects.exclude(pk__in=TaskAssignment.objects.filter(robot__isnull=False).values("robot"))
        for target in targets.filter(connected=True, revoked_at__isnull=True):
            reassign_robot(target)
    return saved


def relabel_episode(episode: Episode, outcome: str, *, actor, reason: str) -> Episode:
    """An operator's verdict on a stored episode: sets outcome and success, records who, audits old and new."""
    if outcome not in {o.value for o in Outcome}:
        raise SopError(f"unknown outcome {outcome!r}")
    with transaction.atomic():
        episode = Episode.objects.select_for_update().get(pk=episode.pk)
        old = episode.outcome
        episode.outcome, episode.success = outcome, outcome == Outcome.SUCCESS.value
        episode.outcome_source, episode.outcome_by = "operator", actor
        episode.save(update_fields=["outcome", "success", "outcome_source", "outcome_by"])
        _audit("relabel", robot=episode.robot, actor=actor,
               detail={"episode": str(episode.pk), "old": old, "new": outcome, "reason": reason[:500]})
    return episode
