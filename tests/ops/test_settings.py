"""DATABASE_URL parsing: query options reach the driver, unsupported URLs fail loudly at start-up."""

import pytest

from sop_web import settings as sop_settings


def test_postgres_url_keeps_credentials_and_query_options():
    db = sop_settings._database(
        "postgresql://sop:p%40ss%2Fword@db.internal:6543/fleet?sslmode=verify-full&sslrootcert=/etc/sop/ca.pem")
    assert db["ENGINE"] == "django.db.backends.postgresql"
    assert (db["NAME"], db["USER"], db["PASSWORD"], db["HOST"], int(db["PORT"])) == (
        "fleet", "sop", "p@ss/word", "db.internal", 6543)
    # These were silently dropped by the old hand-written parser: a TLS-only database then failed, or worse, did not.
    pool = db["OPTIONS"].pop("pool")
    assert db["OPTIONS"] == {"sslmode": "verify-full", "sslrootcert": "/etc/sop/ca.pem"}
    # a pool per process (each ASGI request has a thread of its own: a persistent connection is never reused)
    assert (pool["min_size"], pool["max_size"]) == (1, 20)
    assert db["CONN_MAX_AGE"] == 0 and db["CONN_HEALTH_CHECKS"] is True  # Django refuses a pool with persistence


def test_the_pool_can_be_turned_off_and_then_conn_max_age_applies(monkeypatch):
    monkeypatch.setenv("SOP_DB_POOL_MAX", "0")
    assert "pool" not in sop_settings._database("postgres://localhost/sop").get("OPTIONS", {})
    assert sop_settings._database("postgres://localhost/sop")["CONN_MAX_AGE"] == 60
    monkeypatch.setenv("SOP_DB_CONN_MAX_AGE", "0")
    assert sop_settings._database("postgres://localhost/sop")["CONN_MAX_AGE"] == 0
    monkeypatch.setenv("SOP_DB_POOL_MAX", "8")
    assert sop_settings._database("postgres://localhost/sop")["OPTIONS"]["pool"]["max_size"] == 8


def test_sqlite_url_shares_one_file_with_child_processes(tmp_path):
    path = tmp_path / "x.sqlite3"
    db = sop_settings._database(f"sqlite:///{path}")
    assert db["ENGINE"] == "django.db.backends.sqlite3"
    assert str(db["NAME"]) == str(path) and str(db["TEST"]["NAME"]) == str(path)
    assert db["OPTIONS"]["transaction_mode"] == "IMMEDIATE"  # the embedded default's pragmas are kept


def test_empty_url_is_the_embedded_default():
    db = sop_settings._database("")
    assert db["ENGINE"] == "django.db.backends.sqlite3"
    assert db["NAME"] == sop_settings.DATA_DIR / "db.sqlite3"


@pytest.mark.parametrize("url, message", [
    ("mysql://u@h/db", "not supported"),
    ("sqlite://", "needs a file path"),
    ("sqlite:///:memory:", "needs a file path"),
    ("not a url", "not a database URL"),
])
def test_unsupported_urls_fail_with_a_clear_message(url, message):
    with pytest.raises(ValueError, match=message):
        sop_settings._database(url)


def _settings_in_a_child(tmp_path, **env) -> dict:
    """Settings are read once per process: evaluate them in a fresh interpreter with ``env``."""
    import json, os, subprocess, sys  # noqa: E401
    code = ("import json; from django.conf import settings as s; print(json.dumps({k: getattr(s, k, None) for k in "
            "('SECURE_PROXY_SSL_HEADER', 'SESSION_COOKIE_SECURE', 'CSRF_COOKIE_SECURE', 'SECURE_SSL_REDIRECT', "
            "'SECURE_HSTS_SECONDS', 'CSRF_TRUSTED_ORIGINS')}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60,
                         env={**os.environ, "DJANGO_SETTINGS_MODULE": "sop_web.settings",
                              "SOP_DATA_DIR": str(tmp_path), **env})
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_tls_proxy_mode_trusts_forwarded_proto_and_secures_cookies(tmp_path):
    plain = _settings_in_a_child(tmp_path)
    assert plain["SECURE_PROXY_SSL_HEADER"] is None and plain["SESSION_COOKIE_SECURE"] is False
    tls = _settings_in_a_child(tmp_path, SOP_TLS="1", CSRF_TRUSTED_ORIGINS="https://sop.example.org")
    assert tls["SECURE_PROXY_SSL_HEADER"] == ["HTTP_X_FORWARDED_PROTO", "https"]
    assert tls["SESSION_COOKIE_SECURE"] and tls["CSRF_COOKIE_SECURE"] and tls["SECURE_SSL_REDIRECT"]
    assert tls["SECURE_HSTS_SECONDS"] == 0
    assert tls["CSRF_TRUSTED_ORIGINS"] == ["https://sop.example.org"]


def test_tls_proxy_mode_redirects_plain_http_except_the_probes(tmp_path):
    import os, subprocess, sys  # noqa: E401
    code = ("import django; django.setup(); from django.test import Client; c = Client(HTTP_HOST='localhost'); "
            "r = c.get('/login/'); print(r.status_code, r.get('Location')); "
            "print(c.get('/login/', headers={'x-forwarded-proto': 'https'}).status_code); "
            "print(c.get('/healthz').status_code in (200, 503))")
    # The child's database is the embedded default in tmp_path: under CI, DATABASE_URL names a PostgreSQL database that
    # only exists as pytest-django's test copy, and neither a login page nor the probe's answer depends on it.
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**env, "DJANGO_SETTINGS_MODULE": "sop_web.settings", "SOP_DATA_DIR": str(tmp_path),
                              "SOP_TLS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()[-3:]
    assert lines[0] == "301 https://localhost/login/"
    assert lines[1] == "200"  # the proxy said https: served
    assert lines[2] == "True"  # the probe is not redirected


def test_every_environment_variable_the_server_reads_is_documented():
    """The README's configuration table is the operator's one list: a setting read from the environment and missing
    there is a setting nobody can find."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    read = re.compile(r"""(?:env_str|env_bool|env_int|os\.environ\.get|os\.getenv)\(\s*["']([A-Z][A-Z0-9_]+)["']""")
    names = {name for package in ("sop_web", "robots", "learner") for path in (root / package).rglob("*.py")
             if "agent" not in path.parts for name in read.findall(path.read_text())}
    assert {"DATABASE_URL", "SOP_DATA_DIR", "SOP_TRAINING_ROUND_S"} <= names  # the scan itself works
    readme = (root / "README.md").read_text()
    assert sorted(n for n in names if f"`{n}`" not in readme) == []
