"""Load test: 50 lab-staff users against gunicorn + MariaDB on loopback while a training job runs.

Run: .venv/bin/pip install -r benchmarks/requirements.txt && .venv/bin/python benchmarks/load/run_load.py
Writes benchmarks/results/load.json (requests/s, p50/p99 latency per request kind, errors, hardware).

Users arrive at SPAWN_RATE per second and each logs in once (a password hash costs ~0.5 s of CPU by
design); the statistics are reset when all USERS are in (locust --reset-stats), so the numbers are the
steady state of USERS concurrent users for DURATION, the training job running throughout. Set
RESET_STATS=0 to include the arrival of the users (and their logins) in the numbers.
"""

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from benchmarks.common import write_result  # noqa: E402

PORT = 8798
USERS = int(os.environ.get("USERS", 50))
SPAWN_RATE = os.environ.get("SPAWN_RATE", "2")
DURATION = os.environ.get("DURATION", "150s")  # the arrival (USERS / SPAWN_RATE seconds) included
RESET_STATS = os.environ.get("RESET_STATS", "1") == "1"
DB_NAME = "hemoweb_load"
ENV = {**os.environ, "DB": "mysql", "DB_NAME": DB_NAME, "DB_HOST": "127.0.0.1", "DB_USER": "root",
       "MEDIA_ROOT": "/tmp/hemoweb-load/media", "VAR_DIR": "/tmp/hemoweb-load/var", "MODELS_DIR": "/tmp/hemoweb-load/models", "DEBUG": "0",
       "SECRET_KEY": "load-test-only-" + "x" * 40, "ALLOWED_HOSTS": "127.0.0.1,localhost", "SECURE_SSL_REDIRECT": "0",
       "API_THROTTLE_USER": "100000/min", "STATIC_ROOT": "/tmp/hemoweb-load/static", "OMP_NUM_THREADS": "1"}
# DEBUG=0 marks cookies Secure; plain http on loopback needs them without the flag.
ENV["SECURE_COOKIES"] = "0"


def manage(*args: str) -> str:
    return subprocess.run([sys.executable, "manage.py", *args], cwd=REPO, env=ENV, check=True,
                          capture_output=True, text=True).stdout


def main() -> None:
    subprocess.run(["mariadb", "-h127.0.0.1", "-uroot", "-e",
                    f"DROP DATABASE IF EXISTS {DB_NAME}; CREATE DATABASE {DB_NAME} CHARACTER SET utf8mb4"], check=True)
    manage("migrate", "--no-input")
    manage("collectstatic", "--no-input", "-v", "0")
    manage("setup_demo", "--no-users")
    setup = manage("shell", "-c", (
        "from django.contrib.auth.models import User, Group; from rest_framework.authtoken.models import Token\n"
        "from apps.cells.models import Dataset\n"
        "u = User.objects.filter(username='loadtest').first() or User.objects.create_user('loadtest', password='loadtest-pw')\n"
        "u.groups.add(Group.objects.get(name='Curator'))\n"
        "print(Token.objects.get_or_create(user=u)[0].key, Dataset.objects.get(name='Demo PBC').pk)"))
    token, dataset_id = setup.strip().splitlines()[-1].split()
    server_log = open("/tmp/hemoweb-load/gunicorn.log", "w")
    server = subprocess.Popen([str(REPO / ".venv/bin/gunicorn"), "hemoweb.wsgi:application", "-b", f"127.0.0.1:{PORT}",
                               "-w", os.environ.get("WEB_WORKERS", "3"), "--threads", os.environ.get("WEB_THREADS", "4"),
                               "--timeout", "120", "--keep-alive", "30"],
                              cwd=REPO, env=ENV, stdout=server_log, stderr=server_log)
    worker = subprocess.Popen([sys.executable, "manage.py", "qcluster"], cwd=REPO, env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # A training job in the background, as the issue asks (a real one, small, on the demo data).
    trainer = subprocess.Popen([sys.executable, "manage.py", "train_tree", "--dataset", "Demo PBC", "--arch",
                                "mobilenetv3_small_050", "--epochs", "500", "--patience", "500", "--image-size", "64", "--name", "load-test"],
                               cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(6)
    prefix = "/tmp/hemoweb-load/locust"
    try:
        subprocess.run([str(REPO / ".venv/bin/locust"), "-f", str(Path(__file__).with_name("locustfile.py")), "--headless",
                        "-u", str(USERS), "-r", SPAWN_RATE, "-t", DURATION, "--host", f"http://127.0.0.1:{PORT}",
                        "--csv", prefix, "--only-summary", *(["--reset-stats"] if RESET_STATS else [])],
                       env={**ENV, "HEMOWEB_TOKEN": token, "HEMOWEB_DATASET_ID": dataset_id}, check=False)
        training_was_running = trainer.poll() is None
    finally:
        for process in (trainer, worker, server):
            process.terminate()
        for process in (trainer, worker, server):
            process.wait()
    rows = list(csv.DictReader(open(f"{prefix}_stats.csv")))
    per_request = {
        row["Name"]: {"requests": int(row["Request Count"]), "failures": int(row["Failure Count"]),
                      "p50_ms": float(row["50%"]), "p99_ms": float(row["99%"]), "rps": round(float(row["Requests/s"]), 2)}
        for row in rows if row["Name"] != "Aggregated"
    }
    total = next(row for row in rows if row["Name"] == "Aggregated")
    reads = [v for k, v in per_request.items() if not k.startswith("api classify") and k not in ("login",)]
    write_result("load" if RESET_STATS else "load-with-arrival", {
        "web": {"gunicorn_workers": int(os.environ.get("WEB_WORKERS", "3")), "threads": int(os.environ.get("WEB_THREADS", "4")),
                "torch_threads_per_request": int(ENV.get("WEB_TORCH_THREADS", "1")),
                "training_nice": int(ENV.get("TRAINING_NICE", "10"))},
        "users": USERS, "spawn_rate_per_s": float(SPAWN_RATE), "duration": DURATION,
        "statistics": ("steady state: reset once all users were in (their logins excluded)" if RESET_STATS
                       else "whole run, arrival and logins included"),
        "training_job_running_throughout": training_was_running,
        "requests_per_s": round(float(total["Requests/s"]), 2), "errors": int(total["Failure Count"]),
        "p50_ms": float(total["50%"]), "p99_ms": float(total["99%"]),
        "reads_p99_ms_max": max(v["p99_ms"] for v in reads) if reads else None,
        "per_request": per_request,
    })


if __name__ == "__main__":
    main()
