"""Large files (checkpoint weights, episode MP4s) leave through the reverse proxy, not through Python.

With ``SOP_ACCEL_REDIRECT=1`` (set it only behind the nginx config from ``manage.py proxy_config``) a download view
answers with an empty body and ``X-Accel-Redirect: /_sop_files/<area>/<path>``; nginx then serves the file itself
from an ``internal`` location (which no client can request directly), with ranges, sendfile and no Python worker held
for the length of a 100 MB transfer. The view has already done everything that matters: authentication,
authorisation, the lookup, the existence check. Without the setting the view streams the file (one-machine
deployments and the tests' plain daphne).
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from django.conf import settings
from django.http import HttpResponse
from django.utils.http import content_disposition_header

ACCEL_PREFIX = "/_sop_files"


def accel_areas() -> dict[str, Path]:
    """The directories nginx may serve by internal redirect, by the name of their internal location."""
    return {"checkpoints": Path(settings.CHECKPOINT_DIR), "videos": Path(settings.DATA_DIR) / "videos",
            "exports": Path(settings.DATA_DIR) / "exports"}


def accel_redirect(path: Path, content_type: str, filename: str | None = None) -> HttpResponse | None:
    """The X-Accel-Redirect response for ``path``, or None when offloading is off (the caller streams the file).

    ``path`` must lie inside one of ``accel_areas()``: anything else is a programming error, never a file the proxy
    serves (a ``..`` or a symlink out of the area is resolved first and refused)."""
    if not settings.SOP_ACCEL_REDIRECT:
        return None
    resolved = Path(path).resolve()
    for area, root in accel_areas().items():
        try:
            relative = resolved.relative_to(root.resolve())
        except ValueError:
            continue
        response = HttpResponse(content_type=content_type)
        response["X-Accel-Redirect"] = f"{ACCEL_PREFIX}/{area}/{quote(relative.as_posix())}"
        if filename:
            response["Content-Disposition"] = content_disposition_header(True, filename)
        return response
    raise ValueError(f"{path} is outside the directories the proxy serves")
