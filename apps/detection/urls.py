from django.urls import path

from . import views

app_name = "detection"
urlpatterns = [
    path("", views.home, name="home"),
    path("detect/", views.detect, name="detect"),
    path("train/", views.train, name="train"),
    path("jobs/", views.jobs, name="jobs"),
    path("jobs/<int:pk>/cancel/", views.cancel, name="cancel"),
    path("detectors/<int:pk>/activate/", views.activate, name="activate"),
]
