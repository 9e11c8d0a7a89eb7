from django.contrib import admin, messages
from simple_history.admin import SimpleHistoryAdmin

from . import services
from .models import Site, SiteMember, VerificationStudy


class SiteMemberInline(admin.TabularInline):
    model = SiteMember
    extra = 0
    autocomplete_fields = ["user"]
    verbose_name = "member (works at this site)"


@admin.register(Site)
class SiteAdmin(SimpleHistoryAdmin):
    list_display = ["name", "is_default", "microscope", "stain", "um_per_pixel", "model_set", "reference_dataset"]
    search_fields = ["name", "microscope", "stain"]
    fieldsets = [
        (None, {"fields": ["name", "is_default", "microscope", "stain", "um_per_pixel", "notes"]}),
        ("Routine use", {"fields": ["model_set", "reference_dataset"],
                         "description": "Changing the set shows its latest study at this site; with reference "
                                        "cells, the new set is verified on them at once."}),
        ("Acceptance criteria", {"fields": ["min_sensitivity", "min_n", "type_minimums"]}),
    ]
    inlines = [SiteMemberInline]

    def save_model(self, request, obj, form, change):
        super().save_model(request, obj, form, change)
        if change and "model_set" in form.changed_data:
            use = services.routine_use(obj, user=request.user, changed=True)
            if use.warning:
                messages.warning(request, use.warning)
            elif use.study:
                messages.success(request, f"{use.model_set} passed its latest study at {obj.name} "
                                          f"(agreement {use.study.agreement:.3f}).")
            if use.queued:
                messages.info(request, f"Verification study {use.queued.pk} on the reference cells is queued.")


@admin.register(VerificationStudy)
class VerificationStudyAdmin(admin.ModelAdmin):
    list_display = ["id", "site", "model_set_name", "dataset_name", "status", "n", "agreement", "kappa", "passed",
                    "trigger", "created"]
    list_filter = ["site", "status", "passed", "trigger"]
    search_fields = ["model_set_name", "dataset_name"]
    readonly_fields = [field.name for field in VerificationStudy._meta.fields]

    def has_add_permission(self, request) -> bool:
        return False  # studies start from the site page, the API or verify_set
