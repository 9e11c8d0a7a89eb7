from django.apps import AppConfig
from django.db.models.signals import post_migrate

# Apps whose models curators manage in the admin (every permission of each).
CURATOR_APP_LABELS = ("cells", "classifiers", "training", "detection", "sites", "lis")


def grant_curator_permissions(sender, **kwargs) -> None:
    """Give the Curator group every permission of the curated apps, including apps added later."""
    from django.contrib.auth.models import Group, Permission

    curator, _ = Group.objects.get_or_create(name="Curator")
    Group.objects.get_or_create(name="Lab staff")
    Group.objects.get_or_create(name="Supervisor")
    curator.permissions.add(*Permission.objects.filter(content_type__app_label__in=CURATOR_APP_LABELS))


class AccountsConfig(AppConfig):
    name = "apps.accounts"
    label = "accounts"

    def ready(self) -> None:
        post_migrate.connect(grant_curator_permissions, dispatch_uid="hemoweb-curator-permissions")
