"""Health checks, backup and restore: what a lab's IT person runs hemoweb with."""

import io
import json
import logging
import os
import shutil
import tarfile
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from django.conf import settings
from django.core.management import call_command
from django.db import connection

log = logging.getLogger(__name__)

BACKUP_EXCLUDES = ["contenttypes", "auth.permission", "sessions", "admin.logentry", "django_q", "axes"]


def health() -> dict:
    """{check name: {"ok": bool, ...}} for the database, the task queue and the model files."""
    checks = {}
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        checks["database"] = {"ok": True, "vendor": connection.vendor}
    except Exception as error:  # any driver error means "down"
        checks["database"] = {"ok": False, "error": str(error)}
    try:
        from django_q.brokers import get_broker

        broker = get_broker()
        checks["queue"] = {"ok": bool(broker.ping()), "broker": settings.Q_BROKER, "queued": broker.queue_size()}
    except Exception as error:
        checks["queue"] = {"ok": False, "broker": settings.Q_BROKER, "error": str(error)}
    checks["models"] = _model_files_check() if checks["database"]["ok"] else {"ok": False, "error": "database down"}
    return checks


def _model_files_check() -> dict:
    from apps.classifiers.models import ModelSet

    active = ModelSet.objects.active()
    if active is None:
        return {"ok": True, "active_set": None, "note": "no active model set: classification is unavailable"}
    missing = [model.weights_file for model in active.node_models.all() if not model.weights_path.is_file()]
    return {"ok": not missing, "active_set": active.name, "missing": missing}


def backup(target: Path) -> Path:
    """Write one .tar.gz with the database (as portable JSON), media and models."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        dump = Path(scratch) / "database.json"
        with dump.open("w") as handle:
            call_command("dumpdata", "--natural-foreign", "--natural-primary", *sum((["-e", name] for name in BACKUP_EXCLUDES), []),
                         stdout=handle)
        manifest = {"created": datetime.now(UTC).isoformat(timespec="seconds"), "database_vendor": connection.vendor,
                    "format": "hemoweb-backup-1"}
        partial = target.with_suffix(target.suffix + ".partial")
        with tarfile.open(partial, "w:gz") as archive:
            archive.add(dump, "database.json")
            _add_bytes(archive, "manifest.json", json.dumps(manifest, indent=2).encode())
            for name, folder in (("media", settings.MEDIA_ROOT), ("models", settings.MODELS_DIR)):
                if Path(folder).is_dir():
                    archive.add(folder, name, filter=_skip_temporary)
        os.replace(partial, target)
    log.info("backup written to %s", target)
    return target


def _skip_temporary(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    return None if info.name.endswith((".tmp", ".partial")) else info


def _add_bytes(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def restore(source: Path) -> dict:
    """Load a backup into a migrated, empty database and put media and models back."""
    source = Path(source)
    with tempfile.TemporaryDirectory() as scratch, tarfile.open(source, "r:gz") as archive:
        archive.extractall(scratch, filter="data")  # the 'data' filter refuses absolute paths and '..'
        manifest = json.loads((Path(scratch) / "manifest.json").read_text())
        for name, folder in (("media", settings.MEDIA_ROOT), ("models", settings.MODELS_DIR)):
            if (Path(scratch) / name).is_dir():
                shutil.copytree(Path(scratch) / name, folder, dirs_exist_ok=True)
        call_command("loaddata", str(Path(scratch) / "database.json"), verbosity=0)
    return manifest
