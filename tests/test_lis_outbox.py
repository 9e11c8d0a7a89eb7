"""The LIS outbox end to end: real runs of the tiny model set on the demo cells, signed off, queued and
sent over MLLP to a real listener the test starts; refusals, silence, wrong ACKs, back-off and restarts."""

import logging
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.utils import timezone

from apps.analysis import services
from apps.analysis.models import ClassificationRun
from apps.lis import outbox
from apps.lis.messages import build_hl7
from apps.lis.models import LisConnection, OutboxMessage
from tests.shared_db import SharedDatabase, stop_worker
from tests.test_analysis_services import demo_zip

from .lis_listener import MllpListener, acks, control_id_of, free_port, in_turn, silent

REPO = Path(__file__).resolve().parent.parent
PATIENT = "PAT-SECRET-4711"
State = OutboxMessage.State


def make_run(owner, accession: str = "ACC-77") -> ClassificationRun:
    run = services.start_run(owner=owner, files=[SimpleUploadedFile("s.zip", demo_zip(1))],
                             identity={"accession": accession, "patient_identifier": PATIENT,
                                       "specimen_type": "peripheral-blood"})
    assert run.status == ClassificationRun.Status.SUCCEEDED, run.error
    return run


def sign_off(run, user, capture) -> ClassificationRun:
    """Review every cell (accept its type) and sign off, running the callbacks of the committed sign-off."""
    for cell in run.cells.all():
        services.review_cell(cell_id=cell.pk, user=user)
    with capture(execute=True):
        return services.sign_off(run_id=run.pk, user=user, reason="A small test sample.")


@pytest.fixture
def listener():
    with MllpListener() as lis:
        yield lis


@pytest.fixture
def connection(db, listener):
    return LisConnection.objects.create(name="Lab LIS", host=listener.host, port=listener.port, timeout_s=2)


@pytest.fixture
def signed_run(tiny_model_set, lab_user, connection, django_capture_on_commit_callbacks):
    return sign_off(make_run(lab_user), lab_user, django_capture_on_commit_callbacks)


def only_message(run) -> OutboxMessage:
    (message,) = OutboxMessage.objects.filter(run=run)
    return message


def test_sign_off_queues_the_message_built_then_and_a_pass_delivers_it(signed_run, listener, connection, caplog,
                                                                       lab_client):
    message = only_message(signed_run)
    assert message.state == State.QUEUED and message.connection == connection and message.attempts == 0
    assert control_id_of(message.message) == message.control_id and PATIENT in message.message
    assert message.message.split("\r")[1:] == build_hl7(signed_run, control_id=message.control_id).split("\r")[1:]
    caplog.set_level(logging.INFO, logger="apps.lis")
    (handled,) = outbox.send_due()
    message.refresh_from_db()
    assert handled.pk == message.pk and message.state == State.SENT and message.attempts == 1
    assert message.sent_at and message.last_error == "" and f"MSA|AA|{message.control_id}" in message.ack
    assert listener.received == [message.message]  # exactly what was stored at sign-off
    assert outbox.send_due() == [] and len(listener.received) == 1  # a sent message is not sent again
    api = lab_client.get(f"/api/classification-runs/{signed_run.pk}/").json()["lis_messages"]
    assert api == [{"control_id": message.control_id, "connection": "Lab LIS", "state": "sent", "attempts": 1,
                    "next_attempt_at": api[0]["next_attempt_at"], "last_error": "", "created": api[0]["created"],
                    "sent_at": api[0]["sent_at"]}] and api[0]["sent_at"]
    logged = " ".join(record.getMessage() for record in caplog.records)
    assert message.control_id in logged and f"run {signed_run.pk}" in logged
    assert PATIENT not in logged and "MSH|" not in logged  # never the message text


def test_queueing_is_once_per_run_and_connection(signed_run, django_capture_on_commit_callbacks):
    first = only_message(signed_run)
    with django_capture_on_commit_callbacks(execute=True):
        signed_run.save()  # any later save of the locked run
    assert outbox.enqueue_signed_off(signed_run) == first
    with pytest.raises(services.AnalysisError):
        services.sign_off(run_id=signed_run.pk, user=signed_run.owner)  # a second sign-off is refused anyway
    assert OutboxMessage.objects.filter(run=signed_run).count() == 1


def test_without_an_enabled_connection_nothing_is_queued(tiny_model_set, lab_user, connection,
                                                         django_capture_on_commit_callbacks):
    connection.enabled = False
    connection.save()
    run = sign_off(make_run(lab_user), lab_user, django_capture_on_commit_callbacks)
    assert run.locked and not OutboxMessage.objects.exists()


def test_a_run_that_cannot_be_exported_is_not_queued_and_the_run_page_says_why(
        tiny_model_set, lab_user, connection, lab_client, django_capture_on_commit_callbacks):
    run = sign_off(make_run(lab_user, accession=""), lab_user, django_capture_on_commit_callbacks)
    assert run.locked and not OutboxMessage.objects.exists()
    page = lab_client.get(f"/analysis/runs/{run.pk}/").content.decode()
    assert "Not sent to Lab LIS" in page and "no accession number" in page


def test_a_refusal_is_retried_after_its_back_off_and_then_delivered(signed_run, listener):
    listener.answer = in_turn(acks("AE", text="Analyser code unknown"), acks("AA"))
    now = timezone.now()
    outbox.send_due(now)
    message = only_message(signed_run)
    assert message.state == State.RETRYING and message.attempts == 1
    assert message.next_attempt_at == now + timedelta(seconds=30)
    assert message.last_error == "The LIS answered AE: Analyser code unknown" and "MSA|AE|" in message.ack
    assert outbox.send_due(now + timedelta(seconds=20)) == []  # still waiting
    outbox.send_due(now + timedelta(seconds=31))
    message.refresh_from_db()
    assert message.state == State.SENT and message.attempts == 2 and message.last_error == ""
    assert listener.received == [message.message, message.message]


def test_a_lis_that_is_down_is_retried_with_growing_waits_and_shown(signed_run, connection, lab_client):
    connection.port = free_port()
    connection.save()
    now, waits = timezone.now(), []
    for _ in range(9):
        outbox.send_due(now)
        message = only_message(signed_run)
        waits.append((message.next_attempt_at - now).total_seconds())
        now = message.next_attempt_at
    assert waits == [30, 60, 120, 240, 480, 960, 1920, 3600, 3600]  # doubling, at most an hour
    assert message.state == State.RETRYING and message.attempts == 9  # no max_attempts: retried until delivered
    assert f"No connection to the LIS at 127.0.0.1:{connection.port}" in message.last_error
    panel = lab_client.get(f"/lis/runs/{signed_run.pk}/outbox/", HTTP_HX_REQUEST="true").content.decode()
    assert "Retrying" in panel and "No connection to the LIS" in panel and 'hx-trigger="every 5s"' in panel
    assert PATIENT not in panel


def test_a_lis_that_never_answers_times_out_and_is_retried(signed_run, listener, connection, lab_client):
    listener.answer = silent
    connection.timeout_s = 0.3
    connection.save()
    started = time.monotonic()
    outbox.send_due()
    assert time.monotonic() - started < 5
    message = only_message(signed_run)
    assert message.state == State.RETRYING and "no acknowledgement within 0.3 s" in message.last_error
    assert listener.received == [message.message]
    page = lab_client.get(f"/analysis/runs/{signed_run.pk}/").content.decode()
    assert "Retrying" in page and "no acknowledgement within 0.3 s" in page


def test_an_ack_for_another_message_id_is_not_taken_as_delivery(signed_run, listener, connection):
    listener.answer = acks("AA", control_id="NOT-THIS-ONE")
    connection.timeout_s = 0.5
    connection.save()
    outbox.send_due()
    message = only_message(signed_run)
    assert message.state == State.RETRYING and message.sent_at is None
    assert "acknowledged message NOT-THIS-ONE" in message.last_error and "not taken as delivered" in message.last_error
    assert "MSA|AA|NOT-THIS-ONE" in message.ack


def test_after_max_attempts_a_message_fails_and_send_again_queues_it(signed_run, listener, connection, lab_client):
    listener.answer = in_turn(acks("AR", text="Rejected"), acks("AR", text="Rejected"), acks("AA"))
    connection.max_attempts = 2
    connection.save()
    now = timezone.now()
    outbox.send_due(now)
    outbox.send_due(now + timedelta(seconds=30))
    message = only_message(signed_run)
    assert message.state == State.FAILED and message.attempts == 2
    assert outbox.send_due(now + timedelta(days=1)) == []  # failed: waits for a person
    page = lab_client.get(f"/analysis/runs/{signed_run.pk}/").content.decode()
    assert "Failed" in page and "Send again" in page and "The LIS answered AR: Rejected" in page
    response = lab_client.post(f"/lis/runs/{signed_run.pk}/send-again/")
    assert response.status_code == 302
    message.refresh_from_db()
    assert message.state == State.QUEUED and message.attempts == 0
    outbox.send_due()
    message.refresh_from_db()
    assert message.state == State.SENT and len(listener.received) == 3
    again = lab_client.post(f"/lis/runs/{signed_run.pk}/send-again/", follow=True).content.decode()
    assert "only a failed message is sent again" in again


def test_send_again_needs_the_lab_staff_role_and_a_post(signed_run, client, outsider):
    client.force_login(outsider)
    assert client.post(f"/lis/runs/{signed_run.pk}/send-again/").status_code == 302  # to the login page
    assert only_message(signed_run).state == State.QUEUED


def test_a_message_left_sending_by_a_killed_sender_is_sent_on_the_next_pass(signed_run, listener):
    message = only_message(signed_run)
    now = timezone.now()
    OutboxMessage.objects.filter(pk=message.pk).update(state=State.SENDING, claimed_at=now - timedelta(seconds=30),
                                                       attempts=1)
    assert outbox.send_due(now) == []  # a sender may still be waiting for its ACK (timeout 2 s + margin)
    assert outbox.send_due(now + timedelta(seconds=90))[0].state == State.SENT
    message.refresh_from_db()
    assert message.attempts == 2 and listener.received == [message.message]


def test_a_disabled_connection_keeps_its_queued_message_until_enabled(signed_run, connection, listener):
    connection.enabled = False
    connection.save()
    assert outbox.send_due() == [] and only_message(signed_run).state == State.QUEUED
    connection.enabled = True
    connection.save()
    assert outbox.send_due()[0].state == State.SENT


def test_a_connection_of_the_run_s_site_wins_over_the_one_for_every_site(signed_run, connection, listener):
    from apps.sites.models import Site

    other = Site.objects.create(name="Other lab")
    site_lis = LisConnection.objects.create(name="Site LIS", host="127.0.0.1", port=1, site=signed_run.site)
    LisConnection.objects.create(name="Other LIS", host="127.0.0.1", port=1, site=other)
    assert LisConnection.for_run(signed_run) == site_lis
    site_lis.enabled = False
    site_lis.save()
    assert LisConnection.for_run(signed_run) == connection


def test_a_second_enabled_connection_for_the_same_sites_is_refused(connection):
    from django.core.exceptions import ValidationError

    with pytest.raises(ValidationError, match="already serves runs without a site connection"):
        LisConnection(name="Second", host="lis", port=2575).full_clean()


@pytest.mark.slow
def test_a_queued_message_survives_into_a_new_process_that_sends_it(transactional_db, tiny_model_set, lab_user,
                                                                   listener, connection, tmp_path):
    """`manage.py lis_send --once` in its own process (hemoweb restarted) sends what the test process queued."""
    for cell in (run := make_run(lab_user)).cells.all():
        services.review_cell(cell_id=cell.pk, user=lab_user)
    services.sign_off(run_id=run.pk, user=lab_user, reason="A small test sample.")  # committed: on_commit runs
    message = only_message(run)
    database = SharedDatabase(tmp_path)
    database.push()
    done = subprocess.run([sys.executable, "manage.py", "lis_send", "--once"], cwd=REPO, env=database.env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "1 sent"
    assert PATIENT not in done.stdout + done.stderr
    database.pull()
    message.refresh_from_db()
    assert message.state == State.SENT and listener.received == [message.message]


@pytest.mark.slow
def test_the_schedule_s_task_runs_on_a_real_qcluster(transactional_db, tiny_model_set, lab_user, listener,
                                                     connection, tmp_path):
    """The `lis-send` schedule (made after migrate) queues its task; a real default qcluster runs it and delivers."""
    from django_q.brokers import get_broker
    from django_q.models import OrmQ, Schedule
    from django_q.scheduler import scheduler

    for cell in (run := make_run(lab_user)).cells.all():
        services.review_cell(cell_id=cell.pk, user=lab_user)
    services.sign_off(run_id=run.pk, user=lab_user, reason="A small test sample.")
    message = only_message(run)
    schedule = Schedule.objects.get(name="lis-send")
    assert schedule.func == "apps.lis.tasks.send_due_task" and schedule.minutes == 1 and schedule.repeats == -1
    Schedule.objects.filter(pk=schedule.pk).update(next_run=timezone.now() - timedelta(seconds=1))
    scheduler(broker=get_broker())  # what the cluster's guard does about every 30 s
    assert OrmQ.objects.count() == 1
    database = SharedDatabase(tmp_path, Q_WORKERS="1", VAR_DIR=str(tmp_path / "var"))
    database.push()
    log_path = tmp_path / "qcluster.log"
    with open(log_path, "w") as log:
        cluster = database.qcluster(log)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and database.row(
                    "SELECT state FROM lis_outboxmessage WHERE id = ?", (message.pk,),
                    lambda: OutboxMessage.objects.filter(pk=message.pk).values_list("state")[0])[0] != State.SENT:
                assert cluster.poll() is None, log_path.read_text()[-3000:]
                time.sleep(0.2)
        finally:
            stop_worker(cluster)
    database.pull()
    message.refresh_from_db()
    assert message.state == State.SENT, log_path.read_text()[-3000:]
    assert listener.received == [message.message]
    assert PATIENT not in log_path.read_text()



@pytest.mark.slow
def test_two_senders_at_once_send_each_message_exactly_once(transactional_db, lab_user, tmp_path):
    """Two `lis_send --once` processes side by side on the same database, a LIS that takes its time: each
    message is claimed by one of them and reaches the LIS once."""
    def slow_ack(message):
        time.sleep(0.5)
        return acks("AA")(message)

    with MllpListener(slow_ack) as listener:
        lis = LisConnection.objects.create(name="Lab LIS", host=listener.host, port=listener.port, timeout_s=5)
        control_ids = [f"CTRL{n:02d}" for n in range(12)]
        for control_id in control_ids:
            run = ClassificationRun.objects.create(owner=lab_user, model_set_name="tiny", locked=True,
                                                   status=ClassificationRun.Status.SUCCEEDED)
            OutboxMessage.objects.create(run=run, connection=lis, control_id=control_id, message=(
                f"MSH|^~\\&|HEMOWEB|LAB|LIS|LAB|20261201||ORU^R01^ORU_R01|{control_id}|P|2.5.1"))
        database = SharedDatabase(tmp_path)
        database.push()
        senders = [subprocess.Popen([sys.executable, "manage.py", "lis_send", "--once"], cwd=REPO, env=database.env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        outputs = [sender.communicate(timeout=120) for sender in senders]
    assert [sender.returncode for sender in senders] == [0, 0], [err[-2000:] for _, err in outputs]
    sent = [int(out.split()[0]) if out.strip() != "nothing due" else 0 for out, _ in outputs]
    assert sum(sent) == 12 and min(sent) >= 1, outputs  # both took part
    assert sorted(control_id_of(message) for message in listener.received) == control_ids  # each exactly once
    database.pull()
    assert set(OutboxMessage.objects.values_list("state", "attempts")) == {(State.SENT, 1)}


def test_curators_see_the_outbox_in_the_admin_and_send_failed_messages_again(signed_run, curator_client, connection):
    message = only_message(signed_run)
    OutboxMessage.objects.filter(pk=message.pk).update(state=State.FAILED, attempts=3, last_error="The LIS answered AR")
    listing = curator_client.get("/admin/lis/outboxmessage/")
    assert listing.status_code == 200 and message.control_id in listing.content.decode()
    assert curator_client.get(f"/admin/lis/outboxmessage/{message.pk}/change/").status_code == 200
    assert curator_client.get("/admin/lis/lisconnection/add/").status_code == 200
    done = curator_client.post("/admin/lis/outboxmessage/", {"action": "send_again", "_selected_action": [message.pk]},
                               follow=True)
    assert "1 failed messages queued again" in done.content.decode()
    message.refresh_from_db()
    assert (message.state, message.attempts) == (State.QUEUED, 0)
    second = curator_client.post("/admin/lis/lisconnection/add/", {"name": "Second", "host": "lis", "port": 2575,
                                                                 "enabled": "on", "timeout_s": 10})
    assert second.status_code == 200 and "Another enabled LIS connection already serves" in second.content.decode()


def test_a_run_awaiting_its_second_sign_off_is_queued_only_once_a_supervisor_signs(
        tiny_model_set, lab_user, connection, django_capture_on_commit_callbacks, django_user_model):
    from django.contrib.auth.models import Group

    run = make_run(lab_user)
    run.site.second_review_blast_share = 0.0  # any blast: a supervisor signs too
    run.site.save()
    first = run.cells.order_by("index").first()
    services.review_cell(cell_id=first.pk, user=lab_user, code="BLA")
    run = sign_off(run, lab_user, django_capture_on_commit_callbacks)
    assert run.awaiting_second_sign_off and not run.locked
    assert not OutboxMessage.objects.exists()  # not final yet
    supervisor = django_user_model.objects.create_user("boss", password="pw-boss")
    supervisor.groups.add(Group.objects.get_or_create(name="Supervisor")[0])
    with django_capture_on_commit_callbacks(execute=True):
        services.second_sign_off(run_id=run.pk, user=supervisor)
    message = only_message(run)
    assert message.state == State.QUEUED and "Second sign-off by boss" in message.message


def test_a_failure_to_queue_never_undoes_the_sign_off_and_the_run_page_queues_it_later(
        tiny_model_set, lab_user, connection, listener, lab_client, django_capture_on_commit_callbacks,
        monkeypatch, caplog):
    import apps.lis.messages

    def broken(run, control_id=None):
        raise ValueError(f"cannot encode {run.patient_identifier}")

    monkeypatch.setattr(apps.lis.messages, "build_hl7", broken)
    run = sign_off(make_run(lab_user), lab_user, django_capture_on_commit_callbacks)
    assert run.locked and not OutboxMessage.objects.exists()
    assert f"run {run.pk}: its LIS message could not be queued (ValueError)" in caplog.text
    assert PATIENT not in caplog.text
    monkeypatch.undo()
    page = lab_client.get(f"/analysis/runs/{run.pk}/").content.decode()
    assert "Not queued for Lab LIS yet." in page and "Send to the LIS" in page
    lab_client.post(f"/lis/runs/{run.pk}/send-again/")
    assert outbox.send_due()[0].state == State.SENT and listener.received == [only_message(run).message]
