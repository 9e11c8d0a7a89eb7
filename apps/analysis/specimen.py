"""A run's specimen identity: accession number, patient identifier, specimen type, collection time, WBC count.

Set at upload (page, API, `classify`), editable on the run page until sign-off, required for export (the
accession number), searchable by accession. The patient identifier is optional and never goes into a file
name, a log line or a URL: nothing here logs it, and searching is by accession only.
"""

from datetime import datetime

from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from .models import ClassificationRun

IDENTITY_FIELDS = ("accession", "patient_identifier", "specimen_type", "collected_at", "wbc_count")
MAX_ID = 64  # the columns' length


class IdentityError(ValueError):
    """A specimen identity value a lab user must correct."""


def clean_identity(values: dict | None) -> dict:
    """The identity fields of `values` checked and normalised (unknown keys refused, text stripped)."""
    values = dict(values or {})
    unknown = sorted(set(values) - set(IDENTITY_FIELDS))
    if unknown:
        raise IdentityError(f"Unknown specimen field(s): {', '.join(unknown)}.")
    cleaned = {}
    for key in ("accession", "patient_identifier"):
        if key in values:
            text = " ".join(str(values[key] or "").split())
            if len(text) > MAX_ID:
                what = "accession number" if key == "accession" else "patient identifier"
                raise IdentityError(f"The {what} is {len(text)} characters long; at most {MAX_ID} are accepted.")
            cleaned[key] = text
    if "specimen_type" in values:
        kind = values["specimen_type"] or ClassificationRun.Specimen.PERIPHERAL_BLOOD
        if kind not in ClassificationRun.Specimen.values:
            raise IdentityError(f"The specimen type must be one of {', '.join(ClassificationRun.Specimen.values)}, "
                                f"not {kind!r}.")
        cleaned["specimen_type"] = kind
    if "collected_at" in values:
        cleaned["collected_at"] = _moment(values["collected_at"])
    if "wbc_count" in values:
        count = values["wbc_count"]
        if count in (None, ""):
            cleaned["wbc_count"] = None
        else:
            try:
                count = float(count)
            except (TypeError, ValueError):
                raise IdentityError(f"The WBC count must be a number (10⁹/L), not {count!r}.") from None
            if not 0 < count < 1000:
                raise IdentityError("The WBC count must lie between 0 and 1000 × 10⁹/L.")
            cleaned["wbc_count"] = count
    return cleaned


def _moment(value) -> datetime | None:
    if value in (None, ""):
        return None
    moment = value if isinstance(value, datetime) else parse_datetime(str(value).strip())
    if moment is None:
        raise IdentityError(f"The collection time {value!r} is not a date and time (e.g. 2026-12-01T08:30).")
    if timezone.is_naive(moment):
        moment = timezone.make_aware(moment)
    if moment > timezone.now() + timezone.timedelta(minutes=5):
        raise IdentityError("The collection time lies in the future.")
    return moment


@transaction.atomic
def update_identity(*, run_id: int, values: dict) -> ClassificationRun:
    """Change a run's specimen identity until it is signed off; after that only a missing accession number may
    be added (the export needs it), nothing else changes."""
    cleaned = clean_identity(values)
    run = ClassificationRun.objects.select_for_update().get(pk=run_id)
    changed = {key for key, value in cleaned.items() if value != getattr(run, key)}
    if run.signed_off_at and changed and (changed != {"accession"} or run.accession):
        raise IdentityError(f"Run {run.pk} is signed off: its specimen identity is locked and cannot be changed "
                            "(only a missing accession number can still be added).")
    for key, value in cleaned.items():
        setattr(run, key, value)
    run.save(update_fields=list(cleaned))
    return run


def search_runs(runs: QuerySet, *, accession: str = "") -> QuerySet:
    """Runs whose accession number contains `accession` (case aside); all of them when it is empty."""
    accession = " ".join(accession.split())
    return runs.filter(accession__icontains=accession) if accession else runs
