"""Put the models shipped in the repository into MODELS_DIR and register them (idempotent)."""

import shutil
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand

from apps.classifiers.models import ModelSet
from apps.classifiers.services import RegistryError, register_model_set

SHIPPED = Path(settings.BASE_DIR) / "models"


class Command(BaseCommand):
    help = "Install the shipped default model set and detector into MODELS_DIR (when it lives elsewhere) and register them."

    def handle(self, *args, **options):
        from apps.detection.services import install_shipped_detector

        self.stdout.write(install_shipped_detector())
        source = SHIPPED / "default"
        target = settings.MODELS_DIR / "default"
        if not (source / "set.json").exists():
            self.stdout.write(self.style.WARNING(f"No shipped model set at {source}."))
            return
        if source.resolve() != target.resolve() and not (target / "set.json").exists():
            shutil.copytree(source, target, dirs_exist_ok=True)
        activate = not ModelSet.objects.filter(is_active=True).exists()
        try:
            model_set = register_model_set(target, activate=activate)
        except RegistryError as error:
            self.stderr.write(self.style.ERROR(f"The shipped model set could not be registered: {error}"))
            return
        self.stdout.write(self.style.SUCCESS(
            f"Model set {model_set.name} registered{' and active' if model_set.is_active else ''}."
        ))
