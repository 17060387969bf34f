"""``python manage.py evaluate [--checkpoint N] [--tasks a,b] [--episodes 20]``: success per task, no interventions.

Runs in this process with a progress bar; the results are stored (and shown in the console) like those of the
Celery evaluation job.
"""

from __future__ import annotations

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from learner import services
from learner.models import Checkpoint
from robots.models import Task


class Command(BaseCommand):
    help = "Evaluate a checkpoint on simulated tasks without interventions and store the results."

    def add_arguments(self, parser):
        parser.add_argument("--checkpoint", type=int, metavar="VERSION", help="checkpoint version (default: what the fleet runs)")
        parser.add_argument("--tasks", help="comma-separated task names (default: the run's tasks)")
        parser.add_argument("--episodes", type=int, default=settings.SOP_EVAL_EPISODES)
        parser.add_argument("--guidance-beta", type=float, metavar="BETA",
                            help="RECAP checkpoints: evaluate with this guidance weight instead of the checkpoint's "
                                 "(a sweep; the results are printed, not stored)")

    def handle(self, *args, **opts):
        checkpoint = (Checkpoint.objects.filter(version=opts["checkpoint"]).first() if opts["checkpoint"]
                      else services.current_checkpoint())
        if checkpoint is None:
            raise CommandError("no such checkpoint (pretrain one first: python manage.py pretrain)")
        if opts["guidance_beta"] is not None and opts["guidance_beta"] < 0:
            raise CommandError("--guidance-beta must be >= 0")
        tasks = None
        if opts["tasks"]:
            names = [t.strip() for t in opts["tasks"].split(",") if t.strip()]
            tasks = list(Task.objects.filter(name__in=names))
            if len(tasks) != len(set(names)):
                raise CommandError(f"unknown task among {names}")
        elif checkpoint.run is None:
            raise CommandError("this checkpoint has no run to take tasks from: pass --tasks")
        n_tasks = len(tasks) if tasks is not None else checkpoint.run.tasks.count()
        with tqdm(total=n_tasks * opts["episodes"], desc=f"evaluating v{checkpoint.version}", unit="ep") as bar:
            results = services.evaluate(checkpoint, tasks, opts["episodes"],
                                        progress=lambda task, i, n: bar.update(1),
                                        guidance_beta=opts["guidance_beta"])
        for ev in results:
            rate = f"{ev.success_rate:.2f}" if ev.success_rate is not None else "-"
            length = f"{ev.mean_length:.0f}" if ev.mean_length is not None else "-"
            self.stdout.write(f"{ev.task.name:24s} success {rate}  mean length {length}  ({ev.episodes} episodes)")
