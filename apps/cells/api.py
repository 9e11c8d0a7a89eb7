"""Read endpoints for the tree, datasets and cells."""

from rest_framework import serializers, viewsets

from apps.accounts.roles import IsLabStaff

from .models import Cell, CellType, Dataset


class CellTypeSerializer(serializers.ModelSerializer):
    parent = serializers.SlugRelatedField(slug_field="code", read_only=True)

    class Meta:
        model = CellType
        fields = ["id", "code", "name", "parent", "order", "description", "aliases"]


class DatasetSerializer(serializers.ModelSerializer):
    n_cells = serializers.IntegerField(source="cells.count", read_only=True)

    class Meta:
        model = Dataset
        fields = ["id", "name", "source", "licence", "description", "created", "n_cells"]


class CellSerializer(serializers.ModelSerializer):
    cell_type = serializers.SlugRelatedField(slug_field="code", read_only=True)
    dataset = serializers.SlugRelatedField(slug_field="name", read_only=True)

    class Meta:
        model = Cell
        fields = ["id", "image", "cell_type", "dataset", "split", "original_label", "width", "height", "sha256",
                  "patient_id", "slide_id", "created"]


class CellTypeViewSet(viewsets.ReadOnlyModelViewSet):
    """The cell-type tree, one row per node (parent given by code)."""

    queryset = CellType.objects.select_related("parent")
    serializer_class = CellTypeSerializer
    permission_classes = [IsLabStaff]
    lookup_field = "code"
    pagination_class = None


class DatasetViewSet(viewsets.ReadOnlyModelViewSet):
    queryset = Dataset.objects.all()
    serializer_class = DatasetSerializer
    permission_classes = [IsLabStaff]


class CellViewSet(viewsets.ReadOnlyModelViewSet):
    """Cell images; filter with ?dataset=NAME, ?cell_type=CODE (with descendants), ?split=train."""

    serializer_class = CellSerializer
    permission_classes = [IsLabStaff]

    def get_queryset(self):
        cells = Cell.objects.select_related("cell_type", "dataset")
        params = self.request.query_params
        if params.get("dataset"):
            cells = cells.filter(dataset__name=params["dataset"])
        if params.get("cell_type"):
            node = CellType.objects.filter(code=params["cell_type"]).first()
            cells = cells.under(node) if node else cells.none()
        if params.get("split"):
            cells = cells.filter(split=params["split"])
        return cells


def register(router) -> None:
    router.register("cell-types", CellTypeViewSet, basename="celltype")
    router.register("datasets", DatasetViewSet, basename="dataset")
    router.register("cells", CellViewSet, basename="cell")
