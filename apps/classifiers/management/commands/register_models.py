from django.core.management.base import BaseCommand, CommandError

from apps.classifiers.services import RegistryError, register_model_set


class Command(BaseCommand):
    help = "Register the model set in FOLDER (a folder under MODELS_DIR or a path) and optionally activate it."

    def add_arguments(self, parser):
        parser.add_argument("folder")
        parser.add_argument("--name", help="Name to register it under (default: the name in its set.json).")
        parser.add_argument("--activate", action="store_true", help="Make it the active model set.")

    def handle(self, *args, **options):
        try:
            model_set = register_model_set(options["folder"], name=options["name"], activate=options["activate"])
        except RegistryError as error:
            raise CommandError(str(error)) from error
        state = "active" if model_set.is_active else "not active"
        self.stdout.write(self.style.SUCCESS(
            f"Registered model set {model_set.name} ({model_set.node_models.count()} node classifiers, {state})."
        ))
