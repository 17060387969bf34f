"""Every command a person runs explains itself: ``--help`` of each benchmark script, management command and the robot
agent prints its usage. argparse %-formats help strings, so one literal "%" in a help text (e.g. "95 % of the pace")
makes ``--help`` crash with a TypeError instead of helping; sop_study.py did until this test."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from django.core.management import get_commands, load_command_class

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py")  # the scripts; common.py, the floor app: modules
                    if 'if __name__ == "__main__"' in p.read_text())
OURS = sorted((name, app) for name, app in get_commands().items() if app in ("robots", "learner"))


# what a person types after the interpreter: each benchmark script, and the robot agent (the sop-agent console script)
SCRIPTS = [[str(ROOT / "benchmarks" / name)] for name in BENCHMARKS] + [["-m", "robots.agent"]]


@pytest.mark.parametrize("argv", SCRIPTS, ids=[argv[-1].rpartition("/")[2] for argv in SCRIPTS])
def test_each_script_prints_its_usage(argv):
    done = subprocess.run([sys.executable, *argv, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage:"), done.stdout[:500]


def test_the_project_has_its_management_commands():
    assert {"add_robot", "collect_demos", "train", "evaluate"} <= {name for name, _ in OURS}


@pytest.mark.parametrize("name,app", OURS)
def test_each_management_command_prints_its_usage(name, app):
    parser = load_command_class(app, name).create_parser("manage.py", name)
    assert parser.format_help().startswith(f"usage: manage.py {name}")

