"""The ``dealpulse`` command line."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click
import orjson

from dealpulse.pipelines.settings import Settings


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="dealpulse")
def main() -> None:
    """dealpulse: real-time sales-behaviour analytics (Kafka -> Faust -> River -> ClickHouse).

    Start with `dealpulse demo`: it runs the whole pipeline on an embedded broker and store.
    Settings come from DEALPULSE_* environment variables (see README).
    """


@main.command()
def schema() -> None:
    """Print the JSON Schema of event contract v1 (one Kafka message value)."""
    from dealpulse.pipelines.contract import json_schema

    click.echo(orjson.dumps(json_schema(), option=orjson.OPT_INDENT_2).decode())


@main.group()
def store() -> None:
    """The embedded store (chDB behind ClickHouse's HTTP interface)."""


@store.command("serve")
@click.option("--path", type=click.Path(path_type=Path), required=True, help="chDB data directory")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8123, show_default=True, help="0 picks a free port")
@click.option("--ready-file", type=click.Path(path_type=Path), help="write the bound port here when ready")
def store_serve(path: Path, host: str, port: int, ready_file: Path | None) -> None:
    """Serve a chDB data directory over ClickHouse's HTTP interface.

    Users come from DEALPULSE_STORE_WRITER[_PASSWORD] and DEALPULSE_STORE_READER[_PASSWORD]; both passwords
    are required.
    """
    from dealpulse.agents.storeserver import StoreUsers, serve

    users = StoreUsers(
        os.environ.get("DEALPULSE_STORE_WRITER", "dealpulse"),
        os.environ.get("DEALPULSE_STORE_WRITER_PASSWORD", ""),
        os.environ.get("DEALPULSE_STORE_READER", "bi_reader"),
        os.environ.get("DEALPULSE_STORE_READER_PASSWORD", ""),
    )
    if not users.writer_password or not users.reader_password:
        raise click.UsageError("set DEALPULSE_STORE_WRITER_PASSWORD and DEALPULSE_STORE_READER_PASSWORD")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s store %(levelname)s %(message)s")
    serve(path, host, port, users, ready_file)


@main.command()
def migrate() -> None:
    """Apply the store's migrations (idempotent)."""
    from dealpulse.pipelines.store.client import connect
    from dealpulse.pipelines.store.migrations import migrate_up

    settings = Settings()
    store_ = connect(settings)
    applied = migrate_up(store_, settings.clickhouse_database)
    for migration in applied:
        click.echo(f"applied {migration.version:04d}_{migration.name}")
    if not applied:
        click.echo("store is up to date")


if __name__ == "__main__":
    sys.exit(main())
