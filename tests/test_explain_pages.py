"""The explanation page with the Django client: form, htmx result partial, polling, entry points."""

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse

from apps.explain.models import Explanation

HX = {"HTTP_HX_REQUEST": "true", "HTTP_HX_TARGET": "result"}


@pytest.fixture
def cell(pbc_dataset):
    return pbc_dataset.cells.order_by("id").first()


def test_page_preselects_the_active_root_model_and_the_cell(lab_client, tiny_model_set, cell):
    response = lab_client.get(reverse("explain:home"), {"cell": cell.pk})
    html = response.content.decode()
    root = tiny_model_set.node_models.get(node__code="ROOT")
    assert response.status_code == 200 and f'value="{cell.pk}"' in html
    assert f'<option value="{root.pk}" selected>' in html and "Classes at this level" in html


def test_htmx_post_returns_the_result_partial_with_pictures(lab_client, tiny_model_set, cell):
    root = tiny_model_set.node_models.get(node__code="ROOT")
    response = lab_client.post(reverse("explain:home"), {"model": root.pk, "cell": cell.pk, "method": "ig",
                                                         "n_steps": 10, "baseline": "blurred"}, **HX)
    html = response.content.decode()
    row = Explanation.objects.get()
    assert response.status_code == 200 and "<html" not in html and "<h1>" not in html
    assert row.figure.url in html and "Explained class" in html and row.settings["baseline"] == "blurred"


def test_an_upload_is_explained(lab_client, tiny_model_set, demo_pbc):
    root = tiny_model_set.node_models.get(node__code="ROOT")
    image = next(demo_pbc.rglob("*.jpg"))
    upload = SimpleUploadedFile(image.name, image.read_bytes(), content_type="image/jpeg")
    response = lab_client.post(reverse("explain:home"), {"model": root.pk, "image": upload, "method": "gradcam"}, **HX)
    assert response.status_code == 200 and Explanation.objects.get().figure.url in response.content.decode()


def test_a_queued_explanation_polls_until_done(lab_client, tiny_model_set, cell, settings):
    from apps.explain.tasks import run_explanation

    settings.HEMOWEB_EXPLAIN_INLINE_SECONDS = 0.0
    root = tiny_model_set.node_models.get(node__code="ROOT")
    html = lab_client.post(reverse("explain:home"), {"model": root.pk, "cell": cell.pk, "method": "occlusion"},
                           **HX).content.decode()
    row = Explanation.objects.get()
    poll_url = reverse("explain:result", args=[row.pk])
    assert f'hx-get="{poll_url}"' in html and 'hx-trigger="every 1s"' in html and 'role="progressbar"' in html
    run_explanation(row.pk)
    polled = lab_client.get(poll_url, HTTP_HX_REQUEST="true", HTTP_HX_TARGET=f"explanation-{row.pk}").content.decode()
    assert "every 1s" not in polled and row.__class__.objects.get().figure.url in polled
    full = lab_client.get(poll_url)
    assert full.status_code == 200 and "<h1>Explanation" in full.content.decode()


def test_bad_input_is_shown_in_the_partial(lab_client, tiny_model_set, cell):
    root = tiny_model_set.node_models.get(node__code="ROOT")
    html = lab_client.post(reverse("explain:home"), {"model": root.pk, "cell": cell.pk, "method": "ig",
                                                     "target": "NGS"}, **HX).content.decode()
    assert 'role="alert"' in html and "not an output of the ROOT classifier" in html
    html = lab_client.post(reverse("explain:home"), {"model": root.pk, "method": "ig"}, **HX).content.decode()
    assert "Choose an image" in html
    html = lab_client.post(reverse("explain:home"), {"model": root.pk, "cell": 999999, "method": "ig"},
                           **HX).content.decode()
    assert "no cell with id 999999" in html
    assert not Explanation.objects.exists()


def test_absurd_ids_in_the_address_are_ignored(lab_client, tiny_model_set):
    response = lab_client.get(reverse("explain:home"), {"cell": "9" * 30, "model": "9" * 30, "classified": "x"})
    html = response.content.decode()
    root = tiny_model_set.node_models.get(node__code="ROOT")
    assert response.status_code == 200
    # the page falls back to what it offers with no address at all: the active root model, no cell chosen
    assert f'<option value="{root.pk}" selected>' in html and "Classes at this level" in html
    assert "9" * 30 not in html and 'role="alert"' not in html


def test_the_page_needs_the_lab_role(client, outsider, tiny_model_set):
    client.force_login(outsider)
    response = client.get(reverse("explain:home"))
    assert response.status_code == 302 and response.url.startswith(reverse("login"))


def test_the_gallery_links_every_thumbnail_to_its_explanation(lab_client, pbc_dataset):
    eosinophil = pbc_dataset.cells.filter(cell_type__code="EOS").order_by("id").first()
    html = lab_client.get(reverse("cells:dataset", args=[pbc_dataset.pk]), {"type": "EOS"}).content.decode()
    assert f'{reverse("explain:home")}?cell={eosinophil.pk}' in html
    assert html.count('aria-label="Explain cell') == html.count('class="thumb"') == 10


def test_a_classified_cell_opens_with_its_last_decision(lab_client, tiny_model_set, lab_user, demo_pbc):
    import io
    import zipfile

    from apps.analysis import services as analysis

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        image = sorted((demo_pbc / "neutrophil").glob("*.jpg"))[0] if (demo_pbc / "neutrophil").is_dir() \
            else next(demo_pbc.rglob("*.jpg"))
        archive.write(image, image.name)
    run = analysis.start_run(owner=lab_user, files=[SimpleUploadedFile("cells.zip", buffer.getvalue())])
    classified = run.cells.get()
    last = classified.path[-1]
    html = lab_client.get(reverse("explain:home"), {"classified": classified.pk}).content.decode()
    model = tiny_model_set.node_models.get(node__code=last["node"])
    assert f'<option value="{model.pk}" selected>' in html and f'value="{last["code"]}"' in html
    response = lab_client.post(reverse("explain:home"), {"model": model.pk, "classified": classified.pk,
                                                         "method": "gradcam", "target": last["code"]}, **HX)
    row = Explanation.objects.get()
    assert row.classified_cell_id == classified.pk and row.summary["target"] == last["code"]
    assert row.figure.url in response.content.decode()
