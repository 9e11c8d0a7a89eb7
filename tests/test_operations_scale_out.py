"""Two django-q2 worker processes on one Redis queue: every job runs exactly once."""

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
JOBS = 40


def _manage(*args, env, **kwargs):
    return subprocess.run([sys.executable, "manage.py", *args], cwd=REPO, env=env, check=True,
                          capture_output=True, text=True, timeout=180, **kwargs)


def _redis():
    import redis

    return redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=2)


@pytest.fixture
def redis_env(tmp_path):
    import redis

    client = _redis()
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.fail("This test needs Redis on 127.0.0.1:6379 (scripts/start-redis starts it).")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DB", "DATABASE_URL", "DJANGO_SETTINGS"))}
    env.update({
        "DATABASE_URL": f"sqlite:///{tmp_path / 'queue.sqlite3'}",
        "Q_BROKER": "redis", "REDIS_URL": "redis://127.0.0.1:6379/0",
        # A queue of its own, so that nothing else on this Redis takes or adds jobs.
        "Q_SITE_NAME": f"hemoweb-test-{uuid.uuid4().hex[:8]}",
        "Q_WORKERS": "1", "VAR_DIR": str(tmp_path / "var"), "MEDIA_ROOT": str(tmp_path / "media"),
    })
    _manage("migrate", "--no-input", env=env)
    yield env
    for key in client.scan_iter(f"django_q:{env['Q_SITE_NAME']}*"):
        client.delete(key)


def test_two_workers_share_one_redis_queue_and_run_each_job_once(redis_env, tmp_path):
    journal = tmp_path / "journal.txt"
    journal.touch()
    workers = [subprocess.Popen([sys.executable, "manage.py", "qcluster"], cwd=REPO, env=redis_env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
               for _ in range(2)]
    try:
        # Both clusters announce themselves in Redis once they are up.
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and len(list(_redis().scan_iter(f"django_q:{redis_env['Q_SITE_NAME']}:cluster*"))) < 2:
            time.sleep(0.5)
        _manage("shell", "-c", (
            "from django_q.tasks import async_task\n"
            f"for i in range({JOBS}): async_task('apps.operations.tasks.record_delivery', i, {str(journal)!r}, 0.2)"
        ), env=redis_env)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(journal.read_text().splitlines()) < JOBS:
            time.sleep(0.5)
        time.sleep(2)  # a duplicate delivery would show up now
    finally:
        for worker in workers:
            os.killpg(worker.pid, signal.SIGTERM)
        for worker in workers:
            try:
                worker.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
    lines = [line.split() for line in journal.read_text().splitlines()]
    tokens = sorted(int(token) for token, _ in lines)
    assert tokens == list(range(JOBS)), "every job exactly once"
    assert len({pid for _, pid in lines}) >= 2, "both worker processes took jobs"
