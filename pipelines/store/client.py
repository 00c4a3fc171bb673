"""The one way dealpulse talks to ClickHouse (a server, or the embedded store): clickhouse-connect."""

from __future__ import annotations

from typing import Any

import clickhouse_connect
from clickhouse_connect.driver.client import Client

from dealpulse.pipelines.settings import Settings


class Store:
    """A thin wrapper that also satisfies :class:`~dealpulse.pipelines.store.migrations.SqlRunner`."""

    def __init__(self, client: Client, database: str) -> None:
        self.client = client
        self.database = database
        # (table, columns) -> ClickHouse types: without them, clickhouse-connect asks the server before every insert
        self._insert_types: dict[tuple[str, tuple[str, ...]], list[str]] = {}

    def use_database(self) -> None:
        """Make unqualified table names refer to the dealpulse database (once it exists)."""
        self.client.database = self.database

    def command(self, sql: str) -> object:
        return self.client.command(sql)

    def query_rows(self, sql: str, parameters: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        return [tuple(row) for row in self.client.query(sql, parameters=parameters).result_rows]

    def query_table(
        self, sql: str, parameters: dict[str, Any] | None = None
    ) -> tuple[list[str], list[tuple[Any, ...]]]:
        """Column names and rows of a query."""
        result = self.client.query(sql, parameters=parameters)
        return list(result.column_names), [tuple(row) for row in result.result_rows]

    def insert(
        self,
        table: str,
        rows: list[tuple[Any, ...]],
        columns: tuple[str, ...],
        dedup_token: str | None = None,
    ) -> None:
        settings = {"insert_deduplication_token": dedup_token} if dedup_token else None
        types = self._insert_types.get((table, columns))
        if types is None:
            types = self._insert_types[(table, columns)] = self._column_types(table, columns)
        self.client.insert(
            table,
            rows,
            column_names=list(columns),
            column_type_names=types,
            database=self.database,
            settings=settings,
        )

    def _column_types(self, table: str, columns: tuple[str, ...]) -> list[str]:
        known = dict(
            self.query_rows(
                "SELECT name, type FROM system.columns WHERE database = {db:String} AND table = {t:String}",
                {"db": self.database, "t": table},
            )
        )
        missing = [name for name in columns if name not in known]
        if missing:
            raise ValueError(f"{self.database}.{table} has no columns {missing}: run `dealpulse migrate`")
        return [known[name] for name in columns]

    def close(self) -> None:
        self.client.close()


def preload_insert_path() -> None:
    """Import now what clickhouse-connect would import at the first insert.

    Its first insert checks whether the rows are a pandas DataFrame, and so imports pandas when it is installed
    (river depends on it): ~0.3 s of imports holding the GIL, measured in a worker's first store write, where it
    slows the event loop. Long-running services call this at start-up.
    """
    from clickhouse_connect.driver import options

    getattr(options, "pd", None)  # resolved once: the module, or None when pandas is absent
    getattr(options, "np", None)


def connect(settings: Settings, *, user: str | None = None, password: str | None = None) -> Store:
    """Connect with the settings' credentials (or the ones given)."""
    client = clickhouse_connect.get_client(
        host=settings.clickhouse_host,
        port=settings.clickhouse_port,
        username=user or settings.clickhouse_user,
        password=settings.clickhouse_password if password is None else password,
        secure=settings.clickhouse_secure,
        compress=False,  # loopback and LAN: compression costs more CPU than it saves
        connect_timeout=10,
        send_receive_timeout=120,
        autogenerate_session_id=False,
    )
    store = Store(client, settings.clickhouse_database)
    if client.command(f"EXISTS DATABASE {settings.clickhouse_database}") == 1:
        store.use_database()
    return store


def quiet_client_retry_logs() -> None:
    """Leave store retries to our writer's one line per attempt ("insert into … failed (attempt n, retry in s)").

    urllib3 and clickhouse-connect each add a warning (one with a traceback) for every failed attempt: with the
    store down, three log entries every backoff, for as long as the outage lasts. Their errors still show.
    """
    import logging

    for name in ("urllib3.connectionpool", "clickhouse_connect.driver._backend.http_sync"):
        logging.getLogger(name).setLevel(logging.ERROR)
