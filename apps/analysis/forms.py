from django import forms

from apps.classifiers.models import ModelSet
from apps.sites.models import Site

from .models import ClassificationRun


class ClassifyForm(forms.Form):
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
