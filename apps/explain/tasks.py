"""Background work for explanations whose settings take longer than a web request should."""

from .services import run_queued


def run_explanation(explanation_id: int) -> str:
    row = run_queued(explanation_id)
    return row.status if row else "missing"
