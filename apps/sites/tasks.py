"""Background work: the task takes the study id; the study row records status, progress and errors."""

from .services import run_study


def run_study_task(study_id: int) -> str:
    study = run_study(study_id)
    return f"verification study {study.pk}: {study.status}"
