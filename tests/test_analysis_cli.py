"""python manage.py classify SOURCE [--models SET] --csv OUT."""

import csv
import io

import pytest
from django.core.management import CommandError, call_command

from apps.analysis.models import ClassificationRun
from tests.test_analysis_services import demo_images, demo_zip


def test_classify_a_folder_with_the_active_set_writes_one_row_per_cell(tiny_model_set, tmp_path):
    source = tmp_path / "cells"
    source.mkdir()
    for path in demo_images(1):
        (source / path.name).write_bytes(path.read_bytes())
    (source / "readme.txt").write_text("not an image")
    out, err = io.StringIO(), io.StringIO()
    call_command("classify", str(source), csv=str(tmp_path / "out.csv"), stdout=out, stderr=err)
    rows = list(csv.DictReader((tmp_path / "out.csv").open()))
    assert len(rows) == 8 and {row["model_set"] for row in rows} == {"tiny"}
    assert all(row["path"] and row["final"] for row in rows)
    assert "8 cells classified, 1 skipped" in out.getvalue() and "readme.txt" in err.getvalue()
    assert ClassificationRun.objects.get().owner is None


def test_classify_a_zip_with_a_set_folder_under_models(tiny_model_set, tmp_path, settings):
    archive = tmp_path / "sample.zip"
    archive.write_bytes(demo_zip(1))
    tiny_model_set.delete()  # an unregistered folder under MODELS_DIR works too
    call_command("classify", str(archive), models="tiny", csv=str(tmp_path / "out.csv"), stdout=io.StringIO())
    run = ClassificationRun.objects.get()
    assert run.model_set is None and run.model_set_name == "tiny" and run.cells.count() == 8


def test_classify_without_an_active_set_or_with_corrupt_weights_says_why(tree, tmp_path, tiny_model_set):
    archive = tmp_path / "sample.zip"
    archive.write_bytes(demo_zip(1))
    with pytest.raises(CommandError, match="No model set named 'nope'"):
        call_command("classify", str(archive), models="nope", csv=str(tmp_path / "o.csv"))
    (tiny_model_set.path / "ROOT.safetensors").write_bytes(b"broken")
    with pytest.raises(CommandError, match="corrupt"):
        call_command("classify", str(archive), csv=str(tmp_path / "o.csv"))
    tiny_model_set.delete()
    with pytest.raises(CommandError, match="No model set is active"):
        call_command("classify", str(archive), csv=str(tmp_path / "o.csv"))
    assert not (tmp_path / "o.csv").exists()
