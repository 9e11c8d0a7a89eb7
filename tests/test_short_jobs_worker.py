"""The short jobs (a classification run and an explanation) run to the end on a real default `qcluster`.

The other tests of these jobs run the task inside the test process; this one proves that the queued
task names, arguments and files work in the worker process that `make run` starts.
"""

import io
import os
import time
import zipfile

import pytest
from django.conf import settings
from django.core.files.storage import default_storage
from django.core.files.uploadedfile import SimpleUploadedFile

from apps.analysis import services as analysis
from apps.analysis.models import ClassificationRun
from apps.explain.services import request_explanation, resolve_model
from tests.shared_db import SharedDatabase, stop_worker

from .conftest import DEMO


pytestmark = pytest.mark.slow


def _recorded(database: SharedDatabase, names: list[str]) -> bool:
    """The cluster's monitor saved both results (a moment after the tasks themselves returned)."""
    from django_q.models import Task

    marks = ",".join("?" * len(names))
    return database.row(f"SELECT COUNT(*) FROM django_q_task WHERE name IN ({marks})", tuple(names),
                        lambda: (Task.objects.filter(name__in=names).count(),))[0] == len(names)


def test_a_classification_run_and_an_explanation_finish_on_a_real_qcluster(
        transactional_db, tiny_model_set, lab_user, tmp_path):
    from django_q.models import OrmQ, Task

    images = sorted((DEMO / "pbc" / "neutrophil").glob("*.jpg"))[:5]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for image in images:
            archive.write(image, image.name)
    run = analysis.start_run(owner=lab_user, files=[SimpleUploadedFile("five.zip", buffer.getvalue())],
                             run_async=True)
    outcome = request_explanation(model=resolve_model(node="ROOT"), method="gradcam", upload=images[0].read_bytes(),
                                  user=lab_user, inline=False)
    explanation = outcome.explanation
    assert outcome.queued and run.status == ClassificationRun.Status.QUEUED
    assert OrmQ.objects.filter(key=settings.Q_CLUSTER["name"]).count() == 2  # the default queue, not the training one

    database = SharedDatabase(tmp_path, Q_WORKERS="1", VAR_DIR=str(tmp_path / "var"))
    database.push()
    log_path = tmp_path / "qcluster.log"
    names = [f"classify run {run.pk}", f"explain-{explanation.pk}"]
    with open(log_path, "w") as log:
        cluster = database.qcluster(log)
        try:
            deadline = time.monotonic() + 90
            while not _recorded(database, names) and time.monotonic() < deadline:
                assert cluster.poll() is None, log_path.read_text()[-3000:]
                time.sleep(0.2)
        finally:
            stop_worker(cluster)
    database.pull()

    run.refresh_from_db()
    explanation.refresh_from_db()
    assert (run.status, explanation.status) == ("succeeded", "done"), (run.error, explanation.error,
                                                                     log_path.read_text()[-3000:])
    assert run.worker_pid not in (None, os.getpid(), cluster.pid)  # a worker of the cluster classified it
    assert run.n_done == 5 and run.cells.count() == 5
    assert all(default_storage.exists(cell.image.name) for cell in run.cells.all())
    assert explanation.summary["target"] in explanation.summary["probabilities"]
    assert default_storage.exists(explanation.figure.name) and default_storage.exists(explanation.overlay.name)
    assert Task.objects.filter(name__in=names, success=True).count() == 2 and not OrmQ.objects.exists()
