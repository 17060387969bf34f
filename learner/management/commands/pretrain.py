"""``python manage.py pretrain --tasks reach,drawer-open``: behaviour cloning on the offline demonstrations.

Runs in this process with a progress bar (no worker needed) through the same training service as Celery runs, and
publishes the result as the next checkpoint version (version 1 on a fresh system), deployed to the fleet.
"""

from __future__ import annotations

import math

from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from learner import services
from robots.models import Episode, Task


class Command(BaseCommand):
    help = "Train the base policy by behaviour cloning on offline demonstrations and publish it as a checkpoint."

    def add_arguments(self, parser):
        parser.add_argument("--tasks", help="comma-separated task names (default: every task with demonstrations)")
        parser.add_argument("--steps", type=int, help="learner steps (default: the preset's)")
        parser.add_argument("--preset", default="default", help="learner/config.py preset (default 'default')")
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--cameras", metavar="NAME,...", help="the cameras the policy reads, e.g. "
                            "corner3,gripperPOV (default: the primary camera of the demonstrations)")
        parser.add_argument("--policy", help="the policy implementation (default: the preset's, small_vla); e.g. "
                                             "flow_vla, an installed plug-in's name or module:Class")

    def handle(self, *args, **opts):
        offline = Episode.objects.filter(split="offline", status=Episode.Status.VERIFIED)
        if opts["tasks"]:
            names = [t.strip() for t in opts["tasks"].split(",") if t.strip()]
        else:
            names = sorted(set(offline.values_list("task__name", flat=True)))
        tasks = list(Task.objects.filter(name__in=names))
        if not tasks or len(tasks) != len(set(names)):
            known = sorted(Task.objects.values_list("name", flat=True))
            raise CommandError(f"tasks {names or '(none with demonstrations)'} not all known; known tasks: {known}")
        counts = {t.name: offline.filter(task=t).count() for t in tasks}
        empty = [n for n, c in counts.items() if c == 0]
        if empty:
            raise CommandError(f"no offline demonstrations for {empty}: run "
                               f"python manage.py collect_demos --tasks {','.join(empty)} --episodes 10")
        self.stdout.write("demonstrations: " + ", ".join(f"{n} {c}" for n, c in counts.items()))
        overrides = {"seed": opts["seed"], "checkpoint_every_s": 1e9}
        if opts["steps"]:
            overrides["steps"] = opts["steps"]
        try:
            run = services.start_run("bc", tasks, preset=opts["preset"], overrides=overrides, from_scratch=True,
                                     policy=opts["policy"], enqueue=False,
                                     cameras=[c.strip() for c in opts["cameras"].split(",") if c.strip()]
                                     if opts["cameras"] else None)
        except services.LearnerError as exc:
            raise CommandError(str(exc)) from None
        # Publish once, at the end: the base policy is one version, not one per checkpoint interval.
        run.config["train"]["checkpoint_every_steps"] = run.total_steps
        run.save(update_fields=["config"])
        run = services.claim_run(run.pk, services.worker_name())

        with tqdm(total=run.total_steps, desc="pretraining (bc)", unit="step") as bar:
            def progress(step, stats):
                bar.update(step - bar.n)
                if step % 50 == 0 and stats.get("loss") is not None and math.isfinite(stats["loss"]):
                    bar.set_postfix(loss=f"{stats['loss']:.4f}")

            outcome = services.run_round(run, round_s=float("inf"), progress=progress)
        run.refresh_from_db()
        if outcome != "done" or run.status != run.Status.FINISHED:
            raise CommandError(f"pretraining did not finish: {run.status}: {run.message}")
        checkpoint = run.checkpoints.order_by("-version").first()
        self.stdout.write(self.style.SUCCESS(
            f"published checkpoint v{checkpoint.version} ({checkpoint.size / 1e6:.1f} MB, {run.total_steps} steps)"))
