"""A signed-off run's verified differential as the lab information system reads it.

- `build_hl7`: an HL7 v2.5.1 ORU^R01 message (hl7apy), ER7 text with segments separated by `\\r`;
- `build_fhir`: a FHIR R4 Bundle (fhir.resources' R4B models: R4B is R4-compatible for these resources,
  while the package's top level is R5) with a DiagnosticReport, one Observation per value, the Specimen
  and, when given, the Patient;
- `export_refusal`: why a run cannot be exported (not signed off, no accession number), or None.

Both messages carry the same values (`export_data`): one percentage per cell type of the differential
(`apps.analysis.services.run_differential`, nothing recounted here), the blasts, the number of cells
counted, absolute counts when the run has a WBC count, and comments for everything that has no code:
types without a LOINC code, unfamiliar and unresolved cells, flags, the site-shift acknowledgement, the
sign-off reason and the reviewer's comment. A run whose cells a technologist reviewed is a verified,
manual differential (manual LOINC codes); otherwise the automated codes are used.
"""

import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime

from django.utils import timezone

from apps.analysis.models import ClassificationRun, ClassifiedCell
from apps.analysis.services import run_differential
from apps.cells.models import CellType
from hemoweb.ml.counts import BLASTS, UNFAMILIAR
from hemoweb.ml.loinc import ABSOLUTE_LOINC, PANEL_AUTOMATED, PANEL_MANUAL, loinc_name

SENDING_APPLICATION = "HEMOWEB"
LOCAL_SYSTEM = "urn:hemoweb:differential"  # FHIR system of the values LOINC has no code for
LOCAL_CELLS_COUNTED = ("CELLS", "Cells counted in the differential")
LOCAL_PANEL = "DIFF"  # the order's local code where no LOINC panel applies (a bone-marrow differential)
# SNOMED CT specimen types
SPECIMEN_CODES = {
    ClassificationRun.Specimen.PERIPHERAL_BLOOD: ("119297000", "Blood specimen"),
    ClassificationRun.Specimen.BONE_MARROW: ("119359002", "Bone marrow specimen"),
}


class ExportRefused(ValueError):
    """The run cannot be exported (not signed off, no accession number)."""


def export_refusal(run: ClassificationRun) -> str | None:
    """Why `run` cannot be exported, in words a lab user understands; None when it can."""
    if run.awaiting_second_sign_off:
        return (f"Run {run.pk} awaits a supervisor's second sign-off: it is exported once the sign-off is "
                "confirmed.")
    if not run.locked or run.signed_off_at is None:
        return (f"Run {run.pk} is not signed off: only a verified differential is sent to the lab information "
                "system. Review the cells and sign the run off first.")
    if not run.accession.strip():
        return (f"Run {run.pk} has no accession number: enter the specimen's accession number on the run page "
                "before exporting.")
    return None


# --- the values both messages carry ------------------------------------------------------------


@dataclass
class Value:
    """One numeric result: a percentage, a ratio per 100 leukocytes, an absolute count or the cell count."""

    key: str  # the cell-type code, or BLASTS / UNFAMILIAR / CELLS
    name: str
    value: float
    unit: str  # UCUM
    loinc: str = ""
    n: int | None = None  # cells behind the value

    @property
    def display(self) -> str:
        return loinc_name(self.loinc, self.name) if self.loinc else self.name


@dataclass
class ExportData:
    run: ClassificationRun
    manual: bool
    panel: str
    percentages: list[Value] = field(default_factory=list)  # add up to 100 (the differential's denominator)
    others: list[Value] = field(default_factory=list)  # ratios per 100 leukocytes, absolute counts, cell count
    notes: list[str] = field(default_factory=list)

    @property
    def values(self) -> list[Value]:
        return self.percentages + self.others

    @property
    def panel_name(self) -> str:
        return loinc_name(self.panel) if self.panel else f"{self.run.get_specimen_type_display()} differential"

    @property
    def percent_total(self) -> float:
        return round(sum(value.value for value in self.percentages), 2)


def is_reviewed(run: ClassificationRun) -> bool:
    """A technologist reviewed (accepted or changed) at least one of the run's cells."""
    return run.cells.exclude(review_state=ClassifiedCell.Review.PENDING).exists()


def _fmt(number: float) -> str:
    return f"{number:.2f}".rstrip("0").rstrip(".")


def export_data(run: ClassificationRun) -> ExportData:
    """The run's differential as coded values and comments (refused runs raise ExportRefused)."""
    refusal = export_refusal(run)
    if refusal:
        raise ExportRefused(refusal)
    manual = is_reviewed(run)
    # the types' LOINC codes are peripheral-blood ("in Blood") terms: a marrow differential goes with local codes
    coded = run.specimen_type == ClassificationRun.Specimen.PERIPHERAL_BLOOD
    data = ExportData(run, manual, (PANEL_MANUAL if manual else PANEL_AUTOMATED) if coded else "")
    diff = run_differential(run)
    types = {node.code: node for node in CellType.objects.all()}

    def code_of(key: str) -> str:
        node = types.get(key)
        return (node.loinc_manual_code if manual else node.loinc_code).strip() if node and coded else ""

    blasts_listed = False
    for row in diff.types:
        if row.percent is not None:
            data.percentages.append(Value(row.code, row.name, row.percent, "%", code_of(row.code), row.n))
        elif row.per_100_wbc is not None:  # nucleated red cells in peripheral blood, outside the denominator
            data.others.append(Value(row.code, row.name, row.per_100_wbc, "/100{WBCs}", code_of(row.code), row.n))
        else:  # platelets, artefacts, smudge cells
            data.notes.append(f"{row.name} ({row.code}): {row.n} seen, not part of the differential.")
            continue
        blasts_listed = blasts_listed or row.code in BLASTS
        if not row.resolved:
            data.notes.append(f"{row.n} cells were reviewed as {row.name} ({row.code}), no finer type.")
    if diff.unresolved:
        where = ", ".join(f"{code} {n}" for code, n in sorted(diff.unresolved_at.items()))
        data.notes.append(f"{diff.unresolved.n} cells stopped unresolved ({where}) and were not reviewed: not "
                          "part of the differential.")
    if diff.unfamiliar:
        row = diff.unfamiliar
        data.percentages.append(Value(row.code, row.name, row.percent, "%", "", row.n))
        data.notes.append(f"{row.n} cells are unlike the model's training cells and were not given a type.")
    if not blasts_listed and diff.blast_percent is not None:  # no blast seen: report 0 % explicitly
        blast = next((code for code in BLASTS if code in types), "")
        data.others.append(Value(blast or "BLASTS", types[blast].name if blast else "Blasts", diff.blast_percent,
                                 "%", code_of(blast), diff.blasts))
    data.others.append(Value(LOCAL_CELLS_COUNTED[0], LOCAL_CELLS_COUNTED[1], diff.counted, "{cells}", "",
                             diff.counted))
    if run.wbc_count:
        _add_absolute_counts(data, run.wbc_count)
    if not coded:
        data.notes.append(f"{run.get_specimen_type_display()} differential: the values carry local codes (the cell "
                          "types' LOINC codes are peripheral-blood terms).")
    for value in data.values if coded else ():
        if not value.loinc and value.key not in (LOCAL_CELLS_COUNTED[0], UNFAMILIAR) and value.unit != "10*9/L":
            data.notes.append(f"{value.name} ({value.key}): {_fmt(value.value)} {value.unit} ({value.n} cells); "
                              "no LOINC code for this type.")
    data.notes.extend(_run_notes(run, diff))
    return data


def _add_absolute_counts(data: ExportData, wbc_count: float) -> None:
    """Each percentage's absolute count (10⁹/L) from the analyser's WBC count: a value where LOINC has a code."""
    for value in list(data.percentages):
        absolute, count = ABSOLUTE_LOINC.get(value.loinc, ""), round(wbc_count * value.value / 100, 3)
        if absolute:
            data.others.append(Value(value.key, f"{value.name}, absolute", count, "10*9/L", absolute, value.n))
        else:
            data.notes.append(f"{value.name} ({value.key}), absolute: {_fmt(count)} x 10*9/L (no LOINC code).")


def _run_notes(run: ClassificationRun, diff) -> list[str]:
    notes = []
    if not diff.target_reached:
        notes.append(f"{diff.counted} cells counted, fewer than the target of {diff.target}.")
    flags = Counter(flag.split(":")[0] for flags in run.cells.values_list("flags", flat=True) for flag in flags)
    notes += [f"Flag: {flag} ({n} cells)." for flag, n in sorted(flags.items())]
    shift = run.site_shift or {}
    if shift.get("level") in ("warn", "alarm"):
        note = f"Site shift {shift['level']}: {shift.get('message', '')}".rstrip(": ")
        if run.shift_acknowledged_at:
            who = run.shift_acknowledged_by.get_username() if run.shift_acknowledged_by else "someone"
            note += f" Acknowledged by {who} at {_iso(run.shift_acknowledged_at)}."
        notes.append(note)
    who = run.signed_off_by.get_username() if run.signed_off_by else "someone"
    notes.append(f"Signed off by {who} at {_iso(run.signed_off_at)}.")
    if run.second_signed_off_at:
        second = run.second_signed_off_by.get_username() if run.second_signed_off_by else "someone"
        notes.append(f"Second sign-off by {second} at {_iso(run.second_signed_off_at)}.")
    if run.signoff_reason.strip():
        notes.append(f"Sign-off reason: {run.signoff_reason.strip()}")
    if run.comment.strip():
        notes.append(f"Comment: {run.comment.strip()}")
    return notes


def _iso(moment: datetime | None) -> str | None:
    return timezone.localtime(moment).isoformat(timespec="seconds") if moment else None


# --- HL7 v2.5.1 --------------------------------------------------------------------------------

_ESCAPES = (("\\", "\\E\\"), ("|", "\\F\\"), ("^", "\\S\\"), ("&", "\\T\\"), ("~", "\\R\\"))


def escape(text: str) -> str:
    """HL7 escaping of a free-text or id component (`|^~\\&`); line breaks become spaces.

    hl7apy's own escaping leaves a backslash unescaped when the text after it looks like an escape
    sequence (`D\\E&F`), so the text is escaped here and assigned as the component's ER7 value."""
    text = " ".join(str(text).replace("\r", "\n").split("\n"))
    for char, sequence in _ESCAPES:
        text = text.replace(char, sequence)
    return text


def unescape(text: str) -> str:
    """The text `escape` was given (for reading a message back: hl7apy keeps escape sequences as they are)."""
    out, index = [], 0
    sequences = {sequence: char for char, sequence in _ESCAPES}
    while index < len(text):
        sequence = text[index:index + 3]
        if sequence in sequences:
            out.append(sequences[sequence])
            index += 3
        else:
            out.append(text[index])
            index += 1
    return "".join(out)


def _escaped_within(text: str, limit: int) -> str:
    """The escaped text, cut (before escaping, so that no escape sequence is split) to at most `limit` characters."""
    while len(escape(text)) > limit:
        text = text[:-1]
    return escape(text)


def _dtm(moment: datetime | None) -> str:
    return timezone.localtime(moment).strftime("%Y%m%d%H%M%S%z") if moment else ""


def _coded(code: str, text: str, system: str) -> str:
    return f"{escape(code)}^{escape(text)}^{system}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"  # values come rounded (2 or 3 places)


def build_hl7(run: ClassificationRun, control_id: str | None = None) -> str:
    """The run's verified differential as an HL7 v2.5.1 ORU^R01 message (ER7 text, segments split by `\\r`).

    MSH-10 is `control_id`, or a new unique id. The message is validated by hl7apy (strict) before it is
    returned; a refused run raises ExportRefused."""
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.core import Message

    if control_id is not None and not 0 < len(escape(control_id)) <= 20:
        raise ValueError(f"An HL7 message control id (MSH-10) holds 1 to 20 characters, not {control_id!r}.")
    data = export_data(run)
    message = Message("ORU_R01", version="2.5.1", validation_level=VALIDATION_LEVEL.STRICT)
    msh = message.msh
    msh.msh_3 = SENDING_APPLICATION
    if run.site_id:
        msh.msh_4.hd_1 = _escaped_within(run.site.name, 20)  # HD-1 holds 20 characters
    msh.msh_7 = _dtm(timezone.now())
    msh.msh_9 = "ORU^R01^ORU_R01"
    msh.msh_10 = escape(control_id or uuid.uuid4().hex[:20])
    msh.msh_11 = "P"
    msh.msh_18 = "UNICODE UTF-8"  # comments and names may hold any character
    result = message.add_group("ORU_R01_PATIENT_RESULT")
    if run.patient_identifier.strip():
        pid = result.add_group("ORU_R01_PATIENT").pid
        pid.pid_1 = "1"
        pid.pid_3.cx_1 = escape(run.patient_identifier.strip())
        pid.pid_3.cx_5 = "PI"
        pid.pid_5.xpn_7 = "U"  # the name is required but unknown here: name type "unspecified"
    order = result.add_group("ORU_R01_ORDER_OBSERVATION")
    obr = order.obr
    obr.obr_1 = "1"
    obr.obr_3.ei_1 = escape(run.accession.strip())
    obr.obr_3.ei_2 = SENDING_APPLICATION
    obr.obr_4 = _coded(data.panel or LOCAL_PANEL, data.panel_name, "LN" if data.panel else "L")
    if run.collected_at:
        obr.obr_7 = _dtm(run.collected_at)
    obr.obr_22 = _dtm(run.signed_off_at)
    obr.obr_24 = "HM"  # diagnostic service section: hematology
    obr.obr_25 = "F"
    for index, note in enumerate(data.notes, 1):
        nte = order.add_segment("NTE")
        nte.nte_1 = str(index)
        nte.nte_3 = escape(note)
    for index, value in enumerate(data.values, 1):
        obx = order.add_group("ORU_R01_OBSERVATION").obx
        obx.obx_1 = str(index)
        obx.obx_2 = "NM"
        obx.obx_3 = (_coded(value.loinc, value.display, "LN") if value.loinc
                     else _coded(value.key, value.name, "L"))
        obx.obx_5 = _number(value.value)
        obx.obx_6 = _coded(value.unit, value.unit, "UCUM")
        obx.obx_11 = "F"
        if run.collected_at:
            obx.obx_14 = _dtm(run.collected_at)
    specimen = order.add_group("ORU_R01_SPECIMEN").spm
    specimen.spm_1 = "1"
    specimen.spm_2.eip_2.ei_1 = escape(run.accession.strip())
    code, text = SPECIMEN_CODES.get(run.specimen_type, SPECIMEN_CODES[ClassificationRun.Specimen.PERIPHERAL_BLOOD])
    specimen.spm_4 = _coded(code, text, "SCT")
    if run.collected_at:
        specimen.spm_17.dr_1 = _dtm(run.collected_at)
    message.validate()
    return message.to_er7()


# --- FHIR R4 -----------------------------------------------------------------------------------

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
SNOMED = "http://snomed.info/sct"
ACCESSION_SYSTEM = "urn:hemoweb:accession"
PATIENT_SYSTEM = "urn:hemoweb:patient"


def build_fhir(run: ClassificationRun) -> dict:
    """The run's verified differential as a FHIR R4 Bundle (type collection): a DiagnosticReport, one
    Observation per value (LOINC codes, UCUM units; values without a code carry a local code and are listed
    in the conclusion), the Specimen and, when given, the Patient (by identifier only).

    Built and validated with fhir.resources' R4B models (`fhir.resources.R4B`): FHIR R4B keeps R4's
    DiagnosticReport, Observation, Specimen and Patient, so the JSON is R4-compatible (the package's
    top-level models are R5). A refused run raises ExportRefused."""
    from fhir.resources.R4B.bundle import Bundle

    data = export_data(run)
    accession = run.accession.strip()
    accession_identifier = {"system": ACCESSION_SYSTEM, "value": accession}

    def urn() -> str:
        return f"urn:uuid:{uuid.uuid4()}"

    entries = []
    patient_ref = None
    if run.patient_identifier.strip():
        patient_ref = urn()
        entries.append({"fullUrl": patient_ref, "resource": {
            "resourceType": "Patient",
            "identifier": [{"system": PATIENT_SYSTEM, "value": run.patient_identifier.strip()}]}})
    specimen_ref = urn()
    code, text = SPECIMEN_CODES.get(run.specimen_type, SPECIMEN_CODES[ClassificationRun.Specimen.PERIPHERAL_BLOOD])
    specimen = {"resourceType": "Specimen", "accessionIdentifier": accession_identifier,
                "type": {"coding": [{"system": SNOMED, "code": code, "display": text}], "text": text}}
    if run.collected_at:
        specimen["collection"] = {"collectedDateTime": _iso(run.collected_at)}
    if patient_ref:
        specimen["subject"] = {"reference": patient_ref}
    entries.append({"fullUrl": specimen_ref, "resource": specimen})
    observation_refs = []
    for value in data.values:
        ref = urn()
        observation_refs.append({"reference": ref})
        coding = ({"system": LOINC, "code": value.loinc, "display": value.display} if value.loinc
                  else {"system": LOCAL_SYSTEM, "code": value.key, "display": value.name})
        observation = {
            "resourceType": "Observation", "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                      "code": "laboratory"}]}],
            "code": {"coding": [coding], "text": value.name},
            "specimen": {"reference": specimen_ref},
            "valueQuantity": {"value": value.value, "unit": value.unit, "system": UCUM, "code": value.unit},
            "issued": _iso(run.signed_off_at),
        }
        if run.collected_at:
            observation["effectiveDateTime"] = _iso(run.collected_at)
        if patient_ref:
            observation["subject"] = {"reference": patient_ref}
        entries.append({"fullUrl": ref, "resource": observation})
    report = {
        "resourceType": "DiagnosticReport", "status": "final", "identifier": [accession_identifier],
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "HM",
                                  "display": "Hematology"}]}],
        "code": {"coding": [{"system": LOINC if data.panel else LOCAL_SYSTEM, "code": data.panel or LOCAL_PANEL,
                             "display": data.panel_name}]},
        "issued": _iso(run.signed_off_at), "specimen": [{"reference": specimen_ref}],
        "result": observation_refs, "conclusion": "\n".join(data.notes),
    }
    if run.collected_at:
        report["effectiveDateTime"] = _iso(run.collected_at)
    if patient_ref:
        report["subject"] = {"reference": patient_ref}
    entries.insert(0, {"fullUrl": urn(), "resource": report})
    bundle = {"resourceType": "Bundle", "type": "collection", "timestamp": _iso(timezone.now()),
              "identifier": {"system": ACCESSION_SYSTEM, "value": accession}, "entry": entries}
    Bundle.model_validate(bundle)  # raises on anything FHIR R4 does not accept
    return bundle
