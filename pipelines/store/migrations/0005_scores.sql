-- Intent (per lead) and churn (per account) scores: every score the pipeline emitted, and the latest per entity.
-- src_* is the Kafka position of the event that produced the score (a retried batch is not written twice).
CREATE TABLE IF NOT EXISTS {db}.scores
(
    score_id      String COMMENT '<entity>:<entity id>:<event id>; a feedback event names it in ref_id',
    model         LowCardinality(String) COMMENT 'intent | churn',
    entity        LowCardinality(String) COMMENT 'lead | account',
    entity_id     String,
    account_id    String,
    event_id      String COMMENT 'the event that changed the features',
    ts            DateTime64(3, 'UTC') COMMENT 'event time of that event',
    score         Float32 COMMENT 'probability in [0, 1]: lead converts / account churns',
    grade         LowCardinality(String) COMMENT 'A (highest) .. D, thresholds from the settings',
    model_version UInt32 COMMENT '0 = the cold-start prior of the features file',
    cold          Bool,
    src_topic     LowCardinality(String),
    src_partition UInt16,
    src_offset    UInt64,
    src_index     UInt32,
    scored_at     DateTime64(3, 'UTC')
)
ENGINE = MergeTree
-- by scoring time, not event time: a batch of replayed history must not write one part per month it spans
PARTITION BY toYYYYMM(scored_at)
ORDER BY (model, entity_id, ts)
SETTINGS non_replicated_deduplication_window = 10000;

-- The newest score per (model, entity), kept up to date by a materialized view; read it with FINAL or the views.
CREATE TABLE IF NOT EXISTS {db}.latest_scores
(
    model         LowCardinality(String),
    entity        LowCardinality(String),
    entity_id     String,
    account_id    String,
    ts            DateTime64(3, 'UTC'),
    score         Float32,
    grade         LowCardinality(String),
    model_version UInt32,
    cold          Bool,
    score_id      String
)
ENGINE = ReplacingMergeTree(ts)
ORDER BY (model, entity_id);

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.latest_scores_mv TO {db}.latest_scores AS
SELECT model, entity, entity_id, account_id, ts, score, grade, model_version, cold, score_id
FROM {db}.scores;

INSERT INTO {db}.latest_scores
SELECT model, entity, entity_id, account_id, ts, score, grade, model_version, cold, score_id
FROM {db}.scores;

-- BI: the latest intent score per lead, with its opportunity and account dimensions.
CREATE VIEW IF NOT EXISTS {db}.lead_intent AS
SELECT l.entity_id AS lead_id, l.account_id AS account_id, l.score AS intent_score, l.grade AS intent_grade,
       l.ts AS scored_at_event_time, l.model_version AS model_version, l.cold AS cold,
       a.region AS region, a.industry AS industry, a.product_line AS product_line, a.owner AS owner, a.team AS team
FROM (SELECT * FROM {db}.latest_scores FINAL WHERE model = 'intent') AS l
LEFT JOIN {db}.dim_accounts AS a ON a.account_id = l.account_id;

-- BI: the latest churn risk per account, with its dimensions and contract end.
CREATE VIEW IF NOT EXISTS {db}.account_churn AS
SELECT c.entity_id AS account_id, c.score AS churn_risk, c.grade AS churn_grade,
       c.ts AS scored_at_event_time, c.model_version AS model_version, c.cold AS cold,
       a.region AS region, a.industry AS industry, a.product_line AS product_line, a.owner AS owner, a.team AS team,
       a.contract_end AS contract_end, a.arr AS arr
FROM (SELECT * FROM {db}.latest_scores FINAL WHERE model = 'churn') AS c
LEFT JOIN {db}.dim_accounts AS a ON a.account_id = c.account_id;

-- +down
DROP VIEW IF EXISTS {db}.account_churn;
DROP VIEW IF EXISTS {db}.lead_intent;
DROP VIEW IF EXISTS {db}.latest_scores_mv;
DROP TABLE IF EXISTS {db}.latest_scores;
DROP TABLE IF EXISTS {db}.scores;
