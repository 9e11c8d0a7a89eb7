"""Detection datasets (smear images with boxes), trained detectors and their training jobs."""

from pathlib import Path

from django.conf import settings
from django.db import models, transaction
from django.utils import timezone

from apps.operations.workers import WorkerFields, this_worker


class DetectionDataset(models.Model):
    """Whole smear images with a box around every annotated cell."""

    name = models.CharField(max_length=100, unique=True)
    classes = models.JSONField(default=list, help_text="Box class names, in the detector's output order.")
    source = models.CharField(max_length=255, blank=True)
    licence = models.CharField(max_length=100, blank=True)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class DetectionImage(models.Model):
    dataset = models.ForeignKey(DetectionDataset, on_delete=models.CASCADE, related_name="images")
    file = models.FileField(upload_to="detection/%Y/%m/", max_length=255)
    original_name = models.CharField(max_length=255, blank=True)
    width = models.PositiveIntegerField()
    height = models.PositiveIntegerField()
    split = models.CharField(max_length=5, blank=True, default="",
                             choices=[("", "Unassigned"), ("train", "Train"), ("val", "Validation"), ("test", "Test")])
    sha256 = models.CharField(max_length=64)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]
        constraints = [models.UniqueConstraint(fields=["dataset", "sha256"], name="unique_detection_image_per_dataset")]
        indexes = [models.Index(fields=["dataset", "split"])]

    def __str__(self) -> str:
        return self.original_name or f"image {self.pk}"


class Box(models.Model):
    image = models.ForeignKey(DetectionImage, on_delete=models.CASCADE, related_name="boxes")
    label = models.CharField(max_length=50)
    x1 = models.FloatField()
    y1 = models.FloatField()
    x2 = models.FloatField()
    y2 = models.FloatField()

    class Meta:
        ordering = ["id"]
        verbose_name_plural = "boxes"

    def __str__(self) -> str:
        return f"{self.label} ({self.x1:.0f},{self.y1:.0f})-({self.x2:.0f},{self.y2:.0f})"


class DetectorQuerySet(models.QuerySet):
    def active(self) -> "Detector | None":
        return self.filter(is_active=True).first()

    def named(self, ref: str) -> "Detector | None":
        """A detector by id or name, or `active`, as the commands take it."""
        if ref == "active":
            return self.active()
        return (self.filter(pk=int(ref)).first() if ref.isdigit() else None) or self.filter(name=ref).first()


class Detector(models.Model):
    """A trained detector: safetensors weights + JSON card under MODELS_DIR."""

    name = models.CharField(max_length=100, unique=True)
    weights = models.CharField(max_length=255, help_text="Path under MODELS_DIR (or absolute) of the .safetensors file.")
    architecture = models.CharField(max_length=100, blank=True)
    classes = models.JSONField(default=list)
    card = models.JSONField(default=dict, blank=True)
    metrics = models.JSONField(default=dict, blank=True)
    is_active = models.BooleanField(default=False, help_text="The detector used by the detection page and API.")
    created = models.DateTimeField(auto_now_add=True)

    objects = DetectorQuerySet.as_manager()

    class Meta:
        ordering = ["-created"]

    def __str__(self) -> str:
        return self.name

    @property
    def path(self) -> Path:
        path = Path(self.weights)
        return path if path.is_absolute() else settings.MODELS_DIR / path

    @transaction.atomic
    def activate(self) -> None:
        """Make this the detector in use (exactly one is active)."""
        Detector.objects.filter(is_active=True).exclude(pk=self.pk).update(is_active=False)
        Detector.objects.filter(pk=self.pk).update(is_active=True)
        self.is_active = True


class DetectorTrainingJob(WorkerFields):
    """A detector training: records its worker (host, pid, heartbeat per batch) so that a killed one is found."""

    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        DONE = "done", "Done"
        FAILED = "failed", "Failed"
        CANCELLED = "cancelled", "Cancelled"

    dataset = models.ForeignKey(DetectionDataset, on_delete=models.CASCADE, related_name="training_jobs")
    name = models.CharField(max_length=100)
    architecture = models.CharField(max_length=255, default="yolov8n.yaml")
    epochs = models.PositiveIntegerField(default=30)
    imgsz = models.PositiveIntegerField(default=416)
    device = models.CharField(max_length=10, default="auto")
    activate = models.BooleanField(default=False, help_text="Make the result the active detector when done.")
    train_splits = models.CharField(max_length=20, default="train",
                                    help_text="Dataset splits trained on, comma-separated (train, or train,val).")
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.QUEUED)
    epoch = models.PositiveIntegerField(default=0)
    epochs_total = models.PositiveIntegerField(default=0)
    metrics = models.JSONField(default=dict, blank=True)
    error = models.TextField(blank=True)
    cancel_requested = models.BooleanField(default=False)
    detector = models.ForeignKey(Detector, null=True, blank=True, on_delete=models.SET_NULL, related_name="jobs")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created = models.DateTimeField(auto_now_add=True)
    started = models.DateTimeField(null=True, blank=True)
    finished = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created"]

    def __str__(self) -> str:
        return f"{self.name} ({self.get_status_display()})"

    @property
    def progress(self) -> int:
        """Percent of epochs finished."""
        return round(100 * self.epoch / self.epochs_total) if self.epochs_total else 0

    @property
    def finished_state(self) -> bool:
        return self.status in {self.Status.DONE, self.Status.FAILED, self.Status.CANCELLED}

    def _set(self, **fields) -> None:
        for key, value in fields.items():
            setattr(self, key, value)
        DetectorTrainingJob.objects.filter(pk=self.pk).update(**fields)

    def mark_running(self) -> None:
        self._set(status=self.Status.RUNNING, started=timezone.now(), epochs_total=self.epochs, **this_worker())

    def record_epoch(self, epoch: int, total: int, metrics: dict) -> None:
        self._set(epoch=epoch, epochs_total=total, metrics=metrics, heartbeat=timezone.now())

    def mark_done(self, detector: Detector, metrics: dict) -> None:
        self._set(status=self.Status.DONE, detector=detector, metrics=metrics, finished=timezone.now())

    def mark_failed(self, error: str) -> None:
        self._set(status=self.Status.FAILED, error=error, finished=timezone.now())

    def mark_cancelled(self) -> None:
        self._set(status=self.Status.CANCELLED, finished=timezone.now(),
                  error=f"Cancelled by request after {self.epoch} of {self.epochs_total or self.epochs} epochs; "
                        "no model was saved or activated.")

    def cancel_was_requested(self) -> bool:
        return DetectorTrainingJob.objects.filter(pk=self.pk, cancel_requested=True).exists()

    def alive_unless_cancelled(self) -> bool:
        """Called after every batch: renews the heartbeat (every few seconds) and says whether to stop."""
        now = timezone.now()
        if self.heartbeat is None or (now - self.heartbeat).total_seconds() >= 5:
            self._set(heartbeat=now)
        return self.cancel_was_requested()
