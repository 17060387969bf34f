"""The cast of the security tests: one robot with its token, one task, a real daphne (tests/e2e's launcher)."""

import pytest
from django.conf import settings
from hypothesis.configuration import set_hypothesis_home_dir

from robots import fleet
from robots.models import Task
from tests.e2e.conftest import launcher, log_dir  # noqa: F401  (fixtures: a real daphne on the test database)

# Hypothesis (under schemathesis) keeps caches in .hypothesis/ of the working directory: keep them with the test data.
set_hypothesis_home_dir(str(settings.DATA_DIR / "hypothesis"))


@pytest.fixture
def task(db):
    return Task.objects.create(name="drawer-open", env_id="drawer-open-v3", prompts=["open the drawer"], max_steps=150)


@pytest.fixture
def robot(db):
    """sim-01 and its raw token."""
    return fleet.register_robot("sim-01")
