"""Slide fields made like a detector's training fields before it looks at them: exposure and scale.

A detector learns cells at one magnification and one exposure (the shipped BCCD detector: 11.2 px/µm on a
bright background). A field from another microscope (a lower magnification, a dim camera) is first white balanced
to the training background and resampled to the training scale (measured on the slide's red cells, the best
ruler); the boxes found are mapped back to the field's own pixels. A field already close to both is detected as
it is. The references are measured on the detector's own training fields and kept in its card (`reference`).
Plain Python, no Django.
"""

import numpy as np
from PIL import Image

from .detect import Box, Detection, Detector, detect
from .standardise import background_of

SCALE_CLOSE = 0.25  # within 25 % of the training scale: not resampled
SCALE_LIMITS = (0.25, 4.0)  # a resampling further than this is not believed (a wrong measure): none
EXPOSURE_CLOSE = 0.10  # every channel's background within 10 % of the training one: not white balanced


def standardised(image: Image.Image, reference: dict, px_per_um: float | None) -> tuple[Image.Image, float]:
    """The field as the detector saw its training fields, and the factor from field pixels to its pixels."""
    target = reference.get("background")
    if target:
        rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        gain = np.asarray(target, dtype=np.float32) / background_of(rgb)
        if np.abs(gain - 1).max() > EXPOSURE_CLOSE:
            image = Image.fromarray((rgb * gain * 255).clip(0, 255).round().astype(np.uint8))
    factor = 1.0
    if reference.get("px_per_um") and px_per_um:
        ratio = reference["px_per_um"] / px_per_um
        if abs(ratio - 1) > SCALE_CLOSE and SCALE_LIMITS[0] <= ratio <= SCALE_LIMITS[1]:
            factor = ratio
            image = image.resize((max(1, round(image.width * factor)), max(1, round(image.height * factor))),
                                 Image.Resampling.BILINEAR)
    return image, factor


def detect_field(detector: Detector, image: Image.Image, px_per_um: float | None = None) -> Detection:
    """`detect` on the field standardised to the detector's training fields; boxes in the field's pixels."""
    standard, factor = standardised(image, detector.card.reference or {}, px_per_um)
    found = detect(detector, standard)
    if factor == 1.0:
        return found
    boxes = [Box(box.label, box.x1 / factor, box.y1 / factor, box.x2 / factor, box.y2 / factor, box.score)
             for box in found.boxes]
    return Detection(image.width, image.height, boxes, found.tiles)
