"""Turn JSONL lines into Kafka messages (key = account_id, or lead_id when there is no account).

>>> import io
>>> lines = io.BytesIO(b'{"account_id": "a", "event_id": "1"}\\n\\nnot json\\n{"account_id": "a", "event_id": "2"}\\n')
>>> list(jsonl_messages(lines, 10))
[('', b'not json', 1), ('a', b'[{"account_id": "a", "event_id": "1"},{"account_id": "a", "event_id": "2"}]', 2)]
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import orjson

from dealpulse.pipelines.generator import Record, pack_messages


def partition_key(line: bytes) -> tuple[str, bool]:
    """The key of one line and whether it parsed as a JSON object."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        return "", False
    if not isinstance(obj, dict):
        return "", False
    key = obj.get("account_id") or obj.get("lead_id") or ""
    return (key if isinstance(key, str) else ""), True


def jsonl_messages(lines: Iterable[bytes], events_per_message: int) -> Iterator[tuple[str, bytes, int]]:
    def records() -> Iterator[Record]:
        for raw in lines:
            line = raw.rstrip(b"\r\n")
            if not line.strip():
                continue
            key, ok = partition_key(line)
            yield Record(key, line, "valid" if ok else "malformed", 0)

    return pack_messages(records(), events_per_message)
