"""Dataset exports for people's scripts and the console (docs/lerobot.md, "From the console and the API").

``select_episodes`` turns filters (tasks, split, robots, policy versions) into the verified episodes they name, with a
clear error for a filter that names nothing; ``manage.py export_lerobot`` uses it too. ``request_export`` records a
``DatasetExport`` and queues ``robots.export_dataset``; the task writes the LeRobotDataset v3.0 (robots/lerobot.py)
with its progress in the row, packs it into one uncompressed .tar (parquet and MP4 are compressed already) and stores
it under ``exports/`` (this host's DATA_DIR/exports, or the bucket). Operators and admins start exports, at most
MAX_RUNNING at once each; every console user (or their API token) may list and download them, as they may read every
episode.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from sop_web import storage

from . import events, lerobot, roles
from .exceptions import SopError
from .models import DatasetExport, Episode, Robot, Task
from .protocol import Split

log = logging.getLogger(__name__)

MAX_RUNNING = 2  # queued or running exports per person
PROGRESS_EVERY_S = 0.5
STALE_S = 900.0  # a queued or running export not heard from for this long lost its worker: it is marked failed


class ExportError(SopError):
    default_code = "invalid"
    default_detail = "The export cannot be made."


class ExportForbidden(SopError):
    status_code = 403
    default_code = "forbidden"
    default_detail = "Operators and admins start exports."


class TooManyExports(SopError):
    status_code = 429
    default_code = "quota_exceeded"
    default_detail = f"You have {MAX_RUNNING} exports queued or running; wait for one to finish."


def _names(value: Any, what: str) -> Optional[list[str]]:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value) or len(value) > 1000:
        raise ExportError(f"{what} must be a list of names (or comma-separated)")
    names = [v.strip() for v in value if v.strip()]
    if not names:
        raise ExportError(f"{what} names nothing")
    return names


def clean_filters(raw: dict[str, Any]) -> dict[str, Any]:
    """The filters as stored and applied: ``tasks``/``robots`` (names), ``split``, ``versions`` (ints) or None each.
    Unknown names, splits and malformed versions are an ExportError that says which."""
    if not isinstance(raw, dict):
        raise ExportError("filters must be an object")
    filters: dict[str, Any] = {"tasks": _names(raw.get("tasks"), "tasks"), "robots": _names(raw.get("robots"), "robots"),
                               "split": raw.get("split") or None, "versions": None}
    if filters["tasks"] is not None:
        unknown = set(filters["tasks"]) - set(Task.objects.filter(name__in=filters["tasks"]).values_list("name", flat=True))
        if unknown:
            raise ExportError(f"unknown task(s) {sorted(unknown)}; tasks: "
                              f"{', '.join(Task.objects.values_list('name', flat=True)) or 'none'}")
    if filters["robots"] is not None:
        unknown = set(filters["robots"]) - set(Robot.objects.filter(name__in=filters["robots"])
                                               .values_list("name", flat=True))
        if unknown:
            raise ExportError(f"unknown robot(s) {sorted(unknown)}")
    if filters["split"] is not None and filters["split"] not in {s.value for s in Split}:
        raise ExportError(f"split must be one of {', '.join(s.value for s in Split)}")
    versions = raw.get("versions")
    if versions not in (None, "", []):
        if isinstance(versions, str):
            versions = versions.split(",")
        try:
            filters["versions"] = [int(str(v).strip()) for v in versions if str(v).strip()]
        except (TypeError, ValueError):
            raise ExportError(f"versions {raw.get('versions')!r}: expected checkpoint versions (integers)") from None
        if (not filters["versions"] or min(filters["versions"]) < 0 or max(filters["versions"]) >= 2**31
                or len(filters["versions"]) > 1000):
            raise ExportError("versions takes checkpoint versions (integers from 0 to 2^31 - 1)")
    return filters


def select_episodes(filters: dict[str, Any]) -> list[Episode]:
    """The verified episodes the (cleaned) filters name, oldest first."""
    return list(_selected(filters).select_related("task", "robot").order_by("started_at", "id"))


def _selected(filters: dict[str, Any]):
    episodes = Episode.objects.filter(status=Episode.Status.VERIFIED)
    if filters.get("tasks") is not None:
        episodes = episodes.filter(task__name__in=filters["tasks"])
    if filters.get("robots") is not None:
        episodes = episodes.filter(robot__name__in=filters["robots"])
    if filters.get("split"):
        episodes = episodes.filter(split=filters["split"])
    if filters.get("versions") is not None:
        episodes = episodes.filter(policy_version__in=filters["versions"])
    return episodes


def request_export(user, raw_filters: dict[str, Any]) -> DatasetExport:
    """Record an export of what ``raw_filters`` select and queue it (operators and admins)."""
    if not roles.can_operate(user):
        raise ExportForbidden()
    filters = clean_filters(raw_filters)
    count = _selected(filters).count()
    if not count:
        raise ExportError("no verified episodes match these filters")
    sweep_stale()
    with transaction.atomic():
        running = DatasetExport.objects.select_for_update().filter(
            requested_by=user, state__in=(DatasetExport.State.QUEUED, DatasetExport.State.RUNNING))
        if len(running) >= MAX_RUNNING:
            raise TooManyExports()
        export = DatasetExport.objects.create(requested_by=user, requested_name=user.get_username(), filters=filters,
                                              episodes=count)
        events.audit("dataset_export", actor=user, detail={"export": export.pk, "filters": filters, "episodes": count})
        transaction.on_commit(lambda: _send(export.pk), robust=True)
    return export


def sweep_stale() -> int:
    """Exports whose worker died (killed, out of memory) stop counting against their owner's quota: failed."""
    return DatasetExport.objects.filter(
        state__in=(DatasetExport.State.QUEUED, DatasetExport.State.RUNNING),
        updated_at__lt=timezone.now() - dt.timedelta(seconds=STALE_S),
    ).update(state=DatasetExport.State.FAILED, error="its worker stopped before it was done; export again",
             finished_at=timezone.now())


def expire_old(now=None) -> int:
    """Delete the files of exports finished more than SOP_EXPORT_RETENTION_DAYS ago (their rows stay, ``expired``):
    a .tar is a copy of data the server keeps anyway, and exports would otherwise fill the disk."""
    now = now or timezone.now()
    cutoff = now - dt.timedelta(days=settings.SOP_EXPORT_RETENTION_DAYS)
    expired = 0
    for export in DatasetExport.objects.filter(state=DatasetExport.State.DONE, finished_at__lt=cutoff):
        try:
            storage.delete(export.key)
        except storage.StorageError as exc:  # the bucket did not answer: the next sweep tries again
            log.warning("export %s not deleted yet: %s", export.pk, exc)
            continue
        expired += DatasetExport.objects.filter(pk=export.pk, state=DatasetExport.State.DONE).update(
            state=DatasetExport.State.EXPIRED, updated_at=now)
    if expired:
        log.info("%d dataset export(s) older than %s days deleted", expired, settings.SOP_EXPORT_RETENTION_DAYS)
    return expired


def _send(export_id: int) -> None:
    from celery import current_app

    current_app.send_task("robots.export_dataset", args=[export_id])


def export_key(export: DatasetExport) -> str:
    return f"exports/sop-export-{export.pk}.tar"


def filename(export: DatasetExport) -> str:
    return f"sop-export-{export.pk}-lerobot-v3.tar"


def run_export(export_id: int) -> Optional[DatasetExport]:
    """The Celery task's body: write the dataset, pack it, store it; progress and the outcome in the row."""
    export = DatasetExport.objects.filter(pk=export_id).first()
    if export is None or export.state == DatasetExport.State.DONE:
        return export
    _update(export, state=DatasetExport.State.RUNNING, progress=0.0, error="")
    work = Path(tempfile.mkdtemp(prefix=f"export-{export.pk}-", dir=_area()))
    try:
        episodes = select_episodes(export.filters)
        if not episodes:
            raise lerobot.LeRobotError("no verified episodes match these filters any more")
        last = [0.0]

        def progress(done: int, total: int) -> None:
            if time.monotonic() - last[0] >= PROGRESS_EVERY_S:
                last[0] = time.monotonic()
                _update(export, progress=0.95 * done / max(total, 1))  # the last 5 %: packing

        summary = lerobot.export_dataset(episodes, work / "dataset", progress=progress)
        tar_path = work / "export.tar"
        with tarfile.open(tar_path, "w") as tar:
            tar.add(work / "dataset", arcname=f"sop-export-{export.pk}")
        key = export_key(export)
        storage.upload(key, tar_path)
        size = tar_path.stat().st_size
        storage.place(key, tar_path)
    except Exception as exc:  # whatever it is, the export ends failed with the reason, never "running"
        if isinstance(exc, (lerobot.LeRobotError, storage.StorageError, OSError)):
            log.warning("export %s failed: %s", export.pk, exc)
        else:
            log.exception("export %s failed", export.pk)
        _update(export, state=DatasetExport.State.FAILED, error=(str(exc) or type(exc).__name__)[:500],
                finished_at=timezone.now())
    else:
        _update(export, state=DatasetExport.State.DONE, progress=1.0, key=key, size=size,
                episodes=summary["episodes"], frames=summary["frames"], finished_at=timezone.now())
        log.info("export %s: %d episodes, %d frames, %d bytes", export.pk, summary["episodes"], summary["frames"], size)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    export.refresh_from_db()
    return export


def _area() -> Path:
    folder = storage.local_path("exports/x").parent
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _update(export: DatasetExport, **fields) -> None:
    DatasetExport.objects.filter(pk=export.pk).update(updated_at=timezone.now(), **fields)


def local_file(export: DatasetExport) -> Optional[Path]:
    """The .tar on this host (fetched from the bucket if need be), None if it is not made (or gone)."""
    if export.state != DatasetExport.State.DONE or not export.key:
        return None
    path = storage.local_path(export.key)
    if path.exists():
        return path
    try:
        return storage.ensure_local(export.key, size=export.size) if storage.is_remote() else None
    except storage.StorageError as exc:
        log.warning("export %s not in the bucket: %s", export.pk, exc)
        return None


def view(export: DatasetExport, download_url: str) -> dict[str, Any]:
    return {"id": export.pk, "state": export.state, "progress": round(export.progress, 3), "error": export.error,
            "filters": export.filters, "episodes": export.episodes, "frames": export.frames, "size": export.size,
            "requested_by": export.requested_name, "created_at": export.created_at,
            "finished_at": export.finished_at, "download_url": download_url if export.state == "done" else None}

