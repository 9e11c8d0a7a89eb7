from django.apps import AppConfig


class CellsConfig(AppConfig):
    name = "apps.cells"
    label = "cells"
    verbose_name = "Cell-type tree and datasets"
