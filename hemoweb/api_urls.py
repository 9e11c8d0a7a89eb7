"""One router for the whole REST API; each app registers its viewsets in its api.py."""

from django.urls import include, path
from rest_framework.authtoken.views import obtain_auth_token
from rest_framework.routers import DefaultRouter

from apps.analysis import api as analysis_api
from apps.cells import api as cells_api
from apps.classifiers import api as classifiers_api
from apps.detection import api as detection_api
from apps.explain import api as explain_api
from apps.sites import api as sites_api
from apps.training import api as training_api

router = DefaultRouter()
analysis_api.register(router)
cells_api.register(router)
classifiers_api.register(router)
detection_api.register(router)
explain_api.register(router)
sites_api.register(router)
training_api.register(router)

urlpatterns = [
    path("token/", obtain_auth_token, name="api-token"),
    path("", include(router.urls)),
]
