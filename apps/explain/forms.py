from django import forms

from apps.cells.models import Cell
from hemoweb.ml.explain import BASELINES, IG_STEPS, METHODS

from .services import explainable_models


BASELINE_LABELS = {"background": "the image's background colour", "blurred": "a blurred copy", "black": "black",
                   "mean": "the normalisation mean (grey)"}


class ModelChoiceField(forms.ModelChoiceField):
    def label_from_instance(self, model) -> str:
        set_name = model.model_set.name if model.model_set else "no set"
        active = " (active)" if model.model_set and model.model_set.is_active else ""
        return f"{model.node.code} · {model.node.name} — {set_name}{active}"


class ExplainForm(forms.Form):
    """What to explain and how; every setting optional (empty = the fast default)."""

    model = ModelChoiceField(queryset=explainable_models(), empty_label=None, label="Model (tree level)")
    image = forms.ImageField(required=False, label="Upload a cell image")
    cell = forms.IntegerField(required=False, min_value=1, max_value=2**62, label="or a cell id")
    classified = forms.IntegerField(required=False, min_value=1, max_value=2**62, widget=forms.HiddenInput)
    method = forms.ChoiceField(choices=[(key, label) for key, label in METHODS.items()], initial="gradcam")
    target = forms.CharField(required=False, max_length=20, label="Class to explain",
                             help_text="Empty: the predicted class.")
    baseline = forms.ChoiceField(choices=[(b, BASELINE_LABELS[b]) for b in BASELINES], initial=BASELINES[0],
                                 required=False, label="IG baseline / Occlusion fill")
    n_steps = forms.IntegerField(required=False, min_value=2, max_value=1000, label="IG steps",
                                 widget=forms.NumberInput(attrs={"placeholder": str(IG_STEPS)}))
    window = forms.IntegerField(required=False, min_value=2, max_value=1024, label="Occlusion window (px)",
                                widget=forms.NumberInput(attrs={"placeholder": "input/4"}))
    stride = forms.IntegerField(required=False, min_value=1, max_value=1024, label="Occlusion stride (px)",
                                widget=forms.NumberInput(attrs={"placeholder": "window"}))

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["model"].queryset = explainable_models()

    def clean_cell(self):
        cell_id = self.cleaned_data.get("cell")
        if cell_id is None:
            return None
        cell = Cell.objects.filter(pk=cell_id).first()
        if cell is None:
            raise forms.ValidationError(f"There is no cell with id {cell_id}.")
        return cell

    def clean_classified(self):
        from .services import classified_cell

        classified_id = self.cleaned_data.get("classified")
        if classified_id is None:
            return None
        classified = classified_cell(classified_id)
        if classified is None:
            raise forms.ValidationError(f"There is no classified cell with id {classified_id}.")
        return classified

    def clean(self):
        data = super().clean()
        if not data.get("image") and not data.get("cell") and not data.get("classified"):
            raise forms.ValidationError("Choose an image: upload one or give the id of a cell.")
        return data

    def method_settings(self) -> dict:
        data = self.cleaned_data
        names = {"ig": ("baseline", "n_steps"), "occlusion": ("baseline", "window", "stride")}.get(data["method"], ())
        return {name: data[name] for name in names if data.get(name) not in (None, "")}
