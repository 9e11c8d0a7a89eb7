"""Sites (a lab's instrument set-up), who works at which, and the verification studies of model sets there.

A user's site: the site of their `SiteMember` row (one per user, set in the admin), else the default site. A
site uses its own model set, or the active set when it names none (so one set-up changes nothing).
"""

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models
from simple_history.models import HistoricalRecords

from apps.cells.models import Dataset
from apps.classifiers.models import ModelSet
from apps.operations.workers import WorkerFields
from hemoweb.ml.verification import Criteria

DEFAULT_SITE_NAME = "Main lab"


def default_criteria() -> dict:
    return dict(Criteria().per_type)


class SiteQuerySet(models.QuerySet):
    def default(self) -> "Site":
        """The default site (made when missing: there is always one)."""
        site = self.filter(is_default=True).first()
        if site is None:
            site, _ = self.get_or_create(name=DEFAULT_SITE_NAME, defaults={"is_default": True})
            if not site.is_default:
                self.filter(pk=site.pk).update(is_default=True)
                site.is_default = True
        return site

    def for_user(self, user) -> "Site":
        """The user's site (their SiteMember row), else the default site."""
        if user is not None and getattr(user, "is_authenticated", False):
            member = SiteMember.objects.filter(user=user).select_related("site").first()
            if member:
                return member.site
        return self.default()


class Site(models.Model):
    """A lab's instrument set-up: microscope or scanner, stain, pixel size; the model set it uses."""

    name = models.CharField(max_length=100, unique=True)
    microscope = models.CharField(max_length=200, blank=True, help_text="Microscope or scanner, camera, objective.")
    stain = models.CharField(max_length=100, blank=True, help_text="e.g. May-Grünwald-Giemsa, Wright.")
    um_per_pixel = models.FloatField(null=True, blank=True, verbose_name="pixel size (µm)",
                                     help_text="The images' pixel size, when known.")
    notes = models.TextField(blank=True)
    is_default = models.BooleanField(default=False, help_text="Users without a site, and rows from before sites, "
                                                              "belong here. Exactly one site is the default.")
    model_set = models.ForeignKey(ModelSet, null=True, blank=True, on_delete=models.SET_NULL, related_name="sites",
                                  help_text="The set this site classifies with; empty: the active set.")
    reference_dataset = models.ForeignKey(Dataset, null=True, blank=True, on_delete=models.SET_NULL,
                                          related_name="reference_of",
                                          help_text="Labelled cells of this site: verified again each time its set "
                                                    "changes (quality control over time).")
    min_sensitivity = models.FloatField(default=0.90, help_text="Acceptance: the sensitivity every judged type "
                                                                "must reach.")
    min_n = models.PositiveIntegerField(default=20, help_text="Acceptance: types with fewer cells are reported "
                                                              "but not judged.")
    type_minimums = models.JSONField(default=default_criteria, blank=True,
                                     help_text='Acceptance per type, overriding the sensitivity above, e.g. '
                                               '{"BLA": 0.95}.')
    second_review_blast_share = models.FloatField(
        null=True, blank=True, help_text="Runs with more blasts than this share (0–1) need a supervisor's second "
                                         "sign-off; empty: never.")
    second_review_unfamiliar_share = models.FloatField(
        null=True, blank=True, help_text="Runs with more unfamiliar cells than this share (0–1) need a supervisor's "
                                         "second sign-off; empty: never.")
    created = models.DateTimeField(auto_now_add=True)

    objects = SiteQuerySet.as_manager()
    history = HistoricalRecords()

    class Meta:
        db_table = "Sites"
        ordering = ["-is_default", "name"]

    def __str__(self) -> str:
        return self.name

    @property
    def criteria(self) -> Criteria:
        return Criteria(min_sensitivity=self.min_sensitivity, min_n=self.min_n,
                        per_type={code: float(value) for code, value in (self.type_minimums or {}).items()})

    def clean(self) -> None:
        from apps.cells.models import CellType

        if not self.is_default and self.pk and not Site.objects.filter(is_default=True).exclude(pk=self.pk).exists():
            raise ValidationError({"is_default": "One site must be the default: make another site the default "
                                                 "instead."})
        if not 0 < self.min_sensitivity <= 1:
            raise ValidationError({"min_sensitivity": "A sensitivity lies between 0 and 1."})
        if not isinstance(self.type_minimums, dict):
            raise ValidationError({"type_minimums": 'Give an object of type code → sensitivity, e.g. {"BLA": 0.95}.'})
        unknown = sorted(set(self.type_minimums) - set(CellType.objects.values_list("code", flat=True)))
        if unknown:
            raise ValidationError({"type_minimums": f"Not cell types of the tree: {', '.join(unknown)}."})
        bad = sorted(code for code, value in self.type_minimums.items()
                     if not isinstance(value, (int, float)) or not 0 < value <= 1)
        if bad:
            raise ValidationError({"type_minimums": f"Sensitivities lie between 0 and 1: {', '.join(bad)}."})

    def save(self, *args, **kwargs) -> None:
        super().save(*args, **kwargs)
        if self.is_default:  # exactly one default
            Site.objects.filter(is_default=True).exclude(pk=self.pk).update(is_default=False)

    def set_in_use(self) -> ModelSet | None:
        """The set this site classifies with: its own, else the active one."""
        return self.model_set or ModelSet.objects.active()


class SiteMember(models.Model):
    """Where a user works: their pages use this site (users without a row use the default site)."""

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="site_member")
    site = models.ForeignKey(Site, on_delete=models.CASCADE, related_name="members")

    class Meta:
        db_table = "SiteMembers"
        ordering = ["site", "user"]

    def __str__(self) -> str:
        return f"{self.user} at {self.site}"


class VerificationStudy(WorkerFields):
    """A model set verified on a dataset's labelled cells at a site: per-type agreement, pass or fail."""

    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        SUCCEEDED = "succeeded", "Done"
        FAILED = "failed", "Failed"

    class Trigger(models.TextChoices):
        MANUAL = "manual", "Started by a curator"
        SET_CHANGED = "set-changed", "The site's set changed"
        QUALITY_CONTROL = "quality-control", "Quality control on demand"
        COMMAND = "command", "Command line"

    site = models.ForeignKey(Site, on_delete=models.CASCADE, related_name="studies")
    dataset = models.ForeignKey(Dataset, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    dataset_name = models.CharField(max_length=100)
    model_set = models.ForeignKey(ModelSet, null=True, blank=True, on_delete=models.SET_NULL, related_name="studies")
    model_set_name = models.CharField(max_length=100)
    model_set_version = models.CharField(max_length=100, blank=True)
    model_folder = models.CharField(max_length=255, blank=True, help_text="The set's folder when the study started.")
    trigger = models.CharField(max_length=20, choices=Trigger.choices, default=Trigger.MANUAL)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")
    created = models.DateTimeField(auto_now_add=True)
    started = models.DateTimeField(null=True, blank=True)
    finished = models.DateTimeField(null=True, blank=True)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.QUEUED)
    n_total = models.PositiveIntegerField(default=0, help_text="Cells being classified.")
    n_done = models.PositiveIntegerField(default=0)
    error = models.TextField(blank=True)
    task_id = models.CharField(max_length=64, blank=True)
    results = models.JSONField(default=dict, blank=True, help_text="The study's numbers (hemoweb.ml.verification).")
    n = models.PositiveIntegerField(null=True, blank=True, help_text="Cells scored.")
    agreement = models.FloatField(null=True, blank=True)
    kappa = models.FloatField(null=True, blank=True)
    passed = models.BooleanField(null=True, blank=True)

    class Meta:
        db_table = "VerificationStudies"
        ordering = ["-created"]
        verbose_name_plural = "verification studies"
        indexes = [models.Index(fields=["site", "model_set", "created"])]

    def __str__(self) -> str:
        return f"Study {self.pk} · {self.model_set_name} on {self.dataset_name} at {self.site}"

    @property
    def active(self) -> bool:
        return self.status in (self.Status.QUEUED, self.Status.RUNNING)

    @property
    def percent(self) -> int:
        if self.status == self.Status.SUCCEEDED:
            return 100
        return round(100 * self.n_done / self.n_total) if self.n_total else 0
