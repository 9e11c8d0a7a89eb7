from django.contrib import admin

from .models import TrainingJob


@admin.register(TrainingJob)
class TrainingJobAdmin(admin.ModelAdmin):
    list_display = ["pk", "name", "dataset", "status", "created", "finished"]
    list_filter = ["status"]
    readonly_fields = ["progress", "metrics", "log", "error", "heartbeat", "worker_host", "worker_pid", "task_id"]
