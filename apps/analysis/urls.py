from django.urls import path

from . import views

app_name = "analysis"
urlpatterns = [
    path("", views.home, name="home"),
    path("runs/<int:pk>/", views.run_detail, name="run"),
    path("runs/<int:pk>/progress/", views.run_progress, name="progress"),
    path("runs/<int:pk>/cells/<int:cell_pk>/", views.correct, name="correct"),
    path("runs/<int:pk>/sign-off/", views.sign_off, name="sign-off"),
    path("runs/<int:pk>/acknowledge-shift/", views.acknowledge_shift, name="acknowledge-shift"),
    path("runs/<int:pk>/send/", views.send_to_dataset, name="send"),
    path("runs/<int:pk>/export.csv", views.export_csv, name="export"),
    path("runs/<int:pk>/report/", views.report, name="report"),
]
