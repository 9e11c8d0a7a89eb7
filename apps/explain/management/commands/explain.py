"""python manage.py explain IMAGE [--node CODE | --model ID] --method ig|occlusion|gradcam --out PNG"""

import json
import shutil
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from hemoweb.ml.explain import BASELINES, METHODS, ExplainError

from ...services import request_explanation, resolve_model


class Command(BaseCommand):
    help = "Explain one cell image with a registered model; writes the side-by-side PNG (and prints the numbers)."

    def add_arguments(self, parser):
        parser.add_argument("image", help="Path of a cell image file.")
        which = parser.add_mutually_exclusive_group()
        which.add_argument("--node", help="Tree node code: the active set's classifier of that node.")
        which.add_argument("--model", type=int, help="TrainedModel id.")
        parser.add_argument("--method", choices=list(METHODS), default="gradcam")
        parser.add_argument("--target", default="", help="Class code to explain (default: the predicted class).")
        parser.add_argument("--baseline", choices=BASELINES)
        parser.add_argument("--n-steps", type=int)
        parser.add_argument("--window", type=int)
        parser.add_argument("--stride", type=int)
        parser.add_argument("--out", required=True, help="Where to write the side-by-side PNG.")
        parser.add_argument("--overlay", help="Also write the overlay PNG here.")

    def handle(self, *args, **options):
        image = Path(options["image"])
        if not image.is_file():
            raise CommandError(f"No image file at {image}.")
        names = ("baseline", "n_steps", "window", "stride")
        settings_ = {name: options[name] for name in names if options[name] is not None}
        try:
            model = resolve_model(model_id=options["model"], node=options["node"])
            outcome = request_explanation(model=model, method=options["method"], settings_=settings_,
                                          target=options["target"], upload=image.read_bytes(), inline=True)
        except ExplainError as error:
            raise CommandError(str(error)) from error
        row = outcome.explanation
        if not row.finished_ok:
            raise CommandError(row.error or f"The explanation is {row.status}.")
        out = Path(options["out"])
        out.parent.mkdir(parents=True, exist_ok=True)
        with row.figure.open("rb") as source, out.open("wb") as target:
            shutil.copyfileobj(source, target)
        if options["overlay"]:
            with row.overlay.open("rb") as source, Path(options["overlay"]).open("wb") as target:
                shutil.copyfileobj(source, target)
        self.stdout.write(json.dumps(row.summary, indent=2))
        self.stdout.write(self.style.SUCCESS(f"Wrote {out}{' (from cache)' if outcome.cached else ''}."))
