"""Is anybody taking work off a queue? A job that stays queued tells its user which worker to start.

A django-q2 worker leaves no record of being alive that the web process can read (its statistics live in
the worker's own cache), so the queue itself is the evidence: with the ORM broker a task that a worker has
pulled is locked; a task still unlocked well after it was queued has no worker to run it. With another
broker only the job's age is known.
"""

from datetime import datetime, timedelta

from django.conf import settings
from django.utils import timezone

SHORT_JOBS_COMMAND = "python manage.py qcluster"
TRAINING_COMMAND = f"Q_CLUSTER_NAME={settings.HEMOWEB_TRAINING_CLUSTER} python manage.py qcluster"


def grace_seconds() -> int:
    """How long a queued job may wait before its page says that no worker took it."""
    return getattr(settings, "HEMOWEB_QUEUE_HINT_SECONDS", 20)


def unclaimed(cluster: str, queued_at: datetime) -> bool:
    """Whether the `cluster` queue holds a task queued at or before `queued_at` that no worker has pulled."""
    if settings.Q_BROKER != "orm":
        return True
    from django_q.models import OrmQ

    # enqueue sets lock to the queue time; a worker pulling the task moves it into the future
    return OrmQ.objects.filter(key=cluster, lock__lte=min(queued_at + timedelta(seconds=1), timezone.now())).exists()


def waiting_seconds(cluster: str, queued_at: datetime | None) -> int | None:
    """Seconds a job queued at `queued_at` has waited without a worker, once past the grace period; else None."""
    if queued_at is None:
        return None
    waited = (timezone.now() - queued_at).total_seconds()
    if waited < grace_seconds() or not unclaimed(cluster, queued_at):
        return None
    return int(waited)


def no_worker_hint(what: str, cluster: str, queued_at: datetime | None, command: str) -> str:
    """'' while the job may just be about to start; else a line naming the worker to start."""
    waited = waiting_seconds(cluster, queued_at)
    if waited is None:
        return ""
    return (f"Queued for {_duration(waited)} and no worker has taken it: {what} runs in a background worker. "
            f"Is it running? Start it with `{command}` (`make run` starts it).")


def _duration(seconds: int) -> str:
    return f"{seconds} s" if seconds < 120 else f"{seconds // 60} min"
