from django import forms

from apps.cells.models import Dataset
from apps.classifiers.models import ModelSet


class StudyForm(forms.Form):
    """Start a verification study at a site: the labelled cells, and the set (the site's set by default)."""

    dataset = forms.ModelChoiceField(queryset=Dataset.objects.all(), help_text="Labelled cells of this site, e.g. the "
                                                                                "cells its technologists verified.")
    model_set = forms.ModelChoiceField(queryset=ModelSet.objects.all(), required=False,
                                       empty_label="the site's set in use", help_text="The set to verify.")

    def __init__(self, *args, site=None, **kwargs):
        super().__init__(*args, **kwargs)
        if site is not None and site.reference_dataset_id:
            self.fields["dataset"].initial = site.reference_dataset_id


class UseSetForm(forms.Form):
    """The set a site classifies with in routine use."""

    model_set = forms.ModelChoiceField(queryset=ModelSet.objects.all(), required=False,
                                       empty_label="follow the active set", label="Set for routine use")
