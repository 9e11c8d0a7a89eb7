"""REST API: upload a .zip or images to classify, read a run with its cells and counts, correct a cell.

Token or session auth; lab staff see and change their own runs, curators every run (others get 404).
"""

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (OpenApiParameter, OpenApiResponse, extend_schema, extend_schema_field,
                                   extend_schema_view, inline_serializer)
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.parsers import FormParser, JSONParser, MultiPartParser
from rest_framework.response import Response

from apps.accounts.roles import IsLabStaff
from apps.lis.api import LisExportMixin
from apps.lis.serializers import OutboxMessageSerializer

from . import services
from . import slides as slide_runs
from .models import ClassificationRun, ClassifiedCell
from .specimen import IDENTITY_FIELDS, IdentityError, search_runs, update_identity


class ClassifiedCellSerializer(serializers.ModelSerializer):
    predicted_type = serializers.SlugRelatedField(slug_field="code", read_only=True)
    final_type = serializers.SlugRelatedField(slug_field="code", read_only=True)
    guess_type = serializers.SlugRelatedField(slug_field="code", read_only=True)
    corrected_by = serializers.SlugRelatedField(slug_field="username", read_only=True)
    reviewed_by = serializers.SlugRelatedField(slug_field="username", read_only=True)

    class Meta:
        model = ClassifiedCell
        fields = ["id", "run", "index", "original_name", "image", "sha256", "predicted_type", "path", "confidence",
                  "flags", "resolved", "views", "guess_type", "final_type", "corrected_by", "corrected_at", "version",
                  "model_set_name", "scale", "background", "familiarity", "review_state", "reviewed_by",
                  "reviewed_at"]


class RunSerializer(serializers.ModelSerializer):
    owner = serializers.SlugRelatedField(slug_field="username", read_only=True)
    signed_off_by = serializers.SlugRelatedField(slug_field="username", read_only=True)
    shift_acknowledged_by = serializers.SlugRelatedField(slug_field="username", read_only=True)
    site = serializers.SlugRelatedField(slug_field="name", read_only=True)
    progress = serializers.FloatField(read_only=True)
    second_signed_off_by = serializers.SlugRelatedField(slug_field="username", read_only=True)
    awaiting_second_sign_off = serializers.BooleanField(read_only=True)

    class Meta:
        model = ClassificationRun
        fields = ["id", "name", "owner", "created", "started", "finished", "status", "progress", "n_total", "n_done",
                  "error", "skipped", "model_set", "model_set_name", "model_set_version", "count_target", "locked",
                  "signed_off_by", "signed_off_at", "um_per_pixel", "scale", "colour", "site_shift",
                  "shift_acknowledged_by", "shift_acknowledged_at", "engine", "site", "signoff_reason",
                  "second_signed_off_by", "second_signed_off_at", "awaiting_second_sign_off", *IDENTITY_FIELDS]


class RunDetailSerializer(RunSerializer):
    counts = serializers.SerializerMethodField()
    agreement = serializers.SerializerMethodField()
    review = serializers.SerializerMethodField()
    cells = serializers.SerializerMethodField()
    lis_messages = OutboxMessageSerializer(many=True, read_only=True)  # what went to the LIS, and how

    class Meta(RunSerializer.Meta):
        fields = RunSerializer.Meta.fields + ["counts", "agreement", "review", "cells", "lis_messages"]

    def to_representation(self, run) -> dict:
        return slide_runs.with_slide(run, super().to_representation(run))  # a slide run's fields and slide counts

    @extend_schema_field(OpenApiTypes.OBJECT)
    def get_review(self, run) -> dict:
        """Review progress: {flagged, flagged_reviewed, reviewed, total}."""
        return services.run_summary(run).review

    @extend_schema_field(OpenApiTypes.OBJECT)
    def get_counts(self, run) -> dict:
        return services.run_differential(run).as_dict()

    def get_agreement(self, run) -> float | None:
        return services.run_summary(run).agreement

    @extend_schema_field(ClassifiedCellSerializer(many=True))
    def get_cells(self, run) -> list[dict]:
        cells = run.cells.with_types().order_by("index")
        return ClassifiedCellSerializer(cells, many=True, context=self.context).data


class SpecimenSerializer(serializers.Serializer):
    """The specimen identity a run is created with (the accession number is needed to export it)."""

    accession = serializers.CharField(required=False, allow_blank=True, max_length=64)
    patient_identifier = serializers.CharField(required=False, allow_blank=True, max_length=64,
                                               help_text="Optional; never written into file names, logs or URLs.")
    specimen_type = serializers.ChoiceField(choices=ClassificationRun.Specimen.choices, required=False)
    collected_at = serializers.DateTimeField(required=False, allow_null=True)
    wbc_count = serializers.FloatField(required=False, allow_null=True, min_value=0.01, max_value=999,
                                       help_text="WBC count (10⁹/L): the export adds absolute counts.")


class RunCreateSerializer(SpecimenSerializer):
    files = serializers.ListField(child=serializers.FileField(), help_text="One .zip, or image files.")
    model_set = serializers.CharField(required=False, allow_blank=True,
                                      help_text="Model set name or id; your site's set (else the active set) when "
                                                "left out.")
    count_target = serializers.ChoiceField(choices=ClassificationRun.TARGETS, default=100)
    name = serializers.CharField(required=False, allow_blank=True, max_length=200)
    um_per_pixel = serializers.FloatField(required=False, allow_null=True, min_value=0.001, max_value=100,
                                          help_text="The images' pixel size in µm: used when their red cells "
                                                    "cannot be measured.")


class SlideCreateSerializer(RunCreateSerializer):
    """A slide's fields (images, or one .zip optionally with fields.csv name,x,y) and the detector that finds cells."""

    detector = serializers.CharField(required=False, allow_blank=True,
                                     help_text="Detector id or name; the active detector when left out.")


class CellCorrectionSerializer(serializers.Serializer):
    final_type = serializers.CharField(max_length=16, help_text="Cell-type code of the tree, e.g. NGS.")
    version = serializers.IntegerField(required=False, min_value=0,
                                       help_text="The cell version you saw; a newer one answers 409 (someone else "
                                                 "corrected it). Leave out to skip the check.")


class SignOffSerializer(serializers.Serializer):
    reason = serializers.CharField(required=False, allow_blank=True, max_length=2000,
                                   help_text="Why the run is signed off although the count target is not reached or "
                                             "no cell was reviewed (kept and printed on the report).")


class CellAcceptSerializer(serializers.Serializer):
    best_guess = serializers.BooleanField(default=False, help_text="Accept the cell's best guess instead of the type "
                                                                   "it shows.")
    version = serializers.IntegerField(required=False, min_value=0,
                                       help_text="The cell version you saw; a newer one answers 409.")


ERROR = inline_serializer("AnalysisError", {"detail": serializers.CharField()})


@extend_schema_view(list=extend_schema(parameters=[
    OpenApiParameter("accession", str, description="Only runs whose accession number contains this (case aside).")]))
class ClassificationRunViewSet(LisExportMixin, mixins.ListModelMixin, mixins.RetrieveModelMixin,
                                viewsets.GenericViewSet):
    """Classification runs: POST a .zip or images to classify them down the cell-type tree."""

    permission_classes = [IsLabStaff]
    parser_classes = [MultiPartParser, FormParser, JSONParser]

    def get_queryset(self):
        runs = services.runs_for(self.request.user)  # model_set as its id: no need to load its cards
        if self.action == "list":  # ?accession=: runs whose accession number contains it
            runs = search_runs(runs, accession=self.request.query_params.get("accession", ""))
        return runs

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
                identity={key: form.validated_data[key] for key in IDENTITY_FIELDS if key in form.validated_data},
            )
        except services.AnalysisError as error:
            return Response({"detail": str(error)}, status=status.HTTP_400_BAD_REQUEST)
        return Response(RunSerializer(run).data, status=status.HTTP_201_CREATED)

    @extend_schema(request={"multipart/form-data": SlideCreateSerializer},
                   responses={201: RunSerializer, 400: ERROR})
    @action(detail=False, methods=["post"], url_path="slides")
    def slides(self, request):
        """The fields of one slide: the detector finds the cells, the white cells become one run (kind slide)."""
        form = SlideCreateSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        data = form.validated_data
        try:
            run = slide_runs.start_slide_run(
                owner=request.user, files=request.FILES.getlist("files"), models=data.get("model_set") or None,
                detector=data.get("detector") or None, count_target=int(data["count_target"]),
                name=data.get("name", ""), um_per_pixel=data.get("um_per_pixel"),
                identity={key: data[key] for key in IDENTITY_FIELDS if key in data})
        except services.AnalysisError as error:
            return Response({"detail": str(error)}, status=status.HTTP_400_BAD_REQUEST)
        return Response(slide_runs.with_slide(run, RunSerializer(run).data), status=status.HTTP_201_CREATED)

    @extend_schema(request=SpecimenSerializer, responses={200: RunSerializer, 400: ERROR, 409: ERROR})
    @action(detail=True, methods=["patch"], url_path="specimen")
    def specimen(self, request, pk=None):
        """Change the run's specimen identity (the fields given) until sign-off; after it, only a missing accession
        number can be added (409 otherwise)."""
        run = self.get_object()
        form = SpecimenSerializer(data=request.data, partial=True)
        form.is_valid(raise_exception=True)
        try:
            run = update_identity(run_id=run.pk, values=dict(form.validated_data))
        except IdentityError as error:
            locked = run.signed_off_at is not None
            return Response({"detail": str(error)}, status=status.HTTP_409_CONFLICT if locked else
                            status.HTTP_400_BAD_REQUEST)
        return Response(RunSerializer(run).data)

    @extend_schema(request=SignOffSerializer, responses={200: RunSerializer, 409: ERROR})
    @action(detail=True, methods=["post"], url_path="sign-off")
    def sign_off(self, request, pk=None):
        """Sign the run off (it locks, or awaits a supervisor's second sign-off where its site asks for one)."""
        run = self.get_object()
        form = SignOffSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        try:
            run = services.sign_off(run_id=run.pk, user=request.user, reason=form.validated_data.get("reason", ""))
        except services.AnalysisError as error:
            return Response({"detail": str(error)}, status=status.HTTP_409_CONFLICT)
        return Response(RunSerializer(run).data)

    @extend_schema(request=None, responses={200: RunSerializer, 409: ERROR})
    @action(detail=True, methods=["post"], url_path="second-sign-off")
    def second_sign_off(self, request, pk=None):
        """A supervisor, not the first signer, confirms a sign-off awaiting a second one; the run locks."""
        run = self.get_object()
        try:
            run = services.second_sign_off(run_id=run.pk, user=request.user)
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


REVIEW_RESPONSES = {200: ClassifiedCellSerializer, 400: ERROR,
                    409: OpenApiResponse(ERROR, description="Changed by someone else, or the run is locked.")}


class ClassifiedCellViewSet(mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """One classified cell; PATCH sets its verified type (the prediction is kept)."""

    permission_classes = [IsLabStaff]
    serializer_class = ClassifiedCellSerializer

    def get_queryset(self):
        runs = services.runs_for(self.request.user)
        return ClassifiedCell.objects.filter(run__in=runs).with_types()

    @extend_schema(request=CellCorrectionSerializer, responses=REVIEW_RESPONSES)
    def partial_update(self, request, pk=None):
        """Give the cell a type: its predicted type or best guess is an acceptance, any other a change."""
        cell = self.get_object()
        form = CellCorrectionSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        return self._review(request, cell, code=form.validated_data["final_type"],
                            expected_version=form.validated_data.get("version"))

    @extend_schema(request=CellAcceptSerializer, responses=REVIEW_RESPONSES)
    @action(detail=True, methods=["post"])
    def accept(self, request, pk=None):
        """Accept the type the cell shows (or its best guess): review state `accepted`, not a correction."""
        cell = self.get_object()
        form = CellAcceptSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        return self._review(request, cell, best_guess=form.validated_data["best_guess"],
                            expected_version=form.validated_data.get("version"))

    def _review(self, request, cell, **review) -> Response:
        try:
            cell = services.review_cell(cell_id=cell.pk, user=request.user, **review)
        except services.ConflictError as error:
            return Response({"detail": str(error)}, status=status.HTTP_409_CONFLICT)
        except services.AnalysisError as error:
            refused = "locked" in str(error) or "second sign-off" in str(error)
            code = status.HTTP_409_CONFLICT if refused else status.HTTP_400_BAD_REQUEST
            return Response({"detail": str(error)}, status=code)
        return Response(ClassifiedCellSerializer(self.get_queryset().get(pk=cell.pk), context={"request": request}).data)


def register(router) -> None:
    router.register("classification-runs", ClassificationRunViewSet, basename="classificationrun")
    router.register("classified-cells", ClassifiedCellViewSet, basename="classifiedcell")
