-- Alerts: every state change (firing, resolved) the rules raised, with its evidence. alert_id is
-- <fingerprint>-<start ms>: one alert's lifecycle; a replayed change (after a restart) replaces, never duplicates.
CREATE TABLE IF NOT EXISTS {db}.alerts
(
    alert_id       String,
    fingerprint    String COMMENT 'one per (rule, entity)',
    status         LowCardinality(String) COMMENT 'firing | resolved',
    rule           LowCardinality(String),
    rule_version   String COMMENT 'hash of the rules that produced it',
    severity       LowCardinality(String),
    entity         LowCardinality(String) COMMENT 'lead | account | opportunity | model',
    entity_id      String,
    account_id     String,
    lead_id        String,
    opportunity_id String,
    team           String,
    region         LowCardinality(String),
    recipients     String COMMENT 'JSON list of {role, id | team}',
    message        String,
    starts_at      DateTime64(3, 'UTC') COMMENT 'event time the alert began',
    ts             DateTime64(3, 'UTC') COMMENT 'event time of this change',
    evidence       String COMMENT 'JSON: the events and values that made the rule true',
    silenced_by    Array(String),
    raised_at      DateTime64(3, 'UTC') COMMENT 'wall-clock time the alerter published it'
)
ENGINE = ReplacingMergeTree(raised_at)
PARTITION BY toYYYYMM(starts_at)
ORDER BY (rule, alert_id, status);

-- Every delivery attempt to a webhook subscriber: status ok | retry | dead | silenced, with its latency.
CREATE TABLE IF NOT EXISTS {db}.alert_deliveries
(
    notification_id String,
    subscriber      LowCardinality(String),
    group_key       String,
    alert_ids       Array(String),
    attempt         UInt16,
    outcome         LowCardinality(String) COMMENT 'delivered | retry | dead',
    http_status     UInt16 COMMENT '0 when no response (timeout, refused)',
    error           String,
    latency_ms      Float64 COMMENT 'request round trip',
    event_to_delivery_ms Float64 COMMENT 'from the newest alert''s event time to this attempt',
    attempted_at    DateTime64(3, 'UTC')
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(attempted_at)
ORDER BY (subscriber, attempted_at);

-- Silences: created, listed and expired with `dealpulse alerts silence`. The newest version of a silence wins.
CREATE TABLE IF NOT EXISTS {db}.silences
(
    silence_id String,
    matchers   Array(String) COMMENT 'Alertmanager syntax: rule=x, team!=y, rule=~stage_.*',
    starts_at  DateTime64(3, 'UTC'),
    ends_at    DateTime64(3, 'UTC'),
    created_by String,
    comment    String,
    updated_at DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(updated_at)
ORDER BY silence_id;

-- Alerter checkpoints: rule state per input partition and the offsets it covers (restart resumes from here).
CREATE TABLE IF NOT EXISTS {db}.alerter_checkpoints
(
    consumer_group String,
    partition      UInt16,
    offsets        String COMMENT 'JSON {topic: next offset}',
    state          String CODEC(ZSTD(3)),
    rule_version   String,
    written_at     DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(written_at)
ORDER BY (consumer_group, partition);

-- Rule precision: feedback events (ref_id = alert_id) from subscribers, per rule.
CREATE VIEW IF NOT EXISTS {db}.rule_precision AS
SELECT a.rule AS rule,
       count() AS verdicts,
       countIf(f.verdict = 'accepted') AS accepted,
       countIf(f.verdict = 'rejected') AS rejected,
       round(accepted / verdicts, 4) AS precision
FROM
(
    SELECT JSONExtractString(props, 'ref_id') AS ref_id, argMax(JSONExtractString(props, 'verdict'), ts) AS verdict
    FROM {db}.events
    WHERE type = 'feedback'
    GROUP BY ref_id
) AS f
INNER JOIN (SELECT DISTINCT alert_id, rule FROM {db}.alerts) AS a ON a.alert_id = f.ref_id
GROUP BY rule;

-- +down
DROP VIEW IF EXISTS {db}.rule_precision;
DROP TABLE IF EXISTS {db}.alerter_checkpoints;
DROP TABLE IF EXISTS {db}.silences;
DROP TABLE IF EXISTS {db}.alert_deliveries;
DROP TABLE IF EXISTS {db}.alerts;
