"""schemathesis against hemoweb's own OpenAPI schema: whatever it sends, the API never answers 5xx."""

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from hemoweb.wsgi import application

schema = schemathesis.openapi.from_wsgi("/api/schema/", application)


@pytest.fixture
def api_token(db, tree, curator):
    """A curator's token, so that requests reach the code behind the permission checks."""
    from rest_framework.authtoken.models import Token

    return Token.objects.create(user=curator).key


@pytest.fixture
def keep_test_connection():
    """Calling the WSGI app directly would close the test's database connection after each request
    (Django's test client switches that off the same way)."""
    from django.core import signals
    from django.db import close_old_connections

    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    yield
    signals.request_started.connect(close_old_connections)
    signals.request_finished.connect(close_old_connections)


@schema.parametrize()
@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_api_never_answers_with_a_server_error(case, api_token, keep_test_connection):
    case.call_and_validate(headers={"Authorization": f"Token {api_token}"}, checks=[not_a_server_error])
