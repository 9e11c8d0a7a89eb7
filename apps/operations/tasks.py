"""Diagnostic task: proves that a queue delivers each job exactly once (used by the scale-out test)."""

import os
import time


def record_delivery(token: int, journal: str, seconds: float = 0.05) -> int:
    """Append `token worker-pid` to the journal; the line count shows how often each job ran."""
    time.sleep(seconds)
    with open(journal, "a") as handle:
        handle.write(f"{token} {os.getpid()}\n")
    return token
