"""`manage.py proxy_config` and X-Accel-Redirect: what the proxy is told, and what it is never told."""

from __future__ import annotations

import pytest
from django.core.management import CommandError, call_command

from sop_web.files import ACCEL_PREFIX, accel_redirect


def test_the_config_names_every_node_and_the_internal_file_locations(tmp_path, settings):
    out = tmp_path / "nginx.conf"
    call_command("proxy_config", "--node", "10.0.0.1:8001", "--node", "[::1]:8002", "--listen", "127.0.0.1:8080",
                 "--prefix", str(tmp_path / "nginx"), "--output", str(out))
    text = out.read_text()
    assert "server 10.0.0.1:8001 " in text and "server [::1]:8002 " in text and "listen 127.0.0.1:8080;" in text
    assert "@@" not in text and "\nuser " not in text  # nginx's own default user unless one is named
    call_command("proxy_config", "--node", "10.0.0.1:8001", "--user", "www-data", "--prefix", str(tmp_path / "nginx"),
                 "--output", str(out))
    assert "\nuser www-data;\n" in out.read_text()
    for area in ("checkpoints", "videos"):  # internal: nginx serves them only on a node's X-Accel-Redirect
        block = text.split(f"location {ACCEL_PREFIX}/{area}/ {{", 1)[1].split("}", 1)[0]
        assert "internal;" in block
    assert f"client_max_body_size {settings.SOP_MAX_UPLOAD_CHUNK_BYTES + 1024 * 1024};" in text


@pytest.mark.parametrize("args, message", [
    ([], "at least one web node"),
    (["--node", "evil;host:80"], "not host:port"),
    (["--node", "a:80", "--listen", "80; include /etc/passwd"], "is not"),
    (["--node", "a:80", "--user", "www-data; daemon off"], "not a user name"),
])
def test_a_bad_argument_is_refused_before_anything_is_written(tmp_path, args, message):
    with pytest.raises(CommandError, match=message):
        call_command("proxy_config", *args, "--prefix", str(tmp_path / "p"), "--output", str(tmp_path / "x.conf"))
    assert not (tmp_path / "x.conf").exists()


def test_accel_redirect_is_off_by_default_and_refuses_paths_outside_its_areas(tmp_path, settings):
    target = settings.CHECKPOINT_DIR / "policy-v1.safetensors"
    assert accel_redirect(target, "application/octet-stream") is None  # the view streams the file itself
    settings.SOP_ACCEL_REDIRECT = True
    response = accel_redirect(target, "application/octet-stream", filename="policy-v1.safetensors")
    assert response["X-Accel-Redirect"] == f"{ACCEL_PREFIX}/checkpoints/policy-v1.safetensors"
    assert response.content == b"" and "policy-v1.safetensors" in response["Content-Disposition"]
    with pytest.raises(ValueError, match="outside"):
        accel_redirect(settings.CHECKPOINT_DIR / ".." / "db.sqlite3", "application/octet-stream")
    link = settings.CHECKPOINT_DIR / "escape.safetensors"
    link.parent.mkdir(parents=True, exist_ok=True)
    link.unlink(missing_ok=True)
    link.symlink_to(tmp_path)
    try:
        with pytest.raises(ValueError, match="outside"):  # a symlink out of the area is resolved, then refused
            accel_redirect(link, "application/octet-stream")
    finally:
        link.unlink()
