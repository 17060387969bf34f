"""``manage.py add_robot NAME [--rotate]``: create a robot and print its token, once."""

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from robots import fleet
from robots.models import Robot


class Command(BaseCommand):
    help = "Create a robot and print its token (shown once). With --rotate, issue a new token to an existing robot."

    def add_arguments(self, parser):
        parser.add_argument("name", help="lowercase name, e.g. sim-01")
        parser.add_argument("--rotate", action="store_true", help="replace the token of an existing robot")
        parser.add_argument("--server", default="http://127.0.0.1:8000", help="server URL shown in the agent hint")

    def handle(self, name, rotate, server, **options):
        if Robot.objects.filter(name=name).exists() and not rotate:
            raise CommandError(f"robot {name!r} exists; use --rotate to issue a new token (the old one stops working)")
        try:
            robot, token = fleet.register_robot(name)
        except ValidationError as exc:
            raise CommandError(f"invalid robot name {name!r}: {' '.join(exc.messages)}") from None
        self.stdout.write(f"robot {robot.name}: {'token rotated' if rotate else 'created'}")
        self.stdout.write(f"token (shown once; store it on the robot, e.g. in a file only the agent can read):\n{token}")
        # Never inside a command line: a --token argument is visible to every user in `ps` and lands in shell
        # history. The agent reads SOP_ROBOT_TOKEN from its environment.
        self.stdout.write("run the agent with the token in its environment, not on its command line:\n"
                          f"  SOP_ROBOT_TOKEN=\"$(cat /path/to/{robot.name}.token)\" python -m robots.agent --server {server}")
