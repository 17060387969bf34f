"""The help queue (docs/console.md, "Help queue"): robots asking for an operator, and which operator should answer.

A request comes from a robot's heartbeat (``status.help``: its stall or uncertainty detector; the heartbeat repeats it
until the robot no longer asks) or from the robot API (a help button on the robot). It is ``open`` until an operator
takes the robot over (any takeover of that robot answers its open requests: ``lease_started``), then ``claimed`` until
that lease ends (``resolved``); an operator may instead ``dismiss`` it as a false alarm, and a request the robot stops
reporting before anyone claimed it is ``withdrawn``. robots/control.py holds the operator's side (claim, resolve,
dismiss), which needs the lease services; this module holds what the lease services and the robot socket call.

Assignment (``rebalance``) spreads the open requests over the operators whose console is open (``OperatorPresence``):
most urgent and oldest first, each to the least loaded operator (claimed requests and leases count), and nobody gets
more than their capacity (1 unless they asked for more). It is advice shown in every console; anyone may claim any
request. Every change reaches the consoles as a ``help`` frame after its transaction commits.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections import Counter
from typing import Any, Iterable, Optional

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Max
from django.utils import timezone

from . import events, roles
from .models import ControlLease, HelpRequest, OperatorPresence, Robot

log = logging.getLogger(__name__)

Status = HelpRequest.Status
MAX_CAPACITY = 5  # requests one operator may ask to be assigned at once
RAISE_EVERY_S = 10.0  # a robot's new requests closer together than this are its last one (a robot cannot flood it)


# ---------------------------------------------------------------- requests from robots


def raise_request(robot: Robot, kind: str, reason: str, *, urgency: int = 2, request_id: Optional[str] = None,
                  episode_id: Optional[str] = None, step: int = 0, trace: Iterable[dict] = (),
                  since: Optional[float] = None) -> tuple[HelpRequest, bool]:
    """Record a robot's request (idempotent on ``request_id``). Returns it and whether it is new."""
    request_id = str(request_id or uuid.uuid4())
    found = HelpRequest.objects.filter(robot_id=robot.pk, request_id=request_id).first()
    if found is not None:
        if found.status == Status.WITHDRAWN and kind != "button":
            # withdrawn while the robot was offline (or between two heartbeats), and it still asks: open again
            if HelpRequest.objects.filter(pk=found.pk, status=Status.WITHDRAWN).update(
                    status=Status.OPEN, closed_at=None, note=""):
                found.refresh_from_db()
                events.help_on_commit([found.pk])
                rebalance_on_commit()
                return found, True
        return found, False
    now = timezone.now()
    active = HelpRequest.objects.filter(robot_id=robot.pk, status__in=HelpRequest.ACTIVE)
    # A robot cannot flood the queue: while its button request is active, another press is that request; any new
    # request within RAISE_EVERY_S of an active one is that one.
    recent = (active.filter(kind="button").order_by("-raised_at").first() if kind == "button" else None) or \
        active.filter(raised_at__gt=now - dt.timedelta(seconds=RAISE_EVERY_S)).order_by("-raised_at").first()
    if recent is not None:
        log.warning("robot %s asks for help again while request #%s is active: counted as that one", robot.name,
                    recent.pk)
        return recent, False
    robot_since = None
    if since:
        robot_since = dt.datetime.fromtimestamp(since, tz=dt.timezone.utc)
        if abs((robot_since - now).total_seconds()) > 86400:  # a robot clock that far off is not worth showing
            robot_since = None
    try:
        with transaction.atomic():
            request = HelpRequest.objects.create(
                robot=robot, request_id=request_id, kind=kind, reason=reason[:200], urgency=min(max(urgency, 1), 3),
                episode_id=episode_id, step=step, trace=list(trace), robot_since=robot_since, raised_at=now,
            )
            events.audit("help_requested", robot=robot, actor_name=f"robot {robot.name}"[:150],
                         detail={"request": request.pk, "kind": kind, "reason": reason[:200], "urgency": urgency,
                                 "episode_id": episode_id, "step": step})
            events.help_on_commit([request.pk])
            rebalance_on_commit()
    except IntegrityError:  # the same id from two sockets of the robot at once: the other one recorded it
        return HelpRequest.objects.get(robot_id=robot.pk, request_id=request_id), False
    log.warning("robot %s asks for help (%s, urgency %d): %s", robot.name, kind, request.urgency, reason)
    return request, True


def sync_reported(robot: Robot, signal: Optional[dict[str, Any]]) -> bool:
    """A heartbeat's ``help`` changed (or the socket's first heartbeat): record the request it carries, and withdraw
    the robot's open detector requests it no longer reports. Button requests are not in heartbeats and stay.
    Returns whether the reported state is recorded (False: the request was counted as another active one for now,
    and the socket should ask again with a later heartbeat)."""
    changed: list[int] = []
    keep = signal["id"] if signal else None
    with transaction.atomic():
        stale = HelpRequest.objects.select_for_update().filter(robot_id=robot.pk, status=Status.OPEN).exclude(
            kind="button")
        if keep is not None:
            stale = stale.exclude(request_id=keep)
        now = timezone.now()
        for request in stale:
            request.status, request.closed_at, request.note = Status.WITHDRAWN, now, "the robot stopped asking"
            request.save(update_fields=["status", "closed_at", "note"])
            changed.append(request.pk)
        if changed:
            events.help_on_commit(changed)
            rebalance_on_commit()
    if signal is None:
        return True
    request, new = raise_request(
        robot, signal["kind"], signal["reason"], urgency=signal.get("urgency", 2), request_id=signal["id"],
        episode_id=None, step=signal.get("step", 0), trace=signal.get("trace", ()), since=signal.get("since"),
    )
    if new:
        # The episode the robot runs (the signal's own id is the request's): stored for the queue and the page.
        episode = Robot.objects.filter(pk=robot.pk).values_list("current_episode", flat=True).first()
        if episode:
            HelpRequest.objects.filter(pk=request.pk).update(episode_id=episode)
    return str(request.request_id) == signal["id"]


def robot_offline(robot_id: int) -> list[int]:
    """The robot went offline: nobody can answer its open requests now. They are withdrawn; one it still reports
    when it comes back opens again (raise_request)."""
    ids = list(HelpRequest.objects.filter(robot_id=robot_id, status=Status.OPEN).values_list("pk", flat=True))
    if ids:
        HelpRequest.objects.filter(pk__in=ids, status=Status.OPEN).update(
            status=Status.WITHDRAWN, closed_at=timezone.now(), note="the robot went offline")
        events.help_on_commit(ids)
        rebalance_on_commit()
    return ids


# ---------------------------------------------------------------- leases (robots/control.py calls these)


def lease_started(lease: ControlLease, user) -> list[int]:
    """A takeover of ``lease.robot``: it answers the robot's open requests (inside the lease's transaction)."""
    now = timezone.now()
    ids = list(HelpRequest.objects.select_for_update().filter(robot_id=lease.robot_id, status=Status.OPEN)
               .values_list("pk", flat=True))
    if ids:
        HelpRequest.objects.filter(pk__in=ids).update(
            status=Status.CLAIMED, claimed_by=user, claimed_name=lease.operator_name, claimed_at=now, lease=lease,
            assigned_to=user, assigned_at=now,
        )
        events.audit("help_claimed", robot=Robot(pk=lease.robot_id), actor=user,
                     detail={"requests": ids, "lease": lease.pk})
        events.help_on_commit(ids)
    if ids or HelpRequest.objects.filter(status=Status.OPEN).exists():
        rebalance_on_commit()  # the operator is busier now, whether or not the takeover answered a request
    return ids


def lease_ended(lease: ControlLease) -> list[int]:
    """The lease ended: the requests it claimed and nobody resolved or dismissed explicitly are resolved by it."""
    now = timezone.now()
    ids = list(HelpRequest.objects.select_for_update().filter(lease_id=lease.pk, status=Status.CLAIMED)
               .values_list("pk", flat=True))
    if ids:
        HelpRequest.objects.filter(pk__in=ids).update(
            status=Status.RESOLVED, closed_at=now, closed_by=lease.operator_id, closed_name=lease.operator_name,
            note=f"takeover ended ({lease.end_reason or 'released'})",
        )
        events.help_on_commit(ids)
    if ids or HelpRequest.objects.filter(status=Status.OPEN).exists():
        rebalance_on_commit()  # the operator is free again
    return ids


def close(request: HelpRequest, status: str, user, *, outcome: str = "", note: str = "") -> bool:
    """Resolve or dismiss ``request`` as ``user`` (robots/control.py checks who may), if it is still in the state it
    was read in (False: someone else changed it meanwhile; nothing is written)."""
    now = timezone.now()
    if not HelpRequest.objects.filter(pk=request.pk, status=request.status).update(
            status=status, closed_at=now, closed_by=user, closed_name=user.get_username(), outcome=outcome,
            note=note[:500]):
        return False
    request.status, request.closed_at, request.closed_by = status, now, user
    request.closed_name, request.outcome, request.note = user.get_username(), outcome, note[:500]
    events.audit("help_dismissed" if status == Status.DISMISSED else "help_resolved", robot=request.robot, actor=user,
                 detail={"request": request.pk, "outcome": outcome, "note": note[:500]})
    events.help_on_commit([request.pk])
    rebalance_on_commit()
    return True


def escalate(now: Optional[dt.datetime] = None) -> list[int]:
    """Open requests nobody answered for SOP_HELP_ESCALATE_S (since they were raised or last escalated) grow one level
    more urgent, up to 3: a request does not wait behind newer, louder ones for ever. Returns the changed ids."""
    now = now or timezone.now()
    cutoff = now - dt.timedelta(seconds=settings.SOP_HELP_ESCALATE_S)
    changed = []
    with transaction.atomic():
        for request in HelpRequest.objects.select_for_update().filter(status=Status.OPEN, urgency__lt=3):
            if (request.escalated_at or request.raised_at) <= cutoff:
                HelpRequest.objects.filter(pk=request.pk).update(urgency=request.urgency + 1, escalated_at=now)
                changed.append(request.pk)
        if changed:
            events.help_on_commit(changed)
    return changed


# ---------------------------------------------------------------- operators and assignment


def presence_cutoff() -> dt.datetime:
    return timezone.now() - dt.timedelta(seconds=settings.SOP_PRESENCE_S)


def operator_online(user, channel: str) -> None:
    """An operator's console socket opened: they can be assigned requests."""
    if not roles.can_operate(user):
        return
    now = timezone.now()
    OperatorPresence.objects.update_or_create(channel_name=channel[:200],
                                              defaults={"user": user, "connected_at": now, "seen_at": now})
    rebalance()


def operator_seen(channel: str) -> None:
    OperatorPresence.objects.filter(channel_name=channel[:200]).update(seen_at=timezone.now())


def operator_offline(channel: str) -> None:
    if OperatorPresence.objects.filter(channel_name=channel[:200]).delete()[0]:
        rebalance()


def set_capacity(user, channel: str, capacity: int) -> int:
    """How many requests this operator takes at once (1 by default: "nobody gets two unless they ask")."""
    capacity = min(max(int(capacity), 1), MAX_CAPACITY)
    OperatorPresence.objects.filter(channel_name=channel[:200], user_id=user.pk).update(capacity=capacity)
    rebalance()
    return capacity


def rebalance_on_commit() -> None:
    transaction.on_commit(rebalance, robust=True)


def rebalance() -> list[int]:
    """Assign the open, unassigned requests to the operators online (see the module). Returns the changed ids."""
    now = timezone.now()
    capacity: dict[int, int] = {}
    for user_id, cap in OperatorPresence.objects.filter(seen_at__gte=presence_cutoff(), user__is_active=True) \
            .values_list("user_id", "capacity"):
        capacity[user_id] = max(capacity.get(user_id, 0), cap)
    changed: list[HelpRequest] = []
    with transaction.atomic():
        active = list(HelpRequest.objects.select_for_update().filter(status__in=HelpRequest.ACTIVE)
                      .order_by("-urgency", "raised_at", "pk"))
        offline = set(Robot.objects.filter(pk__in={r.robot_id for r in active}, connected=False)
                      .values_list("pk", flat=True))
        for request in active:  # an operator who left gives back what they had not claimed yet
            if request.status == Status.OPEN and request.assigned_to_id and request.assigned_to_id not in capacity:
                request.assigned_to_id, request.assigned_at = None, None
                changed.append(request)
        load = Counter(r.assigned_to_id for r in active if r.assigned_to_id)
        answered = {r.lease_id for r in active if r.lease_id}
        for lease in ControlLease.objects.filter(ended_at__isnull=True, operator_id__in=list(capacity)) \
                .exclude(pk__in=answered).values_list("operator_id", flat=True):
            load[lease] += 1  # driving a robot nobody asked help for is being busy too
        last = dict(HelpRequest.objects.filter(assigned_to_id__in=list(capacity)).values("assigned_to_id")
                    .annotate(at=Max("assigned_at")).values_list("assigned_to_id", "at"))
        epoch = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
        for request in active:
            if request.status != Status.OPEN or request.assigned_to_id or request.robot_id in offline:
                continue
            free = [u for u in capacity if load[u] < capacity[u]]
            if not free:
                break
            user_id = min(free, key=lambda u: (load[u], last.get(u) or epoch, u))
            request.assigned_to_id, request.assigned_at = user_id, now
            load[user_id] += 1
            last[user_id] = now
            changed.append(request)
        for request in changed:
            request.save(update_fields=["assigned_to", "assigned_at"])
        if changed:
            events.help_on_commit([r.pk for r in changed])
    return [r.pk for r in changed]
