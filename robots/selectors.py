"""Read-side queries of the fleet (no state changes): what the API and pages show."""

from __future__ import annotations

import logging
from typing import Optional

from django.db.models import Count, Q, QuerySet

from .exceptions import EpisodeNotFound, ForbiddenEpisode
from .models import Episode, Robot, Task

log = logging.getLogger(__name__)

_VERIFIED = Q(episodes__status=Episode.Status.VERIFIED)
_EPISODE_COUNTS = dict(
    episode_count=Count("episodes"),
    verified_episode_count=Count("episodes", filter=_VERIFIED),
    successful_episode_count=Count("episodes", filter=_VERIFIED & Q(episodes__success=True)),
)


def list_robots() -> QuerySet[Robot]:
    """Robots with their live state and episode counts."""
    return Robot.objects.select_related("current_task").annotate(**_EPISODE_COUNTS).order_by("name")


def list_tasks() -> QuerySet[Task]:
    return Task.objects.annotate(**_EPISODE_COUNTS).order_by("name")


def list_episodes(
    *,
    task: Optional[str] = None,
    robot: Optional[str] = None,
    split: Optional[str] = None,
    status: Optional[str] = None,
    outcome: Optional[str] = None,
) -> QuerySet[Episode]:
    """Episodes, newest first, filtered by task name, robot name, split, status and outcome."""
    episodes = Episode.objects.select_related("robot", "task").order_by("-started_at", "id")
    for field, value in (("task__name", task), ("robot__name", robot), ("split", split), ("status", status),
                         ("outcome", outcome)):
        if value:
            episodes = episodes.filter(**{field: value})
    return episodes


def episode_detail(episode_id) -> Episode:
    """One episode with its intervention segments. Raises EpisodeNotFound."""
    episode = (
        Episode.objects.select_related("robot", "task", "outcome_by")
        .prefetch_related("segments__operator")
        .filter(pk=episode_id)
        .first()
    )
    if episode is None:
        raise EpisodeNotFound()
    return episode


def robot_episode(robot: Robot, episode_id) -> Episode:
    """An episode as its own robot sees it. Raises EpisodeNotFound, or ForbiddenEpisode for another robot's."""
    episode = Episode.objects.filter(pk=episode_id).first()
    if episode is None:
        raise EpisodeNotFound()
    if episode.robot_id != robot.pk:
        log.warning("robot %s (id %s) asked for episode %s of robot id %s", robot.name, robot.pk, episode.pk,
                    episode.robot_id)
        raise ForbiddenEpisode()
    return episode
