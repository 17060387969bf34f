"""``manage.py add_user NAME --role viewer|operator|admin [--password-env VAR]``: create a console user (or change an
existing one's role and password). The password comes from the environment variable VAR, or a prompt; never from the
command line (it would end up in the shell history and the process list)."""

import getpass
import os
import sys

from django.contrib.auth import get_user_model, password_validation
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from robots import roles


class Command(BaseCommand):
    help = "Create a console user with a role (viewer, operator, admin), or update an existing user's role/password."

    def add_arguments(self, parser):
        parser.add_argument("name", help="username")
        parser.add_argument("--role", choices=roles.ROLES, required=True,
                            help="viewer: watch; operator: also take over, e-stop, label; admin: everything")
        parser.add_argument("--password-env", metavar="VAR", help="read the password from this environment variable")
        parser.add_argument("--email", default="")

    def handle(self, name, role, password_env, email, **options):
        User = get_user_model()
        user = User.objects.filter(username=name).first()
        if password_env:
            password = os.environ.get(password_env, "")
            if not password:
                raise CommandError(f"environment variable {password_env} is empty or not set")
        elif user is not None:
            password = None  # an existing user keeps its password unless one is given
        else:
            password = self._prompt()
        candidate = user or User(username=name, email=email)
        if password is not None:
            try:
                password_validation.validate_password(password, candidate)
            except ValidationError as exc:
                raise CommandError("password refused: " + " ".join(exc.messages)) from None
        with transaction.atomic():
            created = user is None
            if created:
                user = User.objects.create_user(username=name, email=email, password=password)
            elif password is not None:
                user.set_password(password)
                user.save()
            roles.set_role(user, role)
        self.stdout.write(f"user {name}: {'created' if created else 'updated'}, role {role}")

    def _prompt(self) -> str:
        if not sys.stdin.isatty():
            raise CommandError("no terminal to ask for a password: use --password-env VAR")
        first = getpass.getpass("Password: ")
        if first != getpass.getpass("Password (again): "):
            raise CommandError("the passwords do not match")
        if not first:
            raise CommandError("an empty password is not allowed")
        return first
