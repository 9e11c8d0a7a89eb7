from django.contrib.auth.middleware import LoginRequiredMiddleware as DjangoLoginRequired


class LoginRequiredMiddleware(DjangoLoginRequired):
    """Every page needs a login, except the login page, static files, the health check and the API.

    The API answers 401/403 itself (token or session auth) instead of redirecting to a form.
    """

    OPEN_PREFIXES = ("/static/", "/healthz", "/api/", "/admin/login/")

    def process_view(self, request, view_func, view_args, view_kwargs):
        if request.path.startswith(self.OPEN_PREFIXES):
            return None
        return super().process_view(request, view_func, view_args, view_kwargs)
