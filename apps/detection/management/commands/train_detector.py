from django.core.management.base import BaseCommand, CommandError

from apps.detection.models import DetectionDataset
from apps.detection.services import DetectionInputError, run_training, start_training


class Command(BaseCommand):
    help = "Train a YOLO detector on a detection dataset here, in the foreground (the page queues the same job)."

    def add_arguments(self, parser):
        parser.add_argument("--dataset", required=True)
        parser.add_argument("--epochs", type=int, default=30)
        parser.add_argument("--imgsz", type=int, default=416)
        parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
        parser.add_argument("--model", default="yolov8n.yaml", help="yolov8n.yaml, yolo11n.yaml, ... or a detector .safetensors to fine-tune.")
        parser.add_argument("--name", default="")
        parser.add_argument("--activate", action="store_true")
        parser.add_argument("--train-splits", nargs="+", default=["train"], choices=["train", "val"],
                            help="Splits to train on (validation is on val; test is never trained on).")

    def handle(self, *args, **options):
        dataset = DetectionDataset.objects.filter(name=options["dataset"]).first()
        if dataset is None:
            raise CommandError(f"No detection dataset named {options['dataset']!r}.")
        try:
            job = start_training(dataset=dataset, name=options["name"], architecture=options["model"],
                                 epochs=options["epochs"], imgsz=options["imgsz"], device=options["device"],
                                 activate=options["activate"], queue=False,
                                 train_splits=tuple(options["train_splits"]))
        except DetectionInputError as error:
            raise CommandError(str(error)) from error
        job = run_training(job)
        if job.status != job.Status.DONE:
            raise CommandError(f"Training job {job.pk} {job.status}: {job.error}")
        self.stdout.write(f"Detector {job.detector.name} (id {job.detector.pk}) registered: {job.metrics}")
