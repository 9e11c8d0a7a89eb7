"""POST /api/explanations/ and `manage.py explain`: the same service as the page."""

import io

import pytest
from django.core.management import CommandError, call_command
from PIL import Image

from apps.explain.models import Explanation


@pytest.fixture
def cell(pbc_dataset):
    return pbc_dataset.cells.order_by("id").first()


@pytest.fixture
def api(client, lab_user):
    client.force_login(lab_user)
    return client


def test_post_with_node_and_cell_returns_png_urls_and_the_summary(api, tiny_model_set, cell):
    response = api.post("/api/explanations/", {"node": "ROOT", "cell": cell.pk, "method": "ig", "n_steps": 16},
                        content_type="application/json")
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["status"] == "done" and body["node"] == "ROOT" and body["settings"]["n_steps"] == 16
    assert body["summary"]["target"] == body["summary"]["predicted"] and "central_share" in body["summary"]
    for key in ("overlay_url", "figure_url"):
        picture = api.get(body[key])
        assert picture.status_code == 200
        assert Image.open(io.BytesIO(b"".join(picture.streaming_content))).format == "PNG"
    again = api.post("/api/explanations/", {"node": "ROOT", "cell": cell.pk, "method": "ig", "n_steps": 16},
                     content_type="application/json").json()
    assert again["cached"] and again["id"] == body["id"]
    assert api.get(f"/api/explanations/{body['id']}/").json()["summary"] == body["summary"]


def test_post_an_uploaded_image_with_a_model_id(api, tiny_model_set, demo_pbc):
    model = tiny_model_set.node_models.get(node__code="ROOT")
    image = next(demo_pbc.rglob("*.jpg"))
    with image.open("rb") as handle:
        response = api.post("/api/explanations/", {"model": model.pk, "image": handle, "method": "gradcam"})
    assert response.status_code == 200, response.content
    assert response.json()["cell"] is None and response.json()["model"] == model.pk


def test_long_settings_answer_202_and_a_url_to_poll(api, tiny_model_set, cell, settings):
    settings.HEMOWEB_EXPLAIN_INLINE_SECONDS = 0.0
    response = api.post("/api/explanations/", {"node": "ROOT", "cell": cell.pk, "method": "occlusion"},
                        content_type="application/json")
    assert response.status_code == 202 and response.json()["queued"] and response.json()["figure_url"] is None


@pytest.mark.parametrize("payload, message", [
    ({"node": "ROOT", "method": "ig", "target": "NGS"}, "not an output of the ROOT classifier"),
    ({"node": "PLT", "method": "ig"}, "No trained model classifies"),
    ({"node": "ROOT", "method": "ig", "n_steps": 5000}, "less than or equal to 1000"),
    ({"node": "ROOT", "method": "lime"}, "not a valid choice"),
    ({"node": "ROOT", "method": "ig", "cell": 10**30}, "less than or equal to"),
    ({"model": 10**30, "method": "ig"}, "less than or equal to"),
])
def test_bad_requests_say_why(api, tiny_model_set, cell, payload, message):
    response = api.post("/api/explanations/", {"cell": cell.pk, **payload}, content_type="application/json")
    assert response.status_code == 400 and message in response.content.decode()
    assert not Explanation.objects.exists()


def test_api_needs_the_lab_role(client, outsider, tiny_model_set, cell):
    assert client.post("/api/explanations/", {"cell": cell.pk}).status_code in (401, 403)
    client.force_login(outsider)
    assert client.post("/api/explanations/", {"cell": cell.pk}).status_code == 403


def test_openapi_documents_the_endpoint(client):
    schema = client.get("/api/schema/", {"format": "json"}).json()
    post = schema["paths"]["/api/explanations/"]["post"]
    assert "multipart/form-data" in post["requestBody"]["content"] and {"200", "202", "400"} <= set(post["responses"])


def test_cli_writes_the_side_by_side_png(tiny_model_set, demo_pbc, tmp_path, capsys):
    image = next(demo_pbc.rglob("*.jpg"))
    out = tmp_path / "out" / "explained.png"
    call_command("explain", str(image), "--node", "ROOT", "--method", "occlusion", "--out", str(out),
                 "--overlay", str(tmp_path / "overlay.png"))
    assert Image.open(out).format == "PNG" and Image.open(out).size[0] > 3 * 256
    assert Image.open(tmp_path / "overlay.png").size == Image.open(image).size
    assert '"central_share"' in capsys.readouterr().out


def test_cli_explains_bad_input_clearly(tiny_model_set, demo_pbc, tmp_path):
    image = next(demo_pbc.rglob("*.jpg"))
    with pytest.raises(CommandError, match="not an output"):
        call_command("explain", str(image), "--node", "ROOT", "--target", "NGS", "--out", str(tmp_path / "x.png"))
    with pytest.raises(CommandError, match="No image file"):
        call_command("explain", str(tmp_path / "none.jpg"), "--out", str(tmp_path / "x.png"))
