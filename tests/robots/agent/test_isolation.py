"""The robot agent runs on robots, where there is no Django: importing it must never pull Django in."""

import subprocess
import sys

SCRIPT = """
import importlib, pkgutil, sys
import robots.agent
names = [m.name for m in pkgutil.walk_packages(robots.agent.__path__, "robots.agent.")]
for name in names:
    importlib.import_module(name)
from robots.agent.agents import ScriptedExpertAgent
ScriptedExpertAgent()  # imports metaworld and mujoco
assert "robots.agent.__main__" in sys.modules and "mujoco" in sys.modules
leaked = sorted(m for m in sys.modules if m == "django" or m.startswith("django."))
print(len(names), "modules;", "leaked:", leaked)
sys.exit(1 if leaked else 0)
"""


def test_the_agent_and_every_submodule_import_without_django():
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": "."}  # no DJANGO_SETTINGS_MODULE either
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "leaked: []" in proc.stdout
