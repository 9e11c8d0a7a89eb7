"""A classification run whose django-q2 worker is killed (SIGKILL) mid-run ends up failed, keeping its cells.

A real `manage.py qcluster` subprocess classifies a queued run. On SQLite the test database is copied to
a file the subprocess uses (DATABASE_URL=sqlite:////abs/path) and copied back afterwards; on MariaDB the
subprocess connects to the test database itself.
"""

import csv
import io
import os
import socket
import time
import zipfile
from datetime import timedelta
from pathlib import Path

import pytest
from django.core.files.storage import default_storage
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse
from django.utils import timezone

from apps.analysis import services
from apps.analysis.models import ClassificationRun, ClassifiedCell
from apps.operations.workers import is_lost, pid_alive
from tests.shared_db import SharedDatabase

from .conftest import DEMO

COPIES = 4  # 4 x 130 demo images: 520 files, 33 chunks of 16 in the worker


def _demo_zip(copies: int, first: int | None = None) -> bytes:
    with open(DEMO / "pbc" / "labels.csv") as handle:
        paths = [row["path"] for row in csv.DictReader(handle)][:first]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for copy in range(copies):
            for path in paths:
                archive.write(DEMO / "pbc" / path, f"copy{copy}/{path}")
    return buffer.getvalue()


def _progress(database: SharedDatabase, run_id: int) -> tuple[str, int, int]:
    return database.row('SELECT status, n_done, n_total FROM "ClassificationRuns" WHERE id = ?', (run_id,),
                        lambda: ClassificationRun.objects.values_list("status", "n_done", "n_total").get(pk=run_id))


@pytest.mark.slow
def test_a_killed_classification_worker_leaves_a_failed_run_with_its_cells(
        transactional_db, tiny_model_set, lab_user, lab_client, settings, tmp_path):
    earlier = services.start_run(owner=lab_user, files=[SimpleUploadedFile("few.zip", _demo_zip(1, first=6))],
                                 run_async=False, name="earlier")
    assert earlier.status == ClassificationRun.Status.SUCCEEDED
    earlier_cells = list(earlier.cells.values_list("pk", "final_type_id", "image"))

    settings.HEMOWEB_CLASSIFY_SYNC_MAX = 1  # every upload becomes a django-q2 task
    run = services.start_run(owner=lab_user, files=[SimpleUploadedFile("sample.zip", _demo_zip(COPIES))])
    assert run.status == ClassificationRun.Status.QUEUED and run.n_total == 130 * COPIES
    upload = run.upload
    database = SharedDatabase(tmp_path, Q_WORKERS="1", CLASSIFY_CHUNK="16", VAR_DIR=str(tmp_path / "var"))
    database.push()
    log_path = tmp_path / "qcluster.log"
    (status, done, total), cluster_pid = database.qcluster_killed_midway(log_path, lambda: _progress(database, run.pk),
                                                                         timeout=90)
    assert status == "running" and 0 < done < total, (status, done, total, log_path.read_text()[-3000:])
    database.pull()

    run.refresh_from_db()
    assert run.status == ClassificationRun.Status.RUNNING  # the worker could record nothing
    assert run.worker_host == socket.gethostname() and run.worker_pid not in (None, os.getpid(), cluster_pid)
    worker_pid = run.worker_pid
    deadline = time.monotonic() + 10  # the orphaned worker may need a moment to be reaped
    while pid_alive(worker_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    n_done = run.n_done
    assert n_done > 0 and n_done % 16 == 0  # whole chunks only

    # the progress partial (polled by the run page) finds the lost worker and tells the user
    response = lab_client.get(reverse("analysis:progress", args=[run.pk]), HTTP_HX_REQUEST="true")
    assert response.status_code == 200 and response["HX-Refresh"] == "true"
    run.refresh_from_db()
    assert run.status == ClassificationRun.Status.FAILED and run.finished is not None
    assert f"worker process {worker_pid} on {socket.gethostname()}" in run.error
    assert f"after {n_done} of {130 * COPIES} files" in run.error and "killed" in run.error
    assert "cells classified so far are kept" in run.error
    assert run.error in response.content.decode()

    # the cells of every committed chunk are kept, each with its image; nothing half-written is left
    cells = list(run.cells.order_by("index"))
    assert [cell.index for cell in cells] == list(range(n_done)) and run.n_done == n_done and run.skipped == []
    assert all(default_storage.exists(cell.image.name) for cell in cells)
    stored = set(default_storage.listdir(f"analysis/{run.pk}")[1])
    assert {Path(cell.image.name).name for cell in cells} == stored
    assert run.upload == "" and not default_storage.exists(upload)

    # the API reads the same; the earlier run and the model set are untouched
    body = lab_client.get(f"/api/classification-runs/{run.pk}/").json()
    assert body["status"] == "failed" and body["n_done"] == n_done and body["error"] == run.error
    assert len(body["cells"]) == n_done
    earlier.refresh_from_db()
    assert earlier.status == ClassificationRun.Status.SUCCEEDED
    assert list(earlier.cells.values_list("pk", "final_type_id", "image")) == earlier_cells
    assert (tiny_model_set.path / "set.json").is_file()


def test_a_run_whose_worker_lives_stays_running_and_a_silent_one_is_failed(db, tiny_model_set, lab_user, settings):
    run = ClassificationRun.objects.create(owner=lab_user, model_set=tiny_model_set, model_set_name="tiny",
                                           n_total=10)
    assert ClassificationRun.claim(run.pk, status="queued", to="running")
    assert not ClassificationRun.claim(run.pk, status="queued", to="running")  # one worker only
    run.refresh_from_db()
    assert run.worker_pid == os.getpid() and not is_lost(run, settings.HEMOWEB_CLASSIFY_STALE_SECONDS)
    assert services.check_worker(run).status == ClassificationRun.Status.RUNNING  # this process: alive

    # a worker on another machine that stopped reporting
    ClassificationRun.objects.filter(pk=run.pk).update(
        worker_host="other-node", worker_pid=1, n_done=4,
        heartbeat=timezone.now() - timedelta(seconds=settings.HEMOWEB_CLASSIFY_STALE_SECONDS + 5))
    run.refresh_from_db()
    run = services.check_worker(run)
    assert run.status == ClassificationRun.Status.FAILED
    assert "worker process 1 on other-node" in run.error and "after 4 of 10 files" in run.error

    # a finished run is never touched, whatever its heartbeat says
    done = ClassificationRun.objects.create(owner=lab_user, model_set_name="tiny", status="succeeded",
                                            worker_host="other-node", worker_pid=1, heartbeat=run.heartbeat)
    assert services.check_worker(done).status == ClassificationRun.Status.SUCCEEDED
    assert ClassifiedCell.objects.count() == 0
