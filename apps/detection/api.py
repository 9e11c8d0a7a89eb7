"""Detection API: POST a smear image, get boxes, counts and the tree result per white cell."""

from rest_framework import serializers, status, viewsets
from rest_framework.parsers import FormParser, MultiPartParser
from rest_framework.response import Response

from apps.accounts.roles import IsLabStaff
from apps.sites.models import Site

from .models import DetectionDataset, Detector
from .services import DetectionInputError, detect_image


class DetectInput(serializers.Serializer):
    image = serializers.FileField()
    classify = serializers.BooleanField(default=True, required=False)


class DetectorSerializer(serializers.ModelSerializer):
    class Meta:
        model = Detector
        fields = ["id", "name", "architecture", "classes", "metrics", "is_active", "created"]


class DetectionDatasetSerializer(serializers.ModelSerializer):
    n_images = serializers.IntegerField(source="images.count", read_only=True)

    class Meta:
        model = DetectionDataset
        fields = ["id", "name", "classes", "source", "licence", "n_images", "created"]


class DetectViewSet(viewsets.ViewSet):
    """POST multipart `image` (and optionally `classify=false`)."""

    permission_classes = [IsLabStaff]
    parser_classes = [MultiPartParser, FormParser]
    serializer_class = DetectInput

    def create(self, request):
        form = DetectInput(data=request.data)
        if not form.is_valid():
            return Response({"error": "Send the smear image as multipart field 'image'.", "fields": form.errors},
                            status=status.HTTP_400_BAD_REQUEST)
        try:
            result = detect_image(form.validated_data["image"], classify=form.validated_data.get("classify", True),
                                  site=Site.objects.for_user(request.user))
        except DetectionInputError as error:
            return Response({"error": str(error)}, status=status.HTTP_400_BAD_REQUEST)
        return Response(result.as_dict())


class DetectorViewSet(viewsets.ReadOnlyModelViewSet):
    queryset = Detector.objects.all()
    serializer_class = DetectorSerializer
    permission_classes = [IsLabStaff]


class DetectionDatasetViewSet(viewsets.ReadOnlyModelViewSet):
    queryset = DetectionDataset.objects.all()
    serializer_class = DetectionDatasetSerializer
    permission_classes = [IsLabStaff]


def register(router) -> None:
    router.register("detect", DetectViewSet, basename="detect")
    router.register("detectors", DetectorViewSet, basename="detector")
    router.register("detection-datasets", DetectionDatasetViewSet, basename="detectiondataset")
