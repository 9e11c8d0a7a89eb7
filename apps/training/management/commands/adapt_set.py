import json
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from apps.cells.management.commands.import_cells import read_optional
from apps.training.adaptation import AdaptationError, adapt_model_set, describe
from hemoweb.ml.adapt import MODES


class Command(BaseCommand):
    help = ("Adapt a shared-backbone model set to a lab's labelled cells (a folder/.zip or a stored dataset), in the "
            "foreground: part of the cells adapt it, the rest and the set's original test cells score it before and "
            "after; the new set is registered (never activated) only when it is better on the lab's cells and loses "
            "at most 1 point on the original ones.")

    def add_arguments(self, parser):
        parser.add_argument("source", nargs="?", help="Folder or .zip: one sub-folder per label, or a labels CSV.")
        parser.add_argument("--dataset", help="Instead of SOURCE: the cells of this stored dataset.")
        parser.add_argument("--from", dest="from_set", help="The set to adapt (default: the active set).")
        parser.add_argument("--name", required=True, help="Name of the new set.")
        parser.add_argument("--labels", help="CSV with columns path,label.")
        parser.add_argument("--label-map", help="CSV with columns label,cell_type_code.")
        parser.add_argument("--mode", choices=MODES, default="heads",
                            help="heads: the heads only (fast); norm: BatchNorm statistics re-estimated on the lab's "
                                 "cells, then BatchNorm scales and the heads; full: every weight.")
        parser.add_argument("--per-type", type=int, default=0,
                            help="Adapt on this many cells of each type, keep the rest aside (default: half).")
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--json", help="Write the report (before/after scores) as JSON to this file.")

    def handle(self, *args, **o):
        if bool(o["source"]) == bool(o["dataset"]):
            raise CommandError("Give either SOURCE (a folder or .zip) or --dataset NAME.")

        def echo(event):
            if event.kind == "log" and event.message:
                self.stdout.write(event.message)

        report = {}
        try:
            model_set, report = adapt_model_set(
                from_set=o["from_set"], name=o["name"], source=o["source"], dataset=o["dataset"],
                labels_csv=read_optional(o["labels"], "labels"), label_map_csv=read_optional(o["label_map"], "label map"),
                mode=o["mode"], seed=o["seed"], per_type=o["per_type"], callback=echo)
        except AdaptationError as error:
            report = error.report
            if o["json"] and report:
                Path(o["json"]).write_text(json.dumps(report, indent=2))
            for line in describe(report):
                self.stdout.write(line)
            raise CommandError(str(error)) from error
        if o["json"]:
            Path(o["json"]).write_text(json.dumps(report, indent=2))
        for line in describe(report):
            self.stdout.write(line)
        self.stdout.write(f"Model set {model_set.name} registered at {model_set.path} (not activated), "
                          f"in {report['seconds']} s.")
