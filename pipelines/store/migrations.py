"""Numbered SQL migrations with a tracking table.

A migration is ``migrations/NNNN_name.sql``: statements separated by ``;`` at line end, ``{db}`` for the
database, and an optional ``-- +down`` section that reverses it. Applying is idempotent.

>>> [m.version for m in load_migrations()][:3]
[1, 2, 3]
>>> split_statements("CREATE TABLE a (x UInt8);\\n-- note\\nDROP TABLE b;\\n")
['CREATE TABLE a (x UInt8)', 'DROP TABLE b']
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from typing import Protocol

TRACKING_TABLE = "schema_migrations"
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


class SqlRunner(Protocol):
    """What migrations need from a client: run one statement, return rows of a query."""

    def command(self, sql: str) -> object: ...

    def query_rows(self, sql: str) -> list[tuple[object, ...]]: ...

    def use_database(self) -> None: ...


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    up: list[str]
    down: list[str]


def split_statements(sql: str) -> list[str]:
    """Split on ``;`` at line end, dropping comment-only lines."""
    body = "\n".join(line for line in sql.splitlines() if not line.strip().startswith("--"))
    return [s.strip() for s in re.split(r";\s*(?:\n|$)", body) if s.strip()]


def load_migrations() -> list[Migration]:
    """All shipped migrations in version order."""
    folder = resources.files("dealpulse.pipelines.store").joinpath("migrations")
    found = []
    for entry in folder.iterdir():
        match = _NAME.match(entry.name)
        if not match:
            continue
        text = entry.read_text(encoding="utf-8")
        up, _, down = text.partition("-- +down")
        found.append(Migration(int(match.group(1)), match.group(2), split_statements(up), split_statements(down)))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate migration versions: {versions}")
    return found


def ensure_tracking(runner: SqlRunner, db: str) -> None:
    runner.command(f"CREATE DATABASE IF NOT EXISTS {db}")
    runner.use_database()
    runner.command(
        f"CREATE TABLE IF NOT EXISTS {db}.{TRACKING_TABLE} (version UInt32, name String, applied UInt8, "
        "at DateTime64(3, 'UTC') DEFAULT now64(3)) ENGINE = MergeTree ORDER BY (version, at)"
    )


def applied_versions(runner: SqlRunner, db: str) -> set[int]:
    rows = runner.query_rows(
        f"SELECT version FROM {db}.{TRACKING_TABLE} GROUP BY version HAVING argMax(applied, at) = 1"
    )
    return {int(str(row[0])) for row in rows}


def migrate_up(runner: SqlRunner, db: str) -> list[Migration]:
    """Apply every migration not applied yet; return the ones applied now."""
    ensure_tracking(runner, db)
    done = applied_versions(runner, db)
    applied = []
    for migration in load_migrations():
        if migration.version in done:
            continue
        for statement in migration.up:
            runner.command(statement.replace("{db}", db))
        runner.command(
            f"INSERT INTO {db}.{TRACKING_TABLE} (version, name, applied) "
            f"VALUES ({migration.version}, '{migration.name}', 1)"
        )
        applied.append(migration)
    return applied


def migrate_down(runner: SqlRunner, db: str, to_version: int = 0) -> list[Migration]:
    """Reverse applied migrations newer than ``to_version``, newest first."""
    ensure_tracking(runner, db)
    done = applied_versions(runner, db)
    reversed_ = []
    for migration in reversed(load_migrations()):
        if migration.version <= to_version or migration.version not in done:
            continue
        for statement in migration.down:
            runner.command(statement.replace("{db}", db))
        runner.command(
            f"INSERT INTO {db}.{TRACKING_TABLE} (version, name, applied) "
            f"VALUES ({migration.version}, '{migration.name}', 0)"
        )
        reversed_.append(migration)
    return reversed_
