"""Read-side queries of the fleet (no state changes): what the API and pages show."""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from typing import Iterable, Optional

from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.db.models import Count, Q, QuerySet, Sum
from django.utils import timezone

from . import protocol, roles
from .exceptions import EpisodeNotFound, ForbiddenEpisode
from .models import ControlLease, Episode, HelpRequest, Robot, Task
from .serializers import RobotSerializer

log = logging.getLogger(__name__)

_VERIFIED = Q(episodes__status=Episode.Status.VERIFIED)
# The fleet's own work, rated (docs/console.md "Metrics"): online episodes that ended in success, failure or timeout
_RATED_ONLINE = _VERIFIED & Q(episodes__split=protocol.Split.ONLINE.value,
                              episodes__outcome__in=[o.value for o in protocol.RATED_OUTCOMES])
_EPISODE_COUNTS = dict(
    episode_count=Count("episodes"),
    verified_episode_count=Count("episodes", filter=_VERIFIED),
    successful_episode_count=Count("episodes", filter=_VERIFIED & Q(episodes__success=True)),
    rated_online_count=Count("episodes", filter=_RATED_ONLINE),
    # finished by the policy: a success without any intervention (an operator may still have labelled it)
    autonomous_success_count=Count("episodes", filter=_RATED_ONLINE & Q(episodes__success=True,
                                                                        episodes__intervention_count=0)),
)


def list_robots() -> QuerySet[Robot]:
    """Robots with their live state and episode counts."""
    return Robot.objects.select_related("current_task").annotate(**_EPISODE_COUNTS).order_by("name")


def list_tasks() -> QuerySet[Task]:
    return Task.objects.annotate(**_EPISODE_COUNTS).order_by("name")


def list_episodes(
    *,
    task: Optional[str] = None,
    robot: Optional[str] = None,
    split: Optional[str] = None,
    status: Optional[str] = None,
    outcome: Optional[str] = None,
) -> QuerySet[Episode]:
    """Episodes, newest first, filtered by task name, robot name, split, status and outcome."""
    episodes = Episode.objects.select_related("robot", "task").order_by("-started_at", "id")
    for field, value in (("task__name", task), ("robot__name", robot), ("split", split), ("status", status),
                         ("outcome", outcome)):
        if value:
            episodes = episodes.filter(**{field: value})
    return episodes


def episode_detail(episode_id) -> Episode:
    """One episode with its intervention segments. Raises EpisodeNotFound."""
    episode = (
        Episode.objects.select_related("robot", "task", "outcome_by")
        .prefetch_related("segments__operator")
        .filter(pk=episode_id)
        .first()
    )
    if episode is None:
        raise EpisodeNotFound()
    return episode


def robot_episode(robot: Robot, episode_id) -> Episode:
    """An episode as its own robot sees it. Raises EpisodeNotFound, or ForbiddenEpisode for another robot's."""
    episode = Episode.objects.filter(pk=episode_id).first()
    if episode is None:
        raise EpisodeNotFound()
    if episode.robot_id != robot.pk:
        log.warning("robot %s (id %s) asked for episode %s of robot id %s", robot.name, robot.pk, episode.pk,
                    episode.robot_id)
        raise ForbiddenEpisode()
    return episode


# ---------------------------------------------------------------- what consoles see (docs/console.md)


def robot_states(robot_ids: Optional[Iterable[int]] = None,
                 overlays: Optional[dict[int, dict]] = None) -> list[dict]:
    """Robot states as docs/console.md defines them (RobotSerializer + lease, e-stop, deadman, operator, video and
    today's counters), JSON-ready. Revoked robots are left out. Two queries whatever the number of robots.
    ``overlays`` (robot id -> column values) are laid over the rows: what a robot socket holds in memory and has not
    written yet (fleet.StatusWriter.live)."""
    as_of = time.time()  # before the read: a state read after a change committed is always newer than one before
    start = timezone.localtime().replace(hour=0, minute=0, second=0, microsecond=0)
    today = Q(episodes__ended_at__gte=start)
    robots = list_robots().filter(revoked_at__isnull=True, token_hash__isnull=False, recorder=False).annotate(
        episodes_today=Count("episodes", filter=today),
        successes_today=Count("episodes", filter=today & Q(episodes__success=True)),
        interventions_today=Sum("episodes__intervention_count", filter=today),
    )
    if robot_ids is not None:
        robots = robots.filter(pk__in=list(robot_ids))
    robots = list(robots)
    for robot in robots:
        for field, value in (overlays or {}).get(robot.pk, {}).items():
            setattr(robot, field, value)
    reported = {r.reported_lease for r in robots if r.reported_lease}
    relevant = ControlLease.objects.filter(Q(ended_at__isnull=True, robot_id__in=[r.pk for r in robots])
                                           | Q(pk__in=reported))
    leases, ended = {}, {}
    for lease in relevant:
        (leases if lease.ended_at is None else ended)[lease.robot_id if lease.ended_at is None else lease.pk] = lease
    states = []
    for robot, row in zip(robots, RobotSerializer(robots, many=True).data):
        lease = leases.get(robot.pk)
        n = robot.episodes_today
        states.append({
            **row,
            "lease": {"id": lease.pk, "operator": lease.operator_name, "since": lease.started_at} if lease else None,
            # the server's latch, or the robot's own (latched over the data channel while the websocket was down)
            "estopped": robot.estopped or robot.state == protocol.RobotState.ESTOPPED.value,
            "estopped_by": robot.estopped_by,
            "deadman": robot.deadman,
            "operator": robot.operator_name,
            "video_fps": robot.video_fps,
            "viewers": robot.viewers,
            "episodes_today": n,
            "success_rate_today": round(robot.successes_today / n, 3) if n else None,
            "interventions_today": robot.interventions_today or 0,
            "reported_estopped": robot.reported_estopped,
            "reported_lease": robot.reported_lease,
            "mismatch": mismatches(robot, lease, ended.get(robot.reported_lease)),
            "as_of": round(as_of, 6),
        })
    return json.loads(json.dumps(states, cls=DjangoJSONEncoder))  # plain types for the channel layer (msgpack)


MISMATCH_GRACE_S = 1.0  # a heartbeat sent just before a change reached the robot is not a mismatch


def mismatches(robot: Robot, lease: Optional[ControlLease], reported_ended: Optional[ControlLease]) -> list[str]:
    """Where the robot's last heartbeat disagrees with what the server asked it to obey, in words for the console.
    Only heartbeats that came clearly after the change count; the server re-sends on every one (control.reconcile)."""
    if not robot.connected or robot.last_seen is None:
        return []
    grace = dt.timedelta(seconds=MISMATCH_GRACE_S)

    def after(moment) -> bool:
        return moment is None or robot.last_seen > moment + grace

    found = []
    if robot.estopped and not robot.reported_estopped and after(robot.estop_changed_at):
        found.append("E-stop latched, but the robot reports it is not stopped: re-sending the e-stop")
    elif not robot.estopped and robot.reported_estopped and after(robot.estop_changed_at):
        found.append("E-stop cleared, but the robot reports it is still stopped: re-sending the clear")
    if lease is not None and robot.reported_lease != lease.pk and not robot.reported_estopped and after(lease.started_at):
        found.append(f"{lease.operator_name} holds the robot, but it does not report the takeover: re-sending it")
    if reported_ended is not None and after(reported_ended.ended_at):
        found.append(f"The robot still obeys lease {reported_ended.pk}, which ended: re-sending the release")
    return found


def robot_state(robot_id: int) -> Optional[dict]:
    states = robot_states([robot_id])
    return states[0] if states else None


def _iso(value) -> Optional[str]:
    return value.isoformat() if value is not None else None


def help_views(request_ids: Optional[Iterable[int]] = None) -> list[dict]:
    """Help requests as consoles see them (console_protocol.HelpView): ``request_ids``, or every active one, most
    urgent and oldest first."""
    if request_ids is None:
        requests = HelpRequest.objects.filter(status__in=HelpRequest.ACTIVE)
    else:
        requests = HelpRequest.objects.filter(pk__in=list(request_ids))
    requests = requests.select_related("robot", "assigned_to").order_by("-urgency", "raised_at", "pk")
    return [{
        "id": r.pk,
        "robot": r.robot.name,
        "kind": r.kind,
        "reason": r.reason,
        "urgency": r.urgency,
        "status": r.status,
        "episode_id": str(r.episode_id) if r.episode_id else None,
        "step": r.step,
        "raised_at": _iso(r.raised_at),
        "robot_since": _iso(r.robot_since),
        "assigned_to": r.assigned_to.get_username() if r.assigned_to else "",
        "claimed_by": r.claimed_name,
        "lease": r.lease_id,
        "closed_at": _iso(r.closed_at),
        "closed_by": r.closed_name,
        "outcome": r.outcome,
        "note": r.note,
        "trace": r.trace,
    } for r in requests]


def console_hello(user) -> dict:
    """The first frame of a console socket."""
    return {
        "type": "hello",
        "user": user.get_username(),
        "role": roles.role_of(user),
        "ice_servers": settings.SOP_ICE_SERVERS,
        "lease_timeout_s": settings.SOP_LEASE_TIMEOUT_S,
        "deadman_ms": int(protocol.DEADMAN_S * 1000),
        "robots": robot_states(),
        "help": help_views(),
    }
