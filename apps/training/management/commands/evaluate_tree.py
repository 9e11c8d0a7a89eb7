import argparse
import json
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from apps.cells.management.commands.import_cells import read_optional
from apps.training.services import EvaluationError, evaluate_dataset, evaluate_source


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < 100:
        raise argparse.ArgumentTypeError(f"{text} µm per pixel is not a microscope's pixel size (0-100)")
    return value


class Command(BaseCommand):
    help = ("Evaluate a model set down the whole tree on a labelled folder or .zip (the import_cells layouts), "
            "or on a stored dataset's split (--dataset).")

    def add_arguments(self, parser):
        parser.add_argument("source", nargs="?", help="Folder or .zip: one sub-folder per label, or a labels CSV.")
        parser.add_argument("--dataset", help="Instead of SOURCE: the cells of this stored dataset ...")
        parser.add_argument("--split", default="test", choices=["train", "val", "test"],
                            help="... of this split (default test: the cells its trainings left out).")
        parser.add_argument("--models", help="Model set name or folder under models/ (default: the active set).")
        parser.add_argument("--labels", help="CSV with columns path,label.")
        parser.add_argument("--label-map", help="CSV with columns label,cell_type_code (labels that are a tree code, a type's name or alias need none).")
        parser.add_argument("--second-look", type=int, metavar="VIEWS",
                            help="Views averaged for a cell the first pass leaves unsure (0 = none; default: the "
                                 "set's own, chosen on validation cells when it was trained).")
        parser.add_argument("--um-per-pixel", type=positive_float, metavar="UM",
                            help="The images' pixel size in µm, used when their red cells cannot be measured.")
        parser.add_argument("--json", help="Write the metrics as JSON to this file.")

    def handle(self, *args, **o):
        if bool(o["source"]) == bool(o["dataset"]):
            raise CommandError("Give either SOURCE (a folder or .zip) or --dataset NAME.")
        try:
            if o["dataset"]:
                result = evaluate_dataset(o["dataset"], split=o["split"], models=o["models"],
                                          second_look=o["second_look"], um_per_pixel=o["um_per_pixel"])
            else:
                result = evaluate_source(o["source"], models=o["models"], labels_csv=read_optional(o["labels"], "labels"),
                                         label_map_csv=read_optional(o["label_map"], "label map"),
                                         second_look=o["second_look"], um_per_pixel=o["um_per_pixel"])
        except EvaluationError as error:
            raise CommandError(str(error)) from error
        if o["json"]:
            Path(o["json"]).write_text(json.dumps(result, indent=2))
        coarse, forced = result["coarse8"], result["forced"]
        self.stdout.write(
            f"n {result['n']}: accuracy {result['accuracy']:.4f}, balanced accuracy {result['balanced_accuracy']:.4f}, "
            f"macro-F1 {result['macro_f1']:.4f}, coverage {result['coverage']:.4f} "
            f"(second look: {result['second_look'] or 'none'})\n"
            f"8 classes (n {coarse['n']}): accuracy {coarse['accuracy']:.4f}, balanced accuracy "
            f"{coarse['balanced_accuracy']:.4f}, macro-F1 {coarse['macro_f1']:.4f}\n"
            f"Forced to the best guess (no refusals): accuracy {forced['accuracy']:.4f}, macro-F1 "
            f"{forced['macro_f1']:.4f}; 8 classes accuracy {forced['coarse8']['accuracy']:.4f}")
        scale, colour = result.get("scale", {}), result.get("colour", {})
        if scale.get("measured"):
            run = scale.get("run", {})
            self.stdout.write(f"Scale: {run.get('source')} {run.get('px_per_um')} px/µm, {run.get('ratio')}× the "
                              f"training scale{' (' + run['flag'] + ')' if run.get('flag') else ''}")
        if colour.get("background_median"):
            self.stdout.write(f"Background (RGB): {colour['background_median']}"
                              + (f", white balanced to {colour['training_background']}" if colour.get("normalised") else ""))
        for code, values in result["per_code"].items():
            self.stdout.write(f"  {code:5} P {values['precision']:.3f} R {values['recall']:.3f} "
                              f"F1 {values['f1']:.3f} n {values['support']}")
