from django.core.management.base import BaseCommand, CommandError

from apps.training.services import EvaluationError, choose_dataset_second_look


class Command(BaseCommand):
    help = ("Choose how many views a model set averages for the cells its first pass leaves unsure (its second "
            "look), on a dataset's validation cells, and store the choice in the set. Trainings do this themselves; "
            "this serves sets trained before.")

    def add_arguments(self, parser):
        parser.add_argument("--dataset", required=True, help="Stored dataset whose val cells decide.")
        parser.add_argument("--models", help="Model set name or folder under models/ (default: the active set).")

    def handle(self, *args, **o):
        try:
            folder, views, scores = choose_dataset_second_look(o["dataset"], models=o["models"])
        except EvaluationError as error:
            raise CommandError(str(error)) from error
        for option, accuracy in scores.items():
            self.stdout.write(f"  second look {option or 'none':>4}: whole-tree accuracy {accuracy:.4f}")
        self.stdout.write(f"{folder}: second look {views or 'none'} (stored in set.json).")
