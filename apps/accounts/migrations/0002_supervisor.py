"""Create the Supervisor group (the second sign-off of runs over a site's blast or unfamiliar-cell limit)."""

from django.db import migrations


def create_group(apps, schema_editor):
    apps.get_model("auth", "Group").objects.get_or_create(name="Supervisor")


def remove_group(apps, schema_editor):
    apps.get_model("auth", "Group").objects.filter(name="Supervisor").delete()


class Migration(migrations.Migration):
    dependencies = [("accounts", "0001_roles")]
    operations = [migrations.RunPython(create_group, remove_group)]
