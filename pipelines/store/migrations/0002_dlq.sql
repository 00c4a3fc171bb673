-- Dead letters: every rejected message (src_index = -1) or array item, with a typed reason, the field path,
-- the original bytes (for an array item: that item re-serialised) and where it came from.
CREATE TABLE IF NOT EXISTS {db}.dlq
(
    dlq_id        String COMMENT 'topic:partition:offset:index, stable across retries',
    reason        LowCardinality(String),
    detail        String,
    field         String,
    payload       String,
    event_id      String,
    src_topic     LowCardinality(String),
    src_partition UInt16,
    src_offset    UInt64,
    src_index     Int32,
    failed_at     DateTime64(3, 'UTC')
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(failed_at)
ORDER BY (src_topic, src_partition, src_offset, src_index)
SETTINGS non_replicated_deduplication_window = 10000;

-- DLQ entries re-submitted by `dealpulse dlq replay`.
CREATE TABLE IF NOT EXISTS {db}.dlq_replays
(
    dlq_id      String,
    replayed_at DateTime64(3, 'UTC'),
    outcome     LowCardinality(String) COMMENT 'resubmitted | still_invalid'
)
ENGINE = MergeTree
ORDER BY (dlq_id, replayed_at);

-- +down
DROP TABLE IF EXISTS {db}.dlq_replays;
DROP TABLE IF EXISTS {db}.dlq;
