"""Site and study pages: everybody with a role reads them; curators start studies and choose a site's set."""

import pytest
from django.urls import reverse

from apps.sites import services
from apps.sites.models import Site, SiteMember, VerificationStudy
from tests.test_sites_verify import finished_study  # noqa: F401 (fixture)

HX = {"HTTP_HX_REQUEST": "true"}


def test_the_sites_page_lists_the_default_site_its_set_and_is_in_the_navigation(lab_client, tiny_model_set):
    html = lab_client.get(reverse("sites:home")).content.decode()
    assert "Main lab" in html and "tiny" in html and "(the active set)" in html
    assert "tiny has no verification study at Main lab" in html
    assert 'href="/sites/"' in html


def test_a_curator_starts_a_study_from_the_site_page(curator_client, tiny_model_set, pbc_dataset, monkeypatch,
                                                     django_capture_on_commit_callbacks):
    queued = []
    monkeypatch.setattr(services, "_enqueue", queued.append)
    site = Site.objects.default()
    page = curator_client.get(reverse("sites:site", args=[site.pk])).content.decode()
    assert "Start verification study" in page and 'name="dataset"' in page
    with django_capture_on_commit_callbacks(execute=True):
        response = curator_client.post(reverse("sites:start-study", args=[site.pk]), {"dataset": pbc_dataset.pk})
    study = VerificationStudy.objects.get()
    assert response.status_code == 302 and response["Location"] == reverse("sites:study", args=[study.pk])
    assert queued == [study.pk] and study.status == "queued" and study.n_total == 130
    assert study.created_by.username == "cura" and study.model_set == tiny_model_set
    progress = curator_client.get(response["Location"], HTTP_HX_TARGET="study-progress", **HX).content.decode()
    assert progress.lstrip().startswith('<section id="study-progress"') and 'hx-trigger="every 1s"' in progress
    services.run_study(study.pk)
    done = curator_client.get(response["Location"], HTTP_HX_TARGET="study-progress", **HX).content.decode()
    assert "hx-trigger" not in done and 'id="confusion"' in done and 'id="per-type"' in done


def test_a_bad_study_request_shows_why(curator_client, tiny_model_set, pbc_dataset):
    from apps.cells.models import Dataset

    empty = Dataset.objects.create(name="Empty")
    response = curator_client.post(reverse("sites:start-study", args=[Site.objects.default().pk]),
                                   {"dataset": empty.pk})
    assert response.status_code == 400 and "these cells have no cells to score" in response.content.decode()


def test_lab_staff_read_studies_but_cannot_start_one_or_change_a_sites_set(lab_client, finished_study,
                                                                           tiny_model_set, pbc_dataset):
    site = Site.objects.default()
    page = lab_client.get(reverse("sites:site", args=[site.pk])).content.decode()
    assert "Start verification study" not in page and "Use for routine work" not in page
    assert f'href="/sites/studies/{finished_study.pk}/"' in page and "<svg" in page  # the agreement chart
    study = lab_client.get(reverse("sites:study", args=[finished_study.pk])).content.decode()
    assert "Confusion matrix" in study and "Cohen's kappa" in study and "NGS" in study
    report = lab_client.get(reverse("sites:report", args=[finished_study.pk])).content.decode()
    assert "data-print" in report and "Verified by" in report and "<script>" not in report
    assert lab_client.post(reverse("sites:start-study", args=[site.pk]), {"dataset": pbc_dataset.pk}).status_code == 302
    assert lab_client.post(reverse("sites:use-set", args=[site.pk]), {"model_set": ""}).status_code == 302
    assert lab_client.post(reverse("sites:quality-control", args=[site.pk])).status_code == 302
    assert VerificationStudy.objects.count() == 1  # the redirects are to the login page: nothing started


def test_outsiders_see_no_site_page(client, outsider, tiny_model_set):
    client.force_login(outsider)
    assert client.get(reverse("sites:home")).status_code == 302


def test_choosing_a_set_for_routine_use_shows_its_latest_study_or_warns(curator_client, finished_study,
                                                                        tiny_model_set):
    other = Site.objects.create(name="Ward 2")
    response = curator_client.post(reverse("sites:use-set", args=[other.pk]), {"model_set": tiny_model_set.pk},
                                   follow=True)
    html = response.content.decode()
    assert "Ward 2 now classifies with tiny. tiny has no verification study at Ward 2" in html
    response = curator_client.post(reverse("sites:use-set", args=[Site.objects.default().pk]),
                                   {"model_set": tiny_model_set.pk}, follow=True)
    assert "failed: no type had enough cells to judge" in response.content.decode()


def test_the_classification_page_offers_the_users_sites_set(lab_user, tiny_model_set, settings, tiny_set_folder):
    import shutil

    from apps.analysis.forms import ClassifyForm
    from apps.classifiers.services import register_model_set

    shutil.copytree(tiny_set_folder, settings.MODELS_DIR / "ward")
    ward_set = register_model_set(settings.MODELS_DIR / "ward", name="ward set")
    assert ClassifyForm(user=lab_user).fields["model_set"].initial == tiny_model_set.pk  # default site: active set
    ward = Site.objects.create(name="Ward 2", model_set=ward_set)
    SiteMember.objects.create(user=lab_user, site=ward)
    form = ClassifyForm(user=lab_user)
    assert form.site == ward and form.fields["model_set"].initial == ward_set.pk


@pytest.mark.parametrize("with_member", [False, True])
def test_a_run_started_without_a_set_uses_the_owners_site_and_its_set(lab_user, tiny_model_set, settings,
                                                                      tiny_set_folder, with_member):
    import shutil

    from apps.analysis import services as analysis
    from apps.classifiers.services import register_model_set
    from tests.test_analysis_services import demo_zip, upload

    site = Site.objects.default()
    if with_member:
        shutil.copytree(tiny_set_folder, settings.MODELS_DIR / "ward")
        site = Site.objects.create(name="Ward 2", um_per_pixel=0.1,
                                   model_set=register_model_set(settings.MODELS_DIR / "ward", name="ward set"))
        SiteMember.objects.create(user=lab_user, site=site)
    run = analysis.start_run(owner=lab_user, files=[upload(demo_zip(1))])
    assert run.site == site and run.model_set_name == ("ward set" if with_member else "tiny")
    assert run.um_per_pixel == (0.1 if with_member else None)


def test_curators_keep_sites_in_the_admin_and_changing_its_set_warns(curator_client, tiny_model_set, tree):
    from django.core.exceptions import ValidationError

    site = Site.objects.default()
    url = reverse("admin:sites_site_change", args=[site.pk])
    assert curator_client.get(url).status_code == 200
    assert curator_client.get(reverse("admin:sites_verificationstudy_changelist")).status_code == 200
    data = {"name": "Main lab", "is_default": "on", "microscope": "DM96", "stain": "MGG", "um_per_pixel": "0.1",
            "notes": "", "model_set": tiny_model_set.pk, "reference_dataset": "", "min_sensitivity": "0.9",
            "min_n": "20", "type_minimums": '{"BLA": 0.95}', "members-TOTAL_FORMS": "0",
            "members-INITIAL_FORMS": "0", "members-MIN_NUM_FORMS": "0", "members-MAX_NUM_FORMS": "1000"}
    response = curator_client.post(url, data, follow=True)
    assert "has no verification study at Main lab" in response.content.decode()  # (the admin capitalises it)
    assert Site.objects.default().model_set == tiny_model_set
    bad = curator_client.post(url, {**data, "type_minimums": '{"XYZ": 0.9, "BLA": 2}'})
    assert bad.status_code == 200 and "Not cell types of the tree: XYZ" in bad.content.decode()
    with pytest.raises(ValidationError, match="One site must be the default"):
        Site(pk=site.pk, name="Main lab", is_default=False).clean()
