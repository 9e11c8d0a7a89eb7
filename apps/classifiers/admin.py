import json

from django.contrib import admin
from django.shortcuts import redirect
from django.utils.html import format_html
from simple_history.admin import SimpleHistoryAdmin

from .models import ModelSet, ModelsToCellTypes, ModelsTypes, TrainedModel


@admin.register(ModelsTypes)
class ModelsTypesAdmin(admin.ModelAdmin):
    list_display = ["name", "default_input_size"]
    search_fields = ["name"]


class OutputInline(admin.TabularInline):
    model = ModelsToCellTypes
    extra = 0
    autocomplete_fields = ["cell_type"]


@admin.register(TrainedModel)
class TrainedModelAdmin(SimpleHistoryAdmin):
    list_display = ["name", "node", "architecture", "model_set", "threshold", "status", "created"]
    list_filter = ["model_set", "architecture", "status"]
    list_select_related = ["node", "architecture", "model_set"]
    readonly_fields = ["card", "metrics", "created"]
    inlines = [OutputInline]


def rounded(value, digits: int = 4):
    """JSON with its floats rounded for reading (training writes 0.8500000000000001)."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {key: rounded(item, digits) for key, item in value.items()}
    if isinstance(value, list):
        return [rounded(item, digits) for item in value]
    return value


def readable_json(value) -> str:
    return format_html('<pre class="readable-json">{}</pre>', json.dumps(rounded(value or {}), indent=2,
                                                                         ensure_ascii=False))


class NodeModelInline(admin.TabularInline):
    model = TrainedModel
    fields = ["node", "architecture", "weights_file", "threshold_shown", "test_accuracy", "status"]
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = True

    @admin.display(description="threshold")
    def threshold_shown(self, model: TrainedModel) -> str:
        return f"{model.threshold:.2f}"

    @admin.display(description="test accuracy (n)")
    def test_accuracy(self, model: TrainedModel) -> str:
        test = (model.metrics or {}).get("test") or {}
        return f"{test['accuracy']:.3f} ({test.get('n', '?')})" if test.get("accuracy") is not None else "–"


@admin.register(ModelSet)
class ModelSetAdmin(SimpleHistoryAdmin):
    list_display = ["name", "architecture", "mode", "input_size", "is_active", "status", "created"]
    exclude = ["card", "metrics"]
    readonly_fields = ["is_active", "evaluation", "metrics_shown", "card_shown", "created"]
    inlines = [NodeModelInline]
    actions = ["make_active"]

    @admin.display(description="whole-tree evaluation")
    def evaluation(self, model_set: ModelSet) -> str:
        metrics = model_set.metrics or {}
        if metrics.get("accuracy") is None:
            return "not evaluated"
        figures = [f"{metrics.get('n', '?')} test cells", f"accuracy {metrics['accuracy']:.3f}"]
        figures += [f"{label} {metrics[key]:.3f}" for key, label in (
            ("balanced_accuracy", "balanced"), ("macro_f1", "leaf macro-F1"), ("coverage", "coverage"))
            if metrics.get(key) is not None]
        if (metrics.get("coarse8") or {}).get("accuracy") is not None:
            figures.append(f"8 classes {metrics['coarse8']['accuracy']:.3f}")
        return " · ".join(figures)

    @admin.display(description="metrics")
    def metrics_shown(self, model_set: ModelSet) -> str:
        return readable_json(model_set.metrics)

    @admin.display(description="card")
    def card_shown(self, model_set: ModelSet) -> str:
        return readable_json(model_set.card)

    @admin.action(description="Make the selected set the active one")
    def make_active(self, request, queryset):
        if queryset.count() != 1:
            self.message_user(request, "Choose exactly one model set to activate.", level="error")
            return None
        # the same confirmation as the Models page: the set's figures and verification first
        return redirect("classifiers:activate", pk=queryset.get().pk)
