"""REST API: sites, and verification studies (everybody with a role reads; curators start them)."""

from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.response import Response

from apps.accounts.roles import CuratorWritesLabStaffReads

from . import services
from .models import Site, VerificationStudy


class SiteSerializer(serializers.ModelSerializer):
    model_set = serializers.SlugRelatedField(slug_field="name", read_only=True)
    model_set_in_use = serializers.SerializerMethodField()
    reference_dataset = serializers.SlugRelatedField(slug_field="name", read_only=True)

    class Meta:
        model = Site
        fields = ["id", "name", "is_default", "microscope", "stain", "um_per_pixel", "notes", "model_set",
                  "model_set_in_use", "reference_dataset", "min_sensitivity", "min_n", "type_minimums"]

    def get_model_set_in_use(self, site) -> str | None:
        in_use = site.set_in_use()
        return in_use.name if in_use else None


class StudySerializer(serializers.ModelSerializer):
    site = serializers.SlugRelatedField(slug_field="name", read_only=True)
    created_by = serializers.SlugRelatedField(slug_field="username", read_only=True)

    class Meta:
        model = VerificationStudy
        fields = ["id", "site", "dataset", "dataset_name", "model_set", "model_set_name", "model_set_version",
                  "trigger", "created_by", "created", "started", "finished", "status", "n_total", "n_done", "error",
                  "n", "agreement", "kappa", "passed"]


class StudyDetailSerializer(StudySerializer):
    class Meta(StudySerializer.Meta):
        fields = StudySerializer.Meta.fields + ["results"]


class StudyCreateSerializer(serializers.Serializer):
    dataset = serializers.CharField(help_text="Dataset name or id: its labelled cells are verified.")
    model_set = serializers.CharField(required=False, allow_blank=True,
                                      help_text="Model set name or id; the site's set in use when left out.")
    site = serializers.CharField(required=False, allow_blank=True,
                                 help_text="Site name or id; the dataset's site (else the default) when left out.")


ERROR = inline_serializer("StudyError", {"detail": serializers.CharField()})


class SiteViewSet(viewsets.ReadOnlyModelViewSet):
    """Sites (a lab's instrument set-up) with the set each one uses."""

    queryset = Site.objects.select_related("model_set", "reference_dataset")
    serializer_class = SiteSerializer
    permission_classes = [CuratorWritesLabStaffReads]

    @extend_schema(request=None, responses={202: StudySerializer, 400: ERROR})
    @action(detail=True, methods=["post"], url_path="quality-control")
    def quality_control(self, request, pk=None):
        """Verify the site's set in use on its reference cells again (curators)."""
        try:
            study = services.quality_control(site=self.get_object(), user=request.user)
        except services.StudyError as error:
            return Response({"detail": str(error)}, status=status.HTTP_400_BAD_REQUEST)
        return Response(StudySerializer(study).data, status=status.HTTP_202_ACCEPTED)


class VerificationStudyViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Verification studies: POST starts one (a background job); GET it until its status is succeeded."""

    permission_classes = [CuratorWritesLabStaffReads]

    def get_queryset(self):
        studies = VerificationStudy.objects.select_related("site", "created_by")
        site = self.request.query_params.get("site")
        return studies.filter(site_id=site) if site and site.isdigit() else studies

    def get_object(self):
        return services.check_worker(super().get_object())

    def get_serializer_class(self):
        return StudyDetailSerializer if self.action == "retrieve" else StudySerializer

    @extend_schema(request=StudyCreateSerializer, responses={202: StudySerializer, 400: ERROR})
    def create(self, request):
        form = StudyCreateSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        try:
            study = services.start_study(dataset=form.validated_data["dataset"],
                                         models=form.validated_data.get("model_set") or None,
                                         site=form.validated_data.get("site") or None, user=request.user)
        except services.StudyError as error:
            return Response({"detail": str(error)}, status=status.HTTP_400_BAD_REQUEST)
        return Response(StudySerializer(study).data, status=status.HTTP_202_ACCEPTED)


def register(router) -> None:
    router.register("sites", SiteViewSet, basename="site")
    router.register("verification-studies", VerificationStudyViewSet, basename="verificationstudy")
