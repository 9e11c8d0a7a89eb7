"""Classification runs: one row per uploaded sample, one row per classified cell.

A run copies the model set's name and version, and every cell records the set that classified it,
so that deleting a model set never deletes (or silently changes) a result.
"""

from django.conf import settings
from django.db import models

from apps.cells.models import CellType
from apps.classifiers.models import ModelSet
from apps.operations.workers import WorkerFields
from apps.sites.defaults import default_site_id


class ClassificationRun(WorkerFields):
    """A run records its worker (host, pid, heartbeat per chunk): a killed worker's run is found and failed."""

    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        SUCCEEDED = "succeeded", "Done"
        FAILED = "failed", "Failed"

    TARGETS = ((100, "100 cells"), (200, "200 cells"), (400, "400 cells"), (500, "500 cells"))

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                              related_name="classification_runs")
    name = models.CharField(max_length=200, blank=True, help_text="Sample or slide name, e.g. the upload's name.")
    created = models.DateTimeField(auto_now_add=True)
    started = models.DateTimeField(null=True, blank=True)
    finished = models.DateTimeField(null=True, blank=True)
    model_set = models.ForeignKey(ModelSet, null=True, blank=True, on_delete=models.SET_NULL, related_name="runs")
    model_set_name = models.CharField(max_length=100)
    model_set_version = models.CharField(max_length=100, blank=True)
    model_folder = models.CharField(max_length=255, blank=True, help_text="The set's folder when the run started.")
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.QUEUED)
    n_total = models.PositiveIntegerField(default=0, help_text="Files in the upload.")
    n_done = models.PositiveIntegerField(default=0, help_text="Files handled so far (classified or skipped).")
    error = models.TextField(blank=True)
    skipped = models.JSONField(default=list, blank=True, help_text="[file, reason] for files that are not usable images.")
    upload = models.CharField(max_length=255, blank=True, help_text="Stored upload awaiting classification.")
    count_target = models.PositiveIntegerField(choices=TARGETS, default=100)
    signed_off_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                      related_name="+")
    signed_off_at = models.DateTimeField(null=True, blank=True)
    locked = models.BooleanField(default=False)
    um_per_pixel = models.FloatField(null=True, blank=True, help_text="Stated pixel size (µm), used when the red "
                                                                      "cells cannot be measured.")
    scale = models.JSONField(default=dict, blank=True, help_text="The scale the run was classified at (measured on "
                                                                 "its images) and how its cells' own measures fell.")
    colour = models.JSONField(default=dict, blank=True, help_text="The run's slide background against the "
                                                                  "training one (its white balance).")
    site_shift = models.JSONField(default=dict, blank=True, help_text="Whether the run's cells are like the set's "
                                                                      "training cells: level (ok, warn, alarm, none, "
                                                                      "unknown), unfamiliar share, message.")
    shift_acknowledged_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True,
                                              on_delete=models.SET_NULL, related_name="+",
                                              help_text="Who acknowledged the site-shift warning (a run at alarm "
                                                        "cannot be signed off before).")
    shift_acknowledged_at = models.DateTimeField(null=True, blank=True)
    engine = models.CharField(max_length=20, blank=True, help_text="The inference engine that classified the run "
                                                                   "(torch, onnxruntime).")
    site = models.ForeignKey("sites.Site", null=True, blank=True, default=default_site_id, on_delete=models.SET_NULL,
                             related_name="runs", help_text="The lab set-up the sample was imaged at.")

    # Specimen identity (issue 17): required for export; the patient identifier never goes into a file name,
    # a log line or a URL.
    class Specimen(models.TextChoices):
        PERIPHERAL_BLOOD = "peripheral-blood", "Peripheral blood"
        BONE_MARROW = "bone-marrow", "Bone marrow"

    class Kind(models.TextChoices):
        CELLS = "cells", "Single-cell images"
        SLIDE = "slide", "Slide fields"

    accession = models.CharField(max_length=64, blank=True, db_index=True,
                                 help_text="The specimen's accession number in the lab information system.")
    patient_identifier = models.CharField(max_length=64, blank=True,
                                          help_text="Optional; never written into file names, logs or URLs.")
    specimen_type = models.CharField(max_length=20, choices=Specimen.choices, default=Specimen.PERIPHERAL_BLOOD)
    collected_at = models.DateTimeField(null=True, blank=True, help_text="When the specimen was collected.")
    wbc_count = models.FloatField(null=True, blank=True, verbose_name="WBC count (10⁹/L)",
                                  help_text="The analyser's white count, for absolute counts in the export.")
    kind = models.CharField(max_length=10, choices=Kind.choices, default=Kind.CELLS,
                            help_text="Single-cell images, or the fields of one slide (cells found by a detector).")
    detector = models.ForeignKey("detection.Detector", null=True, blank=True, on_delete=models.SET_NULL,
                                 related_name="+", help_text="The detector that found a slide run's cells.")
    detector_name = models.CharField(max_length=100, blank=True)
    # Review and sign-off (issue 20).
    signoff_reason = models.TextField(blank=True, help_text="Why the run was signed off although a sign-off rule "
                                                            "(count target, nothing reviewed) was not met.")
    comment = models.TextField(blank=True, help_text="The reviewer's comment, printed on the report and exported.")
    second_signed_off_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True,
                                             on_delete=models.SET_NULL, related_name="+",
                                             help_text="The supervisor who confirmed the sign-off (runs over the "
                                                       "site's blast or unfamiliar-cell limit).")
    second_signed_off_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "ClassificationRuns"
        ordering = ["-created"]
        indexes = [models.Index(fields=["owner", "created"])]

    def __str__(self) -> str:
        return f"Run {self.pk} · {self.name or 'upload'}"

    @property
    def progress(self) -> float:
        if self.status == self.Status.SUCCEEDED:
            return 1.0
        return self.n_done / self.n_total if self.n_total else 0.0

    @property
    def progress_percent(self) -> int:
        return round(100 * self.progress)

    @property
    def active(self) -> bool:
        return self.status in (self.Status.QUEUED, self.Status.RUNNING)

    @property
    def no_usable_images(self) -> bool:
        """Finished with every file skipped: nothing was classified (the reasons are in `skipped`)."""
        return not self.active and self.n_total > 0 and len(self.skipped) >= self.n_total

    @property
    def shift_alarm(self) -> bool:
        return (self.site_shift or {}).get("level") == "alarm"

    @property
    def needs_acknowledgement(self) -> bool:
        """A run at alarm is signed off only after someone has acknowledged its site-shift warning."""
        return self.shift_alarm and self.shift_acknowledged_at is None

    @property
    def awaiting_second_sign_off(self) -> bool:
        """Signed off, and over its site's blast or unfamiliar limit: it locks when a supervisor confirms."""
        return self.signed_off_at is not None and not self.locked


class ClassifiedCellQuerySet(models.QuerySet):
    def with_types(self):
        """Cells with everything their pages, API and CSV show, fetched in the same query."""
        return self.select_related("predicted_type", "guess_type", "final_type", "corrected_by", "reviewed_by")


class ClassifiedCell(models.Model):
    """One cell of a run: the prediction (kept as it was) and the verified final type."""

    objects = ClassifiedCellQuerySet.as_manager()

    run = models.ForeignKey(ClassificationRun, on_delete=models.CASCADE, related_name="cells")
    index = models.PositiveIntegerField(help_text="Position in the upload.")
    image = models.FileField(upload_to="analysis/%Y/%m/", max_length=255)
    original_name = models.CharField(max_length=255)
    sha256 = models.CharField(max_length=64)
    width = models.PositiveIntegerField(default=0)
    height = models.PositiveIntegerField(default=0)
    predicted_type = models.ForeignKey(CellType, on_delete=models.PROTECT, related_name="+")
    path = models.JSONField(default=list, help_text="[{node, code, probability}] from the root down.")
    confidence = models.FloatField(default=0.0, help_text="Probability of the whole path.")
    flags = models.JSONField(default=list, blank=True)
    resolved = models.BooleanField(default=False)
    guess_type = models.ForeignKey(CellType, null=True, blank=True, on_delete=models.PROTECT, related_name="+",
                                   help_text="Where the most probable path leads with thresholds ignored: the "
                                             "best guess for a cell that stopped unresolved.")
    views = models.PositiveSmallIntegerField(default=1, help_text="Views of the cell its probabilities average: "
                                                                 "more than 1 after a second look at an unsure cell.")
    scale = models.JSONField(default=dict, blank=True, help_text="The scale used (source, px/µm, against the "
                                                                 "training scale) and the cell's own measure.")
    background = models.JSONField(default=list, blank=True, help_text="The image's background colour (RGB) "
                                                                      "before white balance.")
    familiarity = models.FloatField(null=True, blank=True, help_text="Distance to the set's training cells (larger: "
                                                                     "less familiar); empty where the set has no "
                                                                     "familiarity statistics.")
    unfamiliar = models.BooleanField(default=False, help_text="Unlike the set's training cells (flagged "
                                                              "unfamiliar): its own group, first in review.")
    final_type = models.ForeignKey(CellType, on_delete=models.PROTECT, related_name="+")
    corrected_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                     related_name="+")
    corrected_at = models.DateTimeField(null=True, blank=True)
    version = models.PositiveIntegerField(default=0, help_text="Raised by every correction (optimistic check).")
    model_set = models.ForeignKey(ModelSet, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    model_set_name = models.CharField(max_length=100)

    class Review(models.TextChoices):
        PENDING = "pending", "Pending"
        ACCEPTED = "accepted", "Accepted"
        CHANGED = "changed", "Changed"

    review_state = models.CharField(max_length=10, choices=Review.choices, default=Review.PENDING)
    reviewed_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                    related_name="+")
    reviewed_at = models.DateTimeField(null=True, blank=True)
    field = models.ForeignKey("SlideField", null=True, blank=True, on_delete=models.SET_NULL, related_name="cells",
                              help_text="The slide field the cell was found on (slide runs).")
    box = models.JSONField(default=list, blank=True, help_text="[x1, y1, x2, y2] on its field, in field pixels.")

    class Meta:
        db_table = "ClassifiedCells"
        ordering = ["run", "index"]
        indexes = [models.Index(fields=["run", "final_type"])]

    def __str__(self) -> str:
        return f"{self.original_name} → {self.final_type.code}"

    @property
    def flagged(self) -> bool:
        return bool(self.flags)

    @property
    def changed(self) -> bool:
        return self.final_type_id != self.predicted_type_id

    @property
    def offers_guess(self) -> bool:
        """An unresolved cell whose best guess goes further than where it stopped."""
        return self.guess_type_id is not None and self.guess_type_id != self.predicted_type_id


class SlideField(models.Model):
    """One field (photograph) of a slide run: what the detector found on it."""

    run = models.ForeignKey(ClassificationRun, on_delete=models.CASCADE, related_name="fields")
    index = models.PositiveIntegerField(help_text="Position in the upload.")
    image = models.FileField(upload_to="slides/%Y/%m/", max_length=255, blank=True)
    original_name = models.CharField(max_length=255)
    sha256 = models.CharField(max_length=64, blank=True)
    width = models.PositiveIntegerField(default=0)
    height = models.PositiveIntegerField(default=0)
    boxes = models.JSONField(default=list, blank=True,
                             help_text="Every detection: {label, box [x1, y1, x2, y2], score, cell (id or null), "
                                       "duplicate_of (cell id seen on an overlapping field, or null)}.")
    n_white = models.PositiveIntegerField(default=0)
    n_red = models.PositiveIntegerField(default=0)
    n_platelets = models.PositiveIntegerField(default=0)
    error = models.CharField(max_length=255, blank=True, help_text="Why the field could not be used.")

    class Meta:
        db_table = "SlideFields"
        ordering = ["run", "index"]

    def __str__(self) -> str:
        return f"Field {self.index} of run {self.run_id}"


class Correction(models.Model):
    """Every change of a cell's final type: who, when, from what to what (an audit trail)."""

    cell = models.ForeignKey(ClassifiedCell, on_delete=models.CASCADE, related_name="corrections")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    at = models.DateTimeField(auto_now_add=True)
    from_type = models.ForeignKey(CellType, on_delete=models.PROTECT, related_name="+")
    to_type = models.ForeignKey(CellType, on_delete=models.PROTECT, related_name="+")

    class Meta:
        db_table = "CellCorrections"
        ordering = ["cell", "at", "id"]
