from django.contrib import admin, messages
from django.db.models import Count
from django.shortcuts import redirect, render
from django.urls import path
from django.utils.html import format_html, format_html_join
from simple_history.admin import SimpleHistoryAdmin

from .forms import ImportForm, RelabelForm
from .models import Cell, CellType, Dataset, LabelMapping, counts_per_node
from .services import ImportError_, import_cells, relabel_cells


@admin.register(CellType)
class CellTypeAdmin(SimpleHistoryAdmin):
    list_display = ["indented_name", "code", "aliases", "parent", "order", "loinc_code", "loinc_manual_code",
                    "own_images", "images_with_descendants"]
    search_fields = ["code", "name", "aliases", "loinc_code", "loinc_manual_code"]
    autocomplete_fields = ["parent"]

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("parent")

    def get_changelist(self, request, **kwargs):
        class TreeOrderedChangeList(super().get_changelist(request, **kwargs)):
            """Rows depth-first, as the tree reads, whatever the column sort."""

            def get_results(self, request):
                super().get_results(request)
                order = _tree_order()
                self.result_list = sorted(self.result_list, key=lambda node: order.get(node.pk, 0))

        return TreeOrderedChangeList

    def changelist_view(self, request, extra_context=None):
        self._counts = counts_per_node()
        parents = dict(CellType.objects.values_list("pk", "parent_id"))
        self._depth = {}
        for pk in parents:
            depth, node = 0, parents[pk]
            while node is not None:
                depth, node = depth + 1, parents[node]
            self._depth[pk] = depth
        return super().changelist_view(request, extra_context)

    @admin.display(description="Cell type")
    def indented_name(self, node):
        depth = getattr(self, "_depth", {}).get(node.pk, 0)
        return format_html("{}{} <code>{}</code>", "\u2003" * depth, node.name, node.code)

    @admin.display(description="Own images")
    def own_images(self, node):
        return getattr(self, "_counts", {}).get(node.pk, (0, 0))[0]

    @admin.display(description="With descendants")
    def images_with_descendants(self, node):
        return getattr(self, "_counts", {}).get(node.pk, (0, 0))[1]


def _tree_order() -> dict[int, int]:
    """Depth-first position of every node, siblings by their order."""
    children: dict[int | None, list[int]] = {}
    for pk, parent in CellType.objects.order_by("order", "code").values_list("pk", "parent_id"):
        children.setdefault(parent, []).append(pk)
    order, stack = {}, list(reversed(children.get(None, [])))
    while stack:
        pk = stack.pop()
        order[pk] = len(order)
        stack.extend(reversed(children.get(pk, [])))
    return order


class LabelMappingInline(admin.TabularInline):
    model = LabelMapping
    extra = 0
    autocomplete_fields = ["cell_type"]


@admin.register(Dataset)
class DatasetAdmin(SimpleHistoryAdmin):
    list_display = ["name", "n_cells", "site", "source", "licence", "created"]
    list_filter = ["site"]
    search_fields = ["name"]
    inlines = [LabelMappingInline]
    readonly_fields = ["counts_table"]
    change_list_template = "admin/cells/dataset/change_list.html"

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(n_cells=Count("cells"))

    @admin.display(description="Images", ordering="n_cells")
    def n_cells(self, dataset):
        return dataset.n_cells

    @admin.display(description="Images per cell type")
    def counts_table(self, dataset):
        rows = format_html_join(
            "", "<tr><td><code>{}</code> {}</td><td>{}</td></tr>",
            ((row["cell_type__code"], row["cell_type__name"], row["n"]) for row in dataset.counts_per_type()),
        )
        return format_html("<table>{}</table>", rows) if rows else "No images yet."

    def get_urls(self):
        return [path("import/", self.admin_site.admin_view(self.import_view), name="cells_dataset_import")] + super().get_urls()

    def import_view(self, request):
        if not self.has_add_permission(request):
            return redirect("admin:index")
        form = ImportForm(request.POST or None, request.FILES or None)
        report = None
        if request.method == "POST" and form.is_valid():
            data = form.cleaned_data
            try:
                report = import_cells(
                    data["archive"],
                    dataset=data["dataset"],
                    labels_csv=data["labels"].read() if data["labels"] else None,
                    label_map_csv=data["label_map"].read() if data["label_map"] else None,
                    source_description=data["source"],
                    licence=data["licence"],
                )
                messages.success(request, report.summary().splitlines()[0])
            except ImportError_ as error:
                messages.error(request, f"Nothing was imported: {error}")
        context = {**self.admin_site.each_context(request), "form": form, "report": report,
                   "title": "Import cell images", "opts": self.model._meta}
        return render(request, "admin/cells/dataset/import.html", context)


@admin.register(Cell)
class CellAdmin(SimpleHistoryAdmin):
    list_display = ["thumbnail", "id", "cell_type", "dataset", "split", "original_label", "width", "height"]
    list_filter = ["dataset", "split", ("cell_type", admin.RelatedOnlyFieldListFilter)]
    search_fields = ["original_name", "sha256", "patient_id", "slide_id"]
    readonly_fields = ["preview", "sha256", "width", "height", "created"]
    list_select_related = ["cell_type", "dataset"]
    autocomplete_fields = ["cell_type"]
    actions = ["relabel"]
    list_per_page = 100

    @admin.display(description="Image")
    def thumbnail(self, cell):
        return format_html('<img src="{}" width="64" height="64" alt="cell {}" loading="lazy">', cell.image.url, cell.pk)

    @admin.display(description="Preview")
    def preview(self, cell):
        return format_html('<img src="{}" width="256" alt="cell {}">', cell.image.url, cell.pk) if cell.pk else ""

    @admin.action(description="Relabel selected cells")
    def relabel(self, request, queryset):
        if "apply" in request.POST:
            form = RelabelForm(request.POST)
            if form.is_valid():
                changed = relabel_cells(list(queryset.values_list("pk", flat=True)), form.cleaned_data["cell_type"],
                                       user=request.user)
                self.message_user(request, f"{changed} cells relabelled as {form.cleaned_data['cell_type'].code}.")
                return None
        else:
            form = RelabelForm()
        context = {**self.admin_site.each_context(request), "form": form, "cells": queryset,
                   "title": "Relabel cells", "opts": self.model._meta,
                   "action_checkbox_name": admin.helpers.ACTION_CHECKBOX_NAME}
        return render(request, "admin/cells/cell/relabel.html", context)
