"""The default site: every lab has at least one set-up, and rows from before sites belong to it."""

from django.db import migrations

DEFAULT_SITE_NAME = "Main lab"


def create_default_site(apps, schema_editor):
    Site = apps.get_model("sites", "Site")
    if not Site.objects.filter(is_default=True).exists():
        Site.objects.create(name=DEFAULT_SITE_NAME, is_default=True, type_minimums={"BLA": 0.95},
                            notes="Made by the migration that introduced sites: rows from before belong here.")


def remove_default_site(apps, schema_editor):
    apps.get_model("sites", "Site").objects.filter(is_default=True, name=DEFAULT_SITE_NAME).delete()


class Migration(migrations.Migration):
    dependencies = [("sites", "0001_initial")]
    operations = [migrations.RunPython(create_default_site, remove_default_site)]
