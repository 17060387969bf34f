"""What the fleet is asked to do: tasks, task mixes (weighted assignments) and the choice of each robot's next task.

Every door (robot socket, console pages, management commands) calls these. A changed task or mix is pushed to the
connected robots it applies to; they run it from their next episode.
"""

from __future__ import annotations

import random
from typing import Optional

from django.db import transaction

from . import catalog, events, protocol
from .exceptions import SopError
from .models import Robot, Task, TaskAssignment
from .protocol import Split


def next_assignment(robot: Robot) -> protocol.TaskAssigned:
    """Pick what the robot runs next: a weighted choice among its own assignments, else the fleet-wide mix
    (robot=None), else any enabled task; a random prompt of that task. ``task=None`` when no task is enabled."""
    entries: list[TaskAssignment] = []
    base = TaskAssignment.objects.filter(task__enabled=True, weight__gt=0).select_related("task")
    for mix in (base.filter(robot=robot), base.filter(robot__isnull=True)):
        entries = list(mix)
        if entries:
            break
    if entries:
        chosen = random.choices(entries, weights=[e.weight for e in entries])[0]
        task, split = chosen.task, chosen.split
    else:
        task, split = Task.objects.filter(enabled=True).order_by("?").first(), Split.ONLINE.value
    if task is None:
        return protocol.TaskAssigned(task=None)
    prompts = [p for p in task.prompts if isinstance(p, str) and p.strip()] if isinstance(task.prompts, list) else []
    return protocol.TaskAssigned(
        task=task.name,
        env_id=task.env_id,
        prompt=(random.choice(prompts) if prompts else task.name.replace("-", " "))[:500],
        max_steps=max(1, task.max_steps),
        split=split,
    )


def reassign_robot(robot: Robot) -> protocol.TaskAssigned:
    """Choose a new assignment now and push it to the robot's live socket(s) (it applies from the next episode)."""
    with transaction.atomic():
        assignment = assign(robot)
        events.to_robot_on_commit(robot.pk, assignment)
    return assignment


def add_catalog_tasks(specs: list[catalog.TaskSpec]) -> list[tuple[Task, bool]]:
    """Create or update tasks from catalog entries (idempotent). ``enabled`` is left as an operator set it."""
    results = []
    with transaction.atomic():
        for spec in specs:
            task, created = Task.objects.update_or_create(
                name=spec.name,
                defaults=dict(
                    env_id=spec.env_id,
                    prompts=list(spec.prompts),
                    max_steps=spec.max_steps,
                    description=spec.description,
                ),
            )
            results.append((task, created))
    return results


def assign(robot: Robot) -> protocol.TaskAssigned:
    """Choose the robot's next assignment and record it as the robot's current task and prompt."""
    assignment = next_assignment(robot)
    Robot.objects.filter(pk=robot.pk).update(
        current_task=Task.objects.filter(name=assignment.task).first() if assignment.task else None,
        current_prompt=assignment.prompt,
    )
    return assignment



# ---------------------------------------------------------------- console: tasks and task mixes


def save_task(task: Task, *, actor=None, created: bool = False) -> Task:
    """Save a task edited in the console (validated by the caller), audit it, and re-send the assignment of connected
    robots that run it, so that a new prompt, step limit or a disabled task applies from their next episode."""
    with transaction.atomic():
        task.save()
        events.audit("task_saved", actor=actor, detail={
            "task": task.name, "created": created, "env_id": task.env_id, "enabled": task.enabled,
            "max_steps": task.max_steps, "prompts": len(task.prompts)})
        for robot in Robot.objects.filter(current_task=task, connected=True):
            reassign_robot(robot)
    return task


def set_assignments(robot: Optional[Robot], entries: dict[Task, tuple[float, str]], *, actor=None) -> list[TaskAssignment]:
    """Replace a task mix: the robot's own (``robot``) or the fleet-wide one (``robot=None``). ``entries`` maps
    tasks to (weight, split); weights <= 0 leave the task out. Connected robots that the mix applies to are sent a
    new assignment, which they run from their next episode."""
    rows = [(t, float(w), s) for t, (w, s) in entries.items() if w and float(w) > 0]
    for _, _, split in rows:
        if split not in {s.value for s in Split}:
            raise SopError(f"unknown split {split!r}")
    with transaction.atomic():
        scope = TaskAssignment.objects.filter(robot=robot) if robot else TaskAssignment.objects.filter(robot__isnull=True)
        before = {a.task.name: [a.weight, a.split] for a in scope.select_related("task")}
        scope.delete()
        saved = TaskAssignment.objects.bulk_create(
            [TaskAssignment(robot=robot, task=t, weight=w, split=s) for t, w, s in rows])
        after = {t.name: [w, s] for t, w, s in rows}
        if before == after:
            return saved
        events.audit("assignments_saved", robot=robot, actor=actor,
               detail={"scope": robot.name if robot else "fleet", "before": before, "after": after})
        if robot is not None:
            targets = Robot.objects.filter(pk=robot.pk)
        else:  # robots without a mix of their own follow the fleet-wide one
            targets = Robot.objects.exclude(pk__in=TaskAssignment.objects.filter(robot__isnull=False).values("robot"))
        for target in targets.filter(connected=True, revoked_at__isnull=True):
            reassign_robot(target)
    return saved
