from django.contrib import admin
from simple_history.admin import SimpleHistoryAdmin

from apps.sites.services import after_activation

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


class NodeModelInline(admin.TabularInline):
    model = TrainedModel
    fields = ["node", "architecture", "weights_file", "threshold", "status"]
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = True


@admin.register(ModelSet)
class ModelSetAdmin(SimpleHistoryAdmin):
    list_display = ["name", "architecture", "mode", "input_size", "is_active", "status", "created"]
    readonly_fields = ["is_active", "card", "metrics", "created"]
    inlines = [NodeModelInline]
    actions = ["make_active"]

    @admin.action(description="Make the selected set the active one")
    def make_active(self, request, queryset):
        if queryset.count() != 1:
            self.message_user(request, "Choose exactly one model set to activate.", level="error")
            return
        model_set = queryset.get()
        model_set.activate()
        self.message_user(request, f"{model_set.name} is now the active model set.")
        for note in after_activation(model_set, request.user):  # sites following the active set verify it again
            self.message_user(request, note)
