from django.conf import settings
from django.contrib import admin
from django.contrib.auth.decorators import login_not_required
from django.http import FileResponse
from django.urls import include, path
from django.views.static import serve
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerSplitView

from apps.cells import views as cell_views
from apps.operations.views import healthz



def media(request, path: str):
    """Media are patient-adjacent images: served only to logged-in users (LoginRequiredMiddleware).

    MEDIA_ROOT is read per request, so a changed setting (tests, a moved volume) is followed.
    """
    return serve(request, path, document_root=settings.MEDIA_ROOT)


@login_not_required
def favicon(request):
    """Browsers ask for /favicon.ico on every page: the shipped icon, cached for a day."""
    response = FileResponse((settings.BASE_DIR / "static" / "favicon.ico").open("rb"), content_type="image/x-icon")
    response["Cache-Control"] = "public, max-age=86400"
    return response


urlpatterns = [
    path("", cell_views.home, name="home"),
    path("favicon.ico", favicon, name="favicon"),
    path("healthz", healthz, name="healthz"),
    path("accounts/", include("apps.accounts.urls")),
    path("admin/", admin.site.urls),
    path("", include("apps.cells.urls")),
    path("", include("apps.classifiers.urls")),
    path("", include("apps.explain.urls")),
    path("detection/", include("apps.detection.urls")),
    path("analysis/", include("apps.analysis.urls")),
    path("sites/", include("apps.sites.urls")),
    path("lis/", include("apps.lis.urls")),
    path("", include("apps.training.urls")),
    path("api/", include("hemoweb.api_urls")),
    path("api/schema/", login_not_required(SpectacularAPIView.as_view()), name="schema"),
    path("api/docs/", SpectacularSwaggerSplitView.as_view(url_name="schema"), name="api-docs"),
    path(f"{settings.MEDIA_URL.strip('/')}/<path:path>", media, name="media"),
]
