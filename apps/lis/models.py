"""Results for the lab information system: the LIS connection and the outbox of HL7 messages it is sent.

An outbox message is built once, when its run is signed off, and kept as sent: a restart, a LIS
down for a weekend or a later change of the run's data never changes what goes out. Its text holds
the patient identifier: only its run, control id and state are ever logged.
"""

from datetime import timedelta

from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.utils import timezone
from simple_history.models import HistoricalRecords

# Waits between attempts: 30 s, 1 min, 2 min, ... at most an hour.
BACKOFF_FIRST_S = 30
BACKOFF_MAX_S = 3600
# A message `sending` for longer than its connection's timeout plus this is taken as left by a killed sender.
STALE_MARGIN_S = 60


class LisConnection(models.Model):
    """Where signed-off results go: a LIS that listens for HL7 v2 over MLLP (TCP)."""

    name = models.CharField(max_length=100, unique=True)
    host = models.CharField(max_length=255, help_text="The LIS's host name or IP address.")
    port = models.PositiveIntegerField(validators=[MinValueValidator(1), MaxValueValidator(65535)])
    enabled = models.BooleanField(default=True, help_text="Signed-off runs are queued for an enabled connection and "
                                                          "its queued messages are sent; a disabled one keeps them.")
    site = models.ForeignKey("sites.Site", null=True, blank=True, on_delete=models.PROTECT,
                             related_name="lis_connections",
                             help_text="Runs of this site go here; empty: runs of every site without its own.")
    timeout_s = models.FloatField(default=10.0, validators=[MinValueValidator(0.1), MaxValueValidator(600)],
                                  verbose_name="timeout (s)",
                                  help_text="How long to wait for the connection and the LIS's ACK of one message.")
    max_attempts = models.PositiveIntegerField(null=True, blank=True, validators=[MinValueValidator(1)],
                                               help_text="After this many attempts a message is failed (it waits for "
                                                         "Send again); empty: retried until it is delivered.")
    notes = models.TextField(blank=True)
    history = HistoricalRecords()

    class Meta:
        verbose_name = "LIS connection"

    def __str__(self) -> str:
        return f"{self.name} ({self.host}:{self.port})"

    def clean(self) -> None:
        if self.enabled and LisConnection.objects.filter(enabled=True, site=self.site).exclude(pk=self.pk).exists():
            where = f"site {self.site}" if self.site else "runs without a site connection of their own"
            raise ValidationError(f"Another enabled LIS connection already serves {where}: disable it first.")

    @classmethod
    def for_run(cls, run) -> "LisConnection | None":
        """The enabled connection of the run's site, else the enabled one for every site, else None."""
        enabled = cls.objects.filter(enabled=True).order_by("pk")
        return (run.site_id and enabled.filter(site_id=run.site_id).first()) or enabled.filter(site=None).first()


class OutboxMessageQuerySet(models.QuerySet):
    def due(self, now):
        """Queued or retrying, their wait over, for an enabled connection (its ids read first: a row lock on
        this queryset then locks outbox rows only, never the connection's row)."""
        enabled = list(LisConnection.objects.filter(enabled=True).values_list("pk", flat=True))
        return self.filter(state__in=[OutboxMessage.State.QUEUED, OutboxMessage.State.RETRYING],
                           next_attempt_at__lte=now, connection_id__in=enabled)


class OutboxMessage(models.Model):
    """One HL7 message of one signed-off run for one LIS connection, and how its sending went."""

    class State(models.TextChoices):
        QUEUED = "queued", "Queued"
        SENDING = "sending", "Sending"
        SENT = "sent", "Sent"
        RETRYING = "retrying", "Retrying"
        FAILED = "failed", "Failed"

    run = models.ForeignKey("analysis.ClassificationRun", on_delete=models.PROTECT, related_name="lis_messages")
    connection = models.ForeignKey(LisConnection, on_delete=models.PROTECT, related_name="messages")
    control_id = models.CharField(max_length=20, unique=True, help_text="MSH-10: the LIS's ACK names it in MSA-2.")
    message = models.TextField(help_text="The HL7 v2 message as built at sign-off (holds the patient identifier).")
    state = models.CharField(max_length=10, choices=State.choices, default=State.QUEUED, db_index=True)
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(default=timezone.now, db_index=True)
    claimed_at = models.DateTimeField(null=True, blank=True, help_text="When a sender took it (state sending).")
    last_error = models.TextField(blank=True)
    ack = models.TextField(blank=True, help_text="The LIS's last acknowledgement.")
    created = models.DateTimeField(auto_now_add=True)
    sent_at = models.DateTimeField(null=True, blank=True)

    objects = OutboxMessageQuerySet.as_manager()

    class Meta:
        verbose_name = "LIS outbox message"
        ordering = ["created", "pk"]
        constraints = [models.UniqueConstraint(fields=["run", "connection"], name="lis_one_message_per_run_and_lis")]

    def __str__(self) -> str:
        return f"run {self.run_id} → {self.connection_id}: {self.control_id} ({self.state})"

    def backoff(self) -> timedelta:
        """The wait after the `attempts`-th failed attempt: 30 s × 2^(n−1), at most an hour."""
        return timedelta(seconds=min(BACKOFF_FIRST_S * 2 ** min(max(self.attempts - 1, 0), 16), BACKOFF_MAX_S))

    @property
    def stale_after(self) -> timedelta:
        return timedelta(seconds=self.connection.timeout_s + STALE_MARGIN_S)
