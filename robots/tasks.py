"""Periodic fleet jobs (scheduled by settings.CELERY_BEAT_SCHEDULE): thin wrappers over fleet, ingest and control."""

from celery import shared_task

from . import control, fleet, ingest


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
