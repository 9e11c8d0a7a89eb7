"""python manage.py classify SOURCE [--models SET] --csv OUT [--json SUMMARY]: classify a folder or .zip of cell images."""

import json
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from apps.analysis import services
from apps.analysis.models import ClassificationRun
from apps.training.management.commands.evaluate_tree import positive_float


class Command(BaseCommand):
    help = "Classify a folder or .zip of cell images down the tree; write one CSV row per cell (a run is recorded)."

    def add_arguments(self, parser):
        parser.add_argument("source", help="A folder or .zip of single-cell images.")
        parser.add_argument("--models", default="", help="Model set name, or a set folder under MODELS_DIR; "
                                                         "the active set when left out.")
        parser.add_argument("--csv", required=True, help="Where to write the results (CSV).")
        parser.add_argument("--json", metavar="SUMMARY", help="Also write the run's summary here (JSON: run_id, counts, "
                                                              "differential, site_shift).")
        parser.add_argument("--target", type=int, default=100, help="Count target (100, 200, 400 or 500).")
        parser.add_argument("--um-per-pixel", type=positive_float, metavar="UM",
                            help="The images' pixel size in µm, used when their red cells cannot be measured.")
        parser.add_argument("--accession", default="", help="The specimen's accession number (needed to export).")
        parser.add_argument("--specimen", choices=ClassificationRun.Specimen.values, default="peripheral-blood",
                            help="Specimen type (counting convention).")
        parser.add_argument("--patient-id", default="", help="Optional patient identifier (never logged).")
        parser.add_argument("--collected", default="", metavar="DATETIME",
                            help="When the specimen was collected, e.g. 2026-12-01T08:30.")
        parser.add_argument("--fast-decode", action="store_true",
                            help="Let the JPEG codec decode at reduced size (faster, slightly different pixels).")

    def handle(self, *args, **options):
        out = Path(options["csv"])
        summary_out = Path(options["json"]) if options["json"] else None
        for path in (out, summary_out):
            if path is not None and not path.parent.exists():
                raise CommandError(f"The folder for {path} does not exist.")
        try:
            run = services.run_from_source(source=Path(options["source"]), models=options["models"] or None,
                                           count_target=options["target"], draft=options["fast_decode"],
                                           um_per_pixel=options["um_per_pixel"],
                                           identity={"accession": options["accession"],
                                                     "specimen_type": options["specimen"],
                                                     "patient_identifier": options["patient_id"],
                                                     "collected_at": options["collected"]})
        except services.AnalysisError as error:
            raise CommandError(str(error)) from error
        with out.open("w", newline="", encoding="utf-8") as handle:
            rows = services.write_csv(run, handle)
        for name, reason in run.skipped:
            self.stderr.write(f"skipped {name}: {reason}")
        counts = services.run_differential(run)
        summary = ", ".join(f"{row.code} {row.n}" for row in counts.types + [counts.unresolved] if row)
        self.stdout.write(f"Run {run.pk} with {run.model_set_name}: {rows} cells classified, "
                          f"{len(run.skipped)} skipped → {out}")
        if summary:
            self.stdout.write(f"Counts: {summary} ({counts.convention.name})")
        used = run.scale.get("run")
        if used:
            self.stdout.write(f"Scale: {used['source']}, {used['px_per_um']} px/µm ({used['ratio']}× the training "
                              f"scale){'; ' + used['flag'] if used.get('flag') else ''}")
        shift = run.site_shift or {}
        if shift.get("level"):
            share = shift.get("unfamiliar_share")
            self.stdout.write(f"Site shift: {shift['level']}" + (f" ({share:.0%} unfamiliar)" if share is not None
                                                                 else "") + f": {shift.get('message', '')}")
        if summary_out is not None:
            summary_out.write_text(json.dumps(services.run_record(run), indent=2, ensure_ascii=False))
            self.stdout.write(f"Summary → {summary_out}")
        if run.status == ClassificationRun.Status.FAILED:
            raise CommandError(f"Classification failed: {run.error} ({rows} cells done were written to {out}).")
