"""python manage.py analyse_slide SOURCE [--accession ID] [--specimen peripheral-blood|bone-marrow] [--models SET]
[--detector ID|NAME] [--csv OUT] [--json OUT]: the fields of one slide → one classification run."""

import json
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from apps.analysis import services, slides
from apps.analysis.models import ClassificationRun
from apps.training.management.commands.evaluate_tree import positive_float


class Command(BaseCommand):
    help = ("Find the cells on every field of a slide (a folder or .zip of field images), classify the white cells "
            "and count red cells and platelets per field; a slide run is recorded.")

    def add_arguments(self, parser):
        parser.add_argument("source", help="A folder or .zip of the slide's field images (optionally with a "
                                           "fields.csv name,x,y of field offsets in slide pixels).")
        parser.add_argument("--accession", default="", help="The specimen's accession number.")
        parser.add_argument("--specimen", default=ClassificationRun.Specimen.PERIPHERAL_BLOOD,
                            choices=ClassificationRun.Specimen.values, help="The specimen type.")
        parser.add_argument("--models", default="", help="Model set name or id, or a set folder under MODELS_DIR; "
                                                         "the site's (else the active) set when left out.")
        parser.add_argument("--detector", default="", help="Detector id or name; the active one when left out.")
        parser.add_argument("--target", type=int, default=100, help="Count target (100, 200, 400 or 500).")
        parser.add_argument("--um-per-pixel", type=positive_float, metavar="UM",
                            help="The fields' pixel size in µm, used when their red cells cannot be measured.")
        parser.add_argument("--csv", metavar="OUT", help="Write one row per white cell here (with its field and box).")
        parser.add_argument("--json", metavar="OUT", help="Write the run's summary and its fields here (JSON).")

    def handle(self, *args, **options):
        outputs = [Path(options[key]) if options[key] else None for key in ("csv", "json")]
        for path in outputs:
            if path is not None and not path.parent.exists():
                raise CommandError(f"The folder for {path} does not exist.")
        csv_out, json_out = outputs
        try:
            run = slides.slide_from_source(
                source=Path(options["source"]), models=options["models"] or None,
                detector=options["detector"] or None, count_target=options["target"],
                identity={"accession": options["accession"], "specimen_type": options["specimen"]},
                um_per_pixel=options["um_per_pixel"])
        except services.AnalysisError as error:
            raise CommandError(str(error)) from error
        rows = run.cells.count()
        if csv_out is not None:
            with csv_out.open("w", newline="", encoding="utf-8") as handle:
                rows = services.write_csv(run, handle)
        for name, reason in run.skipped:
            self.stderr.write(f"field {name}: {reason}")
        summary = slides.slide_summary(run)
        estimate = summary["platelet_estimate"]
        self.stdout.write(f"Run {run.pk}: {summary['fields']} fields ({summary['usable']} usable) with "
                          f"{run.detector_name}, {rows} white cells classified with {run.model_set_name}"
                          + (f" → {csv_out}" if csv_out else ""))
        self.stdout.write(f"Red cells {summary['red']} ({summary['red_per_field']} per field), platelets "
                          f"{summary['platelets']} ({estimate['mean_per_field']} per field; estimate "
                          f"{estimate['estimate_per_l']} × 10⁹/L, assuming {estimate['assumes']})")
        counts = services.run_differential(run)
        if counts.types:
            self.stdout.write("Counts: " + ", ".join(f"{row.code} {row.n}" for row in counts.types))
        if json_out is not None:
            json_out.write_text(json.dumps(slides.slide_record(run), indent=2, ensure_ascii=False))
            self.stdout.write(f"Summary → {json_out}")
        if run.status == ClassificationRun.Status.FAILED:
            raise CommandError(f"The slide analysis failed: {run.error} ({rows} cells done are kept).")
