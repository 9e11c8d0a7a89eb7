from datetime import UTC, datetime

from django.core.management.base import BaseCommand

from apps.operations.services import backup


class Command(BaseCommand):
    help = "Back up the database (portable JSON), media and models into one .tar.gz."

    def add_arguments(self, parser):
        parser.add_argument("target", nargs="?", help="Output file (default: var/backups/hemoweb-<time>.tar.gz).")

    def handle(self, *args, **options):
        from django.conf import settings

        target = options["target"] or settings.VAR_DIR / "backups" / f"hemoweb-{datetime.now(UTC):%Y%m%d-%H%M%S}.tar.gz"
        path = backup(target)
        self.stdout.write(self.style.SUCCESS(f"Backup written to {path}"))
