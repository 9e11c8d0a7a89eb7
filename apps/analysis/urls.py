from django.urls import path

from . import slide_views, views

app_name = "analysis"
urlpatterns = [
    path("", views.home, name="home"),
    path("runs/<int:pk>/", views.run_detail, name="run"),
    path("runs/<int:pk>/progress/", views.run_progress, name="progress"),
    path("runs/<int:pk>/reference/", views.reference, name="reference"),
    path("runs/<int:pk>/cells/<int:cell_pk>/", views.correct, name="correct"),
    path("runs/<int:pk>/sign-off/", views.sign_off, name="sign-off"),
    path("runs/<int:pk>/second-sign-off/", views.second_sign_off, name="second-sign-off"),
    path("runs/<int:pk>/acknowledge-shift/", views.acknowledge_shift, name="acknowledge-shift"),
    path("runs/<int:pk>/send/", views.send_to_dataset, name="send"),
    path("runs/<int:pk>/specimen/", views.specimen, name="specimen"),
    path("runs/<int:pk>/export.csv", views.export_csv, name="export"),
    path("runs/<int:pk>/report/", views.report, name="report"),
    path("slides/", slide_views.slide_upload, name="slide-upload"),
    path("runs/<int:pk>/fields/<int:index>/", slide_views.field_detail, name="field"),
    path("runs/<int:pk>/cells/<int:cell_pk>/field/", slide_views.cell_field, name="cell-field"),
]
