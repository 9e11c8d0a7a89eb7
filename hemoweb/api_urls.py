"""One router for the whole REST API; each app registers its viewsets in its api.py."""

from django.urls import include, path
from rest_framework.authtoken.views import obtain_auth_token
from rest_framework.routers import DefaultRouter

from apps.cells import api as cells_api
from apps.classifiers import api as classifiers_api

router = DefaultRouter()
cells_api.register(router)
classifiers_api.register(router)

urlpatterns = [
    path("token/", obtain_auth_token, name="api-token"),
    path("", include(router.urls)),
]
