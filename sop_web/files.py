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
from typing import Callable, Optional
from urllib.parse import quote

from django.conf import settings
from django.http import FileResponse, HttpResponse, HttpResponseRedirect
from django.utils.http import content_disposition_header

from . import storage

ACCEL_PREFIX = "/_sop_files"


ACCEL_AREAS = ("checkpoints", "videos", "exports")  # storage areas whose files leave through the proxy


def accel_areas() -> dict[str, Path]:
    """The directories nginx may serve by internal redirect, by the name of their internal location: storage areas
    (sop_web/storage.py) of large downloads."""
    return {name: folder for name, folder in storage.areas().items() if name in ACCEL_AREAS}


def send_stored(key: str, filename: str, content_type: str, local: Callable[[], Optional[Path]], *,
                attachment: bool = False) -> Optional[HttpResponse]:
    """A stored object for download: with object storage a redirect to the bucket's signed URL; else this host's
    file handed to nginx (X-Accel-Redirect) or streamed. ``local()`` finds the file (called only without a bucket);
    None when it has none (the caller answers 404)."""
    url = storage.download_url(key, filename)
    if url is not None:
        return HttpResponseRedirect(url)
    path = local()
    if path is None or not path.exists():
        return None
    return accel_redirect(path, content_type, filename) or FileResponse(
        open(path, "rb"), content_type=content_type, filename=filename, as_attachment=attachment)


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
