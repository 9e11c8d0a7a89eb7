"""The default LOINC codes (hemoweb.ml.loinc.DEFAULT_LOINC) on the tree's types, where a type has none yet."""

from django.db import migrations

from hemoweb.ml.loinc import DEFAULT_LOINC


def set_defaults(apps, schema_editor):
    CellType = apps.get_model("cells", "CellType")
    for node in CellType.objects.filter(code__in=DEFAULT_LOINC):
        automated, manual = DEFAULT_LOINC[node.code]
        fields = {}
        if not node.loinc_code and automated:
            fields["loinc_code"] = automated
        if not node.loinc_manual_code and manual:
            fields["loinc_manual_code"] = manual
        if fields:
            CellType.objects.filter(pk=node.pk).update(**fields)


class Migration(migrations.Migration):
    dependencies = [("cells", "0005_celltype_loinc")]

    operations = [migrations.RunPython(set_defaults, migrations.RunPython.noop)]
