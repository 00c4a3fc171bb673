"""Dimension CSV files for `dealpulse dims load`: parsed and checked before anything is written.

>>> rows = parse_dimension_csv("account_id,region,arr\\nacc-1,EMEA,1200.5\\n", "accounts", "a.csv")
>>> rows[0]["account_id"], rows[0]["region"], rows[0]["arr"], rows[0]["contract_end"]
('acc-1', 'EMEA', 1200.5, None)
>>> parse_dimension_csv("account_id,arr\\nacc-1,lots\\n", "accounts", "a.csv")
Traceback (most recent call last):
...
dealpulse.pipelines.config_errors.ConfigError: a.csv:2:7: arr: 'lots' is not a number
"""

from __future__ import annotations

import csv
import io
from datetime import UTC, date, datetime
from typing import Any

from dealpulse.pipelines.config_errors import ConfigError

TEXT = "text"
COLUMNS: dict[str, dict[str, str]] = {
    "accounts": {"account_id": TEXT, "region": TEXT, "industry": TEXT, "product_line": TEXT, "owner": TEXT,
                 "team": TEXT, "contract_end": "date", "arr": "number", "updated_at": "time"},
    "opportunities": {"opportunity_id": TEXT, "account_id": TEXT, "owner": TEXT, "team": TEXT, "product_line": TEXT,
                      "updated_at": "time"},
}  # fmt: skip
TABLES = {"accounts": "account_attributes", "opportunities": "opportunity_attributes"}


def _convert(kind: str, text: str) -> Any:
    if kind == TEXT:
        return text
    if text == "":
        return None
    if kind == "number":
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a number") from None
    if kind == "date":
        try:
            return date.fromisoformat(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a date (YYYY-MM-DD)") from None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a time (RFC 3339)") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def parse_dimension_csv(text: str, kind: str, filename: str) -> list[dict[str, Any]]:
    """Rows of a dimension CSV (header required); errors name the file, line and column."""
    columns = COLUMNS[kind]
    key = next(iter(columns))
    lines = text.splitlines()
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if not header:
        raise ConfigError(filename, 1, 1, f"empty file: expected a header with {key} and any of {', '.join(columns)}")
    for index, name in enumerate(header):
        if name not in columns:
            column = 1 + sum(len(h) + 1 for h in header[:index])
            raise ConfigError(filename, 1, column, f"unknown column {name!r}; known: {', '.join(columns)}")
    if key not in header:
        raise ConfigError(filename, 1, 1, f"the header needs a {key} column")
    rows = []
    for line_number, values in enumerate(reader, start=2):
        if not any(values):
            continue
        if len(values) != len(header):
            raise ConfigError(filename, line_number, 1, f"{len(values)} fields, the header has {len(header)}")
        row: dict[str, Any] = dict.fromkeys(columns)
        row.update({name: "" for name, kind_ in columns.items() if kind_ == TEXT})
        for index, (name, value) in enumerate(zip(header, values, strict=True)):
            try:
                row[name] = _convert(columns[name], value.strip())
            except ValueError as error:
                raw = lines[line_number - 1] if line_number - 1 < len(lines) else ""
                column = raw.find(value) + 1 if value and raw.find(value) >= 0 else 1 + index
                raise ConfigError(filename, line_number, column, f"{name}: {error}") from None
        if not row[key]:
            raise ConfigError(filename, line_number, 1, f"{key} is empty")
        rows.append(row)
    return rows


def dimension_rows(
    rows: list[dict[str, Any]], kind: str, now: datetime
) -> tuple[list[tuple[Any, ...]], tuple[str, ...]]:
    """Rows for the attribute table (source ``csv``; ``updated_at`` defaults to ``now``)."""
    names = (*COLUMNS[kind], "source")
    out = [
        tuple({**row, "updated_at": row.get("updated_at") or now, "source": "csv"}[n] for n in names) for row in rows
    ]
    return out, names
