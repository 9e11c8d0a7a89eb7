from django.urls import path

from . import export_views, views

app_name = "lis"
urlpatterns = [
    path("runs/<int:pk>/outbox/", views.run_outbox, name="outbox"),
    path("runs/<int:pk>/send-again/", views.send_again, name="send-again"),
    path("runs/<int:pk>/result.hl7", export_views.download_hl7, name="hl7"),
    path("runs/<int:pk>/result.fhir.json", export_views.download_fhir, name="fhir"),
]
