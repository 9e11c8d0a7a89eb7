"""Tree page, dataset list and gallery, the curator admin pages, and the admin import."""

import io
import zipfile

import pytest

from apps.cells.models import Cell, CellType

pytestmark = pytest.mark.django_db


def test_tree_page_shows_counts_own_and_below(lab_client, pbc_dataset):
    html = lab_client.get("/tree/").content.decode()
    assert "<code>NEU</code> Neutrophil" in html
    assert "10 (30)" in html  # NEU: 10 own, 30 with NGB and NGS
    assert "0 (130)" in html  # ROOT


def test_gallery_groups_by_type_and_filters_with_htmx(lab_client, pbc_dataset):
    page = lab_client.get(f"/datasets/{pbc_dataset.pk}/")
    assert page.status_code == 200 and b"<code>EBO</code> Erythroblast" in page.content
    partial = lab_client.get(f"/datasets/{pbc_dataset.pk}/?type=EOS", HTTP_HX_REQUEST="true", HTTP_HX_TARGET="gallery")
    body = partial.content.decode()
    assert "<html" not in body and "<code>EOS</code>" in body and "<code>BAS</code>" not in body
    assert "10 images" in body


def test_dataset_list_counts(lab_client, pbc_dataset):
    html = lab_client.get("/datasets/").content.decode()
    assert "Demo PBC" in html and "<td>130</td>" in html


def test_admin_tree_lists_counts(curator_client, pbc_dataset):
    html = curator_client.get("/admin/cells/celltype/").content.decode()
    assert "With descendants" in html and "Segmented neutrophil" in html


def test_admin_cell_list_filters_and_relabels(curator_client, pbc_dataset, tree):
    listing = curator_client.get(f"/admin/cells/cell/?dataset__id__exact={pbc_dataset.pk}&split__exact=")
    assert listing.status_code == 200 and b"<img" in listing.content
    ids = list(Cell.objects.filter(cell_type__code="NEU").values_list("pk", flat=True)[:3])
    response = curator_client.post("/admin/cells/cell/", {
        "action": "relabel", "_selected_action": ids, "apply": "1", "cell_type": tree["NGB"].pk,
    })
    assert response.status_code == 302
    assert set(Cell.objects.filter(pk__in=ids).values_list("cell_type__code", flat=True)) == {"NGB"}


def test_admin_cell_fields_are_read_only(curator_client, pbc_dataset):
    cell = Cell.objects.first()
    html = curator_client.get(f"/admin/cells/cell/{cell.pk}/change/").content.decode()
    assert cell.sha256 in html and 'name="sha256"' not in html


def test_admin_dataset_shows_counts_per_type(curator_client, pbc_dataset):
    html = curator_client.get(f"/admin/cells/dataset/{pbc_dataset.pk}/change/").content.decode()
    assert "<code>NGS</code> Segmented neutrophil</td><td>10</td>" in html


def test_admin_zip_import_shows_summary_and_skips(curator_client, tree, demo_pbc):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("BAS/a.jpg", next((demo_pbc / "basophil").glob("*.jpg")).read_bytes())
        archive.writestr("BAS/bad.jpg", b"not an image")
    buffer.seek(0)
    buffer.name = "cells.zip"
    response = curator_client.post("/admin/cells/dataset/import/", {"archive": buffer, "dataset": "Uploaded"})
    html = response.content.decode()
    assert "Imported 1, duplicates 0, skipped 1." in html and "BAS/bad.jpg" in html
    assert Cell.objects.filter(dataset__name="Uploaded").count() == 1


def test_admin_refuses_a_cycle_in_the_tree(curator_client, tree):
    myeloid = tree["MYE"]
    response = curator_client.post(f"/admin/cells/celltype/{myeloid.pk}/change/", {
        "code": "MYE", "name": "Myeloid", "parent": tree["NGS"].pk, "order": 1, "description": "",
    })
    assert b"cannot sit below itself" in response.content
    assert CellType.objects.get(code="MYE").parent.code == "ROOT"


def test_lab_staff_cannot_import(lab_client):
    assert lab_client.get("/admin/cells/dataset/import/").status_code == 302
