from django import forms

from apps.cells.models import CellType, Dataset
from apps.classifiers.models import ModelSet
from hemoweb.ml.train import MODES

SUGGESTED_ARCHITECTURES = ("mobilenetv3_small_100", "resnet18", "tf_efficientnet_lite0", "mobilenetv3_large_100",
                           "tf_efficientnetv2_b0", "resnext50_32x4d", "coatnet_0_rw_224", "mobilenetv3_small_050")
MODE_LABELS = {"scratch": "From scratch", "pretrained": "Pretrained", "pretrained_aug": "Pretrained + augmentation"}


class TrainingForm(forms.Form):
    dataset = forms.ModelChoiceField(queryset=Dataset.objects.all())
    name = forms.CharField(max_length=100, help_text="Name of the model set to create.")
    architecture = forms.CharField(max_length=100, initial="mobilenetv3_small_100",
                                   help_text="Any timm model name.",
                                   widget=forms.TextInput(attrs={"list": "architectures"}))
    mode = forms.ChoiceField(choices=[(m, MODE_LABELS[m]) for m in MODES], initial="scratch")
    epochs = forms.IntegerField(min_value=1, max_value=500, initial=10)
    image_size = forms.IntegerField(min_value=16, max_value=1024, initial=128, label="Image size (px)")
    batch_size = forms.IntegerField(min_value=2, max_value=1024, initial=64)
    device = forms.ChoiceField(choices=[("auto", "auto (GPU when present)"), ("cpu", "CPU"), ("cuda", "GPU")])
    nodes = forms.MultipleChoiceField(required=False, help_text="Leave empty to train every node that has data.",
                                      widget=forms.CheckboxSelectMultiple)
    shared_backbone = forms.BooleanField(
        required=False, label="Shared backbone",
        help_text="One network with a head per node, trained together: a cell costs one pass through the "
                  "network for the whole tree (faster training and classification, especially on CPU).")
    activate = forms.BooleanField(required=False, help_text="Make the new set the active one when it succeeds.")
    adapt_from = forms.ModelChoiceField(
        queryset=ModelSet.objects.all(), required=False, label="Adapt a trained set instead",
        help_text="Fine-tune this shared-backbone set on part of the dataset's cells (the rest score it, before and "
                  "after); the fields above except dataset and name are then not used. Registered, never activated, "
                  "only when better on these cells and at most 1 point worse on the set's own test cells.")
    adapt_mode = forms.ChoiceField(choices=[("heads", "Heads only (fast)"), ("norm", "BatchNorm statistics + heads"),
                                            ("full", "Every weight")], initial="heads", required=False,
                                   label="Adaptation")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        inner = CellType.objects.filter(children__isnull=False).distinct().order_by("order", "code")
        self.fields["nodes"].choices = [(node.code, f"{node.code} · {node.name}") for node in inner]

    def clean_architecture(self) -> str:
        import timm

        name = self.cleaned_data["architecture"].strip()
        if not timm.is_model(name):
            raise forms.ValidationError(f"{name!r} is not a timm model name (for example resnet18).")
        return name
