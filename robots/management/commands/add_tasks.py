"""``manage.py add_tasks [NAMES...] [--all]``: create or update tasks from the catalog (robots/catalog.py)."""

from django.core.management.base import BaseCommand, CommandError

from robots import catalog, tasking


class Command(BaseCommand):
    help = "Create or update tasks from the built-in Meta-World MT10 catalog. Idempotent; keeps 'enabled' as set."

    def add_arguments(self, parser):
        parser.add_argument("names", nargs="*", help=f"task names or env ids: {', '.join(catalog.CATALOG)}")
        parser.add_argument("--all", action="store_true", help="every task of the catalog")

    def handle(self, names, all, **options):
        if bool(names) == bool(all):
            raise CommandError("name some tasks or pass --all")
        try:
            specs = list(catalog.MT10) if all else catalog.lookup(names)
        except KeyError as exc:
            raise CommandError(exc.args[0]) from None
        for task, created in tasking.add_catalog_tasks(specs):
            self.stdout.write(f"{'created' if created else 'updated'} {task.name} ({task.env_id})")
