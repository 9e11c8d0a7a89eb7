"""Downloads of a signed-off run's result for the lab information system: HL7 v2 and FHIR."""

import json

from django.contrib import messages
from django.http import HttpResponse
from django.shortcuts import get_object_or_404, redirect

from apps.accounts.roles import lab_staff_required
from apps.analysis.services import runs_for

from .messages import ExportRefused, build_fhir, build_hl7

HL7_TYPE = "application/hl7-v2"
FHIR_TYPE = "application/fhir+json"


def _download(request, pk: int, fmt: str):
    run = get_object_or_404(runs_for(request.user), pk=pk)
    try:
        body = build_hl7(run) if fmt == "hl7" else json.dumps(build_fhir(run), indent=2, ensure_ascii=False)
    except ExportRefused as error:
        messages.error(request, str(error))
        return redirect("analysis:run", pk=run.pk)
    response = HttpResponse(body, content_type=f"{HL7_TYPE if fmt == 'hl7' else FHIR_TYPE}; charset=utf-8")
    # the run's number only: accession numbers and patient identifiers stay out of file names
    response["Content-Disposition"] = f'attachment; filename="run-{run.pk}.{"hl7" if fmt == "hl7" else "fhir.json"}"'
    return response


@lab_staff_required
def download_hl7(request, pk: int):
    return _download(request, pk, "hl7")


@lab_staff_required
def download_fhir(request, pk: int):
    return _download(request, pk, "fhir")
