"""The study command end to end (`benchmarks/sop_study.py --quick`): real demos, pretraining, daphne, a Celery worker,
robots with the simulated operator, a pinned learner, evaluation from saved checkpoints, and resuming."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from urllib.parse import urlparse

import pytest
from django.conf import settings

from .conftest import ROOT, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]


def _study(tmp_path, rows: str) -> subprocess.CompletedProcess:
    url = urlparse(settings.REDIS_URL)
    return subprocess.run(
        [sys.executable, "benchmarks/sop_study.py", "--quick", "--seeds", "0", "--rows", rows,
         "--work", str(tmp_path / "work"), "--results", str(tmp_path / "study.json"),
         "--plot", str(tmp_path / "study.png"), "--port", str(free_port()),
         "--redis-url", f"redis://{url.hostname}:{url.port or 6379}/13"],
        cwd=ROOT, capture_output=True, text=True, timeout=1100)


@pytest.mark.skipif(settings.EMBEDDED_REDIS, reason="the study's processes share a Redis server (REDIS_URL)")
def test_the_quick_study_runs_every_stage_and_resumes(tmp_path):
    done = _study(tmp_path, "base,hg_dagger,bc_long")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "study.json").read_text())
    protocol, runs = results["protocol"], results["runs"]
    assert set(runs) == {"base/seed-0", "hg_dagger/seed-0", "bc_long/seed-0"}
    tasks = protocol["post_trained_tasks"] + protocol["held_out_tasks"]
    for run in runs.values():  # every row evaluated on every task, on the same number of held-out placements
        assert set(run["final"]) == set(tasks)
        assert all(run["final"][t]["episodes"] == protocol["eval_episodes"] for t in tasks)
    online = runs["hg_dagger/seed-0"]
    assert online["robots"] == 2 and online["online_episodes"] > 0 and online["learner_steps"] > 0
    assert online["expert_steps_online"] > 0, "the simulated operator corrected the base policy"
    assert set(online["online_episodes_by_task"]) <= set(protocol["post_trained_tasks"]), "held-out tasks ran online"
    for task, seen in online["placements"].items():  # the seed tree, checked on the run's own episodes
        assert seen["distinct_online"] == seen["online_episodes"] > 0
        assert seen["online_in_eval"] == seen["online_in_demos"] == seen["demos_in_eval"] == 0
    # The snapshots read the run's step from its row, which the worker refreshes every SOP_TRAINING_HEARTBEAT_S: the
    # rate between two of them may read high by up to one heartbeat's worth of steps over the window (more than 5 %
    # of a quick run's ~1 minute), never more.
    window_s = 60 * (online["timeline"][-1]["t_min"] - online["timeline"][0]["t_min"])
    staleness = float(os.environ.get("SOP_TRAINING_HEARTBEAT_S", "5")) / window_s
    assert online["learner_steps_per_s"] <= protocol["pace"] * (1.05 + staleness), "the learner ran ahead of its pace"
    assert online["loop_hz"] and all(len(hz) == 2 for hz in online["loop_hz"])
    assert online["curve"][0]["version"] == 1 and online["curve"][-1]["version"] > 1
    assert runs["bc_long/seed-0"]["learner_steps"] == online["learner_steps"], "the control trains as long"
    summary = results["summary"]
    assert {"base", "hg_dagger", "bc_long"} <= set(summary)
    assert summary["hg_dagger"]["post_trained"]["pooled_episodes"] == protocol["eval_episodes"] * len(
        protocol["post_trained_tasks"])
    assert (tmp_path / "study.png").stat().st_size > 10_000

    again = _study(tmp_path, "base,hg_dagger,bc_long")  # resumable: nothing is redone
    assert again.returncode == 0, again.stdout[-3000:]
    assert again.stdout.count("skipped") == 3
    assert json.loads((tmp_path / "study.json").read_text())["runs"] == runs
