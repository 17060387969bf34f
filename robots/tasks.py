"""Periodic fleet jobs (scheduled by settings.CELERY_BEAT_SCHEDULE): thin wrappers over fleet, ingest and control."""

from celery import shared_task

from . import control, exports, fleet, helpqueue, ingest, replay


@shared_task(name="robots.cleanup_stale_uploads")
def cleanup_stale_uploads() -> int:
    return ingest.cleanup_stale_uploads()


@shared_task(name="robots.mark_silent_robots_offline")
def mark_silent_robots_offline() -> int:
    return fleet.mark_silent_robots_offline()


@shared_task(name="robots.expire_leases")
def expire_leases() -> int:
    """Takeover leases not renewed within SOP_LEASE_TIMEOUT_S end; their robots get control.release."""
    return control.expire_leases()


@shared_task(name="robots.render_episode_video", acks_late=True)
def render_episode_video(episode_id: str, value_too: bool = False) -> str:
    """An episode's MP4, made once after it was verified (robots/replay.py); its progress is in its MediaJob.
    ``value_too``: the episode was verified just now and its value plot's task is sent from here, first, so that
    it never waits for the encoder (the web process sends one message per verified episode)."""
    if value_too:
        replay.send_value_task(episode_id)
    job = replay.render_video(episode_id)
    return job.state if job is not None else "none"


@shared_task(name="robots.escalate_help")
def escalate_help() -> int:
    """Beat, every 10 s: unanswered help requests grow more urgent with time (robots/helpqueue.py)."""
    return len(helpqueue.escalate())


@shared_task(name="robots.expire_exports")
def expire_exports() -> int:
    """Beat, hourly: exports older than SOP_EXPORT_RETENTION_DAYS lose their file (robots/exports.py)."""
    return exports.expire_old()


@shared_task(name="robots.export_dataset", acks_late=True)
def export_dataset(export_id: int) -> str:
    """A LeRobotDataset v3.0 export asked for in the console or the API (robots/exports.py)."""
    export = exports.run_export(export_id)
    return export.state if export is not None else "none"
