"""A test database that worker subprocesses (qcluster, manage.py) share with the test.

On SQLite the in-memory test database is copied to a file the subprocess uses (push) and copied back
afterwards (pull); on MariaDB the subprocess connects to the test database itself.
"""

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from django.conf import settings
from django.db import connection

REPO = Path(__file__).resolve().parent.parent


class SharedDatabase:
    def __init__(self, tmp_path: Path, **extra_env: str):
        self.sqlite = connection.vendor == "sqlite"
        self.file = tmp_path / "shared.sqlite3"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DB", "DATABASE_URL", "SQLITE_PATH"))}
        env.update(MEDIA_ROOT=str(settings.MEDIA_ROOT), MODELS_DIR=str(settings.MODELS_DIR), OMP_NUM_THREADS="1",
                   PYTHONUNBUFFERED="1", **extra_env)
        if self.sqlite:
            env["DATABASE_URL"] = f"sqlite:///{self.file}"  # an absolute path: sqlite:////tmp/...
        else:
            db = connection.settings_dict
            env.update(DB="mysql", DB_NAME=db["NAME"], DB_USER=db["USER"], DB_HOST=db["HOST"] or "127.0.0.1",
                       DB_PORT=str(db["PORT"] or 3306))
            if db["PASSWORD"]:
                env["DB_PASSWORD"] = db["PASSWORD"]
        self.env = env

    def push(self) -> None:
        """Make what the test wrote visible to a subprocess."""
        if self.sqlite:
            connection.ensure_connection()
            target = sqlite3.connect(self.file)
            connection.connection.backup(target)
            target.close()

    def pull(self) -> None:
        """Make what a subprocess wrote visible to the test."""
        if self.sqlite:
            source = sqlite3.connect(self.file)
            source.backup(connection.connection)
            source.close()

    def qcluster(self, log) -> subprocess.Popen:
        """A django-q2 cluster on this database, in its own process group (so that a test can kill it whole)."""
        return subprocess.Popen([sys.executable, "manage.py", "qcluster"], cwd=REPO, env=self.env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)

    def qcluster_killed_midway(self, log_path: Path, progress: Callable[[], tuple], timeout: float) -> tuple:
        """Start a cluster, wait until `progress()` ((status, done, total) as it sees them) shows work done, then
        SIGKILL its whole process group, mid-run (the out-of-memory killer, a reboot). Returns the last progress and
        the cluster's pid."""
        with open(log_path, "w") as log:
            cluster = self.qcluster(log)
            try:
                deadline = time.monotonic() + timeout
                status, done, total = progress()
                while done == 0 and time.monotonic() < deadline:
                    assert cluster.poll() is None, log_path.read_text()[-3000:]
                    time.sleep(0.05)
                    status, done, total = progress()
            finally:
                os.killpg(cluster.pid, signal.SIGKILL)
                cluster.wait()
        return (status, done, total), cluster.pid

    def row(self, sql: str, params: tuple, orm: Callable[[], tuple]) -> tuple:
        """A row as the subprocess sees it now: `sql` on the shared SQLite file, or `orm()` on MariaDB."""
        if self.sqlite:
            with sqlite3.connect(self.file, timeout=30) as db:
                return db.execute(sql, params).fetchone()
        return orm()


def stop_worker(process: subprocess.Popen, timeout: float = 20) -> None:
    """Stop a worker subprocess started with start_new_session=True: SIGTERM to it, SIGKILL to its group if it hangs.

    Only the main process is signalled: a `qcluster` then stops its workers, pusher and monitor in turn (about
    a second), whereas SIGTERM sent to its whole group at once leaves django-q2's stop waiting forever.
    """
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # whatever is left of the group (nothing, after a clean stop)
    except ProcessLookupError:
        pass
    process.wait()
