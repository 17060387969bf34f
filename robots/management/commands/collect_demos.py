"""``python manage.py collect_demos --tasks reach,drawer-open --episodes 10``: offline demonstrations.

Scripted-expert episodes are recorded by worker processes with the robot agent's runtime and recorder (the same
episode files a robot makes), then ingested through the same services as the upload API (``open_upload`` +
``append_upload``: checksum, schema check, verified), with split ``offline``. Only successful demonstrations are kept
unless ``--keep-failures``.
"""

from __future__ import annotations

import logging
import multiprocessing
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from robots import demos, fleet, ingest
from robots.agent.config import SIM_EXPERTS
from robots.agent.seeding import stream_seed
from robots.agent.spool import Spool
from robots.models import Episode, Task

CHUNK = 8 * 1024 * 1024


class Command(BaseCommand):
    help = "Record scripted-expert demonstrations (split offline) and ingest them like robot uploads."

    def add_arguments(self, parser):
        parser.add_argument("--tasks", required=True, help="comma-separated task names (see add_tasks)")
        parser.add_argument("--episodes", type=int, default=10, help="demonstrations per task (default 10)")
        parser.add_argument("--noise", type=float, default=0.0, help="gaussian action noise of the expert")
        parser.add_argument("--expert", choices=SIM_EXPERTS, default="metaworld",
                            help="metaworld (default): Meta-World's scripted experts; recovering: the supervisor of "
                                 "robots/agent/supervisors.py where a task has one (the simulated operator's expert)")
        parser.add_argument("--image-size", type=int, default=96)
        parser.add_argument("--camera", default="corner3")
        parser.add_argument("--extra-cameras", default="", metavar="NAME,...",
                            help="more cameras to record beside it, e.g. gripperPOV")
        parser.add_argument("--workers", type=int, default=2, help="simulator processes (default 2)")
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--robot", default="demo-collector", help="robot the demonstrations are recorded as")
        parser.add_argument("--keep-failures", action="store_true", help="also store demonstrations that failed")

    def handle(self, *args, **opts):
        names = [t.strip() for t in opts["tasks"].split(",") if t.strip()]
        tasks = {t.name: t for t in Task.objects.filter(name__in=names)}
        missing = [n for n in names if n not in tasks]
        if missing:
            raise CommandError(f"unknown task(s) {missing}; create them first: python manage.py add_tasks {' '.join(missing)}")
        if opts["episodes"] < 1:
            raise CommandError("--episodes must be >= 1")
        logging.getLogger("robots.ingest").setLevel(logging.WARNING)  # the progress bar says it
        try:
            robot = fleet.recorder(opts["robot"])
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        self.already = 0

        with tempfile.TemporaryDirectory(prefix="sop-demos-") as tmp:
            spool = Spool(Path(tmp))
            total = opts["episodes"] * len(names)
            ctx = multiprocessing.get_context("spawn")  # a clean interpreter: no Django state, no forked DB sockets
            kept = dropped = 0
            with ProcessPoolExecutor(max_workers=max(1, opts["workers"]), mp_context=ctx) as pool:
                # One job per (task, slice) so both workers stay busy even with a single task.
                per_job = max(1, opts["episodes"] // max(1, opts["workers"]))
                futures = []
                for name in names:
                    task = tasks[name]
                    for j, start in enumerate(range(0, opts["episodes"], per_job)):
                        n = min(per_job, opts["episodes"] - start)
                        futures.append(pool.submit(
                            demos.record, tmp, task.name, task.env_id, list(task.prompts) or [task.name],
                            task.max_steps, n, noise=opts["noise"],
                            # per task and slice, whatever else this call collects: the same demos for a seed
                            seed=stream_seed(opts["seed"], "demos", task.name, j, per_job),
                            image_size=opts["image_size"], camera=opts["camera"], robot=robot.name,
                            recover=opts["expert"] == "recovering",
                            extra_cameras=tuple(c.strip() for c in opts["extra_cameras"].split(",") if c.strip())))
                with tqdm(total=total, desc="demonstrations", unit="ep") as bar:
                    while True:
                        for episode_id in spool.complete_entries():
                            if self._ingest(robot, spool, episode_id, opts["keep_failures"]):
                                kept += 1
                            else:
                                dropped += 1
                            bar.update(1)
                            bar.set_postfix(kept=kept, failed=dropped)
                        if all(f.done() for f in futures) and not spool.complete_entries():
                            break
                        time.sleep(0.2)
                for f in futures:
                    f.result()  # re-raise a worker's error
        if self.already:
            self.stdout.write(f"{self.already} of them were stored already (same --seed: the same demonstrations); "
                              "use another --seed for new ones")
        self.stdout.write(self.style.SUCCESS(
            f"stored {kept - self.already} new offline demonstrations for {', '.join(names)}"
            + (f"; dropped {dropped} failed ones (--keep-failures keeps them)" if dropped else "")))

    def _ingest(self, robot, spool: Spool, episode_id: str, keep_failures: bool) -> bool:
        meta = spool.read_sidecar(episode_id)
        if not meta["success"] and not keep_failures:
            spool.remove(episode_id)
            return False
        if Episode.objects.filter(pk=episode_id, status=Episode.Status.VERIFIED).exists():
            # Episode ids are seeded: the same --seed re-records the same demonstrations, which are stored already.
            self.already += 1
            spool.remove(episode_id)
            return True
        data = spool.payload(episode_id).read_bytes()
        episode, _ = ingest.open_upload(robot, meta)
        offset = episode.received_bytes
        while offset < len(data):
            episode = ingest.append_upload(robot, episode.id, offset, data[offset:offset + CHUNK])
            offset = episode.received_bytes if episode.status != "verified" else len(data)
        spool.remove(episode_id)
        return True
