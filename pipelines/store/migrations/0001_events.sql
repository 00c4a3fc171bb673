-- Validated events: one row per accepted event. Partitioned by month of event time, ordered for
-- per-account queries. src_* is the Kafka position the event was read from (exactly-once on restart).
CREATE TABLE IF NOT EXISTS {db}.events
(
    event_id       String,
    type           LowCardinality(String),
    ts             DateTime64(3, 'UTC') COMMENT 'event time (UTC)',
    tz_offset_min  Int16 COMMENT 'UTC offset the source stated, minutes',
    account_id     String,
    lead_id        String,
    opportunity_id String,
    source         LowCardinality(String),
    props          String COMMENT 'JSON object; chat text already reduced to keywords',
    keywords       Array(LowCardinality(String)),
    src_topic      LowCardinality(String),
    src_partition  UInt16,
    src_offset     UInt64,
    src_index      UInt32,
    ingested_at    DateTime64(3, 'UTC'),
    -- restart recovery reads by source position and ingest time; these let it skip most granules
    INDEX src_position (src_partition, src_offset) TYPE minmax GRANULARITY 4,
    INDEX ingested (ingested_at) TYPE minmax GRANULARITY 4
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (account_id, ts, event_id)
SETTINGS non_replicated_deduplication_window = 10000;

-- +down
DROP TABLE IF EXISTS {db}.events;
