"""The cell-type tree, image datasets, their label mappings and the cell images."""

from django.db import models
from simple_history.models import HistoricalRecords
from django.db.models import Count

from apps.sites.defaults import default_site_id
from hemoweb.ml.tree import CellTree


class CellTypeQuerySet(models.QuerySet):
    def as_tree(self) -> CellTree:
        """The whole tree as the ML core's plain CellTree."""
        rows = self.order_by("order", "code").values_list("code", "name", "parent__code")
        return CellTree.from_rows(rows)


def label_key(label: str) -> str:
    """How dataset labels are compared: case, `_`/`-` and spacing aside."""
    return " ".join(label.replace("_", " ").replace("-", " ").split()).casefold()


class CellType(models.Model):
    """A node of the cell-type tree: a lineage, a stage or a cell type."""

    code = models.CharField(max_length=16, unique=True, help_text="Short code used by datasets, e.g. NGS.")
    name = models.CharField(max_length=100)
    parent = models.ForeignKey("self", null=True, blank=True, on_delete=models.PROTECT, related_name="children")
    order = models.PositiveIntegerField(default=0, help_text="Position among its siblings.")
    description = models.TextField(blank=True)
    aliases = models.CharField(
        max_length=255, blank=True,
        help_text="Other labels datasets use for this type, comma-separated (e.g. IG, immature granulocyte). "
                  "Imports match them, the code and the name without regard to case.",
    )

    loinc_code = models.CharField(max_length=20, blank=True, verbose_name="LOINC (automated)",
                                  help_text="LOINC code of this type's percentage in an automated differential.")
    loinc_manual_code = models.CharField(max_length=20, blank=True, verbose_name="LOINC (manual)",
                                         help_text="LOINC code of this type's percentage in a manual (reviewed) "
                                                   "differential.")

    objects = CellTypeQuerySet.as_manager()
    history = HistoricalRecords()  # audit trail: who changed what, when

    class Meta:
        db_table = "CellTypes"
        ordering = ["order", "code"]
        indexes = [models.Index(fields=["parent", "order"])]

    def __str__(self) -> str:
        return f"{self.code} · {self.name}"

    @property
    def alias_list(self) -> list[str]:
        return [alias.strip() for alias in self.aliases.split(",") if alias.strip()]

    @property
    def labels(self) -> list[str]:
        """The labels that mean this type in a dataset: its code, its name and its aliases."""
        return [self.code, self.name, *self.alias_list]

    def clean(self) -> None:
        from django.core.exceptions import ValidationError

        node = self.parent
        while node is not None:
            if node.pk == self.pk:
                raise ValidationError({"parent": "A cell type cannot sit below itself."})
            node = node.parent
        taken = {label_key(label): other.code for other in CellType.objects.exclude(pk=self.pk) for label in other.labels}
        clashes = sorted({f"{alias} ({taken[label_key(alias)]})" for alias in self.alias_list if label_key(alias) in taken})
        if clashes:
            raise ValidationError({"aliases": f"Already the label of another type: {', '.join(clashes)}."})

    def subtree_ids(self) -> list[int]:
        """This node's id and all ids below it."""
        ids, frontier = [self.pk], [self.pk]
        while frontier:
            frontier = list(CellType.objects.filter(parent_id__in=frontier).values_list("pk", flat=True))
            ids.extend(frontier)
        return ids


class Dataset(models.Model):
    """A collection of labelled cell images from one source."""

    name = models.CharField(max_length=100, unique=True)
    source = models.CharField(max_length=255, blank=True, help_text="Where the images came from.")
    licence = models.CharField(max_length=100, blank=True)
    description = models.TextField(blank=True)
    site = models.ForeignKey("sites.Site", null=True, blank=True, default=default_site_id, on_delete=models.SET_NULL,
                             related_name="datasets", help_text="The lab set-up its images come from.")
    created = models.DateTimeField(auto_now_add=True)
    history = HistoricalRecords()

    class Meta:
        db_table = "Datasets"
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def counts_per_type(self):
        return (
            self.cells.values("cell_type__code", "cell_type__name")
            .annotate(n=Count("id"))
            .order_by("cell_type__order", "cell_type__code")
        )


class LabelMapping(models.Model):
    """How a dataset's raw label (e.g. SNE) maps onto a tree code (NGS)."""

    dataset = models.ForeignKey(Dataset, on_delete=models.CASCADE, related_name="label_mappings")
    raw_label = models.CharField(max_length=100)
    cell_type = models.ForeignKey(CellType, on_delete=models.PROTECT, related_name="+")
    history = HistoricalRecords()

    class Meta:
        db_table = "LabelMappings"
        constraints = [models.UniqueConstraint(fields=["dataset", "raw_label"], name="unique_raw_label_per_dataset")]

    def __str__(self) -> str:
        return f"{self.dataset}: {self.raw_label} → {self.cell_type.code}"


class Split(models.TextChoices):
    UNASSIGNED = "", "Unassigned"
    TRAIN = "train", "Train"
    VAL = "val", "Validation"
    TEST = "test", "Test"


class CellQuerySet(models.QuerySet):
    def under(self, cell_type: CellType) -> "CellQuerySet":
        """Cells labelled at `cell_type` or anywhere below it."""
        return self.filter(cell_type_id__in=cell_type.subtree_ids())


class Cell(models.Model):
    """One single-cell image with its label."""

    image = models.FileField(upload_to="cells/%Y/%m/", max_length=255)
    cell_type = models.ForeignKey(CellType, on_delete=models.PROTECT, related_name="cells")
    dataset = models.ForeignKey(Dataset, on_delete=models.PROTECT, related_name="cells")
    split = models.CharField(max_length=5, choices=Split.choices, blank=True, default=Split.UNASSIGNED)
    original_label = models.CharField(max_length=100, blank=True)
    original_name = models.CharField(max_length=255, blank=True, help_text="File name in the source.")
    width = models.PositiveIntegerField()
    height = models.PositiveIntegerField()
    sha256 = models.CharField(max_length=64, unique=True)
    patient_id = models.CharField(max_length=100, blank=True)
    slide_id = models.CharField(max_length=100, blank=True)
    created = models.DateTimeField(auto_now_add=True)

    objects = CellQuerySet.as_manager()
    history = HistoricalRecords()  # audit trail: who changed what, when

    class Meta:
        db_table = "Cells"
        ordering = ["id"]
        indexes = [
            models.Index(fields=["dataset", "cell_type"]),
            models.Index(fields=["dataset", "split"]),
        ]

    def __str__(self) -> str:
        return f"Cell {self.pk} ({self.cell_type.code})"


def counts_per_node() -> dict[int, tuple[int, int]]:
    """{cell type id: (own images, images at or below it)} in two queries."""
    own = dict(Cell.objects.values_list("cell_type").annotate(n=Count("id")).values_list("cell_type", "n"))
    parents = dict(CellType.objects.values_list("id", "parent_id"))
    total = dict.fromkeys(parents, 0)
    for node_id, n in own.items():
        current = node_id
        while current is not None:
            total[current] += n
            current = parents[current]
    return {node_id: (own.get(node_id, 0), total[node_id]) for node_id in parents}

