from django.core.management.base import BaseCommand, CommandError

from apps.operations.services import restore


class Command(BaseCommand):
    help = "Restore a backup made by `manage.py backup` into a freshly migrated, empty database."

    def add_arguments(self, parser):
        parser.add_argument("source")

    def handle(self, *args, **options):
        try:
            manifest = restore(options["source"])
        except FileNotFoundError as error:
            raise CommandError(f"No backup at {options['source']}.") from error
        self.stdout.write(self.style.SUCCESS(f"Restored the backup made {manifest['created']}."))
