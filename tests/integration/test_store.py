"""The store: migrations, dedup tokens, users and the HTTP interface, against the real chDB engine."""

from __future__ import annotations

import base64
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import orjson
import pytest
from clickhouse_connect.driver.exceptions import DatabaseError

from dealpulse.agents.embedded import StoreCredentials, free_port, start_store
from dealpulse.pipelines.ingest import EVENT_COLUMNS, Batch
from dealpulse.pipelines.settings import Settings
from dealpulse.pipelines.store.client import Store, connect
from dealpulse.pipelines.store.migrations import applied_versions, load_migrations, migrate_down, migrate_up
from dealpulse.pipelines.store.writer import BatchWriter, RetryPolicy, connect_when_ready

pytestmark = pytest.mark.integration


def event_row(event_id: str, offset: int) -> tuple[object, ...]:
    return (event_id, "feature_use", 1_790_000_000_000, 60, "acme", "", "", "test", "{}", (), "t", 0, offset, 0,
            1_790_000_000_000)  # fmt: skip


def test_migrations_apply_on_empty_store_are_idempotent_and_reverse(settings: Settings, store: Store) -> None:
    versions = {m.version for m in load_migrations()}
    assert applied_versions(store, settings.clickhouse_database) == versions  # the fixture applied them
    assert migrate_up(store, settings.clickhouse_database) == []
    tables = {row[0] for row in store.query_rows("SHOW TABLES")}
    assert {"events", "dlq", "dlq_replays", "duplicates", "ingest_accounting", "schema_migrations"} <= tables
    reversed_ = migrate_down(store, settings.clickhouse_database)
    assert [m.version for m in reversed_] == sorted(versions, reverse=True)
    assert {row[0] for row in store.query_rows("SHOW TABLES")} == {"schema_migrations"}
    assert [m.version for m in migrate_up(store, settings.clickhouse_database)] == sorted(versions)


def test_events_table_layout(store: Store) -> None:
    partition_key, sorting_key = store.query_rows(
        "SELECT partition_key, sorting_key FROM system.tables WHERE database = currentDatabase() AND name = 'events'"
    )[0]
    assert partition_key == "toYYYYMM(ts)" and sorting_key.startswith("account_id, ts")


def test_insert_with_same_dedup_token_is_written_once(store: Store) -> None:
    rows = [event_row("a", 1), event_row("b", 2)]
    store.insert("events", rows, EVENT_COLUMNS, dedup_token="tok-1")
    store.insert("events", rows, EVENT_COLUMNS, dedup_token="tok-1")
    store.insert("events", rows[:1], EVENT_COLUMNS, dedup_token="tok-2")
    assert store.query_rows("SELECT event_id, count() FROM events GROUP BY event_id ORDER BY event_id") == [
        ("a", 2),
        ("b", 1),
    ]


def test_read_only_user_can_query_but_not_write(settings: Settings, services: dict[str, object]) -> None:
    credentials = services["credentials"]
    assert isinstance(credentials, StoreCredentials)
    reader = connect(settings, user=credentials.reader, password=credentials.reader_password)
    assert reader.query_rows("SELECT count() FROM events") == [(0,)]
    for statement in (
        "DROP TABLE events",
        "INSERT INTO events (event_id) VALUES ('x')",
        "CREATE TABLE x (a UInt8) ENGINE = Memory",
    ):
        with pytest.raises(DatabaseError, match="READONLY"):
            reader.command(statement)
    with pytest.raises(DatabaseError, match="READONLY"):
        reader.insert("events", [event_row("x", 1)], EVENT_COLUMNS)
    for escape in ("SELECT * FROM file('/etc/passwd', 'LineAsString')", "SELECT 1 INTO OUTFILE '/tmp/x.tsv'",
                   "SELECT * FROM url('http://127.0.0.1:1/', 'CSV', 'a String')"):  # fmt: skip
        with pytest.raises(DatabaseError, match="READONLY"):
            reader.query_rows(escape)


def test_password_is_required(settings: Settings) -> None:
    for password in ("", "wrong"):
        with pytest.raises(DatabaseError, match="AUTHENTICATION_FAILED"):
            connect(settings, password=password).query_rows("SELECT 1")


def test_plain_http_clients_work_like_against_clickhouse(settings: Settings, services: dict[str, object]) -> None:
    """What curl, Grafana's or Metabase's HTTP drivers do: basic auth, query in the body, FORMAT clauses."""
    credentials = services["credentials"]
    assert isinstance(credentials, StoreCredentials)
    base = f"http://127.0.0.1:{settings.clickhouse_port}"
    with urllib.request.urlopen(f"{base}/ping", timeout=5) as response:
        assert response.read() == b"Ok.\n"
    token = base64.b64encode(f"{credentials.reader}:{credentials.reader_password}".encode()).decode()
    request = urllib.request.Request(
        f"{base}/?database={settings.clickhouse_database}&param_n=3",
        data=b"SELECT number * 2 AS doubled FROM numbers({n:UInt8}) FORMAT JSONEachRow",
        headers={"Authorization": f"Basic {token}"},
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        lines = response.read().decode().splitlines()
    assert [orjson.loads(line)["doubled"] for line in lines] == [0, 2, 4]
    writer = {"X-ClickHouse-User": credentials.writer, "X-ClickHouse-Key": credentials.writer_password}
    bad = urllib.request.Request(f"{base}/", data=b"SELEC 1", headers=writer)
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(bad, timeout=5)
    assert info.value.code == 400 and info.value.headers["X-ClickHouse-Exception-Code"] == "62"
    assert b"SYNTAX_ERROR" in info.value.read()


def test_writer_retries_until_the_store_is_back(tmp_path: Path) -> None:
    """A store outage delays the batch; it is written exactly once when the store returns."""
    credentials = StoreCredentials()
    port = free_port()
    process, _ = start_store(tmp_path, tmp_path / "data", credentials, port)
    settings = Settings(clickhouse_port=port, clickhouse_user=credentials.writer,
                        clickhouse_password=credentials.writer_password, clickhouse_database="retry")  # fmt: skip
    store = connect(settings)
    migrate_up(store, "retry")
    retries: list[int] = []
    writer = BatchWriter(store, RetryPolicy(0.05, 0.3), on_retry=lambda table, attempt, exc: retries.append(attempt))
    batch = Batch(events=[event_row(f"e{i}", i) for i in range(100)])
    process.stop()
    thread = threading.Thread(target=writer.write, args=(batch,))
    thread.start()
    deadline = time.monotonic() + 30
    while not retries and time.monotonic() < deadline:
        time.sleep(0.05)
    assert retries, "the writer never noticed the outage"
    assert thread.is_alive(), "the writer gave up or skipped the batch while the store was down"
    process, _ = start_store(tmp_path, tmp_path / "data", credentials, port)
    try:
        thread.join(60)
        assert not thread.is_alive()
        assert store.query_rows("SELECT count(), uniqExact(event_id) FROM events") == [(100, 100)]
    finally:
        store.close()
        process.stop()


def test_connecting_when_ready_fails_at_once_on_a_wrong_password_and_connects_to_a_running_store(
    settings: Settings,
) -> None:
    store = connect_when_ready(settings)  # the store runs: the first attempt connects
    assert store.query_rows("SELECT 1") == [(1,)]
    store.close()
    started = time.monotonic()
    with pytest.raises(DatabaseError, match=r"516|[Aa]uthentication"):  # waiting would not fix it
        connect_when_ready(settings.model_copy(update={"clickhouse_password": "wrong"}))
    assert time.monotonic() - started < 5
