from django.apps import AppConfig


class ClassifiersConfig(AppConfig):
    name = "apps.classifiers"
    label = "classifiers"
    verbose_name = "Model registry"
