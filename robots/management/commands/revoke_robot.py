"""``manage.py revoke_robot NAME``: invalidate a robot's token and close its live sockets."""

from django.core.management.base import BaseCommand, CommandError

from robots import fleet
from robots.models import Robot


class Command(BaseCommand):
    help = "Revoke a robot's token: it can no longer connect or upload, and its live sockets are closed."

    def add_arguments(self, parser):
        parser.add_argument("name")

    def handle(self, name, **options):
        robot = Robot.objects.filter(name=name).first()
        if robot is None:
            raise CommandError(f"no robot named {name!r}")
        fleet.revoke_robot(robot)
        self.stdout.write(f"robot {name}: token revoked (issue a new one with add_robot {name} --rotate)")
