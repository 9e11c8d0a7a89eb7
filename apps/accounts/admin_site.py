from django.contrib import admin
from django.contrib.admin.apps import AdminConfig

from .roles import is_curator


class HemowebAdminSite(admin.AdminSite):
    """The admin is the curators' workbench: the Curator role opens it (no separate staff flag)."""

    site_header = "hemoweb curation"
    site_title = "hemoweb curation"
    index_title = "Cell-type tree, datasets and models"

    def has_permission(self, request) -> bool:
        return request.user.is_active and is_curator(request.user)


class HemowebAdminConfig(AdminConfig):
    default_site = "apps.accounts.admin_site.HemowebAdminSite"
