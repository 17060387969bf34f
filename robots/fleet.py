"""The fleet's live state: robot tokens, and what each robot's socket reports (connect, hello, heartbeats,
disconnect). Every door (robot socket, admin, management commands, Celery) calls these.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import time
from typing import Any, Callable, Optional

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Q, Subquery
from django.utils import timezone

from . import auth, control, events, helpqueue, protocol, tasking
from .exceptions import SopError
from .models import ControlLease, Robot, Task, validate_name
from .protocol import RobotState
from .values import db_count, db_version

log = logging.getLogger(__name__)


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
        # Never the token's prefix: audit records are shown to every console user, and those are secret characters.
        events.audit("robot.token_issued", robot=robot, detail={"rotated": rotated})
        if rotated:
            events.send_on_commit(robot.group_name, events.ROBOT_REVOKED)
    return robot, token


def recorder(name: str) -> Robot:
    """The data identity demonstrations and imported datasets are stored under (created on first use): a robot row
    without a token, marked ``recorder``, so it never connects and the console does not show it as a fleet tile. A
    name that belongs to a real robot (one with a token) is refused."""
    validate_name(name)
    robot, created = Robot.objects.get_or_create(name=name, defaults={"recorder": True})
    if not created and not robot.recorder:
        if robot.token_hash is not None:
            raise ValueError(f"{name} is a robot of the fleet; record demonstrations under another name")
        Robot.objects.filter(pk=robot.pk).update(recorder=True)
        robot.recorder = True
    return robot


def revoke_robot(robot: Robot, actor=None) -> Robot:
    """Invalidate the robot's token and close every live socket of it at once.

    The socket close rides on one channel-layer message; each heartbeat re-checks the token as well (robot_status),
    so a lost message delays the close by one heartbeat at most.
    """
    with transaction.atomic():
        Robot.objects.filter(pk=robot.pk).update(token_hash=None, revoked_at=timezone.now())
        events.audit("robot.token_revoked", robot=robot, actor=actor)
        # one commit hook: the robot's sockets close, and the consoles drop its tile
        events.sends_on_commit([(robot.group_name, {"type": events.ROBOT_REVOKED}),
                                (events.CONSOLE_GROUP, {"type": "robot.removed", "robot": robot.name})])
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
        cameras=msg.cameras,
        policy_version=db_version(msg.policy_version),
        policy_name=msg.policy[:100],
        spool_pending=db_count(msg.spool_pending),
    )
    replies: list[protocol.Message] = [
        protocol.Welcome(robot=robot.name, heartbeat_s=settings.SOP_HEARTBEAT_S, server_time=time.time()),
        tasking.assign(robot),
    ]
    policy = _policy_source() if _policy_source else None
    if policy is not None and policy.version != msg.policy_version:
        replies.append(policy)
    replies.extend(_control_state(robot))
    return replies


def _control_state(robot: Robot) -> list[protocol.Message]:
    """What a (re)connecting robot must obey at once: the e-stop latch and a takeover lease that is still active."""
    replies: list[protocol.Message] = []
    latch = Robot.objects.filter(pk=robot.pk).values("estopped", "estopped_by", "estop_seq").first()
    if latch and latch["estopped"]:
        replies.append(protocol.ControlEstop(engaged=True, by=latch["estopped_by"], seq=latch["estop_seq"]))
    lease = ControlLease.objects.filter(robot_id=robot.pk, ended_at__isnull=True).first()
    if lease is not None:
        replies.append(protocol.ControlTakeover(lease=lease.pk, operator=lease.operator_name, reason=lease.reason))
    return replies


def status_fields(msg: protocol.Status) -> dict[str, Any]:
    """The Robot columns a heartbeat sets (the reported task aside: see _write_status)."""
    if msg.state == RobotState.OFFLINE.value:
        raise SopError("state 'offline' is set by the server, not reported by robots")
    return dict(
        connected=True,
        last_seen=timezone.now(),
        state=msg.state,
        current_episode=msg.episode_id,
        current_step=db_count(msg.step),
        control_source=msg.control_source,
        loop_hz=msg.loop_hz,
        loop_p99_ms=msg.loop_p99_ms,
        policy_version=db_version(msg.policy_version),
        policy_name=msg.policy[:100],
        spool_pending=db_count(msg.spool_pending),
        policy_error=msg.policy_error[:300],
        deadman=msg.deadman,
        operator_name=msg.operator[:150],
        reported_estopped=msg.estopped,
        reported_lease=db_version(msg.lease),
        video_fps=msg.video_fps,
        viewers=db_count(msg.viewers),
    )


# Columns that move on (almost) every heartbeat. A robot socket keeps them in memory (StatusWriter.live), the consoles
# see them from there, and the row gets them with the next change of any other column or every SOP_STATUS_WRITE_S.
VOLATILE_FIELDS = ("last_seen", "current_step", "loop_hz", "loop_p99_ms", "spool_pending", "video_fps")


def _write_status(robot: Robot, fields: dict[str, Any], task: Optional[str], token_hash: str) -> bool:
    if task is not None:
        fields = {**fields, "current_task": Subquery(Task.objects.filter(name=task).values("pk")[:1])}
    # Filtering on the token makes every write a revocation check for free: no row updated = token gone.
    return Robot.objects.filter(pk=robot.pk, token_hash=token_hash, revoked_at__isnull=True).update(**fields) == 1


def robot_status(robot: Robot, msg: protocol.Status, token_hash: str) -> bool:
    """Store a whole heartbeat. Returns False when the socket's token is no longer valid (revoked or rotated)."""
    return _write_status(robot, status_fields(msg), msg.task, token_hash)


@functools.cache
def _volatile_sql() -> str:
    # The ORM's UPDATE compiles for ~0.5 ms of CPU, many times what the statement costs to run. The token filter makes
    # the write a revocation check, as in _write_status.
    columns = ", ".join(f"{Robot._meta.get_field(name).column} = %s" for name in VOLATILE_FIELDS)
    return (f"UPDATE {Robot._meta.db_table} SET {columns} "
            f"WHERE id = %s AND token_hash = %s AND revoked_at IS NULL AND connected = %s")


class StatusWriter:
    """One robot socket's heartbeats, stored cheaply.

    - The row is written when something other than the volatile columns changed (state, task, episode, driver,
      lease, e-stop, policy, viewers...) and at least every ``write_every_s`` (so last_seen never looks silent to
      mark_silent_robots_offline).
    - The control snapshot (token still valid, e-stop latch, active lease: control.control_snapshot) is read with
      every write and at least every ``recheck_s``, and again at the next heartbeat after any control message went
      to the robot (``recheck()``).
    - A heartbeat in between that only moves volatile columns and agrees with the snapshot (control.agrees: the
      reconciliation would send nothing) needs no database at all: ``unchanged()`` says so without leaving the event
      loop. Anything else (a disagreement, an expired lease, a report the snapshot cannot explain) goes to
      ``store()``, which reads afresh and reconciles as before.
    ``live`` holds the latest volatile values for the consoles."""

    def __init__(self, robot: Robot, token_hash: str, write_every_s: Optional[float] = None,
                 recheck_s: Optional[float] = None, clock: Callable[[], float] = time.monotonic):
        self.robot, self.token_hash, self.clock = robot, token_hash, clock
        self.write_every_s = settings.SOP_STATUS_WRITE_S if write_every_s is None else write_every_s
        self.recheck_s = settings.SOP_CONTROL_RECHECK_S if recheck_s is None else recheck_s
        self.live: dict[str, Any] = {}
        self.writes = 0
        self.reads = 0
        self.snapshot: Optional[dict] = None
        self.revived = False  # a write brought back a row marked offline: consoles need the whole state again
        self._key: Optional[tuple] = None
        self._written_at = float("-inf")
        self._read_at = float("-inf")
        self._task: tuple[Optional[str], Optional[int]] = (None, None)  # the reported task's name and pk

    @staticmethod
    def _key_of(msg: protocol.Status, fields: dict[str, Any]) -> tuple:
        return (msg.task, *(v for k, v in fields.items() if k not in VOLATILE_FIELDS))

    def unchanged(self, msg: protocol.Status) -> bool:
        """True when this heartbeat needs no database (see the class); it then only updates ``live``. Pure."""
        now = self.clock()
        if (self.snapshot is None or now - self._read_at >= self.recheck_s
                or now - self._written_at >= self.write_every_s or msg.state == RobotState.OFFLINE.value):
            return False
        fields = status_fields(msg)
        if self._key_of(msg, fields) != self._key or not control.agrees(msg, self.snapshot):
            return False
        self.live = {k: fields[k] for k in VOLATILE_FIELDS}
        return True

    def store(self, msg: protocol.Status) -> Optional[dict]:
        """Store one heartbeat; returns the control snapshot to reconcile it with, or None when the token is gone."""
        fields = status_fields(msg)
        key = self._key_of(msg, fields)
        now = self.clock()
        if key != self._key or now - self._written_at >= self.write_every_s:
            if not self._write(fields, msg.task, volatile_only=key == self._key):
                return None
            self._key, self._written_at = key, now
            self.writes += 1
        self.live = {k: fields[k] for k in VOLATILE_FIELDS}
        self.snapshot = control.control_snapshot(self.robot, self.token_hash)
        self._read_at = now
        self.reads += 1
        return self.snapshot

    def _write(self, fields: dict[str, Any], task: Optional[str], volatile_only: bool = False) -> bool:
        if volatile_only:  # the common write (the interval passed, nothing else moved): one precompiled statement
            with connection.cursor() as cursor:
                values = [Robot._meta.get_field(k).get_db_prep_save(fields[k], connection) for k in VOLATILE_FIELDS]
                cursor.execute(_volatile_sql(), values + [self.robot.pk, self.token_hash, True])
                if cursor.rowcount == 1:
                    return True
            # no row: the token is gone, or the row was marked offline behind this socket's back (a stall longer
            # than SOP_ROBOT_SILENT_S): the whole heartbeat is written, which tells the two apart
            self.revived = True
        if task is not None:
            if self._task[0] != task:  # looked up when the reported task changes, not on every write
                self._task = (task, Task.objects.filter(name=task).values_list("pk", flat=True).first())
            fields = {**fields, "current_task_id": self._task[1]}
        # Filtering on the token makes every write a revocation check for free: no row updated = token gone.
        return Robot.objects.filter(pk=self.robot.pk, token_hash=self.token_hash,
                                    revoked_at__isnull=True).update(**fields) == 1

    def recheck(self) -> None:
        """A control message went to the robot (or a reconciliation repaired one): read the snapshot again at the
        next heartbeat instead of trusting the one in hand."""
        self._read_at = float("-inf")


def robot_disconnected(robot: Robot, connected_at: dt.datetime) -> bool:
    """Mark the robot offline; its takeover lease ends (robot_offline). Returns whether it went offline."""
    # A robot that reconnects before its old socket notices the drop has two sockets for a moment: only the
    # connection that is still the latest one (same connected_at) may mark the robot offline.
    offline = Robot.objects.filter(pk=robot.pk, connected_at=connected_at).update(
        connected=False, state=RobotState.OFFLINE.value, deadman=False, video_fps=0.0, viewers=0
    ) == 1
    if offline:
        control.end_leases_for_robot(robot.pk)
        helpqueue.robot_offline(robot.pk)  # nobody can answer a robot that is gone; it asks again when back
    return offline


def mark_silent_robots_offline() -> int:
    """Robots whose last heartbeat is older than SOP_ROBOT_SILENT_S are shown offline (e.g. after a web node died);
    their takeover leases end."""
    cutoff = timezone.now() - dt.timedelta(seconds=settings.SOP_ROBOT_SILENT_S)
    silent = Robot.objects.filter(connected=True).filter(Q(last_seen__lt=cutoff) | Q(last_seen__isnull=True))
    ids = list(silent.values_list("pk", flat=True))
    count = Robot.objects.filter(pk__in=ids).filter(Q(last_seen__lt=cutoff) | Q(last_seen__isnull=True)).update(
        connected=False, state=RobotState.OFFLINE.value, deadman=False, video_fps=0.0, viewers=0
    )
    for robot_id in ids:
        control.end_leases_for_robot(robot_id)
        helpqueue.robot_offline(robot_id)
        events.broadcast_state_on_commit(robot_id)
    return count


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
    events.send_on_commit(events.FLEET_GROUP, message.TYPE.value, message=message.to_dict())
