"""REST API: upload a .zip or images to classify, read a run with its cells and counts, correct a cell.

Token or session auth; lab staff see and change their own runs, curators every run (others get 404).
"""

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_field, inline_serializer
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.parsers import FormParser, JSONParser, MultiPartParser
from rest_framework.response import Response

from apps.accounts.roles import IsLabStaff

from . import services
from .models import ClassificationRun, ClassifiedCell


class ClassifiedCellSerializer(serializers.ModelSerializer):
    predicted_type = serializers.SlugRelatedField(slug_field="code", read_only=True)
    final_type = serializers.SlugRelatedField(slug_field="code", read_only=True)
    guess_type = serializers.SlugRelatedField(slug_field="code", read_only=True)
    corrected_by = serializers.SlugRelatedField(slug_field="username", read_only=True)

    class Meta:
        model = ClassifiedCell
        fields = ["id", "run", "index", "original_name", "image", "sha256", "predicted_type", "path", "confidence",
                  "flags", "resolved", "views", "guess_type", "final_type", "corrected_by", "corrected_at", "version",
                  "model_set_name", "scale", "background", "familiarity"]


class RunSerializer(serializers.ModelSerializer):
    owner = serializers.SlugRelatedField(slug_field="username", read_only=True)
    signed_off_by = serializers.SlugRelatedField(slug_field="username", read_only=True)
    shift_acknowledged_by = serializers.SlugRelatedField(slug_field="username", read_only=True)
    site = serializers.SlugRelatedField(slug_field="name", read_only=True)
    progress = serializers.FloatField(read_only=True)

    class Meta:
        model = ClassificationRun
        fields = ["id", "name", "owner", "created", "started", "finished", "status", "progress", "n_total", "n_done",
                  "error", "skipped", "model_set", "model_set_name", "model_set_version", "count_target", "locked",
                  "signed_off_by", "signed_off_at", "um_per_pixel", "scale", "colour", "site_shift",
                  "shift_acknowledged_by", "shift_acknowledged_at", "engine", "site"]


class RunDetailSerializer(RunSerializer):
    counts = serializers.SerializerMethodField()
    agreement = serializers.SerializerMethodField()
    cells = serializers.SerializerMethodField()

    class Meta(RunSerializer.Meta):
        fields = RunSerializer.Meta.fields + ["counts", "agreement", "cells"]

    @extend_schema_field(OpenApiTypes.OBJECT)
    def get_counts(self, run) -> dict:
        return services.run_differential(run).as_dict()

    def get_agreement(self, run) -> float | None:
        return services.run_summary(run).agreement

    @extend_schema_field(ClassifiedCellSerializer(many=True))
    def get_cells(self, run) -> list[dict]:
        cells = run.cells.with_types().order_by("index")
        return ClassifiedCellSerializer(cells, many=True, context=self.context).data


class RunCreateSerializer(serializers.Serializer):
    files = serializers.ListField(child=serializers.FileField(), help_text="One .zip, or image files.")
    model_set = serializers.CharField(required=False, allow_blank=True,
                                      help_text="Model set name or id; your site's set (else the active set) when "
                                                "left out.")
    count_target = serializers.ChoiceField(choices=ClassificationRun.TARGETS, default=100)
    name = serializers.CharField(required=False, allow_blank=True, max_length=200)
    um_per_pixel = serializers.FloatField(required=False, allow_null=True, min_value=0.001, max_value=100,
                                          help_text="The images' pixel size in µm: used when their red cells "
                                                    "cannot be measured.")


class CellCorrectionSerializer(serializers.Serializer):
    final_type = serializers.CharField(max_length=16, help_text="Cell-type code of the tree, e.g. NGS.")
    version = serializers.IntegerField(required=False, min_value=0,
                                       help_text="The cell version you saw; a newer one answers 409 (someone else "
                                                 "corrected it). Leave out to skip the check.")


ERROR = inline_serializer("AnalysisError", {"detail": serializers.CharField()})


class ClassificationRunViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Classification runs: POST a .zip or images to classify them down the cell-type tree."""

    permission_classes = [IsLabStaff]
    parser_classes = [MultiPartParser, FormParser, JSONParser]

    def get_queryset(self):
        return services.runs_for(self.request.user)  # model_set as its id: no need to load its cards

    def get_object(self):
        return services.check_worker(super().get_object())  # a killed worker's run reads as failed

    def get_serializer_class(self):
        return RunDetailSerializer if self.action == "retrieve" else RunSerializer

    @extend_schema(request={"multipart/form-data": RunCreateSerializer},
                   responses={201: RunSerializer, 400: ERROR})
    def create(self, request):
        form = RunCreateSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        try:
            run = services.start_run(
                owner=request.user, files=request.FILES.getlist("files"),
                models=form.validated_data.get("model_set") or None,
                count_target=int(form.validated_data["count_target"]), name=form.validated_data.get("name", ""),
                um_per_pixel=form.validated_data.get("um_per_pixel"),
            )
        except services.AnalysisError as error:
            return Response({"detail": str(error)}, status=status.HTTP_400_BAD_REQUEST)
        return Response(RunSerializer(run).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=None, responses={200: RunSerializer, 409: ERROR})
    @action(detail=True, methods=["post"], url_path="sign-off")
    def sign_off(self, request, pk=None):
        run = self.get_object()
        try:
            run = services.sign_off(run_id=run.pk, user=request.user)
        except services.AnalysisError as error:
            return Response({"detail": str(error)}, status=status.HTTP_409_CONFLICT)
        return Response(RunSerializer(run).data)

    @extend_schema(request=None, responses={200: RunSerializer, 409: ERROR})
    @action(detail=True, methods=["post"], url_path="acknowledge-shift")
    def acknowledge_shift(self, request, pk=None):
        """Record that you read the run's site-shift warning (a run at alarm needs it before sign-off)."""
        run = self.get_object()
        try:
            run = services.acknowledge_shift(run_id=run.pk, user=request.user)
        except services.AnalysisError as error:
            return Response({"detail": str(error)}, status=status.HTTP_409_CONFLICT)
        return Response(RunSerializer(run).data)


class ClassifiedCellViewSet(mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """One classified cell; PATCH sets its verified type (the prediction is kept)."""

    permission_classes = [IsLabStaff]
    serializer_class = ClassifiedCellSerializer

    def get_queryset(self):
        runs = services.runs_for(self.request.user)
        return ClassifiedCell.objects.filter(run__in=runs).with_types()

    @extend_schema(request=CellCorrectionSerializer,
                   responses={200: ClassifiedCellSerializer, 400: ERROR,
                              409: OpenApiResponse(ERROR, description="Changed by someone else, or the run is locked.")})
    def partial_update(self, request, pk=None):
        cell = self.get_object()
        form = CellCorrectionSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        try:
            cell = services.correct_cell(cell_id=cell.pk, code=form.validated_data["final_type"], user=request.user,
                                         expected_version=form.validated_data.get("version"))
        except services.ConflictError as error:
            return Response({"detail": str(error)}, status=status.HTTP_409_CONFLICT)
        except services.AnalysisError as error:
            code = status.HTTP_409_CONFLICT if "locked" in str(error) else status.HTTP_400_BAD_REQUEST
            return Response({"detail": str(error)}, status=code)
        return Response(ClassifiedCellSerializer(self.get_queryset().get(pk=cell.pk), context={"request": request}).data)


def register(router) -> None:
    router.register("classification-runs", ClassificationRunViewSet, basename="classificationrun")
    router.register("classified-cells", ClassifiedCellViewSet, basename="classifiedcell")
