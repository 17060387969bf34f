"""The live console pages: the fleet (a tile per robot) and one robot (video, HUD, takeover, teleop, e-stop).

Pages render from the database (so they show something before the console socket connects); live values arrive over
/ws/console/ (docs/console.md). The role is rendered into data attributes and disables controls server-side; the
socket's ``hello`` role is authoritative in the browser, and the server checks every action again.
"""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import Http404
from django.shortcuts import render
from django.views.decorators.http import require_safe

from . import helpqueue, selectors
from .roles import can_operate, is_admin, role_of
from .serializers import RobotSerializer

MAX_FLEET_VIDEOS = 6  # concurrent live videos on the fleet page; more tiles show a click-to-watch placeholder
TAKEOVER_REASONS = ["about to fail", "collision risk", "stuck", "demonstration", "other"]


def _role_context(user) -> dict:
    return {"role": role_of(user) or "viewer", "can_operate": can_operate(user), "is_admin": is_admin(user)}


def _is_revoked(robot) -> bool:
    return robot.revoked_at is not None or robot.token_hash is None


@require_safe
@login_required
def fleet(request):
    robots = [r for r in selectors.list_robots().filter(recorder=False) if not _is_revoked(r)]
    return render(request, "robots/fleet.html", {
        "robots": RobotSerializer(robots, many=True).data,
        "max_videos": MAX_FLEET_VIDEOS,
        "capacities": range(1, helpqueue.MAX_CAPACITY + 1),
        **_role_context(request.user),
    })


@require_safe
@login_required
def robot(request, name: str):
    found = selectors.list_robots().filter(name=name).first()
    if found is None:
        raise Http404(f"no robot {name!r}")
    return render(request, "robots/robot.html", {
        "robot": found,
        "robot_state": RobotSerializer(found).data,
        "reasons": TAKEOVER_REASONS,
        **_role_context(request.user),
    })
