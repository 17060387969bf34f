"""Periodic fleet jobs (scheduled by settings.CELERY_BEAT_SCHEDULE): thin wrappers over services."""

from celery import shared_task

from . import services


@shared_task(name="robots.cleanup_stale_uploads")
def cleanup_stale_uploads() -> int:
    return services.cleanup_stale_uploads()


@shared_task(name="robots.mark_silent_robots_offline")
def mark_silent_robots_offline() -> int:
    return services.mark_silent_robots_offline()
