"""Results for the lab information system: HL7 v2 and FHIR messages, and the outbox that sends them."""

from django.db import models  # noqa: F401
