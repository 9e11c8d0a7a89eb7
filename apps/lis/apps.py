from django.apps import AppConfig


class LisConfig(AppConfig):
    name = "apps.lis"
    label = "lis"
    verbose_name = "Lab information system"
