"""The runs worklist: runs awaiting review and sign-off first, with filters and a count per state."""

from dataclasses import dataclass

from django import forms
from django.core.paginator import Page, Paginator
from django.db.models import Case, Count, IntegerField, Q, QuerySet, Value, When

from apps.sites.models import Site

from . import services
from .models import ClassificationRun
from .specimen import search_runs

WORKLIST_PAGE_SIZE = 50
Status = ClassificationRun.Status

# (value, label, condition): the order is the worklist's order, the work a person has to do first.
STATES = (
    ("review", "Awaiting review", Q(status=Status.SUCCEEDED, locked=False, signed_off_at=None)),
    ("second", "Awaiting second sign-off", Q(status=Status.SUCCEEDED, locked=False, signed_off_at__isnull=False)),
    ("running", "Classifying", Q(status__in=(Status.QUEUED, Status.RUNNING))),
    ("failed", "Failed", Q(status=Status.FAILED)),
    ("signed", "Signed off", Q(locked=True)),
)


class WorklistFilter(forms.Form):
    """The worklist's filters (GET): every one optional; a bad value is reported and ignored."""

    status = forms.ChoiceField(choices=[("", "All")] + [(value, label) for value, label, _ in STATES], required=False)
    date_from = forms.DateField(required=False, label="From", widget=forms.DateInput(attrs={"type": "date"}))
    date_to = forms.DateField(required=False, label="To", widget=forms.DateInput(attrs={"type": "date"}))
    site = forms.ModelChoiceField(queryset=Site.objects.order_by("name"), required=False, empty_label="All sites")
    who = forms.CharField(max_length=150, required=False, label="By", help_text="Who started the run.")
    accession = forms.CharField(max_length=64, required=False)

    def clean(self):
        data = super().clean()
        if data.get("date_from") and data.get("date_to") and data["date_from"] > data["date_to"]:
            self.add_error("date_to", "The end date comes before the start date.")
        return data


def with_state(runs: QuerySet) -> QuerySet:
    """Runs annotated with `worklist_rank` (their state's position in STATES)."""
    return runs.annotate(worklist_rank=Case(*(When(condition, then=Value(rank)) for rank, (_, _, condition)
                                              in enumerate(STATES)), default=Value(len(STATES)),
                                            output_field=IntegerField()))


def _filtered(runs: QuerySet, data: dict) -> QuerySet:
    if data.get("date_from"):
        runs = runs.filter(created__date__gte=data["date_from"])
    if data.get("date_to"):
        runs = runs.filter(created__date__lte=data["date_to"])
    if data.get("site"):
        runs = runs.filter(site=data["site"])
    if data.get("who"):
        runs = runs.filter(owner__username__icontains=data["who"].strip())
    if data.get("accession"):
        runs = search_runs(runs, accession=data["accession"])
    return runs


@dataclass
class Worklist:
    form: WorklistFilter
    page: Page
    counts: list[dict]  # [{value, label, n}] per state, under the other filters
    total: int

    def _query(self, *leave_out: str) -> str:
        data = self.form.data.copy()
        for name in leave_out:
            data.pop(name, None)
        return data.urlencode()

    @property
    def query(self) -> str:
        """The filters as a query string without the page (for the pager)."""
        return self._query("page")

    @property
    def state_query(self) -> str:
        """The filters other than the state (for the state links, each with its own)."""
        return self._query("page", "status")


def worklist(user, params, page: str | None = None) -> Worklist:
    """The runs `user` may see, awaiting review first (then classifying, failed, signed off), newest first within."""
    form = WorklistFilter(params, auto_id="filter_%s")  # not the upload form's id_accession on the same page
    form.is_valid()
    data = form.cleaned_data  # without the fields in error: those are shown on the form and ignored
    runs = with_state(_filtered(services.runs_for(user), data))
    by_rank = dict(runs.order_by().values_list("worklist_rank").annotate(n=Count("pk"))
                   .values_list("worklist_rank", "n"))
    counts = [{"value": value, "label": label, "n": by_rank.get(rank, 0)}
              for rank, (value, label, _) in enumerate(STATES)]
    if data.get("status"):
        runs = runs.filter(worklist_rank=[value for value, _, _ in STATES].index(data["status"]))
    runs = runs.order_by("worklist_rank", "-created", "-pk")
    return Worklist(form, Paginator(runs, WORKLIST_PAGE_SIZE).get_page(page), counts, sum(by_rank.values()))


def my_runs_to_review(user, limit: int = 10) -> tuple[list[ClassificationRun], int]:
    """The user's own finished runs not yet signed off, newest first, and how many there are."""
    runs = services.runs_for(user).filter(STATES[0][2], owner=user).order_by("-created", "-pk")
    return list(runs[:limit]), runs.count()
