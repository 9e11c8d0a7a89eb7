"""Explanations: one row per (model file and version, image, method, settings, class), files beside it."""

from django.conf import settings as django_settings
from django.db import models
from django.utils import timezone

from apps.cells.models import Cell
from apps.classifiers.models import TrainedModel
from hemoweb.ml.explain import METHODS

CURVE_W, CURVE_H = 200, 100  # the faithfulness chart beside each picture (SVG viewBox units)


class Explanation(models.Model):
    """A cached attribution: its pictures under MEDIA_ROOT/explanations/ and the numbers that go with them."""

    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        DONE = "done", "Done"
        FAILED = "failed", "Failed"

    key = models.CharField(max_length=64, unique=True,
                           help_text="sha256 of weights file + mtime, image, method, settings, class.")
    model = models.ForeignKey(TrainedModel, null=True, blank=True, on_delete=models.SET_NULL,
                              related_name="explanations")
    weights_file = models.CharField(max_length=255)
    weights_mtime = models.FloatField()
    node = models.CharField(max_length=20, help_text="Tree node the model classifies.")
    cell = models.ForeignKey(Cell, null=True, blank=True, on_delete=models.SET_NULL, related_name="explanations")
    classified_cell_id = models.PositiveBigIntegerField(null=True, blank=True,
                                                       help_text="The analysis ClassifiedCell explained, if any.")
    image = models.FileField(upload_to="explanations/inputs/", max_length=255, help_text="The explained image.")
    image_sha256 = models.CharField(max_length=64)
    method = models.CharField(max_length=20, choices=list(METHODS.items()))
    settings = models.JSONField(default=dict)
    target = models.CharField(max_length=20, blank=True, help_text="Class code asked for; blank = the predicted class.")
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.QUEUED)
    progress = models.FloatField(default=0.0)
    estimated_seconds = models.FloatField(default=0.0)
    warning = models.TextField(blank=True)
    error = models.TextField(blank=True)
    overlay = models.FileField(upload_to="explanations/", max_length=255, blank=True)
    figure = models.FileField(upload_to="explanations/", max_length=255, blank=True)
    summary = models.JSONField(default=dict, blank=True)
    seconds = models.FloatField(null=True, blank=True)
    requested_by = models.ForeignKey(django_settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                     related_name="+")
    created = models.DateTimeField(auto_now_add=True)
    started = models.DateTimeField(null=True, blank=True)
    finished = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "Explanations"
        ordering = ["-created"]
        indexes = [models.Index(fields=["image_sha256"]), models.Index(fields=["status"])]

    def __str__(self) -> str:
        return f"{self.method} of {self.node} on {self.image_sha256[:10]} ({self.status})"

    @property
    def finished_ok(self) -> bool:
        return self.status == self.Status.DONE

    @property
    def pending(self) -> bool:
        return self.status in (self.Status.QUEUED, self.Status.RUNNING)

    @property
    def percent(self) -> int:
        return int(round(100 * (1.0 if self.finished_ok else self.progress)))

    @property
    def faithfulness(self) -> dict:
        """The deletion and insertion curves of the summary with SVG points for a small chart ({} when absent)."""
        curves = (self.summary or {}).get("faithfulness") or {}
        if not curves.get("fractions"):
            return {}
        points = {name: " ".join(f"{f * CURVE_W:.1f},{(1 - p) * CURVE_H:.1f}"
                                 for f, p in zip(curves["fractions"], curves[name], strict=True))
                  for name in ("deletion", "insertion")}
        return {**curves, "deletion_points": points["deletion"], "insertion_points": points["insertion"],
                "width": CURVE_W, "height": CURVE_H}

    def files_present(self) -> bool:
        return bool(self.overlay and self.figure and self.overlay.storage.exists(self.overlay.name)
                    and self.figure.storage.exists(self.figure.name))

    def claim(self) -> bool:
        """Atomically take a queued explanation to compute it; False when someone else already has."""
        taken = Explanation.objects.filter(pk=self.pk, status=self.Status.QUEUED).update(
            status=self.Status.RUNNING, started=timezone.now(), progress=0.0, error="")
        if taken:
            self.status, self.progress, self.error = self.Status.RUNNING, 0.0, ""
        return bool(taken)

    def mark_failed(self, message: str) -> None:
        self.status, self.error, self.finished = self.Status.FAILED, message, timezone.now()
        Explanation.objects.filter(pk=self.pk).update(status=self.status, error=message, finished=self.finished)
