"""Detect-then-classify through the API, the page (htmx) and the command line, with the shipped detector."""

import io
import json

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from rest_framework.test import APIClient

from apps.detection.models import Detector
from apps.detection.services import register_detector

from .conftest import DEMO
from .test_detection_ml import SHIPPED, _png_header_only

pytestmark = pytest.mark.django_db
SMEAR = DEMO / "bccd" / "BCCD" / "JPEGImages" / "BloodImage_00007.jpg"  # BCCD test split: never trained on


@pytest.fixture
def detector(db) -> Detector:
    return register_detector(SHIPPED, name="BCCD default", activate=True)


@pytest.fixture
def api(lab_user) -> APIClient:
    client = APIClient()
    client.force_authenticate(lab_user)
    return client


def _upload(path=SMEAR, name="smear.jpg"):
    handle = io.BytesIO(path.read_bytes() if hasattr(path, "read_bytes") else path)
    handle.name = name
    return handle


def test_api_returns_boxes_counts_and_a_tree_path_per_white_cell(api, detector, tiny_model_set):
    response = api.post("/api/detect/", {"image": _upload()}, format="multipart")
    assert response.status_code == 200, response.content
    data = response.json()
    assert data["classes"] == ["Platelets", "RBC", "WBC"] and (data["width"], data["height"]) == (640, 480)
    assert data["counts"]["WBC"] == 1 and data["counts"]["RBC"] >= 5
    assert sum(data["counts"].values()) == len(data["boxes"])
    assert {"label", "x1", "y1", "x2", "y2", "score"} <= set(data["boxes"][0])
    assert len(data["cells"]) == 1 and data["model_set"] == "tiny"
    tree = data["cells"][0]["tree"]
    assert tree["path"][0]["node"] == "ROOT" and tree["code"] in data["tree_counts"]


def test_api_without_a_model_set_still_counts_and_says_why_cells_are_not_classified(api, detector):
    data = api.post("/api/detect/", {"image": _upload()}, format="multipart").json()
    assert data["counts"]["WBC"] == 1 and data["cells"][0]["tree"] is None
    assert "No classifier model set is active" in data["tree_note"]


def test_api_refuses_a_non_image_and_an_oversized_scan(api, detector):
    response = api.post("/api/detect/", {"image": _upload(b"%PDF-1.4 report", "report.pdf")}, format="multipart")
    assert response.status_code == 400 and "not an image" in response.json()["error"]
    huge = _upload(_png_header_only(20_000, 20_000), "scan.png")
    response = api.post("/api/detect/", {"image": huge}, format="multipart")
    assert response.status_code == 400
    assert "400,000,000 pixels; the limit is 40,000,000 pixels" in response.json()["error"]
    assert api.post("/api/detect/", {}, format="multipart").status_code == 400


def test_api_needs_the_lab_staff_role(outsider, detector):
    client = APIClient()
    assert client.post("/api/detect/", {"image": _upload()}, format="multipart").status_code in (401, 403)
    client.force_authenticate(outsider)
    assert client.post("/api/detect/", {"image": _upload()}, format="multipart").status_code == 403


def test_no_active_detector_is_a_clear_error(api, tree):
    response = api.post("/api/detect/", {"image": _upload()}, format="multipart")
    assert response.status_code == 400 and "No detector is active" in response.json()["error"]


def test_page_draws_boxes_with_per_class_toggles_and_classifies_white_cells(lab_client, detector, tiny_model_set):
    page = lab_client.get("/detection/")
    assert page.status_code == 200 and b"BCCD default" in page.content and b'id="detect-form"' in page.content
    response = lab_client.post("/detection/detect/", {"image": _upload()}, HTTP_HX_REQUEST="true", HTTP_HX_TARGET="result")
    html = response.content.decode()
    assert response.status_code == 200 and "<html" not in html
    assert html.count('data-class="WBC"') == 1 and html.count('data-class="RBC"') >= 5
    assert 'data-toggle-class="RBC"' in html and 'data-toggle-class="Platelets"' in html
    assert 'class="wbc-code"' in html and "data:image/png;base64," in html
    assert "<script>" not in html


def test_page_explains_a_bad_upload(lab_client, detector):
    response = lab_client.post("/detection/detect/", {"image": _upload(b"hello", "notes.txt")},
                               HTTP_HX_REQUEST="true", HTTP_HX_TARGET="result")
    # 200: htmx swaps only 2xx answers into the page's result area
    assert response.status_code == 200 and b"cannot be analysed: not an image" in response.content


def test_detect_command_writes_json_and_png(tmp_path, detector, tiny_model_set):
    out = io.StringIO()
    call_command("detect", str(SMEAR), json=str(tmp_path / "r.json"), png=str(tmp_path / "r.png"), stdout=out)
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["counts"]["WBC"] == 1 and "white cell at" in out.getvalue()
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(CommandError, match="does not exist"):
        call_command("detect", str(tmp_path / "missing.jpg"))


def test_evaluate_command_reports_map_per_class(tmp_path, detector):
    call_command("evaluate_detector", str(DEMO / "bccd"), model=detector.pk, format="voc", split="test",
                 json=str(tmp_path / "m.json"), stdout=io.StringIO())
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert {"map50", "map50_95", "per_class", "n_images"} <= set(metrics)
    assert metrics["n_images"] == 2 and set(metrics["per_class"]) == {"Platelets", "RBC", "WBC"}
    assert metrics["per_class"]["WBC"] > 0.9 and 0 < metrics["map50_95"] <= metrics["map50"] <= 1
    assert all(box["score"] >= 0.5 and box["image"].endswith(".jpg") for box in metrics["unmatched_sure"])
    by_name = tmp_path / "by-name.json"
    call_command("evaluate_detector", str(DEMO / "bccd"), "--model", detector.name, "--format", "voc", "--split", "test",
                 "--json", str(by_name), stdout=io.StringIO())
    assert json.loads(by_name.read_text()) == metrics
    with pytest.raises(CommandError, match="No detector with id or name '999'"):
        call_command("evaluate_detector", str(DEMO / "bccd"), model=999, format="voc")


def test_setup_demo_imports_the_demo_smears_and_installs_the_shipped_detector(settings, tree):
    from apps.detection.models import DetectionDataset
    from apps.detection.services import install_shipped_detector, setup_demo_detection

    lines = setup_demo_detection(DEMO / "bccd")
    assert DetectionDataset.objects.get(name="Demo BCCD").images.count() == 10 and "Demo BCCD" in lines[0]
    assert setup_demo_detection(DEMO / "bccd") == []  # runs again harmlessly
    # MODELS_DIR is elsewhere (a volume): the shipped file is copied in and registered there.
    assert install_shipped_detector().endswith("registered and active.")
    active = Detector.objects.active()
    assert active.name == "BCCD YOLOv8n (default)"
    assert active.path.resolve().is_relative_to(settings.MODELS_DIR.resolve()) and active.path.is_file()
    assert "test" in active.metrics
    assert install_shipped_detector().endswith("registered and active.")


def test_a_curator_switches_the_active_detector_and_detections_use_it(api, detector, lab_user, curator):
    from django.test import Client

    spare = register_detector(SHIPPED, name="BCCD spare")
    assert not spare.is_active and Detector.objects.active() == detector  # registering alone changes nothing
    lab, cura = Client(), Client()
    lab.force_login(lab_user)
    cura.force_login(curator)
    activate = f"/detection/detectors/{spare.pk}/activate/"
    assert f'action="{activate}"' not in lab.get("/detection/").content.decode()
    assert lab.post(activate).status_code in (302, 403)
    assert cura.get(activate).status_code == 405
    assert list(Detector.objects.filter(is_active=True)) == [detector]
    assert f'action="{activate}"' in cura.get("/detection/").content.decode()

    response = cura.post(activate)
    assert response.status_code == 302 and response.url == "/detection/"
    assert list(Detector.objects.filter(is_active=True)) == [spare]
    page = lab.get("/detection/").content.decode()
    assert "Detector in use: <strong>BCCD spare</strong>" in page
    assert f'action="/detection/detectors/{detector.pk}/activate/"' not in page  # lab staff only look
    data = api.post("/api/detect/", {"image": _upload()}, format="multipart").json()
    assert data["detector"] == "BCCD spare" and data["counts"]["WBC"] == 1
