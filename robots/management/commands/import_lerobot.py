"""``python manage.py import_lerobot DIR --task NAME [--camera KEY=NAME] [--limit N]``: a LeRobotDataset v3 as
offline demonstrations of a task (robots/lerobot.py, docs/lerobot.md).

Each episode becomes an episode file ingested like ``collect_demos``' demonstrations (the same upload services: the
file is checked and verified), as robot ``demo-collector`` unless ``--robot``. Importing again stores nothing twice.
"""

from __future__ import annotations

import logging

from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from robots import lerobot
from robots.models import Task


class Command(BaseCommand):
    help = "Import a LeRobotDataset v3 directory as offline demonstrations of a task."

    def add_arguments(self, parser):
        parser.add_argument("dir", metavar="DIR", help="the dataset directory (meta/, data/, videos/)")
        parser.add_argument("--task", required=True, help="the task the demonstrations are for (see add_tasks)")
        parser.add_argument("--camera", action="append", default=[], metavar="KEY=NAME",
                            help="which camera feature to import and the SOP camera name it gets, e.g. "
                                 "observation.images.front=corner3 (needed when the dataset has several)")
        parser.add_argument("--state-key", default=lerobot.STATE_KEY, help=f"default {lerobot.STATE_KEY}")
        parser.add_argument("--action-key", default=lerobot.ACTION_KEY, help=f"default {lerobot.ACTION_KEY}")
        parser.add_argument("--limit", type=int, help="import only the first N episodes")
        parser.add_argument("--robot", default=lerobot.IMPORT_ROBOT,
                            help=f"robot the demonstrations are stored as (default {lerobot.IMPORT_ROBOT}, "
                                 f"collect_demos' robot)")

    def handle(self, *args, **opts):
        task = Task.objects.filter(name=opts["task"]).first()
        if task is None:
            raise CommandError(f"unknown task {opts['task']!r}; create it first: python manage.py add_tasks "
                               f"{opts['task']}")
        if opts["limit"] is not None and opts["limit"] < 1:
            raise CommandError("--limit must be >= 1")
        # Imported intervention segments have no lease on this server: the ingest would log each as unattributed.
        ingest_log = logging.getLogger("robots.ingest")
        level = ingest_log.level
        ingest_log.setLevel(logging.ERROR)
        try:
            camera_map = lerobot.parse_camera_map(opts["camera"]) or None
            with tqdm(desc="importing", unit="ep") as bar:
                def progress(done: int, total: int) -> None:
                    bar.total = total
                    bar.update(1)

                summary = lerobot.import_dataset(opts["dir"], task, camera_map=camera_map,
                                                 state_key=opts["state_key"], action_key=opts["action_key"],
                                                 limit=opts["limit"], robot_name=opts["robot"], progress=progress)
        except lerobot.LeRobotError as exc:
            raise CommandError(str(exc)) from None
        finally:
            ingest_log.setLevel(level)
        if summary["already"]:
            self.stdout.write(f"{summary['already']} of them were imported before (same task, same content): "
                              f"not stored again")
        self.stdout.write(self.style.SUCCESS(
            f"stored {summary['imported']} new offline demonstrations ({summary['frames']} frames) for task "
            f"{task.name}, camera {summary['camera_key']} as {summary['camera']}"))
