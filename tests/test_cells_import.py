"""Importing image collections: real PBC images, and every kind of bad input the issue lists."""

import io
import zipfile
from pathlib import Path

import pytest
from django.core.files.storage import default_storage
from django.core.management import CommandError, call_command

from apps.cells.models import Cell, Dataset, LabelMapping
from apps.cells.services import ImportError_, import_cells

pytestmark = pytest.mark.django_db


def _import(source, **kwargs):
    kwargs.setdefault("dataset", "Test")
    return import_cells(source, **kwargs)


def _zip(entries: dict[str, bytes]) -> io.BytesIO:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    buffer.seek(0)
    return buffer


def _jpeg(demo_pbc: Path, index: int = 0) -> bytes:
    return sorted((demo_pbc / "basophil").glob("*.jpg"))[index].read_bytes()


def test_import_with_labels_csv_and_label_map_maps_to_tree_codes(tree, demo_pbc):
    report = _import(demo_pbc, labels_csv=(demo_pbc / "labels.csv").read_bytes(),
                     label_map_csv=(demo_pbc / "label_map.csv").read_bytes())
    assert report.imported == 130 and report.duplicates == 0 and report.skipped == []
    assert report.per_type["NGS"] == 10 and report.per_type["NEU"] == 10 and report.per_type["MYI"] == 10
    assert Cell.objects.filter(dataset__name="Test").count() == 130
    cell = Cell.objects.filter(original_label="SNE").first()
    assert cell.cell_type.code == "NGS" and cell.width == 360 and len(cell.sha256) == 64
    assert default_storage.exists(cell.image.name)
    assert LabelMapping.objects.filter(dataset__name="Test").count() == 13


def test_pbc_folder_names_and_file_labels_need_no_label_map(tree, demo_pbc):
    # the PBC layout as published: English folder names (basophil, ig, ...), no label map
    by_folder = _import(demo_pbc)
    assert by_folder.imported == 130 and {path for path, _ in by_folder.skipped} == {"labels.csv", "label_map.csv"}
    assert by_folder.per_type == {"BAS": 10, "EOS": 10, "EBO": 10, "MYI": 40, "LYT": 10, "MON": 10, "NEU": 30,
                                  "PLT": 10}
    # its file-name labels (BA, SNE, MY, IG, ...) match the default aliases: the same 13 codes as the label map
    Cell.objects.all().delete()
    by_label = _import(demo_pbc, labels_csv=(demo_pbc / "labels.csv").read_bytes())
    mapped = _import(demo_pbc, dataset="Mapped", labels_csv=(demo_pbc / "labels.csv").read_bytes(),
                     label_map_csv=(demo_pbc / "label_map.csv").read_bytes())
    assert by_label.imported == 130 and mapped.duplicates == 130
    assert by_label.per_type["NGS"] == 10 and by_label.per_type["MYB"] == 10 and len(by_label.per_type) == 13


def test_labels_match_names_and_aliases_without_regard_to_case_or_plural(tree, demo_pbc):
    report = _import(_zip({"Segmented_Neutrophils/a.jpg": _jpeg(demo_pbc, 0), "THROMBOCYTES/b.jpg": _jpeg(demo_pbc, 1),
                           "immature-granulocyte/c.jpg": _jpeg(demo_pbc, 2)}))
    assert report.per_type == {"NGS": 1, "PLT": 1, "MYI": 1}


def test_an_alias_that_another_type_already_uses_is_refused_and_never_matches(tree, demo_pbc):
    from django.core.exceptions import ValidationError

    from apps.cells.services import label_lookup

    lymphocyte = tree["LYT"]
    lymphocyte.aliases = "LY, ig"
    with pytest.raises(ValidationError, match=r"ig \(MYI\)"):
        lymphocyte.full_clean()
    lymphocyte.save()  # saved past the form: the shared label is left out rather than guessed
    lookup = label_lookup(tree.values())
    assert "ig" not in lookup and lookup["ly"] == "LYT"
    report = _import(_zip({"ig/a.jpg": _jpeg(demo_pbc, 0)}))
    assert report.imported == 0 and "unknown label 'ig'" in report.skipped[0][1]


def test_a_datasets_stored_label_map_serves_its_later_imports(tree, demo_pbc):
    _import(_zip({"X1/a.jpg": _jpeg(demo_pbc, 0)}), label_map_csv=b"label,cell_type_code\nX1,EOS\n")
    later = _import(_zip({"X1/b.jpg": _jpeg(demo_pbc, 1)}))
    other = _import(_zip({"X1/c.jpg": _jpeg(demo_pbc, 2)}), dataset="Other")
    assert later.per_type == {"EOS": 1} and other.imported == 0


def test_second_import_of_the_same_source_imports_nothing(tree, demo_pbc):
    args = dict(labels_csv=(demo_pbc / "labels.csv").read_bytes(), label_map_csv=(demo_pbc / "label_map.csv").read_bytes())
    _import(demo_pbc, **args)
    again = _import(demo_pbc, **args)
    assert again.imported == 0 and again.duplicates == 130
    assert Cell.objects.count() == 130


def test_folder_per_label_with_tree_codes(tree, demo_pbc, tmp_path):
    for code in ("BAS", "EOS"):
        (tmp_path / "set" / code).mkdir(parents=True)
    (tmp_path / "set" / "BAS" / "a.jpg").write_bytes(_jpeg(demo_pbc, 0))
    (tmp_path / "set" / "EOS" / "b.jpg").write_bytes(sorted((demo_pbc / "eosinophil").glob("*.jpg"))[0].read_bytes())
    report = _import(tmp_path / "set")
    assert report.imported == 2
    assert set(Cell.objects.values_list("cell_type__code", flat=True)) == {"BAS", "EOS"}


def test_zip_upload_with_label_folders(tree, demo_pbc):
    report = _import(_zip({"BAS/a.jpg": _jpeg(demo_pbc, 0), "BAS/b.jpg": _jpeg(demo_pbc, 1)}))
    assert report.imported == 2


def test_non_image_named_jpg_is_skipped_with_reason(tree, demo_pbc):
    archive = _zip({"BAS/.DS_Store": b"\x00\x00\x00\x01Bud1", "BAS/fake.jpg": b"\x00\x00\x00\x01Bud1" * 50,
                    "BAS/ok.jpg": _jpeg(demo_pbc)})
    report = _import(archive)
    assert report.imported == 1
    assert [(name, "not an image" in reason) for name, reason in report.skipped] == [("BAS/fake.jpg", True)]


def test_truncated_jpeg_is_skipped(tree, demo_pbc):
    data = _jpeg(demo_pbc)
    report = _import(_zip({"BAS/cut.jpg": data[: len(data) // 2], "BAS/ok.jpg": data}))
    assert report.imported == 1
    assert "truncated" in report.skipped[0][1]


def test_image_over_pixel_limit_is_skipped_before_decoding(tree, settings):
    from PIL import Image

    settings.HEMOWEB_MAX_IMAGE_PIXELS = 1000 * 1000
    buffer = io.BytesIO()
    Image.new("RGB", (2000, 2000), "white").save(buffer, "PNG")
    report = _import(_zip({"BAS/huge.png": buffer.getvalue()}))
    assert report.imported == 0
    assert "over the limit" in report.skipped[0][1]


@pytest.mark.parametrize("name", ["../evil.jpg", "/etc/evil.jpg", "BAS/../../evil.jpg"])
def test_zip_with_path_traversal_is_refused_and_changes_nothing(tree, demo_pbc, name):
    with pytest.raises(ImportError_, match="outside the archive|absolute path"):
        _import(_zip({"BAS/ok.jpg": _jpeg(demo_pbc), name: _jpeg(demo_pbc, 1)}))
    assert Cell.objects.count() == 0 and not Dataset.objects.exists()


def test_zip_bomb_is_refused(tree):
    bomb = _zip({"BAS/bomb.jpg": b"\0" * (20 * 1024 * 1024)})
    with pytest.raises(ImportError_, match="zip bomb"):
        _import(bomb)
    assert Cell.objects.count() == 0


def test_unknown_label_is_skipped_with_reason(tree, demo_pbc):
    report = _import(_zip({"XYZ/a.jpg": _jpeg(demo_pbc), "BAS/b.jpg": _jpeg(demo_pbc, 1)}))
    assert report.imported == 1
    assert "unknown label 'XYZ'" in report.skipped[0][1]


def test_label_map_naming_a_code_not_in_the_tree_stops_the_import(tree, demo_pbc):
    with pytest.raises(ImportError_, match="not in the tree: NOPE"):
        _import(demo_pbc, labels_csv=(demo_pbc / "labels.csv").read_bytes(), label_map_csv=b"label,cell_type_code\nBA,NOPE\n")
    assert Cell.objects.count() == 0


def test_csv_naming_a_missing_file_reports_it(tree, demo_pbc):
    rows = (demo_pbc / "labels.csv").read_text().splitlines()[:3] + ["basophil/missing.jpg,basophil,BA,0"]
    report = _import(demo_pbc, labels_csv="\n".join(rows), label_map_csv=(demo_pbc / "label_map.csv").read_bytes())
    assert report.imported == 2
    assert report.skipped == [("basophil/missing.jpg", "listed in the labels CSV but not found in the source")]


def test_failure_midway_rolls_back_rows_and_files(tree, demo_pbc, monkeypatch):
    from apps.cells import services

    calls = {"n": 0}
    real_check = services.check_image

    def failing_check(data, max_pixels):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("disk gone")
        return real_check(data, max_pixels)

    monkeypatch.setattr(services, "check_image", failing_check)
    with pytest.raises(RuntimeError):
        _import(demo_pbc, labels_csv=(demo_pbc / "labels.csv").read_bytes(),
                label_map_csv=(demo_pbc / "label_map.csv").read_bytes())
    assert Cell.objects.count() == 0 and not Dataset.objects.exists()
    media = Path(default_storage.location)
    assert not media.exists() or not any(p.is_file() for p in media.rglob("*"))


def test_import_keeps_what_was_stored_before(tree, demo_pbc):
    _import(_zip({"BAS/a.jpg": _jpeg(demo_pbc)}))
    with pytest.raises(ImportError_):
        _import(_zip({"../x.jpg": _jpeg(demo_pbc, 1)}))
    assert Cell.objects.count() == 1


def test_command_prints_summary_and_errors_clearly(tree, demo_pbc, tmp_path, capsys):
    call_command("import_cells", str(demo_pbc), "--dataset", "Cmd", "--labels", str(demo_pbc / "labels.csv"),
                 "--label-map", str(demo_pbc / "label_map.csv"))
    out = capsys.readouterr().out
    assert "imported 130, duplicates 0, skipped 0" in out
    with pytest.raises(CommandError, match="does not exist"):
        call_command("import_cells", str(tmp_path / "nothing.zip"), "--dataset", "Cmd")


def test_import_requires_a_seeded_tree(db, demo_pbc):
    with pytest.raises(ImportError_, match="seed_cell_tree"):
        _import(demo_pbc)
