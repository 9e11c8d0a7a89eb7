"""Fault test: restart MariaDB while gunicorn serves page and API reads and a writer adds rows.

Shows that during the outage requests get 503 (never a 500), that service comes back by itself
(CONN_HEALTH_CHECKS), and that no stored row is lost. Needs root and a local MariaDB.
Run: .venv/bin/python benchmarks/faults/mariadb_restart.py
"""

import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from benchmarks.common import write_result  # noqa: E402

PORT = 8799
DB_NAME = "hemoweb_faults"
ENV = {**os.environ, "DB": "mysql", "DB_NAME": DB_NAME, "DB_HOST": "127.0.0.1", "DB_USER": "root",
       "MEDIA_ROOT": "/tmp/hemoweb-faults/media", "VAR_DIR": "/tmp/hemoweb-faults/var", "MODELS_DIR": "/tmp/hemoweb-faults/models", "DEBUG": "1"}


def manage(*args: str) -> str:
    return subprocess.run([sys.executable, "manage.py", *args], cwd=REPO, env=ENV, check=True,
                          capture_output=True, text=True).stdout


def mariadb_up() -> bool:
    return subprocess.run(["mariadb-admin", "-h127.0.0.1", "-uroot", "ping"], capture_output=True).returncode == 0


def main() -> None:
    subprocess.run(["mariadb", "-h127.0.0.1", "-uroot", "-e",
                    f"DROP DATABASE IF EXISTS {DB_NAME}; CREATE DATABASE {DB_NAME} CHARACTER SET utf8mb4"], check=True)
    manage("migrate", "--no-input")
    manage("setup_demo", "--no-users")
    token = manage("shell", "-c", (
        "from django.contrib.auth.models import User, Group; from rest_framework.authtoken.models import Token\n"
        "u, _ = User.objects.get_or_create(username='faults'); u.groups.add(Group.objects.get(name='Curator'))\n"
        "print(Token.objects.get_or_create(user=u)[0].key)")).strip().splitlines()[-1]
    before = int(manage("shell", "-c", "from apps.cells.models import Cell; print(Cell.objects.count())").split()[-1])
    server = subprocess.Popen([str(REPO / ".venv/bin/gunicorn"), "hemoweb.wsgi:application", "-b", f"127.0.0.1:{PORT}",
                               "-w", "2", "--timeout", "30"], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    statuses: list[tuple[float, int]] = []
    stop = threading.Event()

    def reader() -> None:
        session = requests.Session()
        session.headers["Authorization"] = f"Token {token}"
        while not stop.is_set():
            for url in ("/api/cells/?page_size=20", "/api/cell-types/", "/healthz"):
                try:
                    status = session.get(f"http://127.0.0.1:{PORT}{url}", timeout=10).status_code
                except requests.RequestException:
                    status = 0
                statuses.append((time.monotonic(), status))
            time.sleep(0.05)

    time.sleep(4)
    threads = [threading.Thread(target=reader) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(5)
    down_at = time.monotonic()
    subprocess.run(["mariadb-admin", "-h127.0.0.1", "-uroot", "shutdown"], check=True)
    time.sleep(5)
    subprocess.run(["start-stop-daemon", "--start", "--oknodo", "--background", "--exec", "/usr/sbin/mariadbd"], check=True)
    while not mariadb_up():
        time.sleep(0.2)
    up_at = time.monotonic()
    time.sleep(10)
    stop.set()
    for thread in threads:
        thread.join()
    server.terminate()
    server.wait()
    after = int(manage("shell", "-c", "from apps.cells.models import Cell; print(Cell.objects.count())").split()[-1])
    during = Counter(status for t, status in statuses if down_at <= t <= up_at)
    recovered = [t for t, status in statuses if t > up_at and status == 200]
    after_recovery = Counter(status for t, status in statuses if recovered and t > recovered[0])
    result = {
        "requests": len(statuses),
        "statuses_before_outage": dict(Counter(status for t, status in statuses if t < down_at)),
        "statuses_during_outage": dict(during),
        "seconds_to_first_success_after_restart": round(recovered[0] - up_at, 2) if recovered else None,
        "statuses_after_recovery": dict(after_recovery),
        "cells_before": before, "cells_after": after,
        "server_errors_500": sum(1 for _, status in statuses if status == 500),
    }
    write_result("faults_mariadb_restart", result)
    assert result["server_errors_500"] == 0 and before == after and set(after_recovery) == {200}


if __name__ == "__main__":
    main()
