"""The LIS sender as a django-q2 task, run every minute by the schedule `lis-send` on the default cluster."""

from collections import Counter

from .outbox import send_due

SCHEDULE = "lis-send"


def send_due_task() -> str:
    """One pass of the outbox; returns how the messages it handled ended up, e.g. `1 sent, 2 retrying`."""
    states = Counter(message.state for message in send_due())
    return ", ".join(f"{n} {state}" for state, n in sorted(states.items())) or "nothing due"


def ensure_schedule(using: str = "default", **kwargs) -> None:
    """Create the `lis-send` schedule unless it exists (a curator's changes to it stay).

    Without an enabled LIS connection a pass is one cheap query. Its successful runs are not saved as task
    results: one a minute would push the results of real jobs out of the cluster's `save_limit`."""
    from django.db import connections
    from django_q.models import Schedule

    if Schedule._meta.db_table not in connections[using].introspection.table_names():
        return  # django_q not migrated yet (a partial migrate): the next migrate makes it
    Schedule.objects.using(using).get_or_create(name=SCHEDULE, defaults={
        "func": "apps.lis.tasks.send_due_task", "schedule_type": Schedule.MINUTES, "minutes": 1, "repeats": -1,
        "kwargs": "{'q_options': {'save': False}}",
    })
