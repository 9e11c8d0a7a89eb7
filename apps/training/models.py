"""Training jobs: one row per request to train a model set, updated by the worker as it runs."""

from pathlib import Path

from django.conf import settings
from django.db import models
from django.utils import timezone

from apps.cells.models import Dataset
from apps.classifiers.models import ModelSet
from apps.operations.workers import WorkerFields

LOG_LINES = 200


class TrainingJob(WorkerFields):
    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        SUCCEEDED = "succeeded", "Succeeded"
        FAILED = "failed", "Failed"
        CANCELLED = "cancelled", "Cancelled"

    ACTIVE = (Status.QUEUED, Status.RUNNING)

    name = models.CharField(max_length=100, help_text="Name of the model set this job writes.")
    dataset = models.ForeignKey(Dataset, on_delete=models.PROTECT, related_name="training_jobs")
    params = models.JSONField(default=dict, blank=True)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.QUEUED)
    progress = models.JSONField(default=dict, blank=True)
    metrics = models.JSONField(default=dict, blank=True, help_text="Per node: epoch history and test metrics.")
    log = models.TextField(blank=True)
    error = models.TextField(blank=True)
    cancel_requested = models.BooleanField(default=False)
    task_id = models.CharField(max_length=64, blank=True)
    result = models.ForeignKey(ModelSet, null=True, blank=True, on_delete=models.SET_NULL, related_name="training_jobs")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")
    created = models.DateTimeField(auto_now_add=True)
    started = models.DateTimeField(null=True, blank=True)
    finished = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "TrainingJobs"
        ordering = ["-created"]
        indexes = [models.Index(fields=["status"])]

    def __str__(self) -> str:
        return f"Training {self.pk} · {self.name} ({self.status})"

    @property
    def work_dir(self) -> Path:
        """Where the job writes while it runs; moved to MODELS_DIR/<name> only when it succeeds."""
        return settings.MODELS_DIR / ".training" / f"job-{self.pk}"

    @property
    def is_active(self) -> bool:
        return self.status in self.ACTIVE

    @property
    def can_resume(self) -> bool:
        return self.status in (self.Status.FAILED, self.Status.CANCELLED) and self.work_dir.is_dir()

    @property
    def percent(self) -> int:
        if self.status == self.Status.SUCCEEDED:
            return 100
        return int(self.progress.get("percent", 0))

    def append_log(self, line: str) -> None:
        lines = (self.log.splitlines() + [f"{timezone.now():%H:%M:%S} {line}"])[-LOG_LINES:]
        self.log = "\n".join(lines)

    def mark_running(self) -> None:
        self.status = self.Status.RUNNING
        self.started = self.started or timezone.now()
        self.take()
        self.error = ""
        self.finished = None

    def mark_failed(self, message: str) -> None:
        self.status = self.Status.FAILED
        self.error = message
        self.finished = timezone.now()
        self.append_log(f"failed: {message}")

    def mark_cancelled(self) -> None:
        self.status = self.Status.CANCELLED
        self.finished = timezone.now()
        self.append_log("cancelled")

    def mark_succeeded(self, model_set: ModelSet) -> None:
        self.status = self.Status.SUCCEEDED
        self.result = model_set
        self.finished = timezone.now()
        self.progress = {**self.progress, "percent": 100}
