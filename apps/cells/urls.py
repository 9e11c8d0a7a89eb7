from django.urls import path

from . import views

app_name = "cells"
urlpatterns = [
    path("tree/", views.tree, name="tree"),
    path("datasets/", views.datasets, name="datasets"),
    path("datasets/<int:pk>/", views.dataset_gallery, name="dataset"),
    path("attribution/", views.attribution, name="attribution"),
]
