from django.urls import path

from . import views

app_name = "explain"

urlpatterns = [
    path("explain/", views.home, name="home"),
    path("explain/<int:pk>/", views.result, name="result"),
]
