"""Background work for large uploads: the task takes the run id; the run row records status and progress."""

from .services import classify_run
from .slides import analyse_slide


def classify_run_task(run_id: int) -> str:
    run = classify_run(run_id)
    return f"run {run.pk}: {run.status}"


def analyse_slide_task(run_id: int) -> str:
    run = analyse_slide(run_id)
    return f"slide run {run.pk}: {run.status}"
