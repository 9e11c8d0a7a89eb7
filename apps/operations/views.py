from django.contrib.auth.decorators import login_not_required
from django.http import JsonResponse
from django.views.decorators.cache import never_cache

from .services import health


@login_not_required
@never_cache
def healthz(request):
    """For the orchestrator: 200 when the database, the queue and the model files are fine, else 503."""
    checks = health()
    ok = all(check["ok"] for check in checks.values())
    return JsonResponse({"ok": ok, "checks": checks}, status=200 if ok else 503)
