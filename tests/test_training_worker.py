"""Real worker processes: a django-q2 training cluster runs a classifier and a detector training end to end; a
killed worker leaves a resumable job.

A subprocess must see the test database: on SQLite the in-memory test database is copied to a file
for it and copied back afterwards; on MariaDB it connects to the test database itself.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.conf import settings

from apps.training import services
from apps.training.models import TrainingJob
from tests.shared_db import SharedDatabase, stop_worker

REPO = Path(__file__).resolve().parent.parent
TINY = {"architecture": "mobilenetv3_small_050", "epochs": 1, "image_size": 32, "batch_size": 16, "min_images": 3,
        "threads": 1, "nodes": ["ROOT", "NEU"]}

pytestmark = pytest.mark.slow


class TrainingDatabase(SharedDatabase):
    def task_recorded(self, name: str) -> bool:
        """The cluster's monitor saved the task's result (a moment after the task itself returned)."""
        from django_q.models import Task

        return self.row("SELECT COUNT(*) FROM django_q_task WHERE name = ?", (name,),
                        lambda: (Task.objects.filter(name=name).count(),))[0] > 0


@pytest.fixture
def shared_db(transactional_db, tmp_path):
    return TrainingDatabase(tmp_path)


def test_a_training_and_a_detector_training_run_on_a_real_training_qcluster(shared_db, pbc_dataset, demo_bccd,
                                                                             curator, tmp_path):
    from django_q.models import OrmQ, Task

    from apps.detection import services as detection
    from apps.detection.models import DetectionDataset, DetectorTrainingJob

    job = services.start_training(dataset=pbc_dataset, name="queued set", params=TINY, user=curator)
    detection.import_detections(demo_bccd, dataset="Demo BCCD", fmt="voc")
    smears = DetectionDataset.objects.get(name="Demo BCCD")
    detector_job = detection.start_training(dataset=smears, name="queued detector", epochs=1, imgsz=64, device="cpu",
                                            user=curator)
    assert OrmQ.objects.filter(key=settings.HEMOWEB_TRAINING_CLUSTER).count() == 2  # their own queue
    shared_db.push()
    log = open(tmp_path / "qcluster.log", "w")
    cluster = subprocess.Popen(
        [sys.executable, "manage.py", "qcluster"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        env={**shared_db.env, "Q_CLUSTER_NAME": settings.HEMOWEB_TRAINING_CLUSTER}, start_new_session=True)
    try:
        deadline = time.monotonic() + 150
        # the monitor records each task's result (success or not) once the task has returned
        while not (shared_db.task_recorded(f"training-job-{job.pk}")
                   and shared_db.task_recorded(f"detector training {detector_job.pk}")) and time.monotonic() < deadline:
            assert cluster.poll() is None, (tmp_path / "qcluster.log").read_text()[-3000:]
            time.sleep(0.5)
    finally:
        stop_worker(cluster)
        log.close()
    shared_db.pull()
    job.refresh_from_db()
    assert job.status == TrainingJob.Status.SUCCEEDED, job.error + (tmp_path / "qcluster.log").read_text()[-3000:]
    assert job.worker_pid and job.worker_pid != os.getpid()
    assert f"CPU niceness {settings.HEMOWEB_TRAINING_NICE}" in job.log  # training yields the CPU to web requests
    assert job.result.name == "queued set" and (job.result.path / "ROOT.safetensors").is_file()
    assert Task.objects.filter(name=f"training-job-{job.pk}", success=True).exists()
    detector_job = DetectorTrainingJob.objects.get(pk=detector_job.pk)
    assert detector_job.status == "done", detector_job.error + (tmp_path / "qcluster.log").read_text()[-3000:]
    assert detector_job.worker_pid not in (None, os.getpid()) and detector_job.epoch == 1
    assert detector_job.detector.path.is_file() and detector_job.detector.is_active  # the site's first detector
    assert Task.objects.filter(name=f"detector training {detector_job.pk}", success=True).exists()
    assert not OrmQ.objects.exists()


def test_a_killed_worker_leaves_a_failed_job_that_resumes_from_its_checkpoint(shared_db, pbc_dataset, tmp_path):
    shared_db.push()
    log = open(tmp_path / "train.log", "w")
    worker = subprocess.Popen(
        [sys.executable, "manage.py", "train_tree", "--dataset", "Demo PBC", "--arch", "mobilenetv3_small_050",
         "--epochs", "3", "--image-size", "64", "--batch-size", "4", "--min-images", "3", "--threads", "1",
         "--nodes", "ROOT", "NEU", "--name", "killed"],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=shared_db.env, start_new_session=True)
    checkpoints = Path(settings.MODELS_DIR) / ".training"
    try:
        deadline = time.monotonic() + 120
        while not list(checkpoints.glob("job-*/checkpoints/ROOT.json")) and time.monotonic() < deadline:
            assert worker.poll() is None, (tmp_path / "train.log").read_text()[-3000:]
            time.sleep(0.05)
        os.killpg(worker.pid, signal.SIGKILL)  # mid-run, as an out-of-memory killer or a reboot would
        worker.wait()
    finally:
        stop_worker(worker)
        log.close()
    shared_db.pull()
    job = TrainingJob.objects.get(name="killed")
    assert job.status == TrainingJob.Status.RUNNING  # nobody could record anything
    lost = services.detect_lost_jobs()
    assert [j.pk for j in lost] == [job.pk]
    job.refresh_from_db()
    assert job.status == TrainingJob.Status.FAILED
    assert "worker running this job stopped" in job.error and "resume" in job.error
    assert job.can_resume and job.result is None
    services.resume_job(job, enqueue=False)
    job = services.run_training_job(job.pk)
    assert job.status == TrainingJob.Status.SUCCEEDED, job.error
    assert "resumed after epoch" in job.log or "ROOT already trained: kept" in job.log
    assert job.result.name == "killed"
