"""The default of the `site` of rows from other apps (datasets, classification runs), importable from their models."""


def default_site_id() -> int | None:
    """The default site's id: new rows belong to it unless told otherwise."""
    from django.apps import apps

    site = apps.get_model("sites", "Site")
    return site.objects.filter(is_default=True).values_list("pk", flat=True).first()
