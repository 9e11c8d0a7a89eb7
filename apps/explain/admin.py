from django.contrib import admin

from .models import Explanation


@admin.register(Explanation)
class ExplanationAdmin(admin.ModelAdmin):
    list_display = ["id", "method", "node", "target", "status", "seconds", "created"]
    list_filter = ["status", "method", "node"]
    search_fields = ["image_sha256", "key"]
    readonly_fields = ["key", "summary", "settings", "created", "started", "finished"]
    raw_id_fields = ["model", "cell", "requested_by"]
