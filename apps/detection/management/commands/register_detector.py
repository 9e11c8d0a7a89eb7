from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from apps.detection.services import DetectionInputError, register_detector


class Command(BaseCommand):
    help = "Register a detector (.safetensors with its .json card) and optionally make it the active one."

    def add_arguments(self, parser):
        parser.add_argument("weights")
        parser.add_argument("--name", required=True)
        parser.add_argument("--activate", action="store_true")

    def handle(self, *args, **options):
        try:
            detector = register_detector(Path(options["weights"]), name=options["name"], activate=options["activate"])
        except DetectionInputError as error:
            raise CommandError(str(error)) from error
        state = "active" if detector.is_active else "registered"
        self.stdout.write(f"Detector {detector.name} (id {detector.pk}) {state}.")
