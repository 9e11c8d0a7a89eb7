from rest_framework import serializers

from .models import OutboxMessage


class OutboxMessageSerializer(serializers.ModelSerializer):
    """A run's LIS message as the API shows it: its state, never its text (it holds the patient)."""

    connection = serializers.CharField(source="connection.name", read_only=True)

    class Meta:
        model = OutboxMessage
        fields = ["control_id", "connection", "state", "attempts", "next_attempt_at", "last_error", "created",
                  "sent_at"]
        read_only_fields = fields
