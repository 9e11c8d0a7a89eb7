"""Importing annotated smears (Pascal VOC and YOLO): good data kept, each kind of bad input skipped and reported."""

import io
import re
import shutil
import zipfile
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from apps.detection.models import Box, DetectionDataset, DetectionImage
from apps.detection.services import DetectionInputError, import_detections
from hemoweb.ml import detect as ml

from .conftest import copy_demo

pytestmark = pytest.mark.django_db


def _edit_xml(root: Path, stem: str, pattern: str, replacement: str, count: int = 1) -> None:
    path = root / "BCCD" / "Annotations" / f"{stem}.xml"
    text, n = re.subn(pattern, replacement, path.read_text(), count=count, flags=re.S)
    assert n, f"{pattern} not in {path}"
    path.write_text(text)


def test_voc_import_keeps_boxes_and_splits(demo_bccd):
    report = import_detections(demo_bccd, dataset="Demo BCCD", fmt="voc")
    dataset = DetectionDataset.objects.get(name="Demo BCCD")
    assert dataset.classes == ["Platelets", "RBC", "WBC"]
    assert report.imported == 10 and report.problems == []
    assert report.per_class == {"Platelets": 9, "RBC": 163, "WBC": 10}
    assert Box.objects.filter(image__dataset=dataset).count() == 182
    splits = dict(DetectionImage.objects.filter(dataset=dataset).values_list("original_name", "split"))
    assert splits["BloodImage_00007.jpg"] == "test" and splits["BloodImage_00000.jpg"] == "val"
    assert splits["BloodImage_00001.jpg"] == "train"
    image = DetectionImage.objects.get(dataset=dataset, original_name="BloodImage_00000.jpg")
    assert (image.width, image.height) == (640, 480) and len(image.sha256) == 64
    # Importing again adds nothing.
    again = import_detections(demo_bccd, dataset="Demo BCCD", fmt="voc")
    assert again.imported == 0 and again.duplicates == 10


def test_voc_import_skips_bad_boxes_and_reports_them(tmp_path):
    root = copy_demo(tmp_path, "bccd")
    # A box outside the 640×480 image, a zero-size box, a class outside the dataset's classes.
    _edit_xml(root, "BloodImage_00001", r"<xmax>\d+</xmax>", "<xmax>700</xmax>")
    _edit_xml(root, "BloodImage_00003", r"<xmax>(\d+)</xmax>(\s*)<ymax>\d+</ymax>", r"<xmax>\1</xmax>\2<ymax>0</ymax>")
    _edit_xml(root, "BloodImage_00004", r"<name>RBC</name>", "<name>Neutrophil</name>")
    # An image whose boxes are all gone stays as a negative.
    _edit_xml(root, "BloodImage_00005", r"<object>.*</object>", "")
    # A VOC file naming an image that is not there.
    (root / "BCCD" / "JPEGImages" / "BloodImage_00006.jpg").unlink()
    # A file that is not XML at all.
    (root / "BCCD" / "Annotations" / "broken.xml").write_text("<annotation><object>")
    report = import_detections(root, dataset="Damaged", fmt="voc", classes=["RBC", "WBC", "Platelets"])
    problems = "\n".join(report.problems)
    assert "lies outside the 640×480 image" in problems
    assert "has zero size" in problems
    assert "unknown class 'Neutrophil'" in problems
    assert "BloodImage_00006.jpg, which is missing" in problems
    assert "broken.xml: not valid XML" in problems
    assert report.skipped_boxes == 3
    assert report.imported == 9 and report.negatives == 1
    negative = DetectionImage.objects.get(dataset__name="Damaged", original_name="BloodImage_00005.jpg")
    assert negative.boxes.count() == 0
    assert not Box.objects.filter(label="Neutrophil").exists()


def test_yolo_import_reads_names_and_skips_unknown_class_numbers(tmp_path, demo_bccd):
    read = ml.read_voc(demo_bccd)
    data_yaml = ml.export_yolo(read.images, read.classes, tmp_path / "yolo")
    # export_yolo links images; a YOLO source for import needs real files and a line with a bad class.
    folder = tmp_path / "yolo"
    for link in folder.rglob("*.jpg"):
        target = link.resolve()
        link.unlink()
        shutil.copyfile(target, link)
    label = sorted((folder / "labels" / "train").glob("*.txt"))[0]
    label.write_text(label.read_text() + "7 0.5 0.5 0.1 0.1\nnot a box\n")
    assert data_yaml.is_file()
    report = import_detections(folder, dataset="Yolo", fmt="yolo")
    assert report.imported == 8  # train + val of the export
    assert report.skipped_boxes == 2
    assert any("unknown class number 7" in p for p in report.problems)
    dataset = DetectionDataset.objects.get(name="Yolo")
    assert dataset.classes == ["Platelets", "RBC", "WBC"]
    assert set(dataset.images.values_list("split", flat=True)) == {"train", "val"}
    assert Box.objects.filter(image__dataset=dataset).count() == report.boxes > 100


def test_import_command_reports_and_refuses_a_non_dataset(tmp_path, demo_bccd):
    out = io.StringIO()
    call_command("import_detections", str(demo_bccd), dataset="Cmd", format="voc", stdout=out)
    assert "imported 10 images with 182 boxes" in out.getvalue()
    (tmp_path / "empty").mkdir()
    with pytest.raises(CommandError, match="not a Pascal VOC dataset"):
        call_command("import_detections", str(tmp_path / "empty"), dataset="Nothing", format="voc")
    assert not DetectionDataset.objects.filter(name="Nothing").exists()


def test_admin_upload_of_a_voc_zip(curator_client, demo_bccd):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(demo_bccd.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(demo_bccd).as_posix())
    buffer.seek(0)
    buffer.name = "bccd.zip"
    response = curator_client.post("/admin/detection/detectiondataset/import/",
                                   {"archive": buffer, "dataset": "Uploaded", "format": "voc"})
    assert response.status_code == 200
    assert b"Imported 10 images with 182 boxes" in response.content
    assert DetectionImage.objects.filter(dataset__name="Uploaded").count() == 10


def test_a_zip_that_is_not_a_zip_stores_nothing(tmp_path):
    bogus = tmp_path / "smears.zip"
    bogus.write_bytes(b"this is not an archive")
    with pytest.raises(DetectionInputError, match="neither a folder nor a readable .zip"):
        import_detections(bogus, dataset="Bogus", fmt="voc")
    assert not DetectionDataset.objects.exists()
