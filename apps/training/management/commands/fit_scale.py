from django.core.management.base import BaseCommand, CommandError

from apps.training.services import EvaluationError, fit_dataset_scale


class Command(BaseCommand):
    help = ("Measure the scale a model set was trained at (red cells, field and white cells of a dataset's training "
            "cells) and store it in the set's cards, so that the set resamples other labs' images to it. Cross-lab "
            "trainings do this themselves; this serves sets trained before.")

    def add_arguments(self, parser):
        parser.add_argument("--dataset", required=True, help="Stored dataset whose train cells the set learned from.")
        parser.add_argument("--models", help="Model set name or folder under models/ (default: the active set).")

    def handle(self, *args, **o):
        try:
            folder, scale = fit_dataset_scale(o["dataset"], models=o["models"])
        except EvaluationError as error:
            raise CommandError(str(error)) from error
        self.stdout.write(f"{folder}: red cells {scale['px_per_um']} px/µm, a field of {scale['field_um']} µm "
                          f"({scale['field_px']} px), white cells {scale['white_cell_um']} µm (stored in its cards).")
