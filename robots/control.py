"""The console's control plane (docs/console.md): takeover leases, e-stop, episode labels, and the robot state that
consoles see.

Every function here is synchronous and transactional; the console socket (robots/console.py) calls them through
``database_sync_to_async``. Each change is audited (AuditEvent) and, after its transaction commits, sends the matching
protocol message to the robot's channel-layer group (event type = the message's TYPE, payload ``message``) and a
``robot.state`` (plus a ``lease`` event for lease changes) to the consoles' group ``console.fleet``.

Exclusivity rests on the database: a partial unique constraint allows one active lease per robot, so two operators
racing for one robot get one lease and one ``held`` error, whatever the interleaving.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
from typing import Optional

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import F
from django.utils import timezone
from rest_framework import status

from . import events, helpqueue, protocol, roles
from .exceptions import SopError
from .models import ControlLease, Episode, HelpRequest, Robot
from .protocol import Outcome
from sop_web.logformat import ids

log = logging.getLogger(__name__)

EndReason = ControlLease.EndReason
MAX_REASON = 500


# ---------------------------------------------------------------- errors (the console socket's error codes)


class ControlError(SopError):
    """A console request that was refused. ``default_code`` is the console socket's ``error`` code."""

    protocol_code = "forbidden"


class UnknownRobot(ControlError):
    status_code = status.HTTP_404_NOT_FOUND
    default_code = "unknown_robot"
    default_detail = "No such robot (or its token was revoked)."


class Forbidden(ControlError):
    status_code = status.HTTP_403_FORBIDDEN
    default_code = "forbidden"
    default_detail = "Your role does not allow this."


class LeaseHeld(ControlError):
    status_code = status.HTTP_409_CONFLICT
    default_code = "held"
    default_detail = "Another operator holds this robot."


class NotHolder(ControlError):
    status_code = status.HTTP_409_CONFLICT
    default_code = "not_holder"
    default_detail = "You do not hold this robot's lease."


class RobotOffline(ControlError):
    status_code = status.HTTP_409_CONFLICT
    default_code = "robot_offline"
    default_detail = "The robot is offline."


class InvalidRequest(ControlError):
    default_code = "invalid"
    default_detail = "Invalid request."
    protocol_code = "invalid"


def _held(lease: Optional[ControlLease]) -> LeaseHeld:
    holder = lease.operator_name if lease is not None else "another operator"
    return LeaseHeld(f"held by {holder}", holder=holder)


# ---------------------------------------------------------------- lookups


def get_robot(name) -> Robot:
    """A robot by name, as the console addresses it. Unknown or revoked: UnknownRobot."""
    if not isinstance(name, str) or not name or len(name) > 100:
        raise UnknownRobot()
    robot = Robot.objects.filter(name=name, revoked_at__isnull=True, token_hash__isnull=False).first()
    if robot is None:
        raise UnknownRobot(f"no robot named {name!r}")
    return robot


def online_robot(name) -> Robot:
    """A robot that has a live socket now (signalling, labels). Raises UnknownRobot or RobotOffline."""
    robot = get_robot(name)
    if not robot.connected:
        raise RobotOffline(f"robot {robot.name} is offline")
    return robot


def active_lease(robot_id: int) -> Optional[ControlLease]:
    return ControlLease.objects.filter(robot_id=robot_id, ended_at__isnull=True).first()


def _require_operator(user) -> None:
    if not roles.can_operate(user):
        raise Forbidden("operators and admins only")


def _timeout() -> dt.timedelta:
    return dt.timedelta(seconds=settings.SOP_LEASE_TIMEOUT_S)


# ---------------------------------------------------------------- leases


def acquire_lease(robot: Robot, user, reason: str = "", channel: str = "", force: bool = False) -> ControlLease:
    """Take over ``robot`` for ``user`` (an operator or admin) from console socket ``channel``.

    Held by someone else: LeaseHeld ("held by X"), unless ``force`` (admins only), which ends that lease (reason
    ``forced``, audited as forced_takeover). A repeated takeover from the socket that already holds it renews it.
    """
    _require_operator(user)
    if force and not roles.is_admin(user):
        raise Forbidden("only admins can force a takeover")
    reason = (reason or "")[:MAX_REASON]
    name = user.get_username()
    expire_leases(robot)
    with transaction.atomic():
        if not Robot.objects.filter(pk=robot.pk, connected=True).exists():
            raise RobotOffline(f"robot {robot.name} is offline")
        current = ControlLease.objects.select_for_update().filter(robot_id=robot.pk, ended_at__isnull=True).first()
        previous = None
        if current is not None:
            if current.operator_id == user.pk and current.channel_name == channel:
                return _renew(current)
            if not force:
                raise _held(current)
            _end(current, EndReason.FORCED, actor=user)
            previous = current
        now = timezone.now()
        try:
            with transaction.atomic():  # a savepoint: the unique constraint decides a race, the outer block goes on
                lease = ControlLease.objects.create(
                    robot=robot, operator=user, operator_name=name, reason=reason, channel_name=channel[:200],
                    forced=previous is not None, started_at=now, renewed_at=now, expires_at=now + _timeout(),
                )
        except IntegrityError:
            raise _held(active_lease(robot.pk)) from None
        detail = {"lease": lease.pk, "reason": reason}
        if previous is not None:
            detail.update(previous_lease=previous.pk, previous_operator=previous.operator_name)
        events.audit("forced_takeover" if previous else "takeover", robot=robot, actor=user, detail=detail)
        helpqueue.lease_started(lease, user)  # a takeover answers the robot's open help requests
        events.to_robot_on_commit(robot.pk, protocol.ControlTakeover(lease=lease.pk, operator=name, reason=reason))
        events.lease_event_on_commit(robot, lease)
        events.broadcast_state_on_commit(robot.pk)
    log.info("robot %s: %s by %s (lease %s)", robot.name, "forced takeover" if previous else "takeover", name,
             lease.pk)
    return lease


def renew_lease(robot: Robot, user, channel: str) -> ControlLease:
    """The holder's keepalive: the lease lives SOP_LEASE_TIMEOUT_S more. Expired or not the holder: NotHolder."""
    expire_leases(robot)
    lease = _holder_lease(robot, user, channel)
    return _renew(lease)


def release_lease(robot: Robot, user, channel: str) -> ControlLease:
    """The holder gives the robot back to its policy."""
    lease = _holder_lease(robot, user, channel)
    end_lease(lease, EndReason.RELEASED, actor=user)
    return lease


def holder_lease(robot: Robot, user, channel: str) -> ControlLease:
    """The active, unexpired lease of ``robot`` held by ``user`` from ``channel``; NotHolder otherwise."""
    expire_leases(robot)
    return _holder_lease(robot, user, channel)


def end_lease(lease: ControlLease, reason: str, actor=None) -> bool:
    """End an active lease; False if it had already ended. Tells the robot (control.release) and the consoles."""
    return _end(lease, reason, actor=actor)


def end_leases_for_channel(channel: str) -> int:
    """A console socket closed: the leases it held end (reason ``disconnected``); the robots resume their policy."""
    if not channel:
        return 0
    leases = ControlLease.objects.filter(channel_name=channel, ended_at__isnull=True)
    return sum(_end(lease, EndReason.DISCONNECTED) for lease in leases)


def end_leases_for_robot(robot_id: int, reason: str = EndReason.ROBOT_OFFLINE) -> int:
    """The robot went offline: its lease ends (the operator's console hears it)."""
    leases = ControlLease.objects.filter(robot_id=robot_id, ended_at__isnull=True)
    return sum(_end(lease, reason) for lease in leases)


def expire_leases(robot: Optional[Robot] = None) -> int:
    """End the leases not renewed within SOP_LEASE_TIMEOUT_S (all robots, or one). Returns how many ended."""
    leases = ControlLease.objects.filter(ended_at__isnull=True, expires_at__lt=timezone.now())
    if robot is not None:
        leases = leases.filter(robot_id=robot.pk)
    ended = sum(_end(lease, EndReason.TIMEOUT) for lease in leases)
    if ended:
        log.info("%d takeover lease(s) expired", ended)
    return ended


def stale_release(robot: Robot, reported_lease: Optional[int]) -> Optional[protocol.ControlRelease]:
    """A heartbeat says the robot obeys ``reported_lease``: if that lease is not the active one (its release was
    lost, e.g. sent while the robot reconnected), the control.release to send again; else None."""
    if reported_lease is None:
        return None
    lease = ControlLease.objects.filter(pk=reported_lease, robot_id=robot.pk).only("ended_at", "end_reason").first()
    if lease is not None and lease.ended_at is None:
        return None
    return protocol.ControlRelease(lease=reported_lease, reason=lease.end_reason if lease else "unknown")


def _holder_lease(robot: Robot, user, channel: str) -> ControlLease:
    lease = active_lease(robot.pk)
    if lease is None or lease.operator_id != getattr(user, "pk", None) or lease.channel_name != channel:
        raise NotHolder(f"you do not hold robot {robot.name}")
    return lease


def _renew(lease: ControlLease) -> ControlLease:
    now = timezone.now()
    updated = ControlLease.objects.filter(pk=lease.pk, ended_at__isnull=True).update(
        renewed_at=now, expires_at=now + _timeout()
    )
    if not updated:
        raise NotHolder("the lease has ended")
    lease.renewed_at, lease.expires_at = now, now + _timeout()
    return lease


def _end(lease: ControlLease, reason: str, actor=None) -> bool:
    reason = EndReason(reason).value
    with transaction.atomic():
        now = timezone.now()
        # The conditional UPDATE makes every end happen once, whichever door (release, timeout, disconnect) is first.
        if not ControlLease.objects.filter(pk=lease.pk, ended_at__isnull=True).update(ended_at=now, end_reason=reason):
            return False
        lease.ended_at, lease.end_reason = now, reason
        robot = Robot.objects.filter(pk=lease.robot_id).first()
        events.audit(
            "lease_expired" if reason == EndReason.TIMEOUT else "release",
            robot=robot,
            actor=actor,
            detail={"lease": lease.pk, "operator": lease.operator_name, "reason": reason},
        )
        helpqueue.lease_ended(lease)
        events.to_robot_on_commit(lease.robot_id, protocol.ControlRelease(lease=lease.pk, reason=reason))
        if robot is not None:
            events.lease_event_on_commit(robot, lease)
        events.broadcast_state_on_commit(lease.robot_id)
    log.info("lease %s of %s on robot %s ended: %s", lease.pk, lease.operator_name, lease.robot_id, reason)
    return True


# ---------------------------------------------------------------- the help queue (robots/helpqueue.py)


class RequestClosed(ControlError):
    status_code = status.HTTP_409_CONFLICT
    default_code = "invalid"
    default_detail = "This help request is no longer open."
    protocol_code = "invalid"


def _help_request(request_id: int) -> HelpRequest:
    request = HelpRequest.objects.select_related("robot").filter(pk=request_id).first()
    if request is None:
        raise InvalidRequest(f"no help request #{request_id}")
    if not request.active:
        closer = f" by {request.closed_name}" if request.closed_name else ""
        raise RequestClosed(f"help request #{request.pk} was {request.status}{closer}")
    return request


def _answers(lease: Optional[ControlLease], request: HelpRequest, user, channel: str) -> bool:
    """Whether ``lease`` is the one that claimed ``request`` and ``user`` holds it from ``channel``."""
    return (lease is not None and lease.pk == request.lease_id and lease.operator_id == user.pk
            and lease.channel_name == channel)


def claim_help(request_id: int, user, channel: str) -> HelpRequest:
    """Answer a help request: take the robot over (the lease answers it, helpqueue.lease_started). Claimed by someone
    else: LeaseHeld. Claiming again from the socket that holds it is a no-op."""
    _require_operator(user)
    request = _help_request(request_id)
    if request.status == HelpRequest.Status.CLAIMED:
        if _answers(active_lease(request.robot_id), request, user, channel):
            return request
        raise LeaseHeld(f"help request #{request.pk} is answered by {request.claimed_name}",
                        holder=request.claimed_name)
    lease = acquire_lease(request.robot, user, f"help #{request.pk}: {request.reason}", channel)
    request.refresh_from_db()
    if request.status == HelpRequest.Status.OPEN:  # this socket held the robot already: the renewal answers it
        with transaction.atomic():
            helpqueue.lease_started(lease, user)
        request.refresh_from_db()
    return request


def resolve_help(request_id: int, user, channel: str, outcome: Optional[str] = None, note: str = "") -> HelpRequest:
    """The operator who claimed the request is done: optionally end the running episode with ``outcome`` (an
    operator's label), give the robot back to its policy, and close the request as resolved."""
    _require_operator(user)
    request = _help_request(request_id)
    lease = active_lease(request.robot_id)
    if request.status != HelpRequest.Status.CLAIMED or not _answers(lease, request, user, channel):
        raise NotHolder(f"claim help request #{request.pk} before resolving it")
    with transaction.atomic():
        if not helpqueue.close(request, HelpRequest.Status.RESOLVED, user, outcome=outcome or "", note=note):
            raise RequestClosed(f"help request #{request.pk} changed meanwhile; look again")
        end_lease(lease, EndReason.RELEASED, actor=user)
    if outcome:  # after the release: the label ends the episode the operator saw, driven by the policy again
        label_episode(request.robot, user, outcome)
    return request


def dismiss_help(request_id: int, user, channel: str, note: str = "") -> HelpRequest:
    """A false alarm: the request closes as dismissed (data for tuning the detector). A request another operator
    claimed is theirs to close (admins excepted); one this socket claimed also gives the robot back."""
    _require_operator(user)
    request = _help_request(request_id)
    lease = active_lease(request.robot_id)
    mine = _answers(lease, request, user, channel)
    if request.status == HelpRequest.Status.CLAIMED and not mine and not roles.is_admin(user):
        raise LeaseHeld(f"help request #{request.pk} is answered by {request.claimed_name}",
                        holder=request.claimed_name)
    with transaction.atomic():
        if not helpqueue.close(request, HelpRequest.Status.DISMISSED, user, note=note):
            raise RequestClosed(f"help request #{request.pk} changed meanwhile (claimed or closed); look again")
        if mine:
            end_lease(lease, EndReason.RELEASED, actor=user)
    return request


# ---------------------------------------------------------------- e-stop and labels


def set_estop(robot: Robot, engaged: bool, user) -> None:
    """Latch (``engaged``) or clear the e-stop, operators and admins only, always audited. The latch is stored and
    numbered (``estop_seq``): a robot that reconnects gets it again at hello, and every heartbeat that reports another
    state gets it again (``reconcile``), so it does not depend on one message arriving. Works for offline robots too
    (it applies when they come back)."""
    _require_operator(user)
    name = user.get_username()
    with transaction.atomic():
        now = timezone.now()
        Robot.objects.filter(pk=robot.pk).update(
            estopped=bool(engaged), estopped_by=name if engaged else "", estopped_at=now if engaged else None,
            estop_seq=F("estop_seq") + 1, estop_changed_at=now,
        )
        seq = Robot.objects.filter(pk=robot.pk).values_list("estop_seq", flat=True).first() or 0
        events.audit("estop" if engaged else "estop_cleared", robot=robot, actor=user,
                     detail={"engaged": bool(engaged), "via": "console", "seq": seq})
        events.to_robot_on_commit(robot.pk, protocol.ControlEstop(engaged=bool(engaged), by=name, seq=seq))
        events.broadcast_state_on_commit(robot.pk)
    log.warning("robot %s: e-stop %s by %s", robot.name, "ENGAGED" if engaged else "cleared", name,
                extra=ids(robot=robot.name))


_SNAPSHOT_COLUMNS = ("estopped", "estopped_by", "estop_seq", "lease_id", "lease_expires_at", "lease_operator",
                     "lease_reason")


@functools.cache
def _snapshot_sql(with_token: bool) -> str:
    # Plain SQL, built once: the same query through the ORM (four Subquery annotations) cost ~2.5 ms of CPU to
    # compile per heartbeat against ~0.1 ms to run. One active lease per robot at most (a partial unique constraint),
    # so the join gives one row; SQLite and PostgreSQL alike.
    robot, lease = Robot._meta.db_table, ControlLease._meta.db_table
    token = " AND r.token_hash = %s AND r.revoked_at IS NULL" if with_token else ""
    return (f"SELECT r.estopped, r.estopped_by, r.estop_seq, l.id, l.expires_at, l.operator_name, l.reason "
            f"FROM {robot} r LEFT JOIN {lease} l ON l.robot_id = r.id AND l.ended_at IS NULL "
            f"WHERE r.id = %s{token} ORDER BY l.id LIMIT 1")


def _aware(value) -> Optional[dt.datetime]:
    """A timestamp as a raw cursor returns it (PostgreSQL: aware; SQLite: naive UTC or text) -> aware UTC."""
    if value is None or isinstance(value, dt.datetime) and value.tzinfo is not None:
        return value
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.timezone.utc)


def control_snapshot(robot: Robot, token_hash: Optional[str] = None) -> Optional[dict]:
    """What a heartbeat is reconciled against, in one query: the robot's e-stop latch and its active lease (id,
    expiry, operator, reason; None when there is none). With ``token_hash`` the row must still carry that token and
    no revocation: None then means the socket's token is gone (a revocation check for free)."""
    params = [robot.pk] + ([token_hash] if token_hash is not None else [])
    with connection.cursor() as cursor:
        cursor.execute(_snapshot_sql(token_hash is not None), params)
        row = cursor.fetchone()
    if row is None:
        return None
    snapshot = dict(zip(_SNAPSHOT_COLUMNS, row))
    snapshot["estopped"] = bool(snapshot["estopped"])
    snapshot["lease_expires_at"] = _aware(snapshot["lease_expires_at"])
    return snapshot


def agrees(msg: protocol.Status, snapshot: dict) -> bool:
    """Whether ``reconcile(robot, msg, snapshot)`` would send nothing and change nothing: the robot reports exactly
    what the snapshot says it must obey (no lease or the active one, unexpired; the latch as the server holds it).
    Pure, no query: a heartbeat that agrees with a fresh snapshot needs no database (fleet.StatusWriter)."""
    lease_id = snapshot["lease_id"]
    if lease_id is not None and snapshot["lease_expires_at"] < timezone.now():
        return False  # reconcile ends it
    if msg.lease is not None and msg.lease != lease_id:
        return False  # the robot obeys a lease that is not the active one: its release again
    if lease_id is not None and msg.lease != lease_id and not msg.estopped:
        return False  # a lease the robot does not report: its takeover again
    if snapshot["estopped"]:
        return msg.estopped and not msg.estop_local  # else the latch (or its acknowledgement) again
    return not msg.estopped  # else a clear again, or the robot's own latch adopted


def reconcile(robot: Robot, msg: protocol.Status, snapshot: Optional[dict] = None) -> list[protocol.Message]:
    """Compare a heartbeat with what the server asked the robot to obey; return what to send it again.

    Delivery through the channel layer is at most once, so every heartbeat repairs what was lost:
    - the robot obeys a lease that has ended -> its ``control.release`` again;
    - a lease is active but the robot does not report it -> its ``control.takeover`` again;
    - the server's e-stop is latched but the robot runs -> the latch again;
    - the robot is latched by an older server e-stop that has since been cleared -> the clear again;
    - the robot latched itself (an operator's e-stop over the WebRTC data channel, while the server had none): the
      server adopts the latch, audits it, and acknowledges it with a numbered ``control.estop``. Clearing it is then
      an operator's decision like any other e-stop. Fail safe: a latch the server cannot explain is kept, not cleared.
    Every message is idempotent on the robot, so sending one twice is harmless. A lease past its expiry ends here
    (no worker needed for that). ``snapshot`` is control_snapshot(robot), read by the caller (the robot socket reads it
    with the token check); a heartbeat that agrees with it costs no further query.
    """
    row = snapshot if snapshot is not None else control_snapshot(robot)
    if row is None:
        return []
    if row["lease_id"] is not None and row["lease_expires_at"] < timezone.now():
        expire_leases(robot)
        row = control_snapshot(robot) or row
    replies: list[protocol.Message] = []
    lease_id = row["lease_id"]
    if msg.lease is not None and msg.lease != lease_id:
        release = stale_release(robot, msg.lease)
        if release is not None:
            replies.append(release)
    if lease_id is not None and msg.lease != lease_id and not msg.estopped:
        replies.append(protocol.ControlTakeover(lease=lease_id, operator=row["lease_operator"],
                                                reason=row["lease_reason"]))
    latched, seq = row["estopped"], row["estop_seq"]
    if latched and not msg.estopped:
        log.warning("robot %s runs although its e-stop is latched (seq %d): sending the latch again", robot.name, seq)
        replies.append(protocol.ControlEstop(engaged=True, by=row["estopped_by"], seq=seq))
    elif latched and msg.estop_local:  # the server knows the latch; the robot waits for its acknowledgement
        replies.append(protocol.ControlEstop(engaged=True, by=row["estopped_by"], seq=seq))
    elif not latched and msg.estopped:
        if not msg.estop_local and (msg.estop_seq or 0) < seq:
            log.warning("robot %s still latched by e-stop %s, cleared since (seq %d): sending the clear again",
                        robot.name, msg.estop_seq, seq)
            replies.append(protocol.ControlEstop(engaged=False, by="", seq=seq))
        else:
            replies.append(_adopt_robot_estop(robot, msg))
    return replies


def _adopt_robot_estop(robot: Robot, msg: protocol.Status) -> protocol.ControlEstop:
    """The robot reports an e-stop the server did not latch (it came over the data channel): latch it here too."""
    by = msg.estopped_by or "robot"
    with transaction.atomic():
        now = timezone.now()
        Robot.objects.filter(pk=robot.pk).update(estopped=True, estopped_by=by, estopped_at=now,
                                                 estop_seq=F("estop_seq") + 1, estop_changed_at=now)
        seq = Robot.objects.filter(pk=robot.pk).values_list("estop_seq", flat=True).first() or 0
        # The name is the robot's report (the data channel session's user): recorded as such, not as an account.
        events.audit("estop", robot=robot, actor_name=f"{by} (reported by robot {robot.name})"[:150],
                     detail={"engaged": True, "via": "data_channel", "reported_by": robot.name, "by": by, "seq": seq})
        events.broadcast_state_on_commit(robot.pk)
    log.warning("robot %s: e-stop ENGAGED on the robot by %s (data channel); latched on the server too", robot.name, by)
    return protocol.ControlEstop(engaged=True, by=by, seq=seq)


def end_leases_for_user(user, reason: str = EndReason.ROLE_CHANGED) -> int:
    """A user may no longer operate (demoted, deactivated): the leases they hold end now."""
    leases = ControlLease.objects.filter(operator_id=user.pk, ended_at__isnull=True)
    return sum(_end(lease, reason) for lease in leases)


def label_episode(robot: Robot, user, outcome: str, episode_id: Optional[str] = None) -> None:
    """An operator decides the running episode's outcome; the robot ends it with that label (episode.label)."""
    _require_operator(user)
    try:
        message = protocol.EpisodeLabel(outcome=outcome, by=user.get_username(), episode_id=episode_id)
    except protocol.ProtocolError as exc:
        raise InvalidRequest(exc.message) from None
    if episode_id is not None and Episode.objects.filter(pk=episode_id).exclude(robot_id=robot.pk).exists():
        raise InvalidRequest(f"episode {episode_id} is not an episode of robot {robot.name}")
    if not Robot.objects.filter(pk=robot.pk, connected=True).exists():
        raise RobotOffline(f"robot {robot.name} is offline")
    with transaction.atomic():
        events.audit("label", robot=robot, actor=user, detail={"outcome": outcome, "episode_id": episode_id})
        events.to_robot_on_commit(robot.pk, message)


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
        events.audit("relabel", robot=episode.robot, actor=actor,
               detail={"episode": str(episode.pk), "old": old, "new": outcome, "reason": reason[:500]})
    return episode
