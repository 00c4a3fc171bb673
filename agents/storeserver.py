"""The embedded store: the chDB engine (ClickHouse in-process) served over ClickHouse's HTTP interface.

Workers, the CLI and BI tools connect to it exactly as to a ClickHouse server (clickhouse-connect, curl, JDBC
over HTTP). It implements the part of the interface those clients use:

- ``GET /ping``, ``GET /replicas_status``;
- a query in the ``query`` URL parameter and/or the POST body, ``database``, ``default_format``, ``query_id``,
  server-side parameters (``param_name=value`` for ``{name:Type}``);
- ``INSERT … FORMAT <fmt>`` followed by the data (clickhouse-connect sends ``FORMAT Native``), with
  ``insert_deduplication_token``; request bodies compressed with gzip, deflate, lz4 or zstd;
- authentication by ``X-ClickHouse-User``/``X-ClickHouse-Key``, HTTP Basic, or ``user``/``password`` parameters;
  a writer user and a read-only BI user;
- errors as ClickHouse sends them (``Code: N. DB::Exception: …`` and ``X-ClickHouse-Exception-Code``).

Other per-query settings are accepted and ignored. One chDB process owns the data directory (chDB allows only
one), so every query runs under one lock.
"""

from __future__ import annotations

import base64
import gzip
import hmac
import logging
import os
import re
import signal
import tempfile
import threading
import uuid
import zlib
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

log = logging.getLogger(__name__)

_INSERT_WITH_DATA = re.compile(rb"^\s*INSERT\s+INTO\s+(.+?)\s+FORMAT\s+(\w+)[ \t]*\r?\n", re.IGNORECASE | re.DOTALL)
_INSERT_TARGET = re.compile(r"^\s*((?:`[^`]+`|\w+)(?:\.(?:`[^`]+`|\w+))?)\s*(?:\((.*)\))?\s*$", re.DOTALL)
_TRAILING_FORMAT = re.compile(r"\s+FORMAT\s+(\w+)\s*;?\s*$", re.IGNORECASE)
_READ_ONLY_STATEMENT = re.compile(r"^\s*(\(\s*)*(SELECT|WITH|SHOW|DESC|DESCRIBE|EXISTS|EXPLAIN)\b", re.IGNORECASE)
# the BI user reads tables; these would let it read or write the store host's files or reach other hosts
_READER_DENIED = re.compile(
    r"\bINTO\s+OUTFILE\b|\b(file|url|s3|s3Cluster|hdfs|remote|remoteSecure|cluster|mysql|postgresql|mongodb|"
    r"sqlite|jdbc|odbc|executable|input|azureBlobStorage|gcs|iceberg|deltaLake|hudi)\s*\(",
    re.IGNORECASE,
)
_LEADING_COMMENTS = re.compile(r"^(\s*(--[^\n]*\n|/\*.*?\*/))*", re.DOTALL)
_CODE = re.compile(r"Code:\s*(\d+)")
_NOT_SETTINGS = {
    "query", "database", "default_format", "query_id", "session_id", "session_timeout", "session_check",
    "user", "password", "compress", "decompress", "quota_key", "buffer_size", "wait_end_of_query",
}  # fmt: skip
_STATUS_BY_CODE = {62: 400, 516: 401, 164: 403, 497: 403, 60: 404, 81: 404}


@dataclass(frozen=True)
class StoreUsers:
    """The writer user and the read-only BI user of the embedded store."""

    writer: str
    writer_password: str
    reader: str
    reader_password: str


class ClickHouseError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class ChdbEngine:
    """chDB behind a lock, with the statement rewriting the HTTP interface needs."""

    def __init__(self, path: Path) -> None:
        from chdb import session

        path.mkdir(parents=True, exist_ok=True)
        self._session = session.Session(str(path))
        self._lock = threading.Lock()
        self._database = "default"
        self._spool = Path(
            tempfile.mkdtemp(prefix="dealpulse-store-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        )
        self.version = self.run("SELECT version()", "TabSeparated").decode().strip()

    def run(self, sql: str, fmt: str, database: str | None = None, params: dict[str, str] | None = None) -> bytes:
        from chdb import ChdbError

        with self._lock:
            try:
                if database and database != self._database:
                    self._session.query(f"USE `{database}`", "TabSeparated")
                    self._database = database
                result = self._session.query(sql, fmt, params=params or None)
            except ChdbError as exc:
                message = str(exc)
                match = _CODE.search(message)
                raise ClickHouseError(int(match.group(1)) if match else 1000, message) from exc
        return bytes(result.bytes()) if result is not None else b""

    def insert(self, target: str, fmt: str, data: bytes, settings: dict[str, str], database: str | None) -> None:
        """``INSERT INTO target FORMAT fmt`` + data, run as ``INSERT … SELECT FROM file()``."""
        match = _INSERT_TARGET.match(target)
        if not match:
            raise ClickHouseError(62, f"Code: 62. DB::Exception: cannot parse insert target {target!r}. (SYNTAX_ERROR)")
        table, columns = match.group(1), match.group(2)
        spool = self._spool / f"{uuid.uuid4().hex}.bin"
        spool.write_bytes(data)
        try:
            source = f"file('{spool}', '{fmt}')"
            if fmt.lower() != "native":  # text formats need the target's structure to parse by name
                source = f"file('{spool}', '{fmt}', '{self._structure(table, columns, database)}')"
            safe = {k: v for k, v in settings.items() if re.fullmatch(r"\w+", k)}
            clause = ", ".join(f"{k} = '{_quote(v)}'" for k, v in safe.items())
            cols = f" ({columns})" if columns else ""
            sql = f"INSERT INTO {table}{cols} SELECT * FROM {source}" + (f" SETTINGS {clause}" if clause else "")
            self.run(sql, "TabSeparated", database)
        finally:
            spool.unlink(missing_ok=True)

    def _structure(self, table: str, columns: str | None, database: str | None) -> str:
        db, _, name = table.replace("`", "").rpartition(".")
        rows = self.run(
            "SELECT name, type FROM system.columns WHERE database = {db:String} AND table = {t:String} "
            "AND default_kind NOT IN ('MATERIALIZED', 'ALIAS') ORDER BY position",
            "TabSeparated",
            params={"db": db or database or self._database, "t": name},
        ).decode()
        types = dict(line.split("\t", 1) for line in rows.splitlines() if line)
        wanted = [c.strip().strip("`") for c in columns.split(",")] if columns else list(types)
        return ", ".join(f"`{c}` {types[c]}" for c in wanted if c in types)

    def close(self) -> None:
        with self._lock:
            self._session.close()
        for leftover in self._spool.glob("*"):
            leftover.unlink(missing_ok=True)
        self._spool.rmdir()


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def _decompress(body: bytes, encoding: str) -> bytes:
    encoding = encoding.lower().strip()
    if encoding in ("", "identity"):
        return body
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "deflate":
        return zlib.decompress(body)
    if encoding == "lz4":
        import lz4.frame

        return bytes(lz4.frame.decompress(body))
    if encoding == "zstd":
        try:
            from compression import zstd
        except ImportError:
            from backports import zstd
        return bytes(zstd.decompress(body))
    raise ClickHouseError(1001, f"Code: 1001. DB::Exception: unsupported Content-Encoding {encoding!r}.")


class StoreHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], engine: ChdbEngine, users: StoreUsers) -> None:
        super().__init__(address, StoreRequestHandler)
        self.engine = engine
        self.users = users


class StoreRequestHandler(BaseHTTPRequestHandler):
    server: StoreHTTPServer
    protocol_version = "HTTP/1.1"
    # A reply is written as headers, then body. With Nagle's algorithm the body waits for the client to ACK the
    # headers, which a client delays by up to 40 ms: every query took 44 ms (measured), and every insert too
    # (clickhouse-connect asks for the table's columns first).
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        log.debug(format, *args)

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path in ("/ping", "/replicas_status"):
            self._reply(200, b"Ok.\n", {"Content-Type": "text/plain; charset=UTF-8"})
            return
        self._handle(b"")

    def do_POST(self) -> None:
        try:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                body = self._read_chunked()  # clickhouse-connect streams inserts
            else:
                length = int(self.headers.get("Content-Length") or 0)
                body = self._read_exactly(length) if length else b""
        except ConnectionError as exc:
            # a client that died mid-request (e.g. a killed worker): never run half an INSERT
            log.warning("dropping an incomplete request from %s: %s", self.client_address, exc)
            self.close_connection = True
            return
        self._handle(body)

    def _read_exactly(self, size: int) -> bytes:
        data = self.rfile.read(size)
        if len(data) != size:
            raise ConnectionError(f"body ended after {len(data)} of {size} bytes")
        return data

    def _read_chunked(self) -> bytes:
        parts: list[bytes] = []
        while True:
            line = self.rfile.readline()
            if not line:
                raise ConnectionError("connection closed before the last chunk")
            size = int(line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(parts)
            parts.append(self._read_exactly(size))
            self.rfile.readline()

    # --- request handling ----------------------------------------------------------------------------

    def _handle(self, body: bytes) -> None:
        query_id = ""
        try:
            params = dict(parse_qsl(urlsplit(self.path).query, keep_blank_values=True))
            query_id = params.get("query_id") or str(uuid.uuid4())
            user = self._authenticate(params)
            body = _decompress(body, self.headers.get("Content-Encoding", ""))
            output, fmt = self._execute(params, body, user)
            headers = {
                "Content-Type": "text/tab-separated-values; charset=UTF-8"
                if fmt.startswith("TabSeparated")
                else "application/octet-stream",
                "X-ClickHouse-Format": fmt,
                "X-ClickHouse-Query-Id": query_id,
                "X-ClickHouse-Timezone": "UTC",
                "X-ClickHouse-Server-Display-Name": "dealpulse-embedded-store",
                "X-ClickHouse-Summary": '{"read_rows":"0","read_bytes":"0","written_rows":"0"}',
            }
            self._reply(200, output, headers)
        except ClickHouseError as exc:
            text = str(exc)
            if not text.startswith("Code:"):
                text = f"Code: {exc.code}. DB::Exception: {text}"
            status = _STATUS_BY_CODE.get(exc.code, 500)
            self._reply(
                status,
                f"{text} (version {self.server.engine.version})\n".encode(),
                {"X-ClickHouse-Exception-Code": str(exc.code), "X-ClickHouse-Query-Id": query_id},
            )
        except Exception as exc:  # the client must always get an answer it can read
            log.exception("store request failed")
            self._reply(500, f"Code: 1000. DB::Exception: {exc!r}\n".encode(), {"X-ClickHouse-Exception-Code": "1000"})

    def _authenticate(self, params: dict[str, str]) -> str:
        user = self.headers.get("X-ClickHouse-User") or params.get("user")
        password = self.headers.get("X-ClickHouse-Key") or params.get("password") or ""
        auth = self.headers.get("Authorization", "")
        if auth.lower().startswith("basic "):
            user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
        user = user or "default"
        users = self.server.users
        expected = {users.writer: users.writer_password, users.reader: users.reader_password}.get(user)
        if expected is None or not expected or not hmac.compare_digest(expected, password):
            raise ClickHouseError(
                516,
                f"Code: 516. DB::Exception: {user}: Authentication failed: password is incorrect, "
                "or there is no user with such name. (AUTHENTICATION_FAILED)",
            )
        return user

    def _execute(self, params: dict[str, str], body: bytes, user: str) -> tuple[bytes, str]:
        engine = self.server.engine
        database = params.get("database") or None
        settings = {k: v for k, v in params.items() if k not in _NOT_SETTINGS and not k.startswith("param_")}
        query_params = {k[6:]: v for k, v in params.items() if k.startswith("param_")}
        read_only = user == self.server.users.reader

        statement_text = params.get("query", "")
        data = b""
        if statement_text and body:
            data = body  # ClickHouse semantics: query in the URL, the body is data (for INSERT)
            match = _INSERT_WITH_DATA.match(statement_text.encode() + b"\n")
        else:
            match = _INSERT_WITH_DATA.match(body)
            if match:
                data = body[match.end() :]
            else:
                statement_text = statement_text or body.decode("utf-8")
        if match:
            if read_only:
                raise _readonly(user)
            target, fmt = match.group(1).decode(), match.group(2).decode()
            engine.insert(target, fmt, data, settings, database)
            return b"", "TabSeparated"

        statement = _LEADING_COMMENTS.sub("", statement_text).strip().rstrip(";").strip()
        if not statement:
            raise ClickHouseError(62, "Code: 62. DB::Exception: Empty query. (SYNTAX_ERROR)")
        if read_only and (not _READ_ONLY_STATEMENT.match(statement) or _READER_DENIED.search(statement)):
            raise _readonly(user)
        fmt = params.get("default_format") or "TabSeparated"
        trailing = _TRAILING_FORMAT.search(statement)
        if trailing:
            fmt = trailing.group(1)
            statement = statement[: trailing.start()]
        return engine.run(statement, fmt, database, query_params), fmt

    def _reply(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status, HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "")
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _readonly(user: str) -> ClickHouseError:
    return ClickHouseError(164, f"Code: 164. DB::Exception: {user}: Cannot execute query in readonly mode. (READONLY)")


def serve(path: Path, host: str, port: int, users: StoreUsers, ready_file: Path | None = None) -> None:
    """Run the store until SIGTERM/SIGINT; writes the bound port to ``ready_file`` once it accepts queries."""
    engine = ChdbEngine(path)
    server = StoreHTTPServer((host, port), engine, users)
    stop = threading.Event()

    def _stop(*_: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    thread = threading.Thread(target=server.serve_forever, name="store-http", daemon=True)
    thread.start()
    if ready_file is not None:
        tmp = ready_file.with_suffix(".tmp")
        tmp.write_text(str(server.server_address[1]))
        tmp.replace(ready_file)
    log.info("embedded store (chDB %s) on http://%s:%d", engine.version, host, server.server_address[1])
    stop.wait()
    server.shutdown()
    server.server_close()
    engine.close()
