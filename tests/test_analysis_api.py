"""The classification API: token auth, roles, object-level access, upload, read, correct."""

import pytest
from django.contrib.auth.models import Group, User
from django.core.files.uploadedfile import SimpleUploadedFile
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from apps.accounts.roles import LAB_STAFF
from apps.analysis import services
from tests.review_helpers import SMALL_RUN, review_flagged
from tests.test_analysis_services import demo_images, demo_zip


def token_client(user) -> APIClient:
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION="Token " + Token.objects.create(user=user).key)
    return api


@pytest.fixture
def lab_api(lab_user):
    return token_client(lab_user)


def test_post_a_zip_get_the_run_with_cells_and_counts_patch_a_cell(lab_api, lab_user, tiny_model_set):
    created = lab_api.post("/api/classification-runs/", {"files": [SimpleUploadedFile("s.zip", demo_zip(1))],
                                                         "count_target": 200}, format="multipart")
    assert created.status_code == 201, created.content
    run_id = created.json()["id"]
    assert created.json()["status"] == "succeeded"
    run = lab_api.get(f"/api/classification-runs/{run_id}/").json()
    assert len(run["cells"]) == 8 and run["counts"]["total"] == 8 and run["counts"]["target"] == 200
    assert run["agreement"] == 1.0 and run["model_set_name"] == "tiny"
    cell = run["cells"][0]
    assert cell["path"][0]["node"] == "ROOT" and 0 < cell["path"][0]["probability"] <= 1
    assert all(c["guess_type"] == c["predicted_type"] for c in run["cells"] if c["resolved"])
    patched = lab_api.patch(f"/api/classified-cells/{cell['id']}/", {"final_type": "PLT", "version": cell["version"]},
                            format="json")
    assert patched.status_code == 200 and patched.json()["final_type"] == "PLT"
    assert patched.json()["predicted_type"] == cell["predicted_type"] and patched.json()["corrected_by"] == "tech"
    stale = lab_api.patch(f"/api/classified-cells/{cell['id']}/", {"final_type": "EOS", "version": cell["version"]},
                          format="json")
    assert stale.status_code == 409 and "tech changed this cell to PLT" in stale.json()["detail"]
    assert lab_api.patch(f"/api/classified-cells/{cell['id']}/", {"final_type": "XYZ"}, format="json").status_code == 400
    from apps.analysis.models import ClassificationRun

    review_flagged(ClassificationRun.objects.get(pk=run_id), lab_user)
    assert lab_api.post(f"/api/classification-runs/{run_id}/sign-off/", {"reason": SMALL_RUN}).status_code == 200
    again = lab_api.post(f"/api/classification-runs/{run_id}/sign-off/")
    assert again.status_code == 409 and "already signed off" in again.json()["detail"]
    locked = lab_api.patch(f"/api/classified-cells/{cell['id']}/", {"final_type": "EOS"}, format="json")
    assert locked.status_code == 409


def test_image_files_and_bad_input_through_the_api(lab_api, tiny_model_set):
    files = [SimpleUploadedFile(path.name, path.read_bytes(), "image/jpeg") for path in demo_images(1)[:3]]
    created = lab_api.post("/api/classification-runs/", {"files": files}, format="multipart")
    assert created.status_code == 201 and created.json()["n_total"] == 3
    bad = lab_api.post("/api/classification-runs/", {"files": [SimpleUploadedFile("x.zip", b"no zip")]},
                       format="multipart")
    assert bad.status_code == 400 and "readable .zip" in bad.json()["detail"]
    missing = lab_api.post("/api/classification-runs/", {}, format="multipart")
    assert missing.status_code == 400


def test_roles_and_object_level_access(lab_api, lab_user, curator, outsider, tiny_model_set):
    run = services.start_run(owner=lab_user, files=[SimpleUploadedFile("s.zip", demo_zip(1))])
    cell = run.cells.first()
    assert APIClient().get("/api/classification-runs/").status_code == 401
    assert token_client(outsider).get("/api/classification-runs/").status_code == 403
    other = User.objects.create_user("other")
    other.groups.add(Group.objects.get(name=LAB_STAFF))
    other_api = token_client(other)
    assert other_api.get("/api/classification-runs/").json()["count"] == 0
    assert other_api.get(f"/api/classification-runs/{run.pk}/").status_code == 404
    assert other_api.patch(f"/api/classified-cells/{cell.pk}/", {"final_type": "EOS"}, format="json").status_code == 404
    curator_api = token_client(curator)
    assert curator_api.get(f"/api/classification-runs/{run.pk}/").status_code == 200
    assert lab_api.get("/api/classification-runs/").json()["count"] == 1


def test_the_api_is_in_the_openapi_schema(client):
    schema = client.get("/api/schema/").content.decode()
    assert "/api/classification-runs/" in schema and "/api/classified-cells/{id}/" in schema
    assert "multipart/form-data" in schema and "409" in schema


def test_listing_runs_reads_neither_model_set_cards_nor_more_queries_per_run(lab_api, lab_user, tiny_model_set):
    """The list names each run's model set by id: the sets' large JSON cards stay in the database."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    for _ in range(3):
        services.start_run(owner=lab_user, files=[SimpleUploadedFile("s.zip", demo_zip(1))])
    with CaptureQueriesContext(connection) as few:
        listed = lab_api.get("/api/classification-runs/?page_size=1").json()
    with CaptureQueriesContext(connection) as more:
        listed = lab_api.get("/api/classification-runs/").json()
    assert listed["count"] == 3 and {run["model_set"] for run in listed["results"]} == {tiny_model_set.pk}
    assert len(more.captured_queries) == len(few.captured_queries)
    assert not any("ModelSets" in query["sql"] for query in more.captured_queries)
