from django.core.management.base import BaseCommand, CommandError

from apps.training.services import EvaluationError, fit_dataset_familiarity


class Command(BaseCommand):
    help = ("Fit a shared-backbone model set's familiarity statistics on a dataset's train cells and choose their "
            "threshold on its val cells: from then on each classified cell is scored against the training cells, "
            "and cells unlike them go to review. Shared-backbone trainings do this themselves; this serves sets "
            "trained before.")

    def add_arguments(self, parser):
        parser.add_argument("--dataset", required=True, help="Stored dataset whose train cells the set learned from.")
        parser.add_argument("--models", help="Model set name or folder under models/ (default: the active set).")

    def handle(self, *args, **o):
        try:
            folder, card = fit_dataset_familiarity(o["dataset"], models=o["models"])
        except EvaluationError as error:
            raise CommandError(str(error)) from error
        self.stdout.write(f"{folder}: familiarity fitted on {card['n_train']} train cells; threshold "
                          f"{card['threshold']:.2f} (the {card['quantile']:.0%} quantile of {card['n_val']} val "
                          "cells), stored in familiarity.safetensors and set.json.")
