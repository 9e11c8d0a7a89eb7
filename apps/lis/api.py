"""The API's LIS export: GET a signed-off run as HL7 v2 (`/hl7`) or FHIR R4 (`/fhir`); 409 with the reason when
the run cannot be exported (not signed off, no accession number)."""

import json

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema, inline_serializer
from rest_framework import serializers, status
from rest_framework.decorators import action
from rest_framework.renderers import BaseRenderer, JSONRenderer
from rest_framework.response import Response

from .export_views import FHIR_TYPE, HL7_TYPE
from .messages import ExportRefused, build_fhir, build_hl7

REFUSED = OpenApiResponse(inline_serializer("ExportRefused", {"detail": serializers.CharField()}),
                          description="Not signed off, or no accession number.")


class HL7Renderer(BaseRenderer):
    """ER7 text as it is; anything else (an error's detail) as JSON."""

    media_type = HL7_TYPE
    format = "hl7"
    charset = "utf-8"

    def render(self, data, accepted_media_type=None, renderer_context=None):
        return (data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)).encode(self.charset)


class PlainHL7Renderer(HL7Renderer):
    media_type = "text/plain"
    format = "txt"


class FHIRRenderer(JSONRenderer):
    media_type = FHIR_TYPE
    format = "fhir"


class LisExportMixin:
    """The classification-runs viewset's `hl7` and `fhir` actions (the run is looked up as for any detail)."""

    @extend_schema(responses={(200, HL7_TYPE): OpenApiTypes.STR, 409: REFUSED})
    @action(detail=True, methods=["get"], renderer_classes=[HL7Renderer, PlainHL7Renderer, JSONRenderer])
    def hl7(self, request, pk=None):
        """The run's verified differential as an HL7 v2.5.1 ORU^R01 message (segments separated by CR)."""
        try:
            return Response(build_hl7(self.get_object()))
        except ExportRefused as error:
            return Response({"detail": str(error)}, status=status.HTTP_409_CONFLICT, content_type="application/json")

    @extend_schema(responses={(200, FHIR_TYPE): OpenApiTypes.OBJECT, 409: REFUSED})
    @action(detail=True, methods=["get"], renderer_classes=[FHIRRenderer, JSONRenderer])
    def fhir(self, request, pk=None):
        """The run's verified differential as a FHIR R4 Bundle: a DiagnosticReport with one Observation per value."""
        try:
            return Response(build_fhir(self.get_object()))
        except ExportRefused as error:
            return Response({"detail": str(error)}, status=status.HTTP_409_CONFLICT, content_type="application/json")
