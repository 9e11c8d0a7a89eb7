from django import forms

from apps.classifiers.models import ModelSet
from apps.sites.models import Site

from .models import ClassificationRun
from .specimen import IDENTITY_FIELDS


class SpecimenForm(forms.Form):
    """A run's specimen identity (upload form, run page); the accession number is required for export."""

    accession = forms.CharField(max_length=64, required=False, label="Accession number",
                                help_text="The specimen's number in the lab information system (needed to export).")
    patient_identifier = forms.CharField(max_length=64, required=False, label="Patient identifier (optional)")
    specimen_type = forms.ChoiceField(choices=ClassificationRun.Specimen.choices, required=False,
                                      initial=ClassificationRun.Specimen.PERIPHERAL_BLOOD, label="Specimen")
    collected_at = forms.DateTimeField(required=False, label="Collected",
                                       widget=forms.DateTimeInput(attrs={"type": "datetime-local", "step": 1},
                                                                  format="%Y-%m-%dT%H:%M:%S"))
    wbc_count = forms.FloatField(required=False, min_value=0.01, max_value=999, label="WBC count (10⁹/L, optional)",
                                 help_text="The analyser's white count: the export adds absolute counts.")

    def identity(self) -> dict:
        return {key: self.cleaned_data.get(key) for key in IDENTITY_FIELDS}

    @property
    def specimen_fields(self) -> list:
        return [self[name] for name in IDENTITY_FIELDS]


class ClassifyForm(SpecimenForm):
    """The choices of a classification; the files themselves come as `files` (a .zip or images)."""

    model_set = forms.ModelChoiceField(queryset=ModelSet.objects.all(), required=False, empty_label=None,
                                       help_text="Your site's set is chosen by default (the active set when the "
                                                 "site names none).")
    count_target = forms.TypedChoiceField(choices=ClassificationRun.TARGETS, coerce=int, initial=100, required=False,
                                           empty_value=100)
    name = forms.CharField(max_length=200, required=False, help_text="Sample or slide name (optional).")
    um_per_pixel = forms.FloatField(required=False, min_value=0.001, max_value=100, label="Pixel size (µm)",
                                    help_text="Optional: used only when the red cells on the images cannot be "
                                              "measured (tight crops).")

    def __init__(self, *args, user=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.site = Site.objects.for_user(user)  # the user's site, else the default site
        in_use = self.site.set_in_use()
        if in_use:
            self.fields["model_set"].initial = in_use.pk


class CorrectForm(forms.Form):
    code = forms.CharField(max_length=16)
    version = forms.IntegerField(required=False, min_value=0)
