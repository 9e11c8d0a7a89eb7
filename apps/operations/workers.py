"""Rows worked on by one process (a django-q2 worker, a CLI, a web request): who has it, and is it still alive?

A row that a process claims records the process (host and pid) and a heartbeat it renews while it works.
A worker killed with SIGKILL (out-of-memory killer, reboot, `kill -9`) records nothing on its way out;
whoever reads the row later can tell it is lost: the process is gone on this host, or the heartbeat is
older than a stale limit (for a worker on another machine).
"""

import os
import socket
from datetime import timedelta
from pathlib import Path

from django.db import models
from django.utils import timezone


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (a killed process nobody reaped yet, a zombie, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # somebody else's process: alive
        return True
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True


def lower_priority(niceness: int) -> int:
    """Run this process, all its threads included, at CPU niceness `niceness` (never raising its priority).

    Background work (training) calls it so that web requests and short jobs on the same machine keep
    the CPU when they need it; an idle machine still gives the training all of it. Linux keeps a nice
    value per thread, and thread pools (OpenMP, decoding) may already exist: each thread is set.
    Returns the niceness now in effect for the calling thread.
    """
    try:
        threads = [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        threads = [0]
    for tid in threads:
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) < niceness:
                os.setpriority(os.PRIO_PROCESS, tid, niceness)
        except OSError:  # a thread that just ended, or a platform without per-thread priorities
            continue
    return os.getpriority(os.PRIO_PROCESS, 0)


def this_worker() -> dict:
    """The fields that name the current process as a row's worker, with a fresh heartbeat."""
    return {"worker_host": socket.gethostname(), "worker_pid": os.getpid(), "heartbeat": timezone.now()}


def is_lost(row, stale_seconds: float) -> bool:
    """Whether the worker of a (running) row is gone: a dead process on this host, or silent for too long."""
    dead = bool(row.worker_pid) and row.worker_host == socket.gethostname() and not pid_alive(row.worker_pid)
    silent = row.heartbeat is not None and row.heartbeat < timezone.now() - timedelta(seconds=stale_seconds)
    return dead or silent


class WorkerFields(models.Model):
    """Abstract: worker_host, worker_pid and heartbeat, set by `claim` and renewed by `beat`."""

    worker_host = models.CharField(max_length=255, blank=True)
    worker_pid = models.PositiveIntegerField(null=True, blank=True)
    heartbeat = models.DateTimeField(null=True, blank=True)

    class Meta:
        abstract = True

    @classmethod
    def claim(cls, pk: int, *, status: str, to: str, **changes) -> bool:
        """Atomically move row `pk` from `status` to `to` as this process's work; False when it was not in `status`."""
        return bool(cls._default_manager.filter(pk=pk, status=status).update(status=to, **this_worker(), **changes))

    def take(self) -> None:
        """Record this process as the row's worker (on the instance; saved with the row's next save)."""
        for name, value in this_worker().items():
            setattr(self, name, value)

    def beat(self) -> None:
        """Renew the heartbeat (on the instance; save it with the progress it goes with)."""
        self.heartbeat = timezone.now()

    def is_lost(self, stale_seconds: float) -> bool:
        return is_lost(self, stale_seconds)

    @property
    def worker_label(self) -> str:
        if not self.worker_pid:
            return "its worker"
        return f"the worker process {self.worker_pid} on {self.worker_host or 'an unknown host'}"
