from django.urls import path

from . import views

app_name = "training"
urlpatterns = [
    path("training/", views.home, name="home"),
    path("training/new/", views.start, name="start"),
    path("training/compare/", views.compare, name="compare"),
    path("training/jobs/<int:pk>/", views.job, name="job"),
    path("training/jobs/<int:pk>/cancel/", views.cancel, name="cancel"),
    path("training/jobs/<int:pk>/resume/", views.resume, name="resume"),
]
