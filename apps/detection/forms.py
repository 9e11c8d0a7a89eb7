from django import forms

from .models import DetectionDataset

ARCHITECTURES = [("yolov8n.yaml", "YOLOv8n (from scratch)"), ("yolo11n.yaml", "YOLO11n (from scratch)"),
                 ("yolov8s.yaml", "YOLOv8s (from scratch)")]


class DetectForm(forms.Form):
    image = forms.FileField(label="Smear image", help_text="JPEG, PNG, TIFF or BMP; large fields are tiled.",
                            error_messages={"required": "Choose a smear image to upload.",
                                            "empty": "The file is empty (0 bytes): choose a smear image with content."})


class ImportDetectionsForm(forms.Form):
    archive = forms.FileField(label="Annotated images (.zip)")
    dataset = forms.CharField(max_length=100)
    format = forms.ChoiceField(choices=[("voc", "Pascal VOC (Annotations/*.xml + JPEGImages/)"),
                                       ("yolo", "YOLO (images/, labels/, data.yaml)")])
    classes = forms.CharField(required=False, help_text="Optional comma-separated class names; other boxes are skipped.")
    source = forms.CharField(required=False, max_length=255)
    licence = forms.CharField(required=False, max_length=100)


class TrainDetectorForm(forms.Form):
    dataset = forms.ModelChoiceField(queryset=DetectionDataset.objects.all())
    architecture = forms.ChoiceField(choices=ARCHITECTURES, initial="yolov8n.yaml")
    epochs = forms.IntegerField(min_value=1, max_value=1000, initial=30)
    imgsz = forms.IntegerField(min_value=64, max_value=1280, initial=416, help_text="A multiple of 32.")
    device = forms.ChoiceField(choices=[("auto", "auto"), ("cpu", "cpu"), ("cuda", "cuda")], initial="auto")
    activate = forms.BooleanField(required=False, help_text="Use the result for detection when it is done.")

    def clean_imgsz(self):
        value = self.cleaned_data["imgsz"]
        if value % 32:
            raise forms.ValidationError("The image size must be a multiple of 32 (e.g. 416, 512, 640).")
        return value
