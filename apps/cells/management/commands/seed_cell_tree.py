from django.core.management.base import BaseCommand

from apps.cells.services import seed_cell_tree


class Command(BaseCommand):
    help = "Create the default cell-type tree (idempotent: existing nodes are left as curated)."

    def handle(self, *args, **options):
        created, present = seed_cell_tree()
        self.stdout.write(self.style.SUCCESS(f"Cell-type tree: {created} nodes created, {present} already present."))
