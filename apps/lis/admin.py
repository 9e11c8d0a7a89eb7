from django.contrib import admin, messages
from simple_history.admin import SimpleHistoryAdmin

from . import outbox
from .models import LisConnection, OutboxMessage


@admin.register(LisConnection)
class LisConnectionAdmin(SimpleHistoryAdmin):
    list_display = ["name", "host", "port", "enabled", "site", "timeout_s", "max_attempts"]
    list_filter = ["enabled", "site"]
    search_fields = ["name", "host"]


@admin.register(OutboxMessage)
class OutboxMessageAdmin(admin.ModelAdmin):
    """What was sent and how it went; the message itself (it holds the patient) is shown, never changed."""

    list_display = ["control_id", "run", "connection", "state", "attempts", "next_attempt_at", "sent_at"]
    list_filter = ["state", "connection"]
    search_fields = ["control_id", "run__accession"]
    readonly_fields = [field.name for field in OutboxMessage._meta.fields]
    actions = ["send_again"]

    def has_add_permission(self, request) -> bool:
        return False  # messages are made by signing a run off

    def has_delete_permission(self, request, obj=None) -> bool:
        return False  # the record of what went to the LIS stays

    @admin.action(description="Send the selected failed messages again")
    def send_again(self, request, queryset):
        failed = queryset.filter(state=OutboxMessage.State.FAILED)
        for message in failed:
            outbox.send_again(message)
        messages.success(request, f"{len(failed)} failed messages queued again "
                                  f"({queryset.count() - len(failed)} were not failed and stay as they are).")
