"""Explaining cells through the service: cache, one computation per request, the queue, bad input."""

import io
import threading
import time

import numpy as np
import pytest
from django.db import OperationalError, connection
from django_q.models import OrmQ
from PIL import Image

from apps.explain import services, tasks
from apps.explain.models import Explanation
from apps.explain.services import request_explanation, resolve_model
from hemoweb.ml.explain import ExplainError


@pytest.fixture
def root_model(tiny_model_set):
    return resolve_model(node="ROOT")


@pytest.fixture
def cell(pbc_dataset):
    return pbc_dataset.cells.order_by("id").first()


@pytest.fixture
def computations(monkeypatch):
    """Counts the attributions actually computed (the real function still runs)."""
    calls = []
    real = services.explain

    def counting(*args, **kwargs):
        calls.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(services, "explain", counting)
    return calls


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_explaining_a_demo_cell_writes_both_pictures_and_the_numbers(root_model, cell, computations, settings):
    settings.HEMOWEB_EXPLAIN_INLINE_SECONDS = 60  # computed in the request even on a loaded machine
    outcome = request_explanation(model=root_model, method="ig", cell=cell)
    row = outcome.explanation
    assert row.status == Explanation.Status.DONE and not outcome.queued and computations == ["ig"]
    with row.overlay.open("rb") as handle:
        overlay = Image.open(io.BytesIO(handle.read()))
    assert overlay.format == "PNG" and overlay.size == (cell.width, cell.height)
    with row.figure.open("rb") as handle:
        figure = Image.open(io.BytesIO(handle.read()))
    assert figure.format == "PNG" and figure.size[0] > 3 * 256
    summary = row.summary
    assert summary["target"] in summary["probabilities"] and summary["target"] == summary["predicted"]
    assert 0 <= summary["central_share"] <= 1 and summary["max"] >= summary["mean"]
    assert row.overlay.name.startswith("explanations/") and row.settings["n_steps"] == 8


def test_the_same_request_again_comes_from_the_cache(root_model, cell, computations):
    first = request_explanation(model=root_model, method="occlusion", cell=cell, settings_={"window": 8})
    again = request_explanation(model=root_model, method="occlusion", cell=cell, settings_={"window": 8, "stride": 8})
    assert again.cached and again.explanation.pk == first.explanation.pk and computations == ["occlusion"]
    other = request_explanation(model=root_model, method="occlusion", cell=cell, settings_={"window": 6})
    assert not other.cached and other.explanation.pk != first.explanation.pk and len(computations) == 2


def test_a_retrained_model_file_is_not_served_from_the_old_cache(root_model, cell, computations):
    import os

    first = request_explanation(model=root_model, method="gradcam", cell=cell)
    stat = root_model.weights_path.stat()
    os.utime(root_model.weights_path, (stat.st_atime, stat.st_mtime + 10))
    second = request_explanation(model=root_model, method="gradcam", cell=cell)
    assert second.explanation.pk != first.explanation.pk and len(computations) == 2


def test_a_deleted_picture_is_made_again(root_model, cell, computations):
    first = request_explanation(model=root_model, method="gradcam", cell=cell).explanation
    first.figure.storage.delete(first.figure.name)
    again = request_explanation(model=root_model, method="gradcam", cell=cell)
    assert again.explanation.pk == first.pk and again.explanation.files_present() and len(computations) == 2


@pytest.mark.django_db(transaction=True)
def test_two_identical_requests_at_once_compute_once(root_model, cell, computations, settings):
    """Both requests race for the same key: one row, one queued job, one computation."""
    settings.HEMOWEB_EXPLAIN_INLINE_SECONDS = 0.0  # both go the queue way: the race is on the row, not the CPU
    barrier = threading.Barrier(2)
    results, errors = [], []

    def ask():
        try:
            barrier.wait()
            deadline = time.monotonic() + 60
            while True:
                try:
                    results.append(request_explanation(model=root_model, method="ig", cell=cell,
                                                       settings_={"n_steps": 40}))
                    break
                except OperationalError as error:
                    # SQLite's shared in-memory test database answers "table is locked" at once where
                    # the file database of a real install waits for the lock (timeout 30 s): wait here.
                    if "locked" not in str(error) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        except Exception as error:  # reported below
            errors.append(error)
        finally:
            connection.close()

    threads = [threading.Thread(target=ask) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    assert not errors, errors
    row = Explanation.objects.get()
    assert {outcome.explanation.pk for outcome in results} == {row.pk} and len(results) == 2
    assert sorted(outcome.queued for outcome in results) == [False, True]  # the other one joined
    assert OrmQ.objects.count() == 1
    tasks.run_explanation(row.pk)
    tasks.run_explanation(row.pk)  # a duplicate delivery finds the row taken and does nothing
    assert computations == ["ig"] and Explanation.objects.get().status == Explanation.Status.DONE


def test_only_one_worker_can_take_a_queued_explanation(root_model, cell, settings):
    settings.HEMOWEB_EXPLAIN_INLINE_SECONDS = 0.0
    row = request_explanation(model=root_model, method="gradcam", cell=cell).explanation
    first, second = Explanation.objects.get(pk=row.pk), Explanation.objects.get(pk=row.pk)
    assert first.claim() is True and second.claim() is False
    assert request_explanation(model=root_model, method="gradcam", cell=cell).joined


def test_upload_of_any_size_and_mode_is_converted(root_model):
    grey = Image.fromarray(np.random.default_rng(1).integers(0, 255, (75, 45), dtype=np.uint8), mode="L")
    outcome = request_explanation(model=root_model, method="gradcam", upload=png_bytes(grey))
    row = outcome.explanation
    assert row.status == Explanation.Status.DONE and row.cell is None
    with row.overlay.open("rb") as handle:
        assert Image.open(handle).size == (45, 75)


def test_a_file_that_is_not_an_image_is_refused(root_model):
    with pytest.raises(ExplainError, match="cannot be explained"):
        request_explanation(model=root_model, method="gradcam", upload=b"%PDF-1.4 not a cell")
    assert not Explanation.objects.exists()


def test_a_class_not_in_the_node_is_refused(root_model, cell):
    with pytest.raises(ExplainError, match="not an output of the ROOT classifier"):
        request_explanation(model=root_model, method="ig", cell=cell, target="NGS")
    assert not Explanation.objects.exists()


def test_any_class_of_the_node_can_be_explained(root_model, cell):
    classes = services.model_classes(root_model)
    row = request_explanation(model=root_model, method="gradcam", cell=cell, target=classes[-1]).explanation
    assert row.summary["target"] == classes[-1]


def test_missing_weights_give_a_clear_message_and_store_nothing(root_model, cell):
    root_model.weights_path.unlink()
    with pytest.raises(ExplainError, match="weights file of model .* is missing"):
        request_explanation(model=root_model, method="gradcam", cell=cell)
    assert not Explanation.objects.exists()


def test_settings_that_would_take_minutes_are_refused(root_model, cell, settings):
    settings.HEMOWEB_EXPLAIN_MAX_SECONDS = 0.001
    with pytest.raises(ExplainError, match="would take about .* passes through the model"):
        request_explanation(model=root_model, method="occlusion", cell=cell, settings_={"window": 2, "stride": 1})
    assert not Explanation.objects.exists()


def test_long_settings_go_to_the_queue_with_progress_and_a_warning(root_model, cell, settings):
    settings.HEMOWEB_EXPLAIN_INLINE_SECONDS = 0.0
    settings.HEMOWEB_EXPLAIN_WARN_SECONDS = 0.0
    outcome = request_explanation(model=root_model, method="occlusion", cell=cell, settings_={"window": 4, "stride": 1})
    row = outcome.explanation
    assert outcome.queued and row.status == Explanation.Status.QUEUED and "background" in row.warning
    assert OrmQ.objects.count() == 1  # the django-q2 job, as the worker will take it
    joined = request_explanation(model=root_model, method="occlusion", cell=cell, settings_={"window": 4, "stride": 1})
    assert joined.joined and joined.explanation.pk == row.pk and OrmQ.objects.count() == 1
    assert tasks.run_explanation(row.pk) == "done"  # what the worker runs
    row.refresh_from_db()
    assert row.status == Explanation.Status.DONE and row.progress == 1.0 and row.files_present()
    assert tasks.run_explanation(row.pk) == "done"  # a second delivery computes nothing


def test_a_failure_is_recorded_on_the_row_and_tried_again_later(root_model, cell, settings):
    settings.HEMOWEB_EXPLAIN_INLINE_SECONDS = 0.0
    row = request_explanation(model=root_model, method="gradcam", cell=cell).explanation
    root_model.weights_path.rename(root_model.weights_path.with_suffix(".moved"))
    tasks.run_explanation(row.pk)
    row.refresh_from_db()
    assert row.status == Explanation.Status.FAILED and "missing" in row.error
    root_model.weights_path.with_suffix(".moved").rename(root_model.weights_path)
    settings.HEMOWEB_EXPLAIN_INLINE_SECONDS = 10.0
    again = request_explanation(model=root_model, method="gradcam", cell=cell).explanation
    assert again.pk == row.pk and again.status == Explanation.Status.DONE and again.error == ""


def test_models_are_found_by_node_or_id(tiny_model_set):
    root = resolve_model(node="ROOT")
    assert resolve_model(model_id=root.pk) == root and resolve_model() == root
    with pytest.raises(ExplainError, match="No trained model classifies"):
        resolve_model(node="PLT")
    with pytest.raises(ExplainError, match="no ready model with id"):
        resolve_model(model_id=999999)


def test_a_computation_whose_worker_died_is_started_again(root_model, cell, computations):
    from datetime import timedelta

    from django.utils import timezone

    row = request_explanation(model=root_model, method="gradcam", cell=cell).explanation
    Explanation.objects.filter(pk=row.pk).update(status=Explanation.Status.RUNNING,
                                                 started=timezone.now() - timedelta(minutes=5))
    assert request_explanation(model=root_model, method="gradcam", cell=cell).joined  # still within its time
    Explanation.objects.filter(pk=row.pk).update(started=timezone.now() - timedelta(hours=2))
    again = request_explanation(model=root_model, method="gradcam", cell=cell)
    assert not again.joined and again.explanation.status == Explanation.Status.DONE and len(computations) == 2
