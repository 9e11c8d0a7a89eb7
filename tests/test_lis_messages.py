"""HL7 v2.5.1 and FHIR R4 messages of signed-off runs: real runs of the tiny model set on the demo cells,
read back with hl7apy and fhir.resources."""

from datetime import datetime, timezone as dt_timezone

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message

from apps.analysis import services
from apps.analysis.models import ClassificationRun, ClassifiedCell
from apps.cells.models import CellType
from apps.lis.messages import ExportRefused, build_fhir, build_hl7, export_data, export_refusal, unescape
from hemoweb.ml.loinc import DEFAULT_LOINC, PANEL_AUTOMATED, PANEL_MANUAL
from tests.review_helpers import SMALL_RUN, review_flagged
from tests.test_analysis_services import demo_zip

COLLECTED = datetime(2026, 11, 30, 7, 45, tzinfo=dt_timezone.utc)


def make_run(owner, identity=None, per_folder=2) -> ClassificationRun:
    identity = {"accession": "ACC-1", "specimen_type": "peripheral-blood", "collected_at": COLLECTED,
                **(identity or {})}
    run = services.start_run(owner=owner, files=[SimpleUploadedFile("s.zip", demo_zip(per_folder))],
                             identity=identity)
    assert run.status == ClassificationRun.Status.SUCCEEDED
    return run


def signed_off(run, user, *, reviewed=False) -> ClassificationRun:
    """Signed off as reviewed (every flagged cell and the first cell accepted), or as classified (no flag)."""
    if reviewed:
        review_flagged(run, user)
        first = run.cells.select_related("final_type").order_by("index").first()
        services.review_cell(cell_id=first.pk, user=user, code=None if first.final_type.parent_id else "NIF")
    else:
        run.cells.update(flags=[])  # a confident run: nothing the sign-off asks to review
    return services.sign_off(run_id=run.pk, user=user, reason=SMALL_RUN)


def parsed(text: str):
    message = parse_message(text, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    assert message.validate()
    return message


def segments(text: str, name: str) -> list[list[str]]:
    return [line.split("|") for line in text.split("\r") if line.startswith(name + "|")]


def percent_obx(text: str) -> list[list[str]]:
    return [obx for obx in segments(text, "OBX") if obx[6].startswith("%^")]


def test_the_tree_is_seeded_with_automated_and_manual_loinc_codes(tree):
    assert tree["NEU"].loinc_code == "770-8" and tree["NEU"].loinc_manual_code == "23761-0"
    assert tree["LYT"].loinc_code == "736-9" and tree["LYT"].loinc_manual_code == "737-7"
    assert tree["NGS"].loinc_manual_code == "769-9" and tree["BLA"].loinc_manual_code == "709-6"
    assert tree["HAC"].loinc_code == "" and tree["HAC"].loinc_manual_code == ""  # LOINC has no hairy-cell term here
    assert set(DEFAULT_LOINC) <= set(tree)


def test_hl7_message_validates_and_its_percentages_add_up_to_100(lab_user, tiny_model_set):
    run = signed_off(make_run(lab_user, {"wbc_count": 6.5}), lab_user)
    text = build_hl7(run, control_id="CTRL-1")
    assert "\n" not in text and text.startswith("MSH|^~\\&|HEMOWEB|")
    message = parsed(text)
    assert message.msh.msh_9.to_er7() == "ORU^R01^ORU_R01" and message.msh.msh_12.to_er7() == "2.5.1"
    assert message.msh.msh_10.to_er7() == "CTRL-1"
    obr = segments(text, "OBR")[0]
    assert obr[3].split("^")[0] == "ACC-1" and obr[4].startswith(PANEL_AUTOMATED + "^")
    assert obr[7] == "20261130074500+0000" and obr[22] and obr[25] == "F"
    percentages = percent_obx(text)
    assert percentages and all(obx[2] == "NM" and obx[11] == "F" and obx[6] == "%^%^UCUM" for obx in percentages)
    diff = services.run_differential(run)
    counted_rows = [row for row in diff.types if row.counted]
    assert abs(sum(float(obx[5]) for obx in percentages if "^LN" in obx[3] or "^L" in obx[3]) - 100) <= 0.5
    # one percentage per counted type of the differential (and the blasts, 0 % when none was seen)
    assert len(percentages) in (len(counted_rows), len(counted_rows) + 1)
    counted = [obx for obx in segments(text, "OBX") if obx[3].startswith("CELLS^")]
    assert counted and int(counted[0][5]) == diff.counted
    absolute = [obx for obx in segments(text, "OBX") if obx[6] == "10*9/L^10*9/L^UCUM"]
    if any(obx[3].split("^")[0] == "770-8" for obx in percentages):
        neutrophils = next(float(obx[5]) for obx in percentages if obx[3].startswith("770-8^"))
        assert any(obx[3].startswith("751-8^") and abs(float(obx[5]) - 6.5 * neutrophils / 100) < 0.01
                   for obx in absolute)
    assert segments(text, "NTE") and not segments(text, "PID")  # no patient identifier given
    assert build_hl7(run).split("\r")[0].split("|")[9] != build_hl7(run).split("\r")[0].split("|")[9]  # unique ids


def test_exported_percentages_add_up_whatever_the_mix(lab_user, tiny_model_set):
    run = make_run(lab_user, per_folder=3)
    cells = list(run.cells.order_by("index"))
    for cell, code in zip(cells, ["PLT", "BLA", "HAC", "NGB", "MYE", "EBO", "KSC"] * 5):
        services.correct_cell(cell_id=cell.pk, code=code, user=lab_user)
    run = signed_off(run, lab_user, reviewed=True)
    data = export_data(run)
    assert abs(data.percent_total - 100) <= 0.5
    text = build_hl7(run)
    percentages = [float(obx[5]) for obx in percent_obx(text)]
    fhir = build_fhir(run)
    fhir_percentages = [entry["resource"]["valueQuantity"]["value"] for entry in fhir["entry"]
                        if entry["resource"]["resourceType"] == "Observation"
                        and entry["resource"]["valueQuantity"]["code"] == "%"]
    blasts = next(value.value for value in data.values if value.key == "BLA")
    assert abs(sum(percentages) - 100) <= 0.5 and abs(sum(fhir_percentages) - 100) <= 0.5
    assert blasts > 0 and sum(1 for obx in percent_obx(text) if obx[3].startswith("709-6^")) == 1


def test_types_without_a_code_are_comments_never_dropped(lab_user, tiny_model_set):
    run = make_run(lab_user)
    cell = run.cells.order_by("index").first()
    services.correct_cell(cell_id=cell.pk, code="HAC", user=lab_user)  # hairy cell: no LOINC code
    run = signed_off(run, lab_user, reviewed=True)
    text = build_hl7(run)
    hairy = [obx for obx in percent_obx(text) if obx[3].startswith("HAC^")]
    assert hairy and hairy[0][3].endswith("^L")  # a local code, the value kept
    notes = " ".join(nte[3] for nte in segments(text, "NTE"))
    assert "Hairy cell (HAC)" in notes and "no LOINC code" in notes
    report = build_fhir(run)["entry"][0]["resource"]
    assert "Hairy cell (HAC)" in report["conclusion"]


def test_reviewed_runs_use_manual_codes_unreviewed_runs_automated(lab_user, tiny_model_set):
    automated = signed_off(make_run(lab_user), lab_user)
    manual = signed_off(make_run(lab_user, {"accession": "ACC-2"}), lab_user, reviewed=True)
    auto_text, manual_text = build_hl7(automated), build_hl7(manual)
    assert segments(auto_text, "OBR")[0][4].startswith(PANEL_AUTOMATED + "^")
    assert segments(manual_text, "OBR")[0][4].startswith(PANEL_MANUAL + "^")
    manual_codes = {code for _, code in DEFAULT_LOINC.values() if code}
    automated_codes = {code for code, _ in DEFAULT_LOINC.values() if code}
    used_manual = {obx[3].split("^")[0] for obx in percent_obx(manual_text) if obx[3].endswith("^LN")}
    used_auto = {obx[3].split("^")[0] for obx in percent_obx(auto_text) if obx[3].endswith("^LN")}
    assert used_manual and used_manual <= manual_codes and not used_manual & automated_codes
    assert used_auto and used_auto <= automated_codes
    # accepting a cell (no change) is a review too
    accepted = make_run(lab_user, {"accession": "ACC-3"})
    accepted.cells.update(flags=[])
    accepted.cells.filter(pk=accepted.cells.first().pk).update(review_state=ClassifiedCell.Review.ACCEPTED)
    assert export_data(services.sign_off(run_id=accepted.pk, user=lab_user, reason="few cells")).manual


def test_reserved_characters_in_the_accession_are_escaped_and_round_trip(lab_user, tiny_model_set):
    accession = "A|B^C~D\\E&F"
    run = make_run(lab_user, {"accession": accession, "patient_identifier": "P^1|x"})
    run.comment = "Left shift | toxic granulation ^ check\nsecond line"
    run.save(update_fields=["comment"])
    run = signed_off(run, lab_user)
    text = build_hl7(run)
    message = parsed(text)
    order = message.ORU_R01_PATIENT_RESULT.ORU_R01_ORDER_OBSERVATION
    assert unescape(order.OBR.obr_3.ei_1.to_er7()) == accession
    assert unescape(message.ORU_R01_PATIENT_RESULT.ORU_R01_PATIENT.PID.pid_3.cx_1.to_er7()) == "P^1|x"
    assert len(segments(text, "OBR")[0]) == 26  # no field split by the reserved characters
    comments = [unescape(nte.nte_3.to_er7()) for nte in order.children if nte.name == "NTE"]
    assert "Comment: Left shift | toxic granulation ^ check second line" in comments
    bundle = build_fhir(run)
    assert bundle["identifier"]["value"] == accession


def test_patient_identifier_goes_into_pid_and_the_fhir_patient(lab_user, tiny_model_set):
    run = signed_off(make_run(lab_user, {"patient_identifier": "MRN-0042"}), lab_user)
    pid = segments(build_hl7(run), "PID")[0]
    assert pid[3].split("^")[0] == "MRN-0042"
    bundle = build_fhir(run)
    patients = [entry for entry in bundle["entry"] if entry["resource"]["resourceType"] == "Patient"]
    assert patients[0]["resource"]["identifier"][0]["value"] == "MRN-0042"
    report = bundle["entry"][0]["resource"]
    assert report["subject"]["reference"] == patients[0]["fullUrl"]


def test_fhir_bundle_validates_as_r4_with_loinc_and_ucum(lab_user, tiny_model_set):
    from fhir.resources.R4B.bundle import Bundle

    run = signed_off(make_run(lab_user, {"wbc_count": 5.0}), lab_user, reviewed=True)
    bundle = build_fhir(run)
    parsed_bundle = Bundle.model_validate(bundle)
    report = parsed_bundle.entry[0].resource
    assert report.__resource_type__ == "DiagnosticReport" and report.status == "final"
    assert report.code.coding[0].code == PANEL_MANUAL and report.code.coding[0].system == "http://loinc.org"
    observations = [entry.resource for entry in parsed_bundle.entry
                    if entry.resource.__resource_type__ == "Observation"]
    assert len(report.result) == len(observations) > 0
    assert {ref.reference for ref in report.result} == {entry.fullUrl for entry in parsed_bundle.entry
                                                        if entry.resource.__resource_type__ == "Observation"}
    assert all(obs.valueQuantity.system == "http://unitsofmeasure.org" for obs in observations)
    loinc = [obs for obs in observations if obs.code.coding[0].system == "http://loinc.org"]
    assert loinc and all(obs.code.coding[0].code in {c for _, c in DEFAULT_LOINC.values()} | {"753-4", "732-8",
                         "743-5", "712-0", "705-4"} for obs in loinc)
    specimen = next(entry.resource for entry in parsed_bundle.entry if entry.resource.__resource_type__ == "Specimen")
    assert specimen.type.coding[0].code == "119297000" and specimen.accessionIdentifier.value == "ACC-1"


def test_a_marrow_differential_goes_with_local_codes_not_blood_loinc(lab_user, tiny_model_set):
    run = signed_off(make_run(lab_user, {"specimen_type": "bone-marrow"}), lab_user, reviewed=True)
    text = build_hl7(run)
    parsed(text)
    assert segments(text, "OBR")[0][4].endswith("^L") and all(obx[3].endswith("^L") for obx in segments(text, "OBX"))
    assert segments(text, "SPM")[0][4].startswith("119359002^")
    assert abs(sum(float(obx[5]) for obx in percent_obx(text)) - 100) <= 0.5
    bundle = build_fhir(run)
    assert "Bone marrow differential" in bundle["entry"][0]["resource"]["conclusion"]


def test_runs_not_signed_off_or_without_accession_are_refused(lab_user, tiny_model_set):
    run = make_run(lab_user)
    assert "not signed off" in export_refusal(run)
    with pytest.raises(ExportRefused, match="not signed off"):
        build_hl7(run)
    with pytest.raises(ExportRefused, match="not signed off"):
        build_fhir(run)
    nameless = signed_off(make_run(lab_user, {"accession": ""}), lab_user)
    assert "no accession number" in export_refusal(nameless)
    with pytest.raises(ExportRefused, match="no accession number"):
        build_hl7(nameless)


def test_curated_codes_are_used(lab_user, tiny_model_set):
    run = signed_off(make_run(lab_user), lab_user)
    code = next(row.code for row in services.run_differential(run).types if row.counted)
    CellType.objects.filter(code=code).update(loinc_code="99999-9")
    assert sum(1 for obx in percent_obx(build_hl7(run)) if obx[3].startswith("99999-9^")) == 1




def test_a_run_awaiting_its_second_sign_off_is_exported_only_once_confirmed(lab_user, tiny_model_set):
    from django.contrib.auth.models import Group, User

    from apps.accounts.roles import SUPERVISOR

    run = make_run(lab_user)
    run.cells.filter(pk=run.cells.order_by("index").first().pk).update(final_type=CellType.objects.get(code="BLA"))
    run.site.second_review_blast_share = 0.0  # any blast asks for a supervisor
    run.site.save(update_fields=["second_review_blast_share"])
    run = signed_off(run, lab_user, reviewed=True)
    assert run.awaiting_second_sign_off
    assert "second sign-off" in export_refusal(run)
    with pytest.raises(ExportRefused, match="second sign-off"):
        build_hl7(run)
    supervisor = User.objects.create_user("super")
    supervisor.groups.add(Group.objects.get(name=SUPERVISOR))
    run = services.second_sign_off(run_id=run.pk, user=supervisor)
    notes = [nte[3] for nte in segments(build_hl7(run), "NTE")]
    assert any(note.startswith("Second sign-off by super") for note in notes)


@pytest.mark.django_db(transaction=True)
def test_the_loinc_migration_fills_empty_codes_and_keeps_curated_ones():
    from django.db import connection
    from django.db.migrations.executor import MigrationExecutor

    latest = MigrationExecutor(connection).loader.graph.leaf_nodes()
    executor = MigrationExecutor(connection)
    executor.migrate([("cells", "0005_celltype_loinc")])
    old = executor.loader.project_state([("cells", "0005_celltype_loinc")]).apps.get_model("cells", "CellType")
    old.objects.create(code="NEU", name="Neutrophil")
    old.objects.create(code="LYT", name="Lymphocyte", loinc_code="26474-7")  # a lab's own choice
    old.objects.create(code="HAC", name="Hairy cell")
    executor = MigrationExecutor(connection)
    executor.migrate(latest)
    codes = {node.code: (node.loinc_code, node.loinc_manual_code) for node in CellType.objects.all()}
    assert codes == {"NEU": ("770-8", "23761-0"), "LYT": ("26474-7", "737-7"), "HAC": ("", "")}


def test_the_admin_lists_and_edits_the_loinc_codes(admin_client, tree):
    listing = admin_client.get("/admin/cells/celltype/").content.decode()
    assert "770-8" in listing and "23761-0" in listing
    form = admin_client.get(f"/admin/cells/celltype/{tree['NEU'].pk}/change/").content.decode()
    assert 'name="loinc_code"' in form and 'name="loinc_manual_code"' in form


def test_long_names_with_reserved_characters_still_make_a_valid_message(lab_user, tiny_model_set):
    run = make_run(lab_user, {"accession": "|^~\\&" * 12 + "1234", "patient_identifier": "&" * 64})
    run.site.name = "Hämatologie | Labor ^ Nord & Süd, Gebäude 7"
    run.site.save(update_fields=["name"])
    run = signed_off(run, lab_user)
    text = build_hl7(run)
    message = parsed(text)
    assert unescape(message.msh.msh_4.hd_1.to_er7()) == "Hämatologie | Labo"  # 20 characters once escaped
    assert unescape(segments(text, "OBR")[0][3].split("^")[0]) == run.accession
    with pytest.raises(ValueError, match="control id"):
        build_hl7(run, control_id="x" * 21)
