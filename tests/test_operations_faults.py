"""Faults that must leave stored data intact: a full disk during an import."""

import os
import subprocess

import pytest

from apps.cells.models import Cell, Dataset
from apps.cells.services import ImportError_, import_cells


@pytest.fixture
def small_disk(tmp_path, settings):
    """MEDIA_ROOT on a real 1 MiB filesystem (tmpfs), so that writes fail with ENOSPC."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)], check=True)
    settings.MEDIA_ROOT = mount_point
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=False)


@pytest.mark.django_db
def test_full_disk_during_import_stores_nothing_and_keeps_earlier_data(tree, demo_pbc, small_disk):
    first = sorted((demo_pbc / "basophil").glob("*.jpg"))[:2]
    staging = small_disk.parent / "first"
    (staging / "BAS").mkdir(parents=True)
    for path in first:
        (staging / "BAS" / path.name).write_bytes(path.read_bytes())
    assert import_cells(staging, dataset="Before").imported == 2
    kept = {cell.image.name: (small_disk / cell.image.name).read_bytes() for cell in Cell.objects.all()}

    with pytest.raises(ImportError_, match="could not take .*No space left on device"):
        import_cells(demo_pbc, dataset="Too big", labels_csv=(demo_pbc / "labels.csv").read_bytes(),
                     label_map_csv=(demo_pbc / "label_map.csv").read_bytes())

    assert not Dataset.objects.filter(name="Too big").exists()
    assert Cell.objects.count() == 2
    files = sorted(str(p.relative_to(small_disk)) for p in small_disk.rglob("*") if p.is_file())
    assert files == sorted(kept)
    assert all((small_disk / name).read_bytes() == data for name, data in kept.items())
