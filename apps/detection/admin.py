from django.contrib import admin, messages
from django.shortcuts import redirect, render
from django.urls import path

from .forms import ImportDetectionsForm
from .models import Box, DetectionDataset, DetectionImage, Detector, DetectorTrainingJob
from .services import DetectionInputError, import_detections


@admin.register(DetectionDataset)
class DetectionDatasetAdmin(admin.ModelAdmin):
    list_display = ["name", "classes", "source", "licence", "created"]
    change_list_template = "admin/detection/detectiondataset/change_list.html"

    def get_urls(self):
        return [path("import/", self.admin_site.admin_view(self.import_view), name="detection_detectiondataset_import")] \
            + super().get_urls()

    def import_view(self, request):
        if not self.has_add_permission(request):
            return redirect("admin:index")
        form = ImportDetectionsForm(request.POST or None, request.FILES or None)
        report = None
        if request.method == "POST" and form.is_valid():
            data = form.cleaned_data
            classes = [c.strip() for c in data["classes"].split(",") if c.strip()] or None
            try:
                report = import_detections(data["archive"], dataset=data["dataset"], fmt=data["format"], classes=classes,
                                           source_description=data["source"], licence=data["licence"])
                messages.success(request, report.summary().splitlines()[0])
            except DetectionInputError as error:
                messages.error(request, f"Nothing was imported: {error}")
        context = {**self.admin_site.each_context(request), "form": form, "report": report,
                   "title": "Import annotated smear images", "opts": self.model._meta}
        return render(request, "admin/detection/detectiondataset/import.html", context)


class BoxInline(admin.TabularInline):
    model = Box
    extra = 0


@admin.register(DetectionImage)
class DetectionImageAdmin(admin.ModelAdmin):
    list_display = ["id", "original_name", "dataset", "split", "width", "height"]
    list_filter = ["dataset", "split"]
    inlines = [BoxInline]


@admin.register(Detector)
class DetectorAdmin(admin.ModelAdmin):
    list_display = ["name", "architecture", "is_active", "created"]
    actions = ["make_active"]

    @admin.action(description="Make the selected detector the active one")
    def make_active(self, request, queryset):
        if queryset.count() != 1:
            messages.error(request, "Select exactly one detector.")
            return
        queryset.first().activate()


@admin.register(DetectorTrainingJob)
class DetectorTrainingJobAdmin(admin.ModelAdmin):
    list_display = ["name", "dataset", "status", "epoch", "epochs_total", "created"]
    list_filter = ["status"]
