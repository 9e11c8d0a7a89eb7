"""python manage.py export_run RUN --format hl7|fhir --out FILE: a signed-off run's result for the LIS."""

import json
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from apps.analysis.models import ClassificationRun
from apps.lis.messages import ExportRefused, build_fhir, build_hl7


class Command(BaseCommand):
    help = ("Write a signed-off run's verified differential as an HL7 v2.5.1 ORU^R01 message or a FHIR R4 Bundle "
            "(a run not signed off, or without an accession number, is refused and nothing is written).")

    def add_arguments(self, parser):
        parser.add_argument("run", type=int, help="The run's number.")
        parser.add_argument("--format", required=True, choices=["hl7", "fhir"], dest="fmt")
        parser.add_argument("--out", required=True, help="The file to write.")

    def handle(self, *args, **options):
        out = Path(options["out"])
        if not out.parent.exists():
            raise CommandError(f"The folder for {out} does not exist.")
        run = ClassificationRun.objects.filter(pk=options["run"]).first()
        if run is None:
            raise CommandError(f"There is no run {options['run']}.")
        try:  # built (and validated) in full before anything is written
            if options["fmt"] == "hl7":
                text = build_hl7(run)
            else:
                text = json.dumps(build_fhir(run), indent=2, ensure_ascii=False)
        except ExportRefused as error:
            raise CommandError(f"{error} Nothing was written.") from error
        out.write_text(text, encoding="utf-8", newline="")
        what = "HL7 v2.5.1 ORU^R01 message" if options["fmt"] == "hl7" else "FHIR R4 Bundle"
        self.stdout.write(f"Run {run.pk}: {what} → {out}")
