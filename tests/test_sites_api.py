"""The sites and verification-study API: lab staff read, curators start studies (202, then poll)."""

from apps.sites import services
from apps.sites.models import Site, VerificationStudy
from tests.test_analysis_api import token_client
from tests.test_sites_verify import finished_study  # noqa: F401 (fixture)


def test_curators_start_a_study_and_poll_it(curator, tiny_model_set, pbc_dataset, monkeypatch,
                                            django_capture_on_commit_callbacks):
    monkeypatch.setattr(services, "_enqueue", lambda study_id: None)
    api = token_client(curator)
    with django_capture_on_commit_callbacks(execute=True):
        created = api.post("/api/verification-studies/", {"dataset": "Demo PBC"}, format="json")
    assert created.status_code == 202, created.content
    body = created.json()
    assert body["status"] == "queued" and body["site"] == "Main lab" and body["model_set_name"] == "tiny"
    services.run_study(body["id"])
    read = api.get(f"/api/verification-studies/{body['id']}/").json()
    assert read["status"] == "succeeded" and read["n"] == 130 and read["results"]["n"] == 130
    assert set(read["results"]["per_type"]["LYT"]["sensitivity"]) == {"value", "ci"}
    bad = api.post("/api/verification-studies/", {"dataset": "nope"}, format="json")
    assert bad.status_code == 400 and "No dataset named 'nope'" in bad.json()["detail"]
    no_site = api.post("/api/verification-studies/", {"dataset": "Demo PBC", "site": "Mars"}, format="json")
    assert no_site.status_code == 400 and "No site named 'Mars'" in no_site.json()["detail"]


def test_lab_staff_read_sites_and_studies_but_cannot_start(lab_user, finished_study):
    api = token_client(lab_user)
    sites = api.get("/api/sites/").json()["results"]
    assert sites[0]["name"] == "Main lab" and sites[0]["model_set_in_use"] == "tiny" and sites[0]["is_default"]
    listed = api.get(f"/api/verification-studies/?site={Site.objects.default().pk}").json()["results"]
    assert [study["id"] for study in listed] == [finished_study.pk] and "results" not in listed[0]
    assert api.post("/api/verification-studies/", {"dataset": "Demo PBC"}, format="json").status_code == 403
    site = Site.objects.default().pk
    assert api.post(f"/api/sites/{site}/quality-control/").status_code == 403


def test_quality_control_through_the_api(curator, tiny_model_set, pbc_dataset, monkeypatch):
    monkeypatch.setattr(services, "_enqueue", lambda study_id: None)
    api = token_client(curator)
    site = Site.objects.default()
    refused = api.post(f"/api/sites/{site.pk}/quality-control/")
    assert refused.status_code == 400 and "no reference cells" in refused.json()["detail"]
    site.reference_dataset = pbc_dataset
    site.save()
    started = api.post(f"/api/sites/{site.pk}/quality-control/")
    assert started.status_code == 202 and started.json()["trigger"] == "quality-control"
    assert VerificationStudy.objects.get().dataset == pbc_dataset


def test_a_classification_run_names_its_site(lab_user, tiny_model_set):
    from django.core.files.uploadedfile import SimpleUploadedFile

    from tests.test_analysis_services import demo_zip

    api = token_client(lab_user)
    created = api.post("/api/classification-runs/", {"files": [SimpleUploadedFile("s.zip", demo_zip(1))]},
                       format="multipart")
    assert created.status_code == 201 and created.json()["site"] == "Main lab"
