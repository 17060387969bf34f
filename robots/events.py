"""The two side effects every state change of the fleet has: an audit record, and broadcasts after the commit.

Broadcasts go through the channel layer inside ``transaction.on_commit``, so a socket never hears about a change that
was rolled back, and a failed broadcast never undoes a committed change (``robust=True``: it is logged). Channel-layer
event types reuse the protocol's dotted names (``policy.updated`` -> the consumers' ``policy_updated``). Every module
that changes state (robots/fleet.py, ingest.py, tasking.py, control.py, learner/services.py) uses these; this module
imports none of them.
"""

from __future__ import annotations

from typing import Optional

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction

from . import protocol
from .models import AuditEvent, Robot

FLEET_GROUP = "robots.fleet"  # every robot socket joins it: fleet-wide broadcasts (policy.updated)
CONSOLE_GROUP = "console.fleet"  # every console socket joins it: robot.state, robot.removed, lease (docs/console.md)
ROBOT_REVOKED = "robot.revoked"  # channel-layer event: every socket of the robot closes (4003)
ROLE_CHANGED = "role.changed"  # channel-layer event to a user's console sockets: re-read the role


def robot_group(robot_id: int) -> str:
    """Channel-layer group of one robot's socket(s)."""
    return Robot(pk=robot_id).group_name


def user_group(user_id: int) -> str:
    """Channel-layer group of one console user's sockets (all their tabs)."""
    return f"console.user.{user_id}"


def audit(action: str, *, robot: Optional[Robot] = None, actor=None, detail: Optional[dict] = None,
          actor_name: str = "") -> AuditEvent:
    """Append an audit record. ``actor`` is a console user (or None: the server); ``actor_name`` overrides the
    recorded name, e.g. for a name a robot reported that no user account vouches for."""
    user = actor if getattr(actor, "is_authenticated", False) and getattr(actor, "pk", None) else None
    return AuditEvent.objects.create(
        action=action,
        robot=robot,
        actor=user,
        actor_name=(actor_name or (user.get_username() if user else "system"))[:150],
        detail=detail or {},
    )


def send_on_commit(group: str, event_type: str, **payload) -> None:
    """One channel-layer group send once the surrounding transaction commits."""
    sends_on_commit([(group, {"type": event_type, **payload})])


def sends_on_commit(events: list[tuple[str, dict]]) -> None:
    """Several group sends after the commit, in order, as one hook."""

    def send():
        layer = get_channel_layer()
        for group, event in events:
            async_to_sync(layer.group_send)(group, event)

    transaction.on_commit(send, robust=True)


def to_robot_on_commit(robot_id: int, message: protocol.Message) -> None:
    """A protocol message to the robot's socket(s) after the commit (event type = the message's TYPE)."""
    send_on_commit(robot_group(robot_id), message.TYPE.value, message=message.to_dict())


def broadcast_state(robot_id: int) -> None:
    """Send the robot's state to every console now (from sync code outside an event loop)."""
    from .selectors import robot_state  # selectors import serializers; kept local to keep this module cheap

    state = robot_state(robot_id)
    if state is not None:
        async_to_sync(get_channel_layer().group_send)(CONSOLE_GROUP, {"type": "robot.state", "robot": state})


def broadcast_state_on_commit(robot_id: int) -> None:
    """Send the robot's state to the consoles once the surrounding transaction commits (computed then)."""
    transaction.on_commit(lambda: broadcast_state(robot_id), robust=True)


def broadcast_removed_on_commit(robot: Robot) -> None:
    send_on_commit(CONSOLE_GROUP, "robot.removed", robot=robot.name)


HELP_EVENT = "help.requests"  # channel-layer event to the consoles: {"requests": [help view, ...]}


def help_on_commit(request_ids: list[int]) -> None:
    """The help requests ``request_ids`` changed: their views (selectors.help_views, read after the commit) go to
    every console as one ``help`` frame."""
    from .selectors import help_views  # as in broadcast_state

    ids = list(request_ids)

    def send():
        views = help_views(ids)
        if views:
            async_to_sync(get_channel_layer().group_send)(CONSOLE_GROUP, {"type": HELP_EVENT, "requests": views})

    transaction.on_commit(send, robust=True)


def lease_event_on_commit(robot: Robot, lease) -> None:
    """A ``lease`` event (started or ended) to every console after the commit."""
    send_on_commit(
        CONSOLE_GROUP,
        "lease",
        robot=robot.name,
        lease=lease.pk,
        operator=lease.operator_name,
        active=lease.ended_at is None,
        reason=lease.end_reason or "",
    )
