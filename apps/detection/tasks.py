"""Background work for detection: tasks take ids and record everything on the job row."""

from .models import DetectorTrainingJob
from .services import run_training


def train_detector_task(job_id: int) -> str:
    job = DetectorTrainingJob.objects.select_related("dataset").get(pk=job_id)
    job = run_training(job)
    return job.status
