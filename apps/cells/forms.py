from django import forms
from django.conf import settings

from .models import CellType


class ImportForm(forms.Form):
    """Upload a .zip of labelled cell images into a dataset (new or existing)."""

    archive = forms.FileField(help_text="A .zip laid out one sub-folder per label, or any layout with a labels CSV.")
    dataset = forms.CharField(max_length=100, help_text="Existing or new dataset name.")
    labels = forms.FileField(required=False, help_text="Optional CSV with columns path,label.")
    label_map = forms.FileField(required=False, help_text="Optional CSV with columns label,cell_type_code.")
    source = forms.CharField(max_length=255, required=False)
    licence = forms.CharField(max_length=100, required=False)

    def clean_archive(self):
        archive = self.cleaned_data["archive"]
        if archive.size > settings.HEMOWEB_UPLOAD_MAX_BYTES:
            raise forms.ValidationError(f"The archive is larger than {settings.HEMOWEB_UPLOAD_MAX_BYTES // 2**20} MB.")
        if not archive.name.lower().endswith(".zip"):
            raise forms.ValidationError("Upload a .zip archive.")
        return archive


class RelabelForm(forms.Form):
    cell_type = forms.ModelChoiceField(queryset=CellType.objects.all(), label="New cell type")
