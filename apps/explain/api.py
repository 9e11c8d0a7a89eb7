"""POST an image (or a cell id) and a model (or a tree node): get the explanation's pictures and numbers."""

from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.parsers import FormParser, JSONParser, MultiPartParser
from rest_framework.response import Response

from apps.accounts.roles import IsLabStaff
from apps.cells.models import Cell
from hemoweb.ml.explain import BASELINES, METHODS, ExplainError

from .models import Explanation
from .services import classified_cell, decision_of, request_explanation, resolve_model

MAX_ID = 2**62  # beyond any database id (and beyond what SQLite can even compare)


class ExplainInput(serializers.Serializer):
    model = serializers.IntegerField(required=False, min_value=1, max_value=MAX_ID,
                                     help_text="TrainedModel id. Or give `node`.")
    node = serializers.CharField(required=False, max_length=20,
                                 help_text="Tree node code: the active set's classifier of that node.")
    image = serializers.ImageField(required=False, help_text="A cell image (any size or mode). Or give `cell`.")
    cell = serializers.IntegerField(required=False, min_value=1, max_value=MAX_ID, help_text="Id of a stored cell.")
    classified = serializers.IntegerField(required=False, min_value=1, max_value=MAX_ID,
                                          help_text="Id of a cell of a classification run.")
    method = serializers.ChoiceField(choices=list(METHODS), default="gradcam")
    target = serializers.CharField(required=False, allow_blank=True, default="", max_length=20,
                                   help_text="Class code to explain; empty = the predicted class.")
    baseline = serializers.ChoiceField(choices=list(BASELINES), required=False, help_text="IG baseline and Occlusion fill: background (default: the image's background colour), blurred, black or mean.")
    n_steps = serializers.IntegerField(required=False, min_value=2, max_value=1000, help_text="IG steps (default 8).")
    internal_batch_size = serializers.IntegerField(required=False, min_value=1, max_value=1024)
    window = serializers.IntegerField(required=False, min_value=2, max_value=1024,
                                      help_text="Occlusion window in model-input pixels (default input/4).")
    stride = serializers.IntegerField(required=False, min_value=1, max_value=1024, help_text="Default: the window (no overlap).")
    perturbations_per_eval = serializers.IntegerField(required=False, min_value=1, max_value=1024)

    SETTINGS = ("baseline", "n_steps", "internal_batch_size", "window", "stride", "perturbations_per_eval")

    def validate(self, data):
        if not data.get("image") and not data.get("cell") and not data.get("classified"):
            raise serializers.ValidationError("Give an image upload, a cell id or a classified cell id.")
        return data


class ExplanationSerializer(serializers.ModelSerializer):
    overlay_url = serializers.SerializerMethodField()
    figure_url = serializers.SerializerMethodField()
    model = serializers.PrimaryKeyRelatedField(read_only=True)

    class Meta:
        model = Explanation
        fields = ["id", "status", "progress", "method", "settings", "node", "model", "target", "cell",
                  "classified_cell_id", "image_sha256",
                  "overlay_url", "figure_url", "summary", "seconds", "estimated_seconds", "warning", "error",
                  "created", "finished"]

    def _url(self, field) -> str | None:
        if not field:
            return None
        request = self.context.get("request")
        return request.build_absolute_uri(field.url) if request else field.url

    def get_overlay_url(self, row) -> str | None:
        return self._url(row.overlay) if row.finished_ok else None

    def get_figure_url(self, row) -> str | None:
        return self._url(row.figure) if row.finished_ok else None


class ExplanationViewSet(mixins.CreateModelMixin, mixins.RetrieveModelMixin, mixins.ListModelMixin,
                         viewsets.GenericViewSet):
    """Explanations of cell classifications (Integrated Gradients, Occlusion, Grad-CAM), cached."""

    queryset = Explanation.objects.all()
    serializer_class = ExplanationSerializer
    permission_classes = [IsLabStaff]
    parser_classes = [MultiPartParser, FormParser, JSONParser]

    @extend_schema(
        request={"multipart/form-data": ExplainInput, "application/json": ExplainInput},
        responses={
            200: OpenApiResponse(ExplanationSerializer, description="Done (computed now or from the cache)."),
            202: OpenApiResponse(ExplanationSerializer, description="Queued or already running: poll the GET URL."),
            400: OpenApiResponse(description="Bad input or settings that would take too long: `detail` says why."),
        },
        summary="Explain one cell image",
    )
    def create(self, request, *args, **kwargs):
        data = ExplainInput(data=request.data)
        data.is_valid(raise_exception=True)
        values = data.validated_data
        settings_ = {name: values[name] for name in ExplainInput.SETTINGS if name in values}
        try:
            cell = classified = None
            target = values.get("target", "")
            model_id, node = values.get("model"), values.get("node")
            if not values.get("image") and values.get("cell"):
                cell = Cell.objects.filter(pk=values["cell"]).first()
                if cell is None:
                    raise ExplainError(f"There is no cell with id {values['cell']}.")
            elif not values.get("image"):
                classified = classified_cell(values["classified"])
                if classified is None:
                    raise ExplainError(f"There is no classified cell with id {values['classified']}.")
                decided, decided_target = decision_of(classified)
                if not model_id and not node and decided is not None:  # default: its last decision
                    model_id, target = decided.pk, target or decided_target
            model = resolve_model(model_id=model_id, node=node)
            upload = values["image"].read() if values.get("image") else None
            outcome = request_explanation(model=model, method=values["method"], settings_=settings_, target=target,
                                          cell=cell, upload=upload, classified=classified, user=request.user)
        except ExplainError as error:
            return Response({"detail": str(error)}, status=status.HTTP_400_BAD_REQUEST)
        row = outcome.explanation
        body = ExplanationSerializer(row, context={"request": request}).data
        body.update(cached=outcome.cached, joined=outcome.joined, queued=outcome.queued)
        if row.status == Explanation.Status.FAILED:
            return Response({"detail": row.error, **body}, status=status.HTTP_400_BAD_REQUEST)
        return Response(body, status=status.HTTP_202_ACCEPTED if row.pending else status.HTTP_200_OK)


def register(router) -> None:
    router.register("explanations", ExplanationViewSet, basename="explanation")
