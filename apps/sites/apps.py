from django.apps import AppConfig
from django.db import connections
from django.db.models.signals import post_migrate


def ensure_default_site(sender, using="default", **kwargs) -> None:
    """A default site always exists (the data migration makes it; a flushed test database gets it again)."""
    from .models import Site

    if Site._meta.db_table in connections[using].introspection.table_names():  # not after `migrate sites zero`
        Site.objects.using(using).default()


class SitesConfig(AppConfig):
    name = "apps.sites"
    label = "sites"
    verbose_name = "Sites and verification"

    def ready(self) -> None:
        post_migrate.connect(ensure_default_site, sender=self, dispatch_uid="hemoweb-default-site")
