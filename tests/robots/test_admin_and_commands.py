"""The admin and the management commands: the operator's doors into the same services."""

import pytest
from django.core.management import call_command

from robots import auth
from robots.models import AuditEvent, Robot

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client(client, admin_user):
    client.force_login(admin_user)
    return client


@pytest.mark.parametrize("model", ["robot", "task", "taskassignment", "episode", "auditevent"])
def test_every_model_has_an_admin_page(admin_client, robot, task, model):
    assert admin_client.get(f"/admin/robots/{model}/").status_code == 200


def test_the_admin_never_shows_a_token_hash(admin_client, robot):
    robot, _ = robot
    page = admin_client.get(f"/admin/robots/robot/{robot.pk}/change/").content.decode()
    assert robot.token_prefix in page and robot.token_hash not in page


def test_the_admin_revokes_tokens(admin_client, robot, admin_user):
    robot, token = robot
    reply = admin_client.post("/admin/robots/robot/", {"action": "revoke_token", "_selected_action": [robot.pk]})
    assert reply.status_code == 302
    assert auth.authenticate_token(token) is None
    assert AuditEvent.objects.get(action="robot.token_revoked").actor == admin_user


def test_episodes_and_the_audit_log_are_read_only_in_the_admin(admin_client):
    assert admin_client.get("/admin/robots/episode/add/").status_code == 403
    assert admin_client.get("/admin/robots/auditevent/add/").status_code == 403


def test_add_robot_prints_the_token_once_with_an_agent_hint(capsys):
    call_command("add_robot", "sim-07")
    out = capsys.readouterr().out
    token = next(word for word in out.split() if word.startswith("sop_"))
    assert auth.authenticate_token(token) == Robot.objects.get(name="sim-07")
    assert out.count(token) == 1, "shown once, and never inside a command line (ps, shell history)"
    hint = next(line for line in out.splitlines() if "python -m robots.agent" in line)
    assert "SOP_ROBOT_TOKEN=" in hint and "--token" not in hint and token not in hint


def test_the_secret_key_file_is_never_readable_by_others_not_even_for_a_moment(tmp_path):
    """Before: written with the umask's mode (0o644 or worse), then chmod'ed: another user could read it in between.
    The spy records the file's mode whenever anything is written to or chmod'ed on it."""
    import os
    import stat
    import subprocess
    import sys

    env = {**os.environ, "SOP_DATA_DIR": str(tmp_path), "DJANGO_SETTINGS_MODULE": "sop_web.settings"}
    env.pop("SECRET_KEY", None)
    code = "\n".join([
        "import os, pathlib, json",
        "os.umask(0)",
        "seen = []",
        "chmod, write = pathlib.Path.chmod, pathlib.Path.write_text",
        "def spy_chmod(self, mode, **kw):",
        "    seen.append(self.stat().st_mode & 0o777); return chmod(self, mode, **kw)",
        "def spy_write(self, *a, **kw):",
        "    n = write(self, *a, **kw); seen.append(self.stat().st_mode & 0o777); return n",
        "pathlib.Path.chmod, pathlib.Path.write_text = spy_chmod, spy_write",
        "from django.conf import settings; settings.SECRET_KEY",
        "print(json.dumps(seen))",
    ])
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__)))).stdout
    seen = __import__("json").loads(out.strip().splitlines()[-1])
    assert all(mode & 0o077 == 0 for mode in seen), [oct(m) for m in seen]
    assert stat.S_IMODE((tmp_path / "secret_key").stat().st_mode) == 0o600
