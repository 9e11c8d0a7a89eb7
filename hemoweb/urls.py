from django.conf import settings
from django.contrib import admin
from django.contrib.auth.decorators import login_not_required
from django.urls import include, path
from django.views.static import serve
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from apps.cells import views as cell_views

urlpatterns = [
    path("", cell_views.home, name="home"),
    path("accounts/", include("apps.accounts.urls")),
    path("admin/", admin.site.urls),
    path("", include("apps.cells.urls")),
    path("", include("apps.classifiers.urls")),
    path("api/", include("hemoweb.api_urls")),
    path("api/schema/", login_not_required(SpectacularAPIView.as_view()), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
    # Media are patient-adjacent images: served only to logged-in users (LoginRequiredMiddleware).
    path(f"{settings.MEDIA_URL.strip('/')}/<path:path>", serve, {"document_root": settings.MEDIA_ROOT}, name="media"),
]
