-- Events dropped because their event_id was already stored: the third way a message is accounted for.
CREATE TABLE IF NOT EXISTS {db}.duplicates
(
    event_id      String,
    src_topic     LowCardinality(String),
    src_partition UInt16,
    src_offset    UInt64,
    src_index     UInt32,
    dropped_at    DateTime64(3, 'UTC')
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(dropped_at)
ORDER BY (src_topic, src_partition, src_offset, src_index)
SETTINGS non_replicated_deduplication_window = 10000;

-- Every item is stored, dead-lettered or dropped as a duplicate: the three counts in one query.
CREATE VIEW IF NOT EXISTS {db}.ingest_accounting AS
SELECT
    (SELECT count() FROM {db}.events) AS events_stored,
    (SELECT count() FROM {db}.dlq) AS dlq,
    (SELECT count() FROM {db}.duplicates) AS duplicates_dropped;

-- +down
DROP VIEW IF EXISTS {db}.ingest_accounting;
DROP TABLE IF EXISTS {db}.duplicates;
