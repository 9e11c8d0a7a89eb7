import json
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from apps.sites.models import VerificationStudy
from apps.sites.services import StudyError, run_study, start_study


class Command(BaseCommand):
    help = ("Verify a model set on a dataset's labelled cells (a verification study, run in the foreground): per cell "
            "type n, sensitivity, PPV and F1 with exact 95 % intervals, the confusion matrix, agreement, kappa, "
            "coverage, selective accuracy, and pass or fail under the site's acceptance criteria.")

    def add_arguments(self, parser):
        parser.add_argument("--dataset", required=True, help="The stored dataset whose labelled cells are verified.")
        parser.add_argument("--models", help="Model set name or folder under models/ (default: the site's set, "
                                             "else the active set).")
        parser.add_argument("--site", help="Site name or id (default: the dataset's site, else the default site).")
        parser.add_argument("--json", help="Write the study's numbers as JSON to this file.")

    def handle(self, *args, **o):
        try:
            study = start_study(dataset=o["dataset"], models=o["models"], site=o["site"],
                                trigger=VerificationStudy.Trigger.COMMAND, enqueue=False)
        except StudyError as error:
            raise CommandError(str(error)) from error
        self.stdout.write(f"Verification study {study.pk}: {study.model_set_name} on {study.n_total} cells of "
                          f"{study.dataset_name} at {study.site.name}")
        study = run_study(study.pk, echo=self._progress if o["verbosity"] > 1 else None)
        if study.status != VerificationStudy.Status.SUCCEEDED:
            raise CommandError(f"The study failed: {study.error}")
        if o["json"]:
            Path(o["json"]).write_text(json.dumps({"study": study.pk, **study.results}, indent=2))
        self._summary(study.results)
        verdict = "PASSED" if study.passed else "FAILED"
        self.stdout.write(f"{verdict} under the acceptance criteria of {study.site.name}")

    def _progress(self, line: str) -> None:
        self.stdout.write(line)

    def _summary(self, r: dict) -> None:
        agreement, left_out = r["agreement"], r["left_out"]
        low, high = agreement["ci"]
        kappa = "–" if r["kappa"] is None else f"{r['kappa']:.3f}"
        selective = "–" if r["selective_accuracy"] is None else f"{r['selective_accuracy']:.3f}"
        self.stdout.write(
            f"n {r['n']}: agreement {agreement['value']:.3f} (95 % CI {low:.3f}–{high:.3f}),"
            f" kappa {kappa}, coverage {r['coverage']:.3f}, selective accuracy {selective} on {r['selective_n']} cells;"
            f" with no refusals (best guesses) {r['forced_agreement']:.3f}")
        if left_out["training_overlap"]:
            self.stdout.write(f"Left out: {left_out['training_overlap']} cells the set was trained on (by sha256)")
        if not left_out.get("training_datasets_checked"):
            self.stdout.write("The set's training cells are not in this database: an overlap could not be checked")
        for code, skipped in left_out["too_few"].items():
            self.stdout.write(f"Skipped {code}: {skipped['reason']}")
        if left_out["unknown_labels"]:
            self.stdout.write("Skipped labels the tree does not know: " + ", ".join(
                f"{label} ({n})" for label, n in left_out["unknown_labels"].items()))
        if r.get("cannot_report"):
            self.stdout.write(f"The set cannot report: {', '.join(r['cannot_report'])} (their cells count as wrong)")
        for code, row in r["per_type"].items():
            verdict = r["verdicts"][code]
            mark = "not judged" if not verdict["judged"] else ("pass" if verdict["passed"] else "FAIL")
            sens, ppv, f1 = row["sensitivity"], row["ppv"], row["f1"]
            self.stdout.write(f"  {code:5} n {row['n']:4}  sensitivity {_f(sens)}  PPV {_f(ppv)}  F1 {_f(f1)}  {mark}")


def _f(value: dict) -> str:
    if value["value"] is None:
        return "  –  (–)        "
    return f"{value['value']:.3f} ({value['ci'][0]:.2f}–{value['ci'][1]:.2f})"
