"""Console pages of the fleet app. Pages render from the database; live values arrive through the API/socket."""

from django.contrib.auth.decorators import login_required
from django.db import connection
from django.http import JsonResponse
from django.shortcuts import render
from django.views.decorators.http import require_safe


@login_required
def fleet(request):
    return render(request, "robots/fleet.html")


@require_safe
def healthz(request):
    """Liveness for process supervisors and tests: the web process answers and its database is reachable."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    return JsonResponse({"ok": True})
