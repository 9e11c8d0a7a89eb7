import json
from collections import Counter
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from apps.detection.models import Detector
from apps.detection.services import FORMATS, DetectionInputError, evaluate_detector


class Command(BaseCommand):
    help = "Score a detector on an annotated folder: mAP@0.5, mAP@0.5:0.95, AP@0.5 per class."

    def add_arguments(self, parser):
        parser.add_argument("source")
        parser.add_argument("--model", required=True, help="Detector id or name, or `active`.")
        parser.add_argument("--format", choices=FORMATS, required=True)
        parser.add_argument("--split", choices=["train", "val", "test"], help="Only this split of the source.")
        parser.add_argument("--json", dest="json_out")

    def handle(self, *args, **options):
        detector = Detector.objects.named(str(options["model"]))
        if detector is None:
            raise CommandError(f"No detector with id or name '{options['model']}'.")
        try:
            metrics = evaluate_detector(detector, Path(options["source"]), fmt=options["format"], split=options["split"])
        except DetectionInputError as error:
            raise CommandError(str(error)) from error
        if options["json_out"]:
            Path(options["json_out"]).write_text(json.dumps(metrics, indent=2))
        per_class = ", ".join(f"{name} {ap:.3f}" for name, ap in metrics["per_class"].items())
        self.stdout.write(f"{metrics['n_images']} images: mAP50 {metrics['map50']:.3f}, "
                          f"mAP50-95 {metrics['map50_95']:.3f}; AP50 per class: {per_class}")
        unmatched = metrics["unmatched_sure"]
        if unmatched:
            per_label = Counter(box["label"] for box in unmatched)
            self.stdout.write(f"{len(unmatched)} boxes scored ≥ 0.5 match no annotated box "
                              f"({', '.join(f'{label} {n}' for label, n in sorted(per_label.items()))}): false positives, "
                              "or cells the annotation missed. The surest:")
            for box in unmatched[:10]:
                self.stdout.write(f"  {box['image']}: {box['label']} {box['score']:.2f} at "
                                  f"({box['x1']:.0f},{box['y1']:.0f})-({box['x2']:.0f},{box['y2']:.0f})")
