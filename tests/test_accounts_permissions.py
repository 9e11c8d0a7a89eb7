"""Every page needs a login; the admin is for curators; the API answers by role."""

import pytest
from rest_framework.authtoken.models import Token

pytestmark = pytest.mark.django_db

PAGES = ["/", "/tree/", "/datasets/", "/models/"]


@pytest.mark.parametrize("url", PAGES)
def test_anonymous_is_sent_to_login(client, url):
    response = client.get(url)
    assert response.status_code == 302 and response.url.startswith("/accounts/login/")


def test_login_page_is_open_and_login_works(client, lab_user):
    assert client.get("/accounts/login/").status_code == 200
    response = client.post("/accounts/login/", {"username": "tech", "password": "pw-tech"})
    assert response.status_code == 302 and response.url == "/"
    assert client.get("/").status_code == 200


def test_wrong_password_gets_a_message(client, lab_user):
    response = client.post("/accounts/login/", {"username": "tech", "password": "nope"})
    assert b"did not match" in response.content


def test_logout_requires_post_and_ends_the_session(lab_client):
    assert lab_client.post("/accounts/logout/").status_code == 302
    assert lab_client.get("/").status_code == 302


# What each page must show a lab (from the rows below), and what only curators get there.
SHOWN = {
    "/": ['Active model set: <a href="/models/{set_pk}/">site set</a>',
          "<strong>{n_types}</strong> nodes in the cell-type tree"],
    "/tree/": ["<code>NGS</code> Segmented neutrophil", "<code>KSC</code> Smudge cell"],
    "/datasets/": ['<a href="/datasets/{dataset_pk}/">Marrow 2024</a>'],
    "/models/": ['<a href="/models/{set_pk}/">site set</a>', '<span class="tag ok">active</span>'],
}


@pytest.mark.parametrize("url", PAGES)
def test_lab_staff_see_pages(lab_client, tree, url):
    from apps.cells.models import Dataset
    from apps.classifiers.models import ModelSet

    dataset = Dataset.objects.create(name="Marrow 2024")
    model_set = ModelSet.objects.create(name="site set", folder="site-set", architecture="resnet18", is_active=True)
    response = lab_client.get(url)
    html = response.content.decode()
    assert response.status_code == 200
    for text in SHOWN[url]:
        assert text.format(set_pk=model_set.pk, dataset_pk=dataset.pk, n_types=len(tree)) in html, text
    assert "/admin/" not in html  # the admin links are for curators


def test_admin_is_for_curators_only(client, lab_user, curator, tree):
    client.force_login(lab_user)
    assert client.get("/admin/").status_code == 302
    client.force_login(curator)
    assert client.get("/admin/").status_code == 200
    assert client.get("/admin/cells/celltype/").status_code == 200


def test_api_needs_authentication_and_a_role(client, outsider, lab_user, tree):
    assert client.get("/api/cell-types/").status_code == 401
    token = Token.objects.create(user=outsider)
    assert client.get("/api/cell-types/", HTTP_AUTHORIZATION=f"Token {token.key}").status_code == 403
    token = Token.objects.create(user=lab_user)
    response = client.get("/api/cell-types/", HTTP_AUTHORIZATION=f"Token {token.key}")
    assert response.status_code == 200
    assert {"code": "NGS", "parent": "NEU"}.items() <= next(r for r in response.json() if r["code"] == "NGS").items()


def test_token_endpoint_issues_tokens(client, lab_user):
    response = client.post("/api/token/", {"username": "tech", "password": "pw-tech"})
    assert response.status_code == 200 and len(response.json()["token"]) == 40


def test_api_filters_cells_by_subtree(lab_client, pbc_dataset):
    response = lab_client.get("/api/cells/?cell_type=NEU")
    codes = {row["cell_type"] for row in response.json()["results"]}
    assert codes == {"NEU", "NGB", "NGS"} and response.json()["count"] == 30


def test_openapi_schema_and_docs_are_served(lab_client):
    schema = lab_client.get("/api/schema/")
    assert schema.status_code == 200 and b"/api/cell-types/" in schema.content
    docs = lab_client.get("/api/docs/")
    assert docs.status_code == 200 and b"cdn" not in docs.content.lower()
