"""Read endpoints for the model registry."""

from rest_framework import serializers, viewsets

from apps.accounts.roles import IsLabStaff

from .models import ModelSet, TrainedModel


class TrainedModelSerializer(serializers.ModelSerializer):
    node = serializers.SlugRelatedField(slug_field="code", read_only=True)
    architecture = serializers.SlugRelatedField(slug_field="name", read_only=True)
    classes = serializers.SerializerMethodField()

    class Meta:
        model = TrainedModel
        fields = ["id", "name", "node", "architecture", "model_set", "input_size", "threshold", "status", "metrics",
                  "classes", "created"]

    def get_classes(self, model) -> list[str]:
        return [output.cell_type.code for output in model.outputs.all()]


class ModelSetSerializer(serializers.ModelSerializer):
    class Meta:
        model = ModelSet
        fields = ["id", "name", "architecture", "mode", "input_size", "is_active", "status", "metrics", "created"]


class ModelSetViewSet(viewsets.ReadOnlyModelViewSet):
    queryset = ModelSet.objects.all()
    serializer_class = ModelSetSerializer
    permission_classes = [IsLabStaff]


class TrainedModelViewSet(viewsets.ReadOnlyModelViewSet):
    queryset = TrainedModel.objects.select_related("node", "architecture").prefetch_related("outputs__cell_type")
    serializer_class = TrainedModelSerializer
    permission_classes = [IsLabStaff]


def register(router) -> None:
    router.register("model-sets", ModelSetViewSet, basename="modelset")
    router.register("models", TrainedModelViewSet, basename="trainedmodel")
