import time
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from apps.cells.services import ImportError_, import_cells


def read_optional(path: str | None, what: str) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise CommandError(f"Cannot read the {what} CSV {path}: {error.strerror}") from error


class Command(BaseCommand):
    help = "Import a folder or .zip of labelled cell images (one sub-folder per label, or a labels CSV)."

    def add_arguments(self, parser):
        parser.add_argument("source", help="Folder or .zip.")
        parser.add_argument("--dataset", required=True, help="Dataset name (created when new).")
        parser.add_argument("--labels", help="CSV with columns path,label (paths relative to SOURCE).")
        parser.add_argument("--label-map", help="CSV with columns label,cell_type_code (labels that are a tree code, a type's name or alias need none).")
        parser.add_argument("--source-description", default="", help="Where the images came from.")
        parser.add_argument("--licence", default="")

    def handle(self, *args, **options):
        started = time.perf_counter()
        progress = None
        if options["verbosity"] > 1:
            def progress(done, total):
                self.stdout.write(f"  {done}/{total}")
        try:
            report = import_cells(
                options["source"],
                dataset=options["dataset"],
                labels_csv=read_optional(options["labels"], "labels"),
                label_map_csv=read_optional(options["label_map"], "label map"),
                source_description=options["source_description"],
                licence=options["licence"],
                progress=progress,
            )
        except ImportError_ as error:
            raise CommandError(f"Nothing was imported: {error}") from error
        self.stdout.write(report.summary())
        self.stdout.write(self.style.SUCCESS(f"Done in {time.perf_counter() - started:.1f} s."))
