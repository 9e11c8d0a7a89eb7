from django.core.management.base import BaseCommand, CommandError

from apps.detection.services import FORMATS, DetectionInputError, import_detections


class Command(BaseCommand):
    help = "Import smear images with boxes (Pascal VOC or YOLO txt, a folder or .zip) into a detection dataset."

    def add_arguments(self, parser):
        parser.add_argument("source", help="Folder or .zip.")
        parser.add_argument("--dataset", required=True)
        parser.add_argument("--format", choices=FORMATS, required=True)
        parser.add_argument("--classes", default="", help="Comma-separated class names; boxes of other classes are skipped.")
        parser.add_argument("--source-description", default="")
        parser.add_argument("--licence", default="")

    def handle(self, *args, **options):
        classes = [c.strip() for c in options["classes"].split(",") if c.strip()] or None
        try:
            report = import_detections(options["source"], dataset=options["dataset"], fmt=options["format"], classes=classes,
                                       source_description=options["source_description"], licence=options["licence"])
        except DetectionInputError as error:
            raise CommandError(f"Nothing was imported: {error}") from error
        self.stdout.write(report.summary())
