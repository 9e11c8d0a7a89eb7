import json
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from apps.detection.models import Detector
from apps.detection.services import DetectionInputError, detect_image


class Command(BaseCommand):
    help = "Find and count cells on a smear image and classify the white cells down the tree."

    def add_arguments(self, parser):
        parser.add_argument("image")
        parser.add_argument("--json", dest="json_out", help="Write the result as JSON here.")
        parser.add_argument("--png", dest="png_out", help="Write the image with boxes drawn here.")
        parser.add_argument("--model", help="Detector id or name (default: the active one).")
        parser.add_argument("--no-classify", action="store_true", help="Do not classify the white cells.")

    def handle(self, *args, **options):
        detector = None
        if options["model"]:
            detector = Detector.objects.named(str(options["model"]))
            if detector is None:
                raise CommandError(f"No detector with id or name '{options['model']}'.")
        try:
            result = detect_image(Path(options["image"]), detector=detector, classify=not options["no_classify"])
        except DetectionInputError as error:
            raise CommandError(str(error)) from error
        data = result.as_dict()
        if options["json_out"]:
            Path(options["json_out"]).write_text(json.dumps(data, indent=2))
        if options["png_out"]:
            Path(options["png_out"]).write_bytes(result.annotated_png())
        counts = ", ".join(f"{name} {n}" for name, n in data["counts"].items())
        self.stdout.write(f"{options['image']}: {len(data['boxes'])} cells ({counts}) with {data['detector']}.")
        for cell in data["cells"]:
            tree = cell["tree"]
            self.stdout.write(f"  white cell at ({cell['box']['x1']:.0f},{cell['box']['y1']:.0f}): "
                              + (tree["code"] + (" [flagged]" if tree["flags"] else "") if tree else "not classified"))
        if data["tree_note"]:
            self.stdout.write(self.style.WARNING(data["tree_note"]))
