"""The model registry: architectures, trained node classifiers, their output classes, model sets."""

from pathlib import Path

from django.conf import settings
from django.db import models, transaction
from simple_history.models import HistoricalRecords

from apps.cells.models import CellType


class ModelsTypes(models.Model):
    """An architecture (a timm model name) that hemoweb can train."""

    name = models.CharField(max_length=100, unique=True, help_text="timm model name, e.g. resnet18.")
    description = models.TextField(blank=True)
    default_input_size = models.PositiveIntegerField(default=224)

    class Meta:
        db_table = "ModelsTypes"
        ordering = ["name"]
        verbose_name = "architecture"

    def __str__(self) -> str:
        return self.name


class ModelSetQuerySet(models.QuerySet):
    def active(self) -> "ModelSet | None":
        return self.filter(is_active=True).first()


class ModelSet(models.Model):
    """One trained classifier per inner node: together they classify down the whole tree."""

    class Status(models.TextChoices):
        READY = "ready", "Ready"
        BROKEN = "broken", "Files missing or damaged"

    name = models.CharField(max_length=100, unique=True)
    folder = models.CharField(max_length=255, help_text="Folder under MODELS_DIR (or an absolute path).")
    architecture = models.CharField(max_length=100, blank=True)
    mode = models.CharField(max_length=30, blank=True)
    input_size = models.PositiveIntegerField(default=0)
    is_active = models.BooleanField(default=False, help_text="The set used for classification by default.")
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.READY)
    card = models.JSONField(default=dict, blank=True)
    metrics = models.JSONField(default=dict, blank=True)
    created = models.DateTimeField(auto_now_add=True)

    objects = ModelSetQuerySet.as_manager()
    history = HistoricalRecords()

    class Meta:
        db_table = "ModelSets"
        ordering = ["-created"]

    def __str__(self) -> str:
        return self.name

    @property
    def path(self) -> Path:
        folder = Path(self.folder)
        return folder if folder.is_absolute() else settings.MODELS_DIR / folder

    @transaction.atomic
    def activate(self) -> None:
        """Make this the set that classifies by default (exactly one is active)."""
        ModelSet.objects.filter(is_active=True).exclude(pk=self.pk).update(is_active=False)
        ModelSet.objects.filter(pk=self.pk).update(is_active=True)
        self.is_active = True


class TrainedModel(models.Model):
    """One trained classifier for one tree node (the thesis' Models table)."""

    class Status(models.TextChoices):
        TRAINING = "training", "Training"
        READY = "ready", "Ready"
        FAILED = "failed", "Failed"

    name = models.CharField(max_length=150)
    architecture = models.ForeignKey(ModelsTypes, on_delete=models.PROTECT, related_name="models")
    node = models.ForeignKey(CellType, on_delete=models.PROTECT, related_name="classifiers")
    model_set = models.ForeignKey(ModelSet, null=True, blank=True, on_delete=models.CASCADE, related_name="node_models")
    weights_file = models.CharField(max_length=255, help_text="safetensors file; its JSON card lies beside it.")
    input_size = models.PositiveIntegerField(default=224)
    threshold = models.FloatField(default=0.0, help_text="Below this confidence a cell stops at this node.")
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.READY)
    metrics = models.JSONField(default=dict, blank=True)
    card = models.JSONField(default=dict, blank=True)
    created = models.DateTimeField(auto_now_add=True)
    output_classes = models.ManyToManyField(CellType, through="ModelsToCellTypes", related_name="+")
    history = HistoricalRecords()

    class Meta:
        db_table = "Models"
        ordering = ["model_set", "node__order"]
        indexes = [models.Index(fields=["model_set", "node"])]

    def __str__(self) -> str:
        return self.name

    @property
    def weights_path(self) -> Path:
        path = Path(self.weights_file)
        return path if path.is_absolute() else settings.MODELS_DIR / path


class ModelsToCellTypes(models.Model):
    """Output index `output_index` of a model means cell type `cell_type`."""

    model = models.ForeignKey(TrainedModel, on_delete=models.CASCADE, related_name="outputs")
    cell_type = models.ForeignKey(CellType, on_delete=models.PROTECT, related_name="+")
    output_index = models.PositiveSmallIntegerField()

    class Meta:
        db_table = "ModelsToCellTypes"
        ordering = ["model", "output_index"]
        constraints = [
            models.UniqueConstraint(fields=["model", "output_index"], name="one_class_per_output"),
            models.UniqueConstraint(fields=["model", "cell_type"], name="one_output_per_class"),
        ]

    def __str__(self) -> str:
        return f"{self.model} [{self.output_index}] → {self.cell_type.code}"
