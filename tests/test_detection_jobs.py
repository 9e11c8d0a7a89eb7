"""Detector training as a job row: progress per epoch, a registered detector at the end, cancellation half-way."""

import os
import socket
import subprocess

import pytest
import torch

from apps.detection import services
from apps.detection.models import DetectionDataset, Detector, DetectorTrainingJob

pytestmark = pytest.mark.django_db


@pytest.fixture
def demo_detection_dataset(demo_bccd):
    services.import_detections(demo_bccd, dataset="Demo BCCD", fmt="voc")
    torch.set_num_threads(1)
    return DetectionDataset.objects.get(name="Demo BCCD")


def test_training_job_records_progress_and_registers_the_detector(demo_detection_dataset, settings, curator):
    job = services.start_training(dataset=demo_detection_dataset, epochs=1, imgsz=64, device="cpu", user=curator,
                                  queue=False)
    assert job.status == "queued"
    services.run_training(job)
    job.refresh_from_db()
    assert job.status == "done", job.error
    assert (job.epoch, job.epochs_total, job.progress) == (1, 1, 100)
    assert job.worker_pid == os.getpid() and job.heartbeat is not None  # who trains it, and that it is alive
    assert {"map50", "map50_95", "per_class", "precision", "recall"} <= set(job.metrics)
    detector = job.detector
    assert detector.path.is_file() and detector.path.is_relative_to(settings.MODELS_DIR)
    assert detector.path.with_suffix(".json").is_file()
    assert detector.classes == ["Platelets", "RBC", "WBC"]
    assert detector.is_active  # the first detector is the one in use


def test_training_cancelled_half_way_keeps_the_previous_detector(demo_detection_dataset, settings, monkeypatch):
    previous = Detector.objects.create(name="previous", weights="elsewhere.safetensors", is_active=True)
    job = services.start_training(dataset=demo_detection_dataset, epochs=3, imgsz=64, device="cpu", activate=True,
                                  queue=False)
    record_epoch = DetectorTrainingJob.record_epoch

    def record_then_cancel(self, epoch, total, metrics):
        record_epoch(self, epoch, total, metrics)
        services.cancel_training(self)  # what the curator's Cancel button does, after the first epoch

    monkeypatch.setattr(DetectorTrainingJob, "record_epoch", record_then_cancel)
    services.run_training(job)
    job.refresh_from_db()
    assert job.status == "cancelled"
    assert "after 1 of 3 epochs" in job.error and "no model was saved" in job.error
    assert job.detector is None
    assert list(Detector.objects.values_list("name", flat=True)) == ["previous"]
    assert Detector.objects.active() == previous
    assert not list((settings.MODELS_DIR).rglob("*.safetensors"))


def test_cancelling_a_queued_job_stops_it_before_it_starts(demo_detection_dataset):
    job = services.start_training(dataset=demo_detection_dataset, epochs=5, imgsz=64, device="cpu", queue=False)
    services.cancel_training(job)
    services.run_training(DetectorTrainingJob.objects.get(pk=job.pk))
    job.refresh_from_db()
    assert job.status == "cancelled" and job.epoch == 0 and job.started is None


def test_training_form_refuses_bad_sizes_and_queues_a_job(curator_client, demo_detection_dataset, settings,
                                                          django_capture_on_commit_callbacks):
    response = curator_client.post("/detection/train/", {"dataset": demo_detection_dataset.pk, "architecture": "yolov8n.yaml",
                                                         "epochs": 2, "imgsz": 100, "device": "cpu"},
                                   HTTP_HX_REQUEST="true", HTTP_HX_TARGET="jobs")
    assert response.status_code == 200 and not DetectorTrainingJob.objects.exists()
    assert b"multiple of 32" in response.content
    with django_capture_on_commit_callbacks(execute=True):
        response = curator_client.post("/detection/train/", {"dataset": demo_detection_dataset.pk,
                                                             "architecture": "yolov8n.yaml", "epochs": 2, "imgsz": 96,
                                                             "device": "cpu"},
                                       HTTP_HX_REQUEST="true", HTTP_HX_TARGET="jobs")
    job = DetectorTrainingJob.objects.get()
    from django_q.models import OrmQ

    assert OrmQ.objects.filter(key=settings.HEMOWEB_TRAINING_CLUSTER).count() == 1  # the training queue
    assert (job.epochs, job.imgsz, job.status) == (2, 96, "queued")
    assert b"Queued" in response.content and b"<html" not in response.content
    response = curator_client.post(f"/detection/jobs/{job.pk}/cancel/", HTTP_HX_REQUEST="true", HTTP_HX_TARGET="jobs")
    assert b"Cancelled" in response.content


def test_lab_staff_cannot_train(lab_client, demo_detection_dataset):
    response = lab_client.post("/detection/train/", {"dataset": demo_detection_dataset.pk, "epochs": 1, "imgsz": 64})
    assert response.status_code in (302, 403)
    assert not DetectorTrainingJob.objects.exists()


def test_a_training_whose_worker_died_is_failed_and_a_live_one_is_left_alone(demo_detection_dataset):
    dead = subprocess.Popen(["sleep", "60"])
    dead.kill()
    dead.wait()  # killed and reaped: its pid names no process
    host = socket.gethostname()
    lost = services.start_training(dataset=demo_detection_dataset, epochs=5, imgsz=64, device="cpu", queue=False)
    alive = services.start_training(dataset=demo_detection_dataset, epochs=5, imgsz=64, device="cpu", queue=False,
                                    name="alive")
    DetectorTrainingJob.objects.filter(pk=lost.pk).update(status="running", epoch=2, epochs_total=5,
                                                          worker_host=host, worker_pid=dead.pid)
    DetectorTrainingJob.objects.filter(pk=alive.pk).update(status="running", worker_host=host, worker_pid=os.getpid())
    assert [job.pk for job in services.detect_lost_training_jobs()] == [lost.pk]
    lost.refresh_from_db()
    alive.refresh_from_db()
    assert lost.status == "failed" and lost.finished is not None
    assert f"worker process {dead.pid}" in lost.error and "after 2 of 5 epochs" in lost.error
    assert "No model was saved" in lost.error
    assert alive.status == "running"


def test_training_splits_are_recorded_and_the_test_split_is_never_trained_on(demo_detection_dataset):
    job = services.start_training(dataset=demo_detection_dataset, epochs=1, imgsz=64, device="cpu", queue=False,
                                  train_splits=("train", "val"))
    assert job.train_splits == "train,val"
    with pytest.raises(services.DetectionInputError, match="test split stays unseen"):
        services.start_training(dataset=demo_detection_dataset, epochs=1, imgsz=64, device="cpu", queue=False,
                                train_splits=("train", "test"))


def test_train_detector_command_trains_on_the_splits_it_is_given(demo_detection_dataset, capsys):
    from django.core.management import call_command

    call_command("train_detector", "--dataset", "Demo BCCD", "--epochs", "1", "--imgsz", "64", "--device", "cpu",
                 "--train-splits", "train", "val", "--name", "cli detector")
    job = DetectorTrainingJob.objects.get(name="cli detector")
    assert job.status == "done" and job.train_splits == "train,val"
    assert job.detector.name == "cli detector" and job.detector.path.is_file()
    assert "registered" in capsys.readouterr().out
