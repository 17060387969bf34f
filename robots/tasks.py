"""Periodic fleet jobs (scheduled by settings.CELERY_BEAT_SCHEDULE): thin wrappers over services."""

from celery import shared_task

from . import services


@shared_task(name="robots.cleanup_stale_uploads")
def cleanup_stale_uploads() -> int:
    return services.cleanup_stale_uploads()


@shared_task(name="robots.mark_silent_robots_offline")
def mark_silent_robots_offline() -> int:
    return services.mark_silent_robots_offline()


@shared_task(name="robots.expire_leases")
def expire_leases() -> int:
    """Takeover leases not renewed within SOP_LEASE_TIMEOUT_S end; their robots get control.release."""
    from . import control

    return control.expire_leases()
