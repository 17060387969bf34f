"""Schemathesis against a live daphne: every operation of docs/openapi.json, fuzzed from its schema.

Checks on every response: no server error, the status code is one the schema documents, the content type is the
documented one, the body matches the documented schema. Robot endpoints are called with a robot token, operator
endpoints with a logged-in admin's session cookie (+ the CSRF header for POSTs), so the fuzzing reaches the views
instead of stopping at 401/403; half of the valid cases aim at real rows (episodes, runs, checkpoints, the task) so
that they get past 404 into the services. Bounded and deterministic (derandomized): MAX_EXAMPLES valid and as many
invalid cases per operation, about 1.5 minutes on a 2-core machine. A failure prints the request as a curl line.
"""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

import pytest
import requests
import schemathesis
from django.conf import settings as django_settings
from django.utils import timezone
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from learner.models import Checkpoint, TrainingRun
from robots import fleet
from robots.models import Episode, InterventionSegment, Robot

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

SCHEMA = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"
MAX_EXAMPLES = 100
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
ADMIN_PASSWORD = "carol-password-1"  # tests/conftest.py's admin_user


class Live:
    """The running server, the credentials the fuzzing uses and the ids of real rows to aim at."""

    def __init__(self, proc, url: str, token: str, session: requests.Session, rows: dict):
        self.proc, self.url, self.token, self.session, self.rows = proc, url, token, session, rows

    @property
    def csrf(self) -> str:
        return self.session.cookies["csrftoken"]


def _login(url: str, username: str, password: str) -> requests.Session:
    """A browser's session: the login page's CSRF cookie, then the login form."""
    session = requests.Session()
    page = session.get(f"{url}/login/", timeout=10)
    assert page.status_code == 200
    reply = session.post(f"{url}/login/", data={"username": username, "password": password,
                                                "csrfmiddlewaretoken": session.cookies["csrftoken"]},
                         headers={"Referer": f"{url}/login/"}, allow_redirects=False, timeout=10)
    assert reply.status_code == 302 and "sessionid" in session.cookies, reply.text[:500]
    return session


def _fleet_data(robot: Robot, other: Robot, task, admin) -> tuple[dict, list[Path]]:
    """Rows for the endpoints to find (so that the fuzzing gets past 404 and the response schemas meet real data):
    their ids, and the files to delete afterwards."""
    Robot.objects.filter(pk=robot.pk).update(current_task=task, connected=True, state="running", loop_hz=9.5,
                                             capabilities=["teleop", "webrtc"])
    now = timezone.now()
    verified = Episode.objects.create(robot=robot, task=task, split="online", status=Episode.Status.VERIFIED,
                                      outcome="success", success=True, started_at=now, ended_at=now, steps=10,
                                      outcome_by=admin, payload_size=10, received_bytes=10)
    InterventionSegment.objects.create(episode=verified, start_step=2, end_step=5, source="operator", operator=admin,
                                       operator_name=admin.username, reason="slipping")
    uploading = Episode.objects.create(robot=robot, task=task, split="eval", status=Episode.Status.UPLOADING,
                                       started_at=now, payload_size=100, payload_sha256="1" * 64)
    foreign = Episode.objects.create(robot=other, task=task, status=Episode.Status.UPLOADING, started_at=now,
                                     payload_size=100, payload_sha256="2" * 64)
    run = TrainingRun.objects.create(algorithm="hg_dagger", total_steps=100, step=10)
    run.tasks.add(task)
    TrainingRun.objects.create(algorithm="bc")  # total_steps 0: progress null
    weights = Path(django_settings.CHECKPOINT_DIR) / f"schemathesis-{uuid.uuid4().hex}.safetensors"
    weights.parent.mkdir(parents=True, exist_ok=True)
    weights.write_bytes(b"weights")
    first = Checkpoint.objects.create(version=1, run=run, algorithm="hg_dagger", step=5, path=weights.name,
                                      size=7, sha256=hashlib.sha256(b"weights").hexdigest())
    Checkpoint.objects.create(version=2, run=None, parent=first, algorithm="hg_dagger", step=10, path="missing.st",
                              size=7, sha256="0" * 64)
    rows = {"episode_id": [str(verified.id), str(uploading.id), str(foreign.id)], "run_id": [run.pk],
            "version": [1, 2], "task": task.name}
    return rows, [weights]


@pytest.fixture
def live(launcher, robot, task, admin_user):
    other = fleet.register_robot("sim-02")[0]
    rows, files = _fleet_data(robot[0], other, task, admin_user)
    proc, url = launcher.server()
    yield Live(proc, url, robot[1], _login(url, admin_user.username, ADMIN_PASSWORD), rows)
    for path in files:
        path.unlink(missing_ok=True)
    # A view that failed inside but still answered something documented would slip through the checks: not its log.
    log = proc.output()
    assert "Traceback" not in log and "Internal Server Error" not in log, log[-4000:]


def _load_schema():
    config = schemathesis.Config()
    project = config.projects.default
    project.update(request_timeout=30)
    # The credentials come from the test (robot token, admin session); generated ones would only ever get 401/403.
    project.generation.update(max_examples=MAX_EXAMPLES, with_security_parameters=False, database="none")
    return schemathesis.openapi.from_path(SCHEMA, config=config)


def _operations():
    return [result.ok() for result in _load_schema().get_all_operations()]


def test_every_operation_answers_as_documented(live, subtests):
    """Each operation, positive cases (valid per the schema) then negative ones (invalid), MAX_EXAMPLES each.

    One test and one server for all operations (pytest's subtests report each operation on its own); not
    schemathesis's pytest loader, whose lazy fixture support does not run on pytest 9."""
    operations = _operations()
    assert len(operations) == 17
    for operation in operations:
        robot = operation.path.startswith("/api/robot/")
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            with subtests.test(operation=operation.label, mode=mode.value):
                _fuzz(operation, mode, live, robot)


def _fuzz(operation, mode, live, robot: bool) -> None:
    if robot:
        headers, session = {"Authorization": f"Bearer {live.token}"}, requests.Session()
    else:
        headers, session = {"X-CSRFToken": live.csrf, "Referer": f"{live.url}/"}, live.session
    strategy = operation.as_strategy(generation_mode=mode)
    if mode == GenerationMode.POSITIVE:  # half of the valid cases aim at real rows, so they reach the services
        strategy = st.tuples(strategy, st.booleans(), st.integers(0, 2)).map(lambda drawn: _aim(*drawn, live.rows))

    @given(case=strategy)
    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
    def fuzz(case):
        case.call_and_validate(base_url=live.url, session=session, headers=headers, checks=CHECKS)

    try:
        fuzz()
    except Unsatisfiable:
        assert mode == GenerationMode.NEGATIVE, operation.label  # nothing to make invalid (no parameters, no body)


def _aim(case, aim: bool, pick: int, rows: dict):
    if not aim:
        return case
    for name, value in (case.path_parameters or {}).items():
        if name in rows:
            case.path_parameters[name] = rows[name][pick % len(rows[name])]
    if isinstance(case.body, dict):
        if "task" in case.body:
            case.body["task"] = rows["task"]
        if "tasks" in case.body:
            case.body["tasks"] = [rows["task"]]
    return case
