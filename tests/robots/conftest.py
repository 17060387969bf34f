"""The fleet's cast for tests/robots: two robots with their tokens and one task."""

import pytest

from robots import fleet
from robots.models import Task


@pytest.fixture
def task(db):
    """drawer-open: the one enabled task, so every assignment is predictable."""
    return Task.objects.create(name="drawer-open", env_id="drawer-open-v3", prompts=["open the drawer"], max_steps=150)


@pytest.fixture
def robot(db):
    """sim-01 and its raw token: the robot under test."""
    return fleet.register_robot("sim-01")


@pytest.fixture
def other_robot(db):
    """sim-02 and its raw token: a second robot that must never act as, or read the data of, sim-01."""
    return fleet.register_robot("sim-02")
