from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from apps.cells.models import Dataset
from apps.training.models import TrainingJob
from apps.training.services import TrainingRequestError, run_training_job, start_training
from hemoweb.ml.train import MODES


def _local_path(path: str) -> str:
    """A path given on the command line that exists here, made absolute (the job resolves others under models/)."""
    return str(Path(path).resolve()) if path and Path(path).is_file() else path


class Command(BaseCommand):
    help = "Train one classifier per inner tree node on a dataset, in the foreground, and register the model set."

    def add_arguments(self, parser):
        parser.add_argument("--dataset", required=True)
        parser.add_argument("--arch", default="mobilenetv3_small_100", help="Any timm model name.")
        parser.add_argument("--mode", choices=MODES, default="scratch")
        parser.add_argument("--epochs", type=int, default=10)
        parser.add_argument("--image-size", type=int, default=128)
        parser.add_argument("--batch-size", type=int, default=64)
        parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
        parser.add_argument("--name", help="Model set name (default: <dataset>-<arch>-<mode>).")
        parser.add_argument("--min-images", type=int, default=10, help="Fewest images a class needs at a node.")
        parser.add_argument("--cap", type=int, default=1000, help="Balancing: never cap a class below this.")
        parser.add_argument("--balance", choices=("cap", "weights", "none"), default="cap")
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--lr", type=float)
        parser.add_argument("--patience", type=int, default=5)
        parser.add_argument("--warmup-epochs", type=float, default=1.0)
        parser.add_argument("--nodes", nargs="*", help="Only these inner nodes (default: all trainable).")
        parser.add_argument("--pretrained-file", default="", help="Weights to start from: a safetensors file here, or a path under models/ "
                                 "(default models/pretrained/<arch>.safetensors; a set's backbone.safetensors "
                                 "fine-tunes that set).")
        parser.add_argument("--augment", action="store_true", default=None, help="Force augmentation on.")
        parser.add_argument("--no-augment", action="store_false", dest="augment", help="Force augmentation off.")
        parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default).")
        parser.add_argument("--max-steps", type=int, default=0, help="Cap steps per epoch (quick trials).")
        parser.add_argument("--shared-backbone", action="store_true",
                            help="One backbone with a head per node, trained together (one pass per cell).")
        parser.add_argument("--cross-lab", action="store_true",
                            help="Train for other labs' cells: white balance on the slide background, augmentation "
                                 "with other stains, optics, exposures, cameras and crops, and the training scale "
                                 "measured from the red cells (all stored in the set's cards).")
        parser.add_argument("--activate", action="store_true", help="Make the new set the active one.")
        parser.add_argument("--resume", type=int, metavar="JOB", help="Resume a failed or cancelled job in the foreground.")

    def handle(self, *args, **o):
        if o["resume"]:
            from apps.training.services import resume_job

            job = TrainingJob.objects.filter(pk=o["resume"]).first()
            if job is None:
                raise CommandError(f"No training job {o['resume']}.")
            try:
                job = resume_job(job, enqueue=False)
            except TrainingRequestError as error:
                raise CommandError(str(error)) from error
            return self._run(job)
        dataset = Dataset.objects.filter(name=o["dataset"]).first()
        if dataset is None:
            names = ", ".join(Dataset.objects.values_list("name", flat=True)) or "none"
            raise CommandError(f"No dataset named {o['dataset']!r} (datasets: {names}).")
        params = {
            "architecture": o["arch"], "mode": o["mode"], "epochs": o["epochs"], "image_size": o["image_size"],
            "batch_size": o["batch_size"], "device": o["device"], "min_images": o["min_images"],
            "balance_threshold": o["cap"], "balance": o["balance"], "seed": o["seed"], "patience": o["patience"], "warmup_epochs": o["warmup_epochs"],
            "nodes": o["nodes"] or [], "pretrained_file": _local_path(o["pretrained_file"]), "threads": o["threads"],
            "max_steps_per_epoch": o["max_steps"], "activate": o["activate"], "shared_backbone": o["shared_backbone"],
            "cross_lab": o["cross_lab"],
        }
        if o["lr"]:
            params["lr"] = o["lr"]
        if o["augment"] is not None:
            params["augment"] = o["augment"]
        name = o["name"] or f"{dataset.name}-{o['arch']}-{o['mode']}"
        try:
            job = start_training(dataset=dataset, name=name, params=params, enqueue=False)
        except TrainingRequestError as error:
            raise CommandError(str(error)) from error
        self._run(job)

    def _run(self, job):
        self.stdout.write(f"Training job {job.pk}: {job.name}")
        job = run_training_job(job.pk, echo=self.stdout.write)
        if job.status != TrainingJob.Status.SUCCEEDED:
            hint = f" Resume with: python manage.py train_tree --dataset {job.dataset.name} --resume {job.pk}" \
                if job.can_resume else ""
            raise CommandError(f"Training {job.status}: {job.error or 'see the log'}.{hint}")
        metrics = job.result.metrics
        self.stdout.write(self.style.SUCCESS(
            f"Done: {job.result.name} in {job.result.path}; test accuracy {metrics.get('accuracy')}, "
            f"macro-F1 {metrics.get('macro_f1')}, 8-class accuracy {metrics.get('coarse8', {}).get('accuracy')}."))
