"""Print (or write) the nginx configuration for N web nodes of this deployment (docs/deploy.md)."""

from __future__ import annotations

import re
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from sop_web.files import accel_areas

TEMPLATE = Path(settings.BASE_DIR) / "sop_web" / "deploy" / "nginx.conf.in"
NODE = re.compile(r"(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):([0-9]{1,5})")
LISTEN = re.compile(r"((\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):)?[0-9]{1,5}( ssl)?")


USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}")


def render(nodes: list[str], listen: str, prefix: Path, user: str | None = None) -> str:
    for node in nodes:
        if not NODE.fullmatch(node):
            raise CommandError(f"web node {node!r} is not host:port")
    if not nodes:
        raise CommandError("name at least one web node (--node host:port)")
    if not LISTEN.fullmatch(listen):
        raise CommandError(f"--listen {listen!r} is not [host:]port")
    if user is not None and not USER.fullmatch(user):
        raise CommandError(f"--user {user!r} is not a user name")
    areas = accel_areas()
    values = {
        # nginx's workers read the static files, checkpoints and videos: as this user (nginx's default when started
        # as root is "nobody", which needs read access to SOP_DATA_DIR and every directory above it)
        "USER": f"user {user};\n" if user else "",
        "NODES_COUNT": str(len(nodes)),
        "SERVERS": "\n".join(f"        server {n} max_fails=1 fail_timeout=5s;" for n in nodes),
        "LISTEN": listen,
        "PREFIX": str(prefix),
        "MAX_BODY": str(settings.SOP_MAX_UPLOAD_CHUNK_BYTES + 1024 * 1024),
        "STATIC_ROOT": str(Path(settings.STATIC_ROOT).resolve()),
        "CHECKPOINT_DIR": str(areas["checkpoints"].resolve()),
        "VIDEO_DIR": str(areas["videos"].resolve()),
    }
    text = TEMPLATE.read_text()
    for key, value in values.items():
        text = text.replace(f"@@{key}@@", value)
    if "@@" in text:
        raise CommandError("the nginx template has a placeholder this command does not fill")
    return text


class Command(BaseCommand):
    help = "nginx configuration for SOP web nodes behind one proxy (websockets, static files, X-Accel downloads)"

    def add_arguments(self, parser):
        parser.add_argument("--node", action="append", default=[], metavar="HOST:PORT",
                            help="a web node (daphne) address; repeat for each node")
        parser.add_argument("--listen", default="8080", help="address nginx listens on (default 8080)")
        parser.add_argument("--prefix", type=Path, default=None,
                            help="directory for nginx's pid, logs and temp files (default SOP_DATA_DIR/nginx)")
        parser.add_argument("--output", type=Path, default=None, help="write here instead of printing")
        parser.add_argument("--user", default=None,
                            help="the user nginx's worker processes run as (nginx -c as root; default: nginx's own)")

    def handle(self, *args, node, listen, prefix, output, user, **options):
        prefix = (prefix or Path(settings.DATA_DIR) / "nginx").resolve()
        text = render(node, listen, prefix, user)
        for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (prefix / sub).mkdir(parents=True, exist_ok=True)
        for area in accel_areas().values():
            area.mkdir(parents=True, exist_ok=True)
        if output:
            output.write_text(text)
            self.stderr.write(f"wrote {output}: nginx -c {output.resolve()}")
        else:
            self.stdout.write(text)
