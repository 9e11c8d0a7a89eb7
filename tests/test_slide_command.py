"""analyse_slide on a folder of BCCD fields: one slide run, CSV rows with field and box, a JSON summary."""

import csv
import json
import shutil

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from apps.analysis.models import ClassificationRun
from apps.detection.services import register_detector

from .conftest import DEMO
from .test_detection_ml import SHIPPED

FIELDS = DEMO / "bccd" / "BCCD" / "JPEGImages"


@pytest.fixture
def detector(db):
    return register_detector(SHIPPED, name="BCCD default")


def test_analyse_slide_writes_a_csv_with_fields_and_boxes_and_a_json_summary(tmp_path, tiny_model_set, detector,
                                                                              capsys):
    slide = tmp_path / "slide"
    slide.mkdir()
    for name in ("BloodImage_00004.jpg", "BloodImage_00005.jpg"):
        shutil.copy(FIELDS / name, slide / name)
    (slide / "readme.txt").write_text("not a field")
    out, summary = tmp_path / "cells.csv", tmp_path / "slide.json"
    call_command("analyse_slide", str(slide), "--accession", "ACC-9", "--specimen", "bone-marrow",
                 "--detector", str(detector.pk), "--models", "tiny", "--csv", str(out), "--json", str(summary))
    printed = capsys.readouterr()
    run = ClassificationRun.objects.get()
    assert run.kind == "slide" and run.accession == "ACC-9" and run.specimen_type == "bone-marrow"
    assert run.detector == detector and run.status == "succeeded"
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert len(rows) == run.cells.count() >= 2
    assert {row["field"] for row in rows} == {"BloodImage_00004.jpg", "BloodImage_00005.jpg"}
    for row in rows:
        cell = run.cells.get(index=int(row["index"]))
        assert [float(row[f"box_{k}"]) for k in ("x1", "y1", "x2", "y2")] == cell.box
    record = json.loads(summary.read_text())
    assert record["run_id"] == run.pk and record["kind"] == "slide" and record["detector"] == "BCCD default"
    assert [f["name"] for f in record["fields"]] == ["BloodImage_00004.jpg", "BloodImage_00005.jpg", "readme.txt"]
    assert "not an image" in record["fields"][2]["error"]
    assert record["slide"]["usable"] == 2 and record["slide"]["red"] == sum(f["n_red"] for f in record["fields"])
    assert record["counts"]["classified"] == len(rows)
    assert f"Run {run.pk}: 3 fields (2 usable)" in printed.out and "field readme.txt: not an image" in printed.err


def test_analyse_slide_refuses_an_unknown_detector_and_a_missing_source(tmp_path, tiny_model_set, detector):
    with pytest.raises(CommandError, match="No detector with the id or name 'other'"):
        call_command("analyse_slide", str(FIELDS), "--detector", "other")
    with pytest.raises(CommandError, match="does not exist"):
        call_command("analyse_slide", str(tmp_path / "nothing"), "--detector", "BCCD default")
    assert not ClassificationRun.objects.exists()
