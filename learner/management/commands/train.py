"""``python manage.py train --algorithm hg_dagger --tasks reach,drawer-open``: start a training run on the workers.

The run is queued on the ``learner`` Celery queue (a worker must be running: ``manage.py demo`` starts one). With
``--follow`` the command shows the run's progress until it ends; Ctrl-C then stops following, not the run
(``--stop RUN_ID`` stops a run).
"""

from __future__ import annotations

import json
import time
from typing import Optional

from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from learner import services
from learner.algorithms import NAMES as ALGORITHMS
from learner.models import TrainingRun
from learner.policy import available_policies


class Command(BaseCommand):
    help = "Start (or stop) a training run on the Celery workers."

    def add_arguments(self, parser):
        parser.add_argument("--algorithm", default="hg_dagger", choices=sorted(ALGORITHMS))
        parser.add_argument("--tasks", help="comma-separated task names")
        parser.add_argument("--steps", type=int, help="learner steps (default: the preset's)")
        parser.add_argument("--preset", default="default")
        parser.add_argument("--from-scratch", action="store_true", help="fresh weights instead of the fleet's policy")
        parser.add_argument("--policy", help="the policy implementation: a built-in name, an installed plug-in's "
                                             "sop.policies entry point, or module:Class (default: the preset's)")
        parser.add_argument("--policy-option", action="append", default=[], metavar="KEY=JSON",
                            help="a setting of the policy (its options), e.g. hidden=256 or layers='[64, 64]'")
        parser.add_argument("--cameras", metavar="NAME,...",
                            help="the cameras the policy reads, e.g. corner3,gripperPOV (default: the robot's primary; "
                                 "robots must record them: agent --extra-cameras)")
        parser.add_argument("--list-policies", action="store_true", help="print the policies this install can build")
        parser.add_argument("--device", help="train on this device: cpu, cuda, cuda:N (default: the worker's "
                                             "SOP_DEVICE, cpu unless set)")
        parser.add_argument("--amp", choices=["off", "bf16"], help="mixed precision on CUDA (default off)")
        parser.add_argument("--world-size", type=int, help="data-parallel processes on the worker that claims the run "
                                                           "(gloo on CPU, NCCL on GPUs; default 1)")
        parser.add_argument("--follow", action="store_true", help="show progress until the run ends")
        parser.add_argument("--stop", type=int, metavar="RUN_ID", help="stop a run instead of starting one")

    def handle(self, *args, **opts):
        if opts["list_policies"]:
            for name, origin in sorted(available_policies().items()):
                self.stdout.write(f"{name}: {origin}")
            return
        if opts["stop"]:
            run = TrainingRun.objects.filter(pk=opts["stop"]).first()
            if run is None:
                raise CommandError(f"no training run {opts['stop']}")
            run = services.stop_run(run)
            self.stdout.write(f"run {run.pk}: {run.status}")
            return
        if not opts["tasks"]:
            raise CommandError("--tasks is required")
        tasks = [t.strip() for t in opts["tasks"].split(",") if t.strip()]
        overrides = {k: opts[k] for k in ("device", "amp", "world_size") if opts[k]}
        try:
            run = services.start_run(opts["algorithm"], tasks, preset=opts["preset"], total_steps=opts["steps"],
                                     from_scratch=opts["from_scratch"], policy=opts["policy"],
                                     policy_options=_options(opts["policy_option"]), overrides=overrides or None,
                                     cameras=_cameras(opts["cameras"]))
        except services.LearnerError as exc:
            raise CommandError(str(exc)) from None
        base = f"from v{run.base_checkpoint.version}" if run.base_checkpoint else "from scratch"
        self.stdout.write(self.style.SUCCESS(f"queued run {run.pk}: {run.algorithm} on {', '.join(tasks)}, "
                                             f"{run.total_steps} steps, {base}"))
        if opts["follow"]:
            self._follow(run)

    def _follow(self, run: TrainingRun):
        with tqdm(total=run.total_steps, desc=f"run {run.pk}", unit="step") as bar:
            while True:
                run.refresh_from_db()
                bar.update(run.step - bar.n)
                bar.set_postfix_str(f"{run.status}: {run.message}"[:60])
                if run.status not in TrainingRun.ACTIVE:
                    break
                time.sleep(1.0)
        self.stdout.write(f"run {run.pk} {run.status}: {run.message}")


def _cameras(value: Optional[str]) -> Optional[list[str]]:
    return None if value is None else [c.strip() for c in value.split(",") if c.strip()]


def _options(pairs: list[str]) -> dict:
    """KEY=JSON pairs; a value that is not JSON is taken as a string."""
    options = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise CommandError(f"--policy-option {pair!r} is not KEY=VALUE")
        try:
            options[key] = json.loads(raw)
        except ValueError:
            options[key] = raw
    return options
