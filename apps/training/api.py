"""Training jobs over the API: lab staff read them, curators start them."""

from rest_framework import mixins, serializers, status, viewsets
from rest_framework.response import Response

from apps.accounts.roles import CuratorWritesLabStaffReads
from apps.cells.models import Dataset
from apps.classifiers.models import ModelSet
from hemoweb.ml.adapt import MODES as ADAPT_MODES
from hemoweb.ml.train import MODES

from . import services
from .adaptation import AdaptationError, start_adaptation
from .models import TrainingJob


class TrainingJobSerializer(serializers.ModelSerializer):
    dataset = serializers.SlugRelatedField(slug_field="name", read_only=True)
    result = serializers.SlugRelatedField(slug_field="name", read_only=True)

    class Meta:
        model = TrainingJob
        fields = ["id", "name", "dataset", "params", "status", "progress", "metrics", "log", "error", "result",
                  "created", "started", "finished"]


class StartTrainingSerializer(serializers.Serializer):
    dataset = serializers.SlugRelatedField(slug_field="name", queryset=Dataset.objects.all())
    name = serializers.CharField(max_length=100)
    architecture = serializers.CharField(max_length=100, default="mobilenetv3_small_100")
    mode = serializers.ChoiceField(choices=MODES, default="scratch")
    epochs = serializers.IntegerField(min_value=1, max_value=500, default=10)
    image_size = serializers.IntegerField(min_value=16, max_value=1024, default=128)
    batch_size = serializers.IntegerField(min_value=2, max_value=1024, default=64)
    device = serializers.ChoiceField(choices=("auto", "cpu", "cuda"), default="auto")
    nodes = serializers.ListField(child=serializers.CharField(max_length=16), required=False)
    shared_backbone = serializers.BooleanField(
        default=False, help_text="One backbone with a head per node: one network pass per cell for the whole tree.")
    activate = serializers.BooleanField(default=False)
    adapt_from = serializers.SlugRelatedField(
        slug_field="name", queryset=ModelSet.objects.all(), required=False, allow_null=True,
        help_text="Adapt this shared-backbone set to the dataset's cells instead of training a new one.")
    adapt_mode = serializers.ChoiceField(choices=ADAPT_MODES, default="heads")
    per_type = serializers.IntegerField(min_value=0, default=0, help_text="Cells per type to adapt on (0: half).")


class TrainingJobViewSet(mixins.CreateModelMixin, viewsets.ReadOnlyModelViewSet):
    queryset = TrainingJob.objects.select_related("dataset", "result")
    serializer_class = TrainingJobSerializer
    permission_classes = [CuratorWritesLabStaffReads]

    def list(self, request, *args, **kwargs):
        services.detect_lost_jobs()
        return super().list(request, *args, **kwargs)

    def create(self, request, *args, **kwargs):
        given = StartTrainingSerializer(data=request.data)
        given.is_valid(raise_exception=True)
        data = dict(given.validated_data)
        if data.get("adapt_from"):
            try:
                job = start_adaptation(dataset=data["dataset"], from_set=data["adapt_from"], name=data["name"],
                                       mode=data["adapt_mode"], per_type=data["per_type"], user=request.user)
            except AdaptationError as error:
                return Response({"detail": str(error)}, status=status.HTTP_400_BAD_REQUEST)
            return Response(TrainingJobSerializer(job).data, status=status.HTTP_201_CREATED)
        try:
            job = services.start_training(dataset=data.pop("dataset"), name=data.pop("name"),
                                          params=services.job_params_from_form(data), user=request.user)
        except services.TrainingRequestError as error:
            return Response({"detail": str(error)}, status=status.HTTP_400_BAD_REQUEST)
        return Response(TrainingJobSerializer(job).data, status=status.HTTP_201_CREATED)


def register(router) -> None:
    router.register("training-jobs", TrainingJobViewSet, basename="trainingjob")
