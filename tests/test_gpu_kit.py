"""The GPU kit: pack a stored dataset here, then train and score a set from the pack without Django."""

import csv
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from apps.cells.models import Cell

ROOT = Path(__file__).resolve().parent.parent
NO_DJANGO = "import sys, runpy\nfor name in ('django', 'rest_framework', 'captum', 'ultralytics'): sys.modules[name] = None\n"


@pytest.mark.django_db
def test_a_pack_trains_a_set_with_the_ml_core_alone(pbc_dataset, tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))
    import pack

    monkeypatch.setattr(sys, "argv", ["pack.py", "--dataset", pbc_dataset.name, "--size", "32", "--out",
                                      str(tmp_path / "pack")])
    pack.main()
    with open(tmp_path / "pack" / "cells.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    stored = {f"images/{pk}.webp": (code, split) for pk, code, split in
              Cell.objects.filter(dataset=pbc_dataset).values_list("pk", "cell_type__code", "split")}
    assert len(rows) == len(stored) == 130
    assert all(stored[row["path"]] == (row["label"], row["split"]) for row in rows)  # the database's splits
    assert {row["split"] for row in rows} == {"train", "val", "test"}

    out = tmp_path / "out"
    script = NO_DJANGO + f"sys.argv = ['train_set.py', '--pack', {str(tmp_path / 'pack')!r}, '--out', {str(out)!r}, " \
        "'--device', 'cpu', '--epochs', '1', '--max-steps', '1', '--workers', '1', '--mode', 'scratch', " \
        "'--arch', 'mobilenetv3_small_100']\n" \
        f"runpy.run_path({str(ROOT / 'benchmarks' / 'gpu' / 'train_set.py')!r}, run_name='__main__')\n"
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, timeout=600, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "train_set.json").read_text())
    test_cells = sum(row["split"] == "test" for row in rows)
    assert report["test_on_packed_images"]["n"] == test_cells
    assert report["config"]["shared_backbone"] and report["config"]["image_size"] == 32
    with tarfile.open(out / "set.tar") as tar:
        names = tar.getnames()
    assert "pbc-lite0-gpu/backbone.safetensors" in names and "pbc-lite0-gpu/set.json" in names
    assert not any("checkpoints" in name for name in names)
