"""The MariaDB leg really runs on MariaDB, with utf8mb4 and strict mode (a mis-set DB must not run SQLite twice).

The leg is told by the environment (DB=mysql/mariadb, DB_* variables or a mysql:// DATABASE_URL), as
`make test-mysql` sets it; the connection must then be MariaDB. On the SQLite leg the test is skipped.
"""

import os

import pytest
from django.db import DataError, IntegrityError, connection, transaction

from apps.cells.models import Dataset


def _mariadb_leg_requested() -> bool:
    """Whatever the settings make of it, does the environment ask for MariaDB?"""
    if os.environ.get("DB", "").lower() not in ("", "sqlite", "sqlite3"):
        return True  # mysql, mariadb, or a misspelling of them: either way not the SQLite leg
    if os.environ.get("DATABASE_URL", "").split(":", 1)[0] not in ("", "sqlite"):
        return True
    return any(os.environ.get(name) for name in ("DB_NAME", "DB_HOST", "DB_PORT"))


@pytest.mark.skipif(not _mariadb_leg_requested(), reason="SQLite leg: DB/DATABASE_URL do not ask for MariaDB")
@pytest.mark.django_db
def test_the_mariadb_leg_runs_on_mariadb_with_utf8mb4_and_strict_mode():
    assert connection.vendor == "mysql", (
        f"The environment asks for MariaDB (DB={os.environ.get('DB')!r}, "
        f"DATABASE_URL={os.environ.get('DATABASE_URL', '')!r}) but the tests run on {connection.vendor}")
    assert connection.mysql_is_mariadb, "connected to MySQL, not MariaDB"
    with connection.cursor() as cursor:
        cursor.execute("SELECT @@character_set_connection, @@SESSION.sql_mode")
        charset, sql_mode = cursor.fetchone()
        cursor.execute("SELECT DEFAULT_CHARACTER_SET_NAME, DEFAULT_COLLATION_NAME FROM information_schema.SCHEMATA "
                       "WHERE SCHEMA_NAME = DATABASE()")
        database_charset, collation = cursor.fetchone()
    assert charset == "utf8mb4" and (database_charset, collation) == ("utf8mb4", "utf8mb4_unicode_ci")
    assert "STRICT_TRANS_TABLES" in sql_mode.split(",")

    # what those settings mean for a lab: four-byte characters are kept, an overlong value is refused, not cut
    name = "Smear 🩸 Ω-cells"
    Dataset.objects.create(name=name)
    assert Dataset.objects.get(name=name).name == name
    with pytest.raises((DataError, IntegrityError)), transaction.atomic():
        Dataset.objects.create(name="x" * (Dataset._meta.get_field("name").max_length + 1))
