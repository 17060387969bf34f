"""The default task catalog: the ten Meta-World MT10 (v3) tasks with natural-language prompts. Pure: no Django.

``manage.py add_tasks --all`` turns it into Task rows; the agent's simulator looks environments up by ``env_id``.
"""

from __future__ import annotations

import dataclasses

DEFAULT_MAX_STEPS = 150  # Meta-World's horizon is 500; the scripted experts succeed in 44-87 steps


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str  # Task.name, a lowercase identifier (protocol._NAME)
    env_id: str  # Meta-World environment id
    prompts: tuple[str, ...]  # language instructions; one is picked per episode
    description: str = ""
    max_steps: int = DEFAULT_MAX_STEPS


MT10: tuple[TaskSpec, ...] = (
    TaskSpec("reach", "reach-v3", ("reach the goal", "move the gripper to the target"),
             "Move the end effector to a goal position."),
    TaskSpec("push", "push-v3", ("push the puck to the goal", "slide the puck to the target"),
             "Push a puck across the table to a goal position."),
    TaskSpec("pick-place", "pick-place-v3", ("pick up the puck and place it at the goal", "put the puck on the target"),
             "Pick a puck up and place it at a goal position."),
    TaskSpec("door-open", "door-open-v3", ("open the door", "pull the door open"),
             "Open a door with a revolving joint."),
    TaskSpec("drawer-open", "drawer-open-v3", ("open the drawer", "pull the drawer out"),
             "Open a drawer."),
    TaskSpec("drawer-close", "drawer-close-v3", ("close the drawer", "push the drawer shut"),
             "Push a drawer closed."),
    TaskSpec("button-press-topdown", "button-press-topdown-v3",
             ("press the button from the top", "push the button down"),
             "Press a button from the top."),
    TaskSpec("peg-insert-side", "peg-insert-side-v3", ("insert the peg into the hole", "put the peg in sideways"),
             "Insert a peg sideways into a hole."),
    TaskSpec("window-open", "window-open-v3", ("open the window", "slide the window open"),
             "Slide a window open."),
    TaskSpec("window-close", "window-close-v3", ("close the window", "slide the window shut"),
             "Slide a window closed."),
)

CATALOG: dict[str, TaskSpec] = {spec.name: spec for spec in MT10}

# What `manage.py demo` runs by default: tasks whose scripted experts are reliable and quick.
DEMO_TASKS: tuple[str, ...] = ("reach", "drawer-open", "button-press-topdown", "window-open")


def lookup(names: list[str] | tuple[str, ...]) -> list[TaskSpec]:
    """The specs for ``names`` (task names or env ids), in catalog order. Raises KeyError naming the unknown ones."""
    by_env = {spec.env_id: spec for spec in MT10}
    unknown = [n for n in names if n not in CATALOG and n not in by_env]
    if unknown:
        raise KeyError(f"not in the catalog: {', '.join(unknown)} (known: {', '.join(CATALOG)})")
    wanted = {CATALOG.get(n) or by_env[n] for n in names}
    return [spec for spec in MT10 if spec in wanted]
