"""Writes to the cell tree and datasets: seeding the tree, importing image collections, relabelling."""

import csv
import hashlib
import io
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import transaction
from simple_history.utils import bulk_update_with_history

from hemoweb.ml.loinc import DEFAULT_LOINC
from hemoweb.ml.sources import BadImage, ImageSource, Limits, SourceError, check_image
from hemoweb.ml.tree import DEFAULT_ALIASES, DEFAULT_TREE

from .models import Cell, CellType, Dataset, LabelMapping, Split, label_key

log = logging.getLogger(__name__)
BATCH = 500


class ImportError_(ValueError):
    """The import cannot start or had to stop; nothing was stored."""


def upload_limits() -> Limits:
    return Limits(
        max_entries=settings.HEMOWEB_ZIP_MAX_ENTRIES,
        max_uncompressed=settings.HEMOWEB_ZIP_MAX_UNCOMPRESSED,
        max_ratio=settings.HEMOWEB_ZIP_MAX_RATIO,
        max_entry_bytes=settings.HEMOWEB_ZIP_MAX_ENTRY_BYTES,
        max_pixels=settings.HEMOWEB_MAX_IMAGE_PIXELS,
    )


@transaction.atomic
def seed_cell_tree() -> tuple[int, int]:
    """Create the default tree's missing nodes; existing nodes (maybe renamed or moved) stay as curated.

    Returns (created, already present).
    """
    existing = {node.code: node for node in CellType.objects.all()}
    created = 0
    for order, (code, name, parent_code) in enumerate(DEFAULT_TREE):
        if code in existing:
            continue
        automated, manual = DEFAULT_LOINC.get(code, ("", ""))
        existing[code] = CellType.objects.create(
            code=code, name=name, parent=existing.get(parent_code) if parent_code else None, order=order,
            aliases=", ".join(DEFAULT_ALIASES.get(code, ())), loinc_code=automated, loinc_manual_code=manual,
        )
        created += 1
    return created, len(DEFAULT_TREE) - created


@dataclass
class ImportReport:
    dataset: str
    imported: int = 0
    duplicates: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    per_type: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [
            f"Dataset {self.dataset}: imported {self.imported}, duplicates {self.duplicates}, skipped {len(self.skipped)}."
        ]
        if self.per_type:
            lines.append("Per cell type: " + ", ".join(f"{code} {n}" for code, n in sorted(self.per_type.items())))
        lines += [f"  skipped {name}: {reason}" for name, reason in self.skipped]
        return "\n".join(lines)


def read_csv_rows(data: bytes | str, required: tuple[str, ...], what: str) -> list[dict[str, str]]:
    """Rows of a CSV with a header naming at least `required`, stripped; a clear error otherwise."""
    text = data.decode("utf-8-sig") if isinstance(data, bytes) else data
    reader = csv.DictReader(io.StringIO(text))
    header = [name.strip() for name in reader.fieldnames or []]
    missing = [name for name in required if name not in header]
    if missing:
        raise ImportError_(f"The {what} CSV needs the columns {', '.join(required)}; it lacks {', '.join(missing)}.")
    reader.fieldnames = header
    return [{key: (value or "").strip() for key, value in row.items() if key} for row in reader]


def load_label_map(data: bytes | str | None) -> dict[str, str]:
    """{raw label: tree code} from a `label,cell_type_code` CSV; every code must be in the tree."""
    if data is None:
        return {}
    rows = read_csv_rows(data, ("label", "cell_type_code"), "label map")
    codes = set(CellType.objects.values_list("code", flat=True))
    unknown = sorted({row["cell_type_code"] for row in rows} - codes)
    if unknown:
        raise ImportError_(f"The label map names cell-type codes that are not in the tree: {', '.join(unknown)}.")
    return {row["label"]: row["cell_type_code"] for row in rows}


def labelled_entries(source: ImageSource, labels_csv: bytes | str | None) -> tuple[list[tuple[str, str, dict]], list]:
    """(path, raw label, extra columns) per file, plus files skipped before reading them."""
    skipped = []
    if labels_csv is not None:
        rows = read_csv_rows(labels_csv, ("path", "label"), "labels")
        entries = []
        for row in rows:
            path = row["path"].replace("\\", "/")
            if not source.exists(path):
                skipped.append((path, "listed in the labels CSV but not found in the source"))
                continue
            entries.append((path, row["label"], row))
        return entries, skipped
    entries = []
    for file in source.files():
        parts = PurePosixPath(file.path).parts
        if len(parts) < 2:
            skipped.append((file.path, "not inside a label folder (lay out one sub-folder per label, or give a labels CSV)"))
            continue
        entries.append((file.path, parts[-2], {}))
    return entries, skipped


def import_cells(
    source: Path | str | io.IOBase,
    *,
    dataset: str,
    labels_csv: bytes | str | None = None,
    label_map_csv: bytes | str | None = None,
    source_description: str = "",
    licence: str = "",
    progress: Callable[[int, int], None] | None = None,
) -> ImportReport:
    """Import a folder or .zip of labelled cell images into `dataset`, all or nothing.

    Files that are not usable images, duplicates (same sha256) and labels that map to no tree
    node are skipped and reported; anything that stops the run midway rolls back every row and
    removes every file it wrote.
    """
    label_map = load_label_map(label_map_csv)
    types = {node.code: node for node in CellType.objects.all()}
    if not types:
        raise ImportError_("The cell-type tree is empty: run `python manage.py seed_cell_tree` first.")
    limits = upload_limits()
    try:
        image_source = ImageSource(source, limits)
    except SourceError as error:
        raise ImportError_(str(error)) from error
    written: list[str] = []
    try:
        with image_source, transaction.atomic():
            report = _import(image_source, dataset, labels_csv, label_map, types, limits, written, progress,
                             source_description, licence)
    except (SourceError, ImportError_) as error:
        _remove(written)
        raise ImportError_(str(error)) from error
    except BaseException:
        _remove(written)
        raise
    log.info("import %s", report.summary().splitlines()[0])
    return report


def _import(source, dataset_name, labels_csv, label_map, types, limits, written, progress, description, licence):
    dataset, _ = Dataset.objects.get_or_create(
        name=dataset_name, defaults={"source": description, "licence": licence}
    )
    for raw, code in label_map.items():
        LabelMapping.objects.update_or_create(dataset=dataset, raw_label=raw, defaults={"cell_type": types[code]})
    # the dataset's stored mappings (from earlier imports or the admin) serve later imports too
    label_map = dict(dataset.label_mappings.values_list("raw_label", "cell_type__code"))
    entries, skipped = labelled_entries(source, labels_csv)
    lookup = label_lookup(types.values())
    report = ImportReport(dataset=dataset.name, skipped=skipped)
    seen: set[str] = set()
    pending: list[Cell] = []
    for done, (path, raw_label, extra) in enumerate(entries, 1):
        code = resolve_label(raw_label, label_map, lookup)
        if code is None:
            report.skipped.append((path, f"unknown label {raw_label!r}: not a tree code, name or alias and not in the label map"))
            continue
        try:
            data = source.read(path)
        except BadImage as error:
            report.skipped.append((path, str(error)))
            continue
        digest = hashlib.sha256(data).hexdigest()
        if digest in seen or Cell.objects.filter(sha256=digest).exists():
            report.duplicates += 1
            continue
        try:
            info = check_image(data, limits.max_pixels)
        except BadImage as error:
            report.skipped.append((path, str(error)))
            continue
        seen.add(digest)
        extension = {"JPEG": "jpg", "PNG": "png", "TIFF": "tif", "BMP": "bmp"}[info.format]
        name = store_file(f"cells/{digest[:2]}/{digest}.{extension}", data)
        written.append(name)
        pending.append(
            Cell(
                image=name,
                cell_type=types[code],
                dataset=dataset,
                split=extra.get("split", "") if extra.get("split", "") in Split.values else "",
                original_label=raw_label,
                original_name=path[-255:],
                width=info.width,
                height=info.height,
                sha256=digest,
                patient_id=extra.get("patient_id", ""),
                slide_id=extra.get("slide_id", ""),
            )
        )
        if len(pending) >= BATCH:
            _flush(pending, report)
        if progress and done % 100 == 0:
            progress(done, len(entries))
    _flush(pending, report)
    if progress:
        progress(len(entries), len(entries))
    return report


def store_file(name: str, data: bytes) -> str:
    """Save bytes to media storage; a full or read-only disk becomes an ImportError_ and leaves no partial file."""
    existed = default_storage.exists(name)
    try:
        return default_storage.save(name, ContentFile(data))
    except OSError as error:
        if not existed:
            _remove([name])
        raise ImportError_(f"The image storage could not take {name}: {error.strerror or error}.") from error


def label_lookup(types: Iterable[CellType]) -> dict[str, str]:
    """{case-folded label: tree code} for every type's code, name and aliases; a label two types share is left out."""
    lookup, shared = {}, set()
    for cell_type in types:
        for label in cell_type.labels:
            key = label_key(label)
            if lookup.setdefault(key, cell_type.code) != cell_type.code:
                shared.add(key)
    return {key: code for key, code in lookup.items() if key not in shared}


def resolve_label(raw_label: str, label_map: dict[str, str], lookup: dict[str, str]) -> str | None:
    """The tree code for a raw label: through the label map, else a type's code, name or alias (plurals too)."""
    if raw_label in label_map:
        return label_map[raw_label]
    key = label_key(raw_label)
    return lookup.get(key) or (lookup.get(key[:-1]) if key.endswith("s") else None)


def _flush(pending: list[Cell], report: ImportReport) -> None:
    Cell.objects.bulk_create(pending)
    for cell in pending:
        report.per_type[cell.cell_type.code] = report.per_type.get(cell.cell_type.code, 0) + 1
    report.imported += len(pending)
    pending.clear()


def _remove(names: list[str]) -> None:
    for name in names:
        try:
            default_storage.delete(name)
        except OSError:
            log.warning("could not remove %s after a failed import", name)


@transaction.atomic
def relabel_cells(cell_ids: list[int], cell_type: CellType, *, user=None) -> int:
    """Give the cells a new label, recorded in their history; returns how many changed."""
    cells = list(Cell.objects.filter(pk__in=cell_ids).exclude(cell_type=cell_type))
    for cell in cells:
        cell.cell_type = cell_type
        cell._history_user = user
    bulk_update_with_history(cells, Cell, ["cell_type"], batch_size=BATCH, default_user=user,
                             default_change_reason="relabel")
    return len(cells)
