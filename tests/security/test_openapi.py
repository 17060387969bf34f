"""The OpenAPI schema of /api/: docs/openapi.json is what drf-spectacular generates now, /api/schema/ needs a login."""

from __future__ import annotations

import json
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command
from django.test import Client
from django.urls import get_resolver

COMMITTED = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"
REGENERATE = ".venv/bin/python manage.py spectacular --format openapi-json --file docs/openapi.json"


def _generate(tmp_path) -> dict:
    out = tmp_path / "openapi.json"
    call_command("spectacular", "--format", "openapi-json", "--file", str(out), "--validate", "--fail-on-warn",
                 stdout=StringIO(), stderr=StringIO())
    return json.loads(out.read_text())


def test_the_committed_schema_is_current(tmp_path):
    generated = _generate(tmp_path)
    committed = json.loads(COMMITTED.read_text())
    assert generated == committed, f"docs/openapi.json is stale: run {REGENERATE}"


def test_every_api_route_is_in_the_schema_with_its_security(tmp_path):
    schema = _generate(tmp_path)
    routes = set()

    def walk(patterns, prefix=""):
        for p in patterns:
            if hasattr(p, "url_patterns"):
                walk(p.url_patterns, prefix + str(p.pattern))
            else:
                routes.add(prefix + str(p.pattern))

    walk(get_resolver().url_patterns)
    api_routes = {r for r in routes if r.startswith("api/") and r != "api/schema/"}
    assert len(schema["paths"]) == len(api_routes) == 15, (sorted(schema["paths"]), sorted(api_routes))
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            robot = path.startswith("/api/robot/")
            # robot endpoints: the robot's token; console endpoints: a login session or the person's API token
            assert operation["security"] == ([{"robotToken": []}] if robot else [{"cookieAuth": []}, {"userToken": []}]), \
                (method, path)
            scheme = "robotToken" if robot else "cookieAuth"
            codes = set(operation["responses"])
            assert codes & {"200", "201", "202"} and ("401" if scheme == "robotToken" else "403") in codes, (method, path)
            for code, response in operation["responses"].items():
                if code >= "400":
                    ref = response["content"]["application/json"]["schema"]["$ref"]
                    assert ref == "#/components/schemas/Error", (method, path, code)
    upload = schema["paths"]["/api/robot/episodes/{episode_id}/payload"]["put"]
    assert set(upload["requestBody"]["content"]) == {"application/octet-stream"}
    assert [p["name"] for p in upload["parameters"] if p["in"] == "header"] == ["Upload-Offset"]
    assert {"409", "413", "422", "429", "507"} <= set(upload["responses"])
    checkpoint = schema["paths"]["/api/robot/checkpoints/{version}"]["get"]["responses"]["200"]
    assert set(checkpoint["content"]) == {"application/octet-stream"}
    assert "token_prefix" not in json.dumps(schema)


@pytest.mark.django_db
def test_the_schema_is_served_to_logged_in_users_only(operator):
    client = Client()
    anonymous = client.get("/api/schema/")
    assert anonymous.status_code == 403 and anonymous.json()["code"] == "not_authenticated"
    client.force_login(operator)
    served = client.get("/api/schema/")
    assert served.status_code == 200 and served["Content-Type"].startswith("application/vnd.oai.openapi+json")
    assert served.json() == json.loads(COMMITTED.read_text())
