from django.contrib import admin

from .models import ClassificationRun, ClassifiedCell


@admin.register(ClassificationRun)
class ClassificationRunAdmin(admin.ModelAdmin):
    list_display = ["id", "name", "owner", "site", "model_set_name", "status", "n_total", "locked", "created"]
    list_filter = ["status", "locked", "site"]
    search_fields = ["name", "model_set_name"]
    readonly_fields = ["created", "started", "finished", "signed_off_by", "signed_off_at"]


@admin.register(ClassifiedCell)
class ClassifiedCellAdmin(admin.ModelAdmin):
    list_display = ["id", "run", "original_name", "predicted_type", "final_type", "corrected_by", "resolved"]
    list_select_related = ["predicted_type", "final_type", "corrected_by", "run"]
    raw_id_fields = ["run"]
