"""Slide runs on their pages: the slide's counts, and a field's boxes as the SVG draws them."""

from django import template
from django.urls import reverse

from apps.analysis import slides
from hemoweb.ml.detect import CLASS_COLOURS

register = template.Library()
KIND_COLOURS = {"white": CLASS_COLOURS["WBC"], "red": CLASS_COLOURS["RBC"], "platelet": CLASS_COLOURS["Platelets"],
                "other": "#8c564b"}


@register.simple_tag
def slide_summary(run) -> dict:
    return slides.slide_summary(run)


@register.simple_tag
def field_boxes(field, run) -> list[dict]:
    """Colour by kind (white, red, platelet); a white box links to its cell on the field's page."""
    base = reverse("analysis:field", args=[run.pk, field.index])
    drawn = []
    for box in field.boxes:
        x1, y1, x2, y2 = box["box"]
        drawn.append({**box, "x": x1, "y": y1, "w": x2 - x1, "h": y2 - y1,
                      "colour": KIND_COLOURS.get(box.get("kind"), KIND_COLOURS["other"]),
                      "href": f"{base}?cell={box['cell']}" if box.get("cell") else ""})
    return drawn


@register.filter
def stroke(field) -> int:
    return max(2, round(max(field.width, field.height) / 300))
