"""``python manage.py demo``: the whole system on one machine, stopped cleanly with Ctrl-C.

Starts the embedded Redis (unless REDIS_URL is set), migrates, creates a login, tasks and simulated robots, then runs
a daphne web server, a Celery worker (with beat) and N robot agents as child processes, and prints progress.
Children run in their own process groups so that Ctrl-C reaches only this supervisor, which then stops them in
order: robots first (they spool and finish their uploads), then the worker and the web server, then Redis.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError
from django.db.models import Count, Q

from robots import catalog, fleet
from robots.models import Episode, Robot, Task, TaskAssignment
from sop_web import embedded

DEMO_USER = "operator"


class Command(BaseCommand):
    help = "Run the web server, a Celery worker and N simulated robots on this machine (Ctrl-C stops everything)."

    def add_arguments(self, parser):
        parser.add_argument("--robots", type=int, default=2, help="simulated robots to start (default 2)")
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument("--tasks", default=",".join(catalog.DEMO_TASKS), help="comma-separated task names")
        parser.add_argument("--noise", type=float, default=0.3, help="action noise of the scripted robots' policy")
        parser.add_argument("--policy", default="expert", help="robot policy: expert | random")
        parser.add_argument("--hz", type=float, default=10.0, help="robot control rate")
        parser.add_argument("--extra-cameras", default="", metavar="NAME,...",
                            help="more cameras each robot records and streams, e.g. gripperPOV (the wrist view)")
        parser.add_argument("--supervised", type=int, default=1,
                            help="the last N robots have no simulated operator: when their policy stalls they ask a "
                                 "person for help (the console's help queue); default 1 (0: every robot is "
                                 "supervised by the simulated operator)")
        parser.add_argument("--no-worker", action="store_true", help="do not start a Celery worker")
        parser.add_argument("--no-learning", action="store_true",
                            help="robots run the scripted policy only: no demonstrations, pretraining or training run")
        parser.add_argument("--demos", type=int, default=5, help="expert demonstrations per task for the base policy")
        parser.add_argument("--pretrain-steps", type=int, default=1500, help="behaviour-cloning steps of the base")
        parser.add_argument("--algorithm", default="hg_dagger", help="online post-training algorithm")
        parser.add_argument("--no-evaluator", action="store_true",
                            help="do not evaluate published checkpoints in the background (a niced second worker)")
        parser.add_argument("--eval-episodes", type=int, default=10,
                            help="episodes per task of the background evaluations (the fixed held-out placements)")

    def handle(self, *args, **opts):
        self.children: list[tuple[str, subprocess.Popen]] = []
        self.redis = None
        log_dir = settings.DATA_DIR / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        self._interrupted = False
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        try:
            self._start(opts, log_dir)
            self._watch(opts)
        finally:
            self._stop_all()

    # ------------------------------------------------------------------ start

    def _start(self, opts, log_dir: Path):
        if settings.EMBEDDED_REDIS:
            self.redis = embedded.start_redis(settings.DATA_DIR, settings.REDIS_SOCKET)
            self._say(f"redis      embedded, {settings.REDIS_SOCKET}")
        else:
            self._say(f"redis      {settings.REDIS_URL}")
        call_command("migrate", verbosity=0)
        self._say(f"database   {settings.DATABASES['default']['NAME']}")

        password = self._demo_login()
        tasks = [t.strip() for t in opts["tasks"].split(",") if t.strip()]
        unknown = [t for t in tasks if t not in catalog.CATALOG]
        if unknown:
            raise CommandError(f"unknown task(s) {unknown}; known: {sorted(catalog.CATALOG)}")
        call_command("add_tasks", *tasks, verbosity=0)
        if not TaskAssignment.objects.exists():  # first run: a fleet-wide mix of the demo tasks
            for task in Task.objects.filter(name__in=tasks):
                TaskAssignment.objects.create(robot=None, task=task, weight=1.0)

        learning = not opts["no_learning"]
        if learning:
            self._bootstrap_learning(tasks, opts)

        url = f"http://{opts['host']}:{opts['port']}"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        evaluator = learning and not opts["no_worker"] and not opts["no_evaluator"]
        if evaluator:
            # Every published checkpoint is evaluated (the newest one when the evaluator falls behind) on its own
            # queue by a second worker at low CPU priority: the Training page fills in without slowing the trainer.
            env.update(SOP_AUTO_EVALUATE="1", SOP_EVALUATION_QUEUE="evaluation",
                       SOP_EVAL_EPISODES=str(opts["eval_episodes"]))
        self._spawn("web", [sys.executable, "-m", "daphne", "-b", opts["host"], "-p", str(opts["port"]),
                            "sop_web.asgi:application"], env, log_dir)
        if not opts["no_worker"]:
            self._spawn("worker", [sys.executable, "-m", "celery", "-A", "sop_web", "worker", "-B", "-l", "INFO",
                                   "--concurrency", "1", "-Q", "default,learner",
                                   "--schedule", str(settings.DATA_DIR / "celerybeat-schedule")], env, log_dir)
        if evaluator:
            self._spawn("evaluator", ["nice", "-n", "15", sys.executable, "-m", "celery", "-A", "sop_web", "worker",
                                      "-l", "INFO", "--concurrency", "1", "-Q", "evaluation", "-n", "evaluator@%h"],
                        env, log_dir)
        self._wait_http(f"{url}/healthz")
        self._say(f"web        {url}  (log: {log_dir}/web.log)")

        supervised = set(range(opts["robots"] - max(opts["supervised"], 0) + 1, opts["robots"] + 1))
        for i in range(1, opts["robots"] + 1):
            name = f"sim-{i}"
            _, token = fleet.register_robot(name)  # a fresh token per demo start; the old one stops working
            agent_env = {**env, "SOP_ROBOT_TOKEN": token}
            # a person supervises the robots in `supervised` (they ask for help); the simulated operator the others
            gate = [] if i in supervised else ["--sim-operator"]
            policy = (["--policy", "learned", "--fallback", "expert", *gate] if learning
                      else ["--policy", opts["policy"], "--noise", str(opts["noise"])])
            if learning and i in supervised:
                self._say(f"{name}      asks a person for help when its policy stalls (the fleet page's help queue)")
            self._spawn(name, [sys.executable, "-m", "robots.agent", "--server", url,
                               "--spool", str(settings.DATA_DIR / "spool" / name), *policy,
                               "--hz", str(opts["hz"]), "--seed", str(i),
                               *(["--extra-cameras", opts["extra_cameras"]] if opts["extra_cameras"] else [])],
                        agent_env, log_dir)
        if learning and not opts["no_worker"]:
            self._ensure_training_run(tasks, opts)
        self._say("")
        self._say(self.style.SUCCESS(f"Console:  {url}/   login: {DEMO_USER} / {password}"))
        self._say(f"Admin:    {url}/admin/")
        self._say("Ctrl-C stops everything.\n")

    def _bootstrap_learning(self, tasks: list[str], opts) -> None:
        """First start: demonstrations, then a base policy (checkpoint v1) for the robots to run and improve."""
        from learner import services as learner

        have = {t: Episode.objects.filter(task__name=t, split="offline", status=Episode.Status.VERIFIED).count()
                for t in tasks}
        missing = [t for t, n in have.items() if n < opts["demos"]]
        if missing:
            self._say(f"recording {opts['demos']} expert demonstrations for {', '.join(missing)} (first start only)")
            call_command("collect_demos", "--tasks", ",".join(missing), "--episodes", str(opts["demos"]))
        if learner.current_checkpoint() is None:
            self._say(f"pretraining the base policy on the demonstrations ({opts['pretrain_steps']} steps)")
            call_command("pretrain", "--tasks", ",".join(tasks), "--steps", str(opts["pretrain_steps"]))

    def _ensure_training_run(self, tasks: list[str], opts) -> None:
        """Keep one online post-training run going: resume the active one or start a new one."""
        from learner import services as learner
        from learner.models import TrainingRun

        active = TrainingRun.objects.filter(status__in=TrainingRun.ACTIVE).first()
        if active:
            self._say(f"training   run {active.pk} ({active.algorithm}) continues")
            return
        run = learner.start_run(opts["algorithm"], tasks, total_steps=1_000_000,
                                overrides={"checkpoint_every_steps": 300, "checkpoint_every_s": 90.0})
        self._say(f"training   run {run.pk}: {run.algorithm} on {', '.join(tasks)}, a checkpoint every 300 steps")

    def _demo_login(self) -> str:
        """The demo login's password is random, made once and kept in the data directory (never a constant)."""
        path = settings.DATA_DIR / "demo_login.txt"
        User = get_user_model()
        if path.exists() and User.objects.filter(username=DEMO_USER).exists():
            return path.read_text().strip()
        password = secrets.token_urlsafe(9)
        user, _ = User.objects.get_or_create(username=DEMO_USER)
        user.is_staff = user.is_superuser = True
        user.set_password(password)
        user.save()
        path.write_text(password + "\n")
        path.chmod(0o600)
        return password

    def _spawn(self, name, cmd, env, log_dir: Path):
        log = open(log_dir / f"{name}.log", "ab")
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=settings.BASE_DIR, start_new_session=True)
        self.children.append((name, proc))

    def _wait_http(self, url, timeout=60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.children:
                if proc.poll() is not None:
                    raise CommandError(f"{name} exited with {proc.returncode}; see {settings.DATA_DIR}/logs/{name}.log")
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise CommandError(f"the web server did not answer {url} within {timeout:.0f}s")

    # ------------------------------------------------------------------ watch

    def _watch(self, opts):
        """One progress line every few seconds until Ctrl-C; report a child that dies."""
        started = time.monotonic()
        reported_dead = set()
        while not self._interrupted:
            for name, proc in self.children:
                if proc.poll() is not None and name not in reported_dead:
                    reported_dead.add(name)
                    self._say(self.style.ERROR(f"{name} exited with {proc.returncode}; see logs/{name}.log"))
            online = Robot.objects.filter(connected=True).count()
            totals = Episode.objects.filter(status=Episode.Status.VERIFIED, split="online").aggregate(
                n=Count("id"), ok=Count("id", filter=Q(success=True)), iv=Count("id", filter=Q(intervention_count__gt=0)))
            rate = f"{totals['ok'] / totals['n']:.0%}" if totals["n"] else "-"
            elapsed = int(time.monotonic() - started)
            policy = ""
            if not opts["no_learning"]:
                from learner import services as learner

                current = learner.current_checkpoint()
                policy = f"  fleet policy {'v%d' % current.version if current else '-'}"
            line = (f"[{elapsed // 60:02d}:{elapsed % 60:02d}] robots online {online}/{opts['robots']}  "
                    f"online episodes {totals['n']}  success {rate}  with interventions {totals['iv']}{policy}")
            self._say(line)
            for _ in range(50):
                if self._interrupted:
                    break
                time.sleep(0.1)

    def _on_signal(self, signum, frame):
        if self._interrupted:  # second Ctrl-C: stop waiting politely
            for _, proc in self.children:
                _kill_group(proc, signal.SIGKILL)
        self._interrupted = True

    # ------------------------------------------------------------------ stop

    def _stop_all(self):
        if not self.children and self.redis is None:
            return
        self._say("\nstopping: robots first (they spool their current episode and finish uploads)...")
        robots = [(n, p) for n, p in self.children if n.startswith("sim-")]
        others = [(n, p) for n, p in self.children if not n.startswith("sim-")]
        for group, grace in ((robots, 15.0), (list(reversed(others)), 10.0)):
            for _, proc in group:
                _kill_group(proc, signal.SIGTERM)
            deadline = time.monotonic() + grace
            for name, proc in group:
                try:
                    proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    self._say(f"{name} did not stop in {grace:.0f}s; killing it")
                    _kill_group(proc, signal.SIGKILL)
                    proc.wait()
        embedded.stop(self.redis)
        self._say("stopped.")
        self.children = []
        self.redis = None

    def _say(self, text):
        self.stdout.write(text)
        self.stdout.flush()


def _kill_group(proc: subprocess.Popen, sig):
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
