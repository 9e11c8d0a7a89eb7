"""django-q2 tasks of the training cluster (they take ids; the work is in services)."""

from .services import run_training_job


def run_training_task(job_id: int) -> str:
    """Run one training job; its outcome is on the TrainingJob row."""
    return run_training_job(job_id).status
