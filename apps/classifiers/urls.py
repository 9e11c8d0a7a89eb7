from django.urls import path

from . import views

app_name = "classifiers"
urlpatterns = [
    path("models/", views.model_sets, name="model-sets"),
    path("models/<int:pk>/", views.model_set, name="model-set"),
    path("models/<int:pk>/activate/", views.activate, name="activate"),
]
