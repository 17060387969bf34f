"""``python manage.py export_lerobot OUT [--tasks a,b] [--split online] [--robots r1,r2] [--versions 3,4]``:
verified episodes as a LeRobotDataset v3.0 (robots/lerobot.py, docs/lerobot.md).

Only verified episodes are exported (their payloads passed the checks); an unverified one has no trustworthy file.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from robots import exports, lerobot
from robots.protocol import Split


class Command(BaseCommand):
    help = "Export verified episodes as a LeRobotDataset v3.0 directory (parquet + MP4)."

    def add_arguments(self, parser):
        parser.add_argument("out", metavar="OUT", help="the dataset directory to write (absent or empty)")
        parser.add_argument("--tasks", help="comma-separated task names (default: all)")
        parser.add_argument("--split", choices=[s.value for s in Split], help="only this split (default: all)")
        parser.add_argument("--robots", help="comma-separated robot names (default: all)")
        parser.add_argument("--versions", help="comma-separated checkpoint versions the episodes ran (default: all; "
                                               "demonstrations have none)")
        parser.add_argument("--fps", type=int, help="the dataset's frame rate (default: the episodes' control rate, "
                                                    "which must then be one whole number)")
        parser.add_argument("--crf", type=int, default=lerobot.VIDEO_CRF,
                            help=f"H.264 quality, lower is better and larger (default {lerobot.VIDEO_CRF})")
        parser.add_argument("--overwrite", action="store_true",
                            help="replace OUT if it holds a LeRobot dataset (anything else is never deleted)")

    def handle(self, *args, **opts):
        out = Path(opts["out"])
        try:
            filters = exports.clean_filters({"tasks": opts["tasks"], "robots": opts["robots"], "split": opts["split"],
                                             "versions": opts["versions"]})
        except exports.ExportError as exc:
            raise CommandError(str(exc.detail)) from None
        episodes = exports.select_episodes(filters)
        if not episodes:
            raise CommandError("no verified episodes match these filters")

        replaced = None
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            if not opts["overwrite"]:
                raise CommandError(f"{out} exists and is not empty; pass --overwrite to replace the dataset in it")
            if not (out / lerobot.INFO_PATH).is_file():
                raise CommandError(f"{out} is not a LeRobot dataset (no {lerobot.INFO_PATH}); not deleting it")
            # Kept until the new dataset is complete: a failed export leaves the old one in place.
            replaced = out.with_name(f".{out.name}.replaced")
            shutil.rmtree(replaced, ignore_errors=True)
            out.rename(replaced)
        try:
            with tqdm(total=len(episodes), desc="exporting", unit="ep") as bar:
                summary = lerobot.export_dataset(episodes, out, fps=opts["fps"], crf=opts["crf"],
                                                 progress=lambda done, total: bar.update(1))
        except lerobot.LeRobotError as exc:
            if replaced is not None:
                replaced.rename(out)
            raise CommandError(str(exc)) from None
        except BaseException:
            if replaced is not None:
                replaced.rename(out)
            raise
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
        self.stdout.write(self.style.SUCCESS(
            f"exported {summary['episodes']} episodes, {summary['frames']} frames, {summary['tasks']} task strings "
            f"at {summary['fps']} fps to {summary['path']}: {summary['files']} files, "
            f"{lerobot.human_bytes(summary['bytes'])}"))
