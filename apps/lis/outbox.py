"""The LIS outbox: a signed-off run's HL7 message is queued once and sent until the LIS acknowledges it.

- `enqueue_signed_off(run)` builds the message when the run is signed off (called after the sign-off's
  transaction commits) and stores it: what goes out is what was signed off, whatever happens later.
- `send_due()` sends every due message (queued, or retrying and its wait over), one ACK each. A refused
  (AE/AR), unanswered or unreachable attempt waits 30 s × 2^(n−1), at most an hour, and is tried again;
  with the connection's `max_attempts` set it is failed after that many (Send again requeues it).
  Without `max_attempts` a message is retried until delivered.
- Nothing is lost across restarts: queued and retrying messages are rows; a message a killed sender left
  `sending` is put back to retrying on the next pass (the LIS may have got it: it is sent again with the
  same control id, MSH-10, so that the LIS can tell it is the same message).

Log lines name the run, the control id and the state, never the message text (it holds the patient).
"""

import logging
import uuid

from django.db import IntegrityError, connection as db_connection, transaction
from django.db.models import F
from django.utils import timezone

from . import mllp
from .models import LisConnection, OutboxMessage

log = logging.getLogger(__name__)
State = OutboxMessage.State


class OutboxError(Exception):
    """A request on the outbox that cannot be done (a lab user reads the text)."""


def new_control_id() -> str:
    """A message control id (MSH-10) that names nothing about the patient: 20 hex digits."""
    return uuid.uuid4().hex[:20].upper()


def enqueue_signed_off(run) -> OutboxMessage | None:
    """Queue the run's result for its LIS connection; None without an enabled connection or if the run
    cannot be exported. Once per run and connection: a second call returns the first message."""
    lis = LisConnection.for_run(run)
    if lis is None or not run.locked:
        return None
    existing = OutboxMessage.objects.filter(run=run, connection=lis).first()
    if existing is not None:
        return existing
    from .messages import build_hl7, export_refusal

    if export_refusal(run) is not None:
        log.info("run %s: not queued for the LIS %s (cannot be exported)", run.pk, lis.name)
        return None
    control_id = new_control_id()
    text = build_hl7(run, control_id=control_id)
    try:
        with transaction.atomic():
            message = OutboxMessage.objects.create(run=run, connection=lis, control_id=control_id, message=text)
    except IntegrityError:  # queued by a concurrent sign-off request meanwhile
        return OutboxMessage.objects.get(run=run, connection=lis)
    log.info("run %s: LIS message %s queued for %s", run.pk, control_id, lis.name)
    return message


def enqueue_after_commit(run_id: int) -> None:
    """Queue the run's message once the sign-off is committed; a failure here never undoes the sign-off
    (the run page then shows it as not queued, with a button to queue it)."""
    def enqueue() -> None:
        from apps.analysis.models import ClassificationRun

        try:
            enqueue_signed_off(ClassificationRun.objects.get(pk=run_id))
        except Exception as error:  # noqa: BLE001 - the sign-off stands; the run page offers to queue it again
            log.error("run %s: its LIS message could not be queued (%s)", run_id, type(error).__name__)

    transaction.on_commit(enqueue)


def send_again(message: OutboxMessage) -> OutboxMessage:
    """Queue a failed message again, its attempts counted from zero; the same text and control id."""
    if not OutboxMessage.objects.filter(pk=message.pk, state=State.FAILED).update(
            state=State.QUEUED, attempts=0, next_attempt_at=timezone.now()):
        raise OutboxError(f"Message {message.control_id} is not failed: only a failed message is sent again.")
    log.info("run %s: LIS message %s queued again", message.run_id, message.control_id)
    message.refresh_from_db()
    return message


def queue_again(*, run_id: int) -> OutboxMessage:
    """Send again: requeue the run's failed message, or queue a signed-off run that has none yet."""
    from apps.analysis.models import ClassificationRun

    run = ClassificationRun.objects.get(pk=run_id)
    failed = run.lis_messages.filter(state=State.FAILED).first()
    if failed is not None:
        return send_again(failed)
    if not run.locked:
        raise OutboxError("Only a signed-off run is sent to the LIS.")
    lis = LisConnection.for_run(run)
    if lis is None:
        raise OutboxError("No LIS connection is enabled for this run's site.")
    existing = run.lis_messages.filter(connection=lis).first()
    if existing is not None:
        raise OutboxError(f"Message {existing.control_id} is {existing.get_state_display().lower()}: "
                          "only a failed message is sent again.")
    from .messages import export_refusal

    refusal = export_refusal(run)
    if refusal:
        raise OutboxError(refusal)
    return enqueue_signed_off(run)


def send_due(now=None) -> list[OutboxMessage]:
    """One pass: requeue messages left sending by a killed sender, then send every due message once."""
    now = now or timezone.now()
    requeue_stale(now)
    handled, seen = [], set()
    while (message := _claim_next(now, seen)) is not None:
        seen.add(message.pk)
        handled.append(_deliver(message, now))
    return handled


def requeue_stale(now) -> int:
    """Messages `sending` for longer than their timeout plus a margin go back to retrying, due now."""
    n = 0
    for message in OutboxMessage.objects.filter(state=State.SENDING).select_related("connection"):
        if message.claimed_at is None or message.claimed_at < now - message.stale_after:
            if OutboxMessage.objects.filter(pk=message.pk, state=State.SENDING, claimed_at=message.claimed_at).update(
                    state=State.RETRYING, next_attempt_at=now,
                    last_error="The sender stopped while waiting for the LIS's acknowledgement (hemoweb restarted?); "
                               "sent again with the same control id."):
                n += 1
                log.warning("run %s: LIS message %s was left sending; retrying", message.run_id, message.control_id)
    return n


def _claim_next(now, seen: set[int]) -> OutboxMessage | None:
    """Take the next due message for this sender: marked sending, its attempt counted.

    Row locks (skip locked) keep two senders on MariaDB apart; the conditional update does the same on
    SQLite, which has no row locks: of two senders only one changes the row from its due state."""
    while True:
        with transaction.atomic():
            due = OutboxMessage.objects.due(now).exclude(pk__in=seen).order_by("next_attempt_at", "pk")
            if db_connection.features.has_select_for_update_skip_locked:
                due = due.select_for_update(skip_locked=True)
            message = due.first()
            if message is None:
                return None
            taken = OutboxMessage.objects.filter(pk=message.pk, state=message.state).update(
                state=State.SENDING, claimed_at=now, attempts=F("attempts") + 1)
        if taken:
            message = OutboxMessage.objects.select_related("connection").get(pk=message.pk)
            log.info("run %s: sending LIS message %s (attempt %s)", message.run_id, message.control_id,
                     message.attempts)
            return message
        seen.add(message.pk)  # another sender took it first


def _deliver(message: OutboxMessage, now) -> OutboxMessage:
    """Send one claimed message and record how it went."""
    lis = message.connection
    try:
        ack = mllp.send(lis.host, lis.port, message.message, message.control_id, timeout=lis.timeout_s)
    except mllp.MllpError as error:
        message.last_error = str(error)
        message.ack = error.answer
        if lis.max_attempts and message.attempts >= lis.max_attempts:
            message.state = State.FAILED
        else:
            message.state, message.next_attempt_at = State.RETRYING, now + message.backoff()
        message.save(update_fields=["state", "next_attempt_at", "last_error", "ack"])
        log.warning("run %s: LIS message %s %s after attempt %s (%s)", message.run_id, message.control_id,
                    message.state, message.attempts, type(error).__name__)
        return message
    message.state, message.sent_at, message.ack, message.last_error = State.SENT, timezone.now(), ack.raw, ""
    message.save(update_fields=["state", "sent_at", "ack", "last_error"])
    log.info("run %s: LIS message %s sent (%s)", message.run_id, message.control_id, ack.code)
    return message


SIGN_OFF_FIELDS = {"locked", "signed_off_at", "second_signed_off_at"}


def queue_on_sign_off(sender, instance, raw: bool = False, update_fields=None, **kwargs) -> None:
    """post_save of a run: once a save signs it off (or records its second sign-off), queue its message."""
    if raw or not instance.locked or (update_fields is not None and not SIGN_OFF_FIELDS & set(update_fields)):
        return
    enqueue_after_commit(instance.pk)


def outbox_state(run) -> dict:
    """What the run page shows: the run's messages; for a signed-off run its LIS connection has no message
    of (queueing failed, or the connection came later), why it cannot be sent or that it can be queued now."""
    messages = list(run.lis_messages.select_related("connection"))
    lis = LisConnection.for_run(run) if run.locked else None
    missing = lis is not None and all(message.connection_id != lis.pk for message in messages)
    refusal = None
    if missing:
        from .messages import export_refusal

        refusal = export_refusal(run)
    return {"messages": messages, "connection": lis, "missing": missing, "refusal": refusal,
            "active": any(message.state in (State.QUEUED, State.SENDING, State.RETRYING) for message in messages)}
