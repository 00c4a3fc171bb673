-- Analysis schema: compact tables fed incrementally by materialized views from `events`, dimension tables,
-- and the BI views. Views named *_at(...) are parameterized (as_of = the moment to look from, capped at the
-- newest stored event time, so a replay of last month gives last month's answer); the plain views are the
-- same at "now" = the newest event. Columns are documented in README.md ("Analytics").
-- Each materialized view is followed by a one-off backfill from `events`: run this migration with the workers
-- stopped, or rows inserted between the two statements would be counted twice.

-- Stage order, thresholds and required activity: written by `dealpulse migrate` from the settings.
CREATE TABLE IF NOT EXISTS {db}.stage_config
(
    stage             String,
    position          UInt16 COMMENT 'funnel order, 1 = first; lost has 0',
    kind              LowCardinality(String) COMMENT 'open | won | lost',
    threshold_days    Float64 COMMENT 'a visit longer than this is blocking; an open one is stalled',
    required_activity LowCardinality(String) COMMENT 'event type a visit needs to be compliant'
)
ENGINE = MergeTree
ORDER BY position;

-- Targets of the sales-health metrics: written by `dealpulse migrate`.
CREATE TABLE IF NOT EXISTS {db}.health_targets
(
    metric      String,
    target      Float64,
    direction   LowCardinality(String) COMMENT 'min: healthy at or above target; max: at or below',
    from_stage  String COMMENT 'reach metrics: the cohort enters this stage ...',
    to_stage    String COMMENT '... and counts when it reaches this stage or a later one',
    description String
)
ENGINE = MergeTree
ORDER BY metric;

-- The newest event time stored: "now" for every view (one row per insert block, merged away; read instantly).
CREATE TABLE IF NOT EXISTS {db}.event_watermark
(
    max_ts SimpleAggregateFunction(max, DateTime64(3, 'UTC'))
)
ENGINE = AggregatingMergeTree
ORDER BY tuple();

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.event_watermark_mv TO {db}.event_watermark AS
SELECT max(ts) AS max_ts FROM {db}.events;

INSERT INTO {db}.event_watermark SELECT max(ts) FROM {db}.events HAVING count() > 0;

-- Every stage change, keyed by opportunity (the funnel and dwell views read only this).
CREATE TABLE IF NOT EXISTS {db}.stage_events
(
    opportunity_id String,
    account_id     String,
    lead_id        String,
    ts             DateTime64(3, 'UTC'),
    from_stage     LowCardinality(String),
    to_stage       LowCardinality(String),
    event_id       String
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (opportunity_id, ts, event_id);

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.stage_events_mv TO {db}.stage_events AS
SELECT opportunity_id, account_id, lead_id, ts, JSONExtractString(props, 'from_stage') AS from_stage,
       JSONExtractString(props, 'to_stage') AS to_stage, event_id
FROM {db}.events
WHERE type = 'stage_change' AND opportunity_id != '';

INSERT INTO {db}.stage_events
SELECT opportunity_id, account_id, lead_id, ts, JSONExtractString(props, 'from_stage'),
       JSONExtractString(props, 'to_stage'), event_id
FROM {db}.events
WHERE type = 'stage_change' AND opportunity_id != '';

-- What happened on an opportunity besides stage changes (compliance and last activity).
CREATE TABLE IF NOT EXISTS {db}.opportunity_activity
(
    opportunity_id String,
    type           LowCardinality(String),
    ts             DateTime64(3, 'UTC')
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (opportunity_id, type, ts);

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.opportunity_activity_mv TO {db}.opportunity_activity AS
SELECT opportunity_id, type, ts FROM {db}.events WHERE opportunity_id != '' AND type != 'stage_change';

INSERT INTO {db}.opportunity_activity
SELECT opportunity_id, type, ts FROM {db}.events WHERE opportunity_id != '' AND type != 'stage_change';

-- Daily activity per account and event type (UTC days), kept up to date as events arrive.
CREATE TABLE IF NOT EXISTS {db}.daily_account_activity
(
    day            Date,
    account_id     String,
    type           LowCardinality(String),
    events         UInt64,
    tickets_opened UInt64
)
ENGINE = SummingMergeTree
ORDER BY (account_id, day, type);

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.daily_account_activity_mv TO {db}.daily_account_activity AS
SELECT toDate(ts) AS day, account_id, type, count() AS events,
       countIf(type = 'support_ticket' AND JSONExtractString(props, 'status') = 'open') AS tickets_opened
FROM {db}.events
GROUP BY day, account_id, type;

INSERT INTO {db}.daily_account_activity
SELECT toDate(ts) AS day, account_id, type, count(),
       countIf(type = 'support_ticket' AND JSONExtractString(props, 'status') = 'open')
FROM {db}.events
GROUP BY day, account_id, type;

-- Dimension sources: account_update events, and CSV files loaded with `dealpulse dims load`.
CREATE TABLE IF NOT EXISTS {db}.account_attributes
(
    account_id   String,
    updated_at   DateTime64(3, 'UTC'),
    region       String,
    industry     String,
    product_line String,
    owner        String,
    team         String,
    contract_end Nullable(Date),
    arr          Nullable(Float64),
    source       LowCardinality(String)
)
ENGINE = MergeTree
ORDER BY (account_id, updated_at);

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.account_attributes_mv TO {db}.account_attributes AS
SELECT account_id, ts AS updated_at, JSONExtractString(props, 'region') AS region,
       JSONExtractString(props, 'industry') AS industry, JSONExtractString(props, 'product_line') AS product_line,
       JSONExtractString(props, 'owner') AS owner, JSONExtractString(props, 'team') AS team,
       toDateOrNull(JSONExtractString(props, 'contract_end')) AS contract_end,
       if(JSONHas(props, 'arr'), JSONExtractFloat(props, 'arr'), NULL) AS arr, 'event' AS source
FROM {db}.events
WHERE type = 'account_update';

INSERT INTO {db}.account_attributes
SELECT account_id, ts, JSONExtractString(props, 'region'), JSONExtractString(props, 'industry'),
       JSONExtractString(props, 'product_line'), JSONExtractString(props, 'owner'), JSONExtractString(props, 'team'),
       toDateOrNull(JSONExtractString(props, 'contract_end')),
       if(JSONHas(props, 'arr'), JSONExtractFloat(props, 'arr'), NULL), 'event'
FROM {db}.events
WHERE type = 'account_update';

CREATE TABLE IF NOT EXISTS {db}.opportunity_attributes
(
    opportunity_id String,
    updated_at     DateTime64(3, 'UTC'),
    account_id     String,
    owner          String,
    team           String,
    product_line   String,
    source         LowCardinality(String)
)
ENGINE = MergeTree
ORDER BY (opportunity_id, updated_at);

-- The newest non-empty value of each attribute (partial updates never blank a field).
CREATE VIEW IF NOT EXISTS {db}.dim_accounts AS
SELECT x.account_id AS account_id,
       argMaxIf(x.region, x.updated_at, x.region != '') AS region,
       argMaxIf(x.industry, x.updated_at, x.industry != '') AS industry,
       argMaxIf(x.product_line, x.updated_at, x.product_line != '') AS product_line,
       argMaxIf(x.owner, x.updated_at, x.owner != '') AS owner,
       argMaxIf(x.team, x.updated_at, x.team != '') AS team,
       argMaxIf(x.contract_end, x.updated_at, x.contract_end IS NOT NULL) AS contract_end,
       argMaxIf(x.arr, x.updated_at, x.arr IS NOT NULL) AS arr,
       max(x.updated_at) AS last_updated_at
FROM {db}.account_attributes AS x
GROUP BY x.account_id;

CREATE VIEW IF NOT EXISTS {db}.dim_opportunities AS
SELECT s.opportunity_id AS opportunity_id, s.account_id AS account_id, s.lead_id AS lead_id,
       s.created_at AS created_at, s.current_stage AS current_stage,
       if(o.owner != '', o.owner, a.owner) AS owner, if(o.team != '', o.team, a.team) AS team,
       a.region AS region, a.industry AS industry,
       if(o.product_line != '', o.product_line, a.product_line) AS product_line
FROM
(
    SELECT se.opportunity_id AS opportunity_id, any(se.account_id) AS account_id, any(se.lead_id) AS lead_id,
           min(se.ts) AS created_at, argMax(se.to_stage, (se.ts, se.event_id)) AS current_stage
    FROM {db}.stage_events AS se
    GROUP BY se.opportunity_id
) AS s
LEFT JOIN {db}.dim_accounts AS a ON a.account_id = s.account_id
LEFT JOIN
(
    SELECT y.opportunity_id AS opportunity_id, argMaxIf(y.owner, y.updated_at, y.owner != '') AS owner,
           argMaxIf(y.team, y.updated_at, y.team != '') AS team,
           argMaxIf(y.product_line, y.updated_at, y.product_line != '') AS product_line
    FROM {db}.opportunity_attributes AS y
    GROUP BY y.opportunity_id
) AS o ON o.opportunity_id = s.opportunity_id;

-- First entry per (opportunity, stage), with the opportunity's whole path up to as_of: (ts, position, kind).
CREATE VIEW IF NOT EXISTS {db}.stage_entries_at AS
WITH least({as_of:DateTime64(3, 'UTC')}, (SELECT max(max_ts) FROM {db}.event_watermark)) AS cutoff
SELECT opportunity_id, stage, position, kind, entered_at, path
FROM
(
    SELECT e.opportunity_id AS opportunity_id, e.to_stage AS stage, c.position AS position, c.kind AS kind,
           min(e.ts) AS entered_at
    FROM {db}.stage_events AS e
    INNER JOIN {db}.stage_config AS c ON c.stage = e.to_stage
    WHERE e.ts <= cutoff
    GROUP BY opportunity_id, stage, position, kind
) AS firsts
INNER JOIN
(
    SELECT e.opportunity_id AS opportunity_id, groupArray((e.ts, c.position, c.kind)) AS path
    FROM {db}.stage_events AS e
    INNER JOIN {db}.stage_config AS c ON c.stage = e.to_stage
    WHERE e.ts <= cutoff
    GROUP BY opportunity_id
) AS paths USING (opportunity_id);

-- Funnel facts: one row per (opportunity, open stage) it entered, from its first entry. Converted = reached a
-- later stage (won included) within the window; dropped = lost, or the window passed; open = neither yet.
CREATE VIEW IF NOT EXISTS {db}.funnel_steps_at AS
WITH least({as_of:DateTime64(3, 'UTC')}, (SELECT max(max_ts) FROM {db}.event_watermark)) AS cutoff
SELECT f.opportunity_id AS opportunity_id, f.stage AS stage, f.position AS position, f.entered_at AS entered_at,
       toDate(f.entered_at) AS cohort_day, toMonday(f.entered_at) AS cohort_week,
       toStartOfMonth(f.entered_at) AS cohort_month,
       f.converted_at AS converted_at, f.lost_at AS lost_at,
       f.converted_at IS NOT NULL AND f.converted_at <= f.entered_at + toIntervalDay({window_days:UInt32})
           AS is_converted,
       NOT is_converted
           AND (f.lost_at IS NOT NULL OR f.entered_at + toIntervalDay({window_days:UInt32}) <= cutoff) AS is_dropped,
       NOT is_converted AND NOT is_dropped AS is_open,
       if(is_converted, dateDiff('millisecond', f.entered_at, f.converted_at) / 86400000, NULL) AS days_to_convert,
       d.account_id AS account_id, d.lead_id AS lead_id, d.region AS region, d.industry AS industry,
       d.product_line AS product_line, d.owner AS owner, d.team AS team
FROM
(
    SELECT opportunity_id, stage, position, entered_at,
           if(arrayExists(e -> e.2 > position AND e.3 != 'lost' AND e.1 >= entered_at, path),
              toNullable(arrayMin(arrayFilter(e -> e.2 > position AND e.3 != 'lost' AND e.1 >= entered_at,
                                              path).1)), NULL) AS converted_at,
           if(arrayExists(e -> e.3 = 'lost' AND e.1 >= entered_at, path),
              toNullable(arrayMin(arrayFilter(e -> e.3 = 'lost' AND e.1 >= entered_at, path).1)), NULL) AS lost_at
    FROM {db}.stage_entries_at(as_of = {as_of:DateTime64(3, 'UTC')})
    WHERE kind = 'open'
) AS f
LEFT JOIN {db}.dim_opportunities AS d ON d.opportunity_id = f.opportunity_id;

CREATE VIEW IF NOT EXISTS {db}.funnel_steps AS
SELECT * FROM {db}.funnel_steps_at(as_of = '2100-01-01 00:00:00', window_days = 30);

CREATE VIEW IF NOT EXISTS {db}.funnel AS
SELECT stage, position, count() AS entered, countIf(is_converted) AS converted, countIf(is_dropped) AS dropped,
       countIf(is_open) AS still_open, round(converted / entered, 4) AS conversion_rate,
       round(if(converted + dropped = 0, NULL, converted / (converted + dropped)), 4) AS decided_conversion_rate,
       round(quantileExactInclusiveIf(0.5)(days_to_convert, is_converted), 3) AS median_days_to_convert,
       round(quantileExactInclusiveIf(0.9)(days_to_convert, is_converted), 3) AS p90_days_to_convert
FROM {db}.funnel_steps
GROUP BY stage, position
ORDER BY position;

-- Stage visits: every entry into an open stage until the next stage change (or until now, if current).
CREATE VIEW IF NOT EXISTS {db}.stage_visit_facts_at AS
WITH least({as_of:DateTime64(3, 'UTC')}, (SELECT max(max_ts) FROM {db}.event_watermark)) AS cutoff
SELECT v.opportunity_id AS opportunity_id, v.stage AS stage, v.position AS position, v.entered_at AS entered_at,
       v.left_at AS left_at, v.next_stage AS next_stage, v.left_at IS NULL AS is_current,
       dateDiff('millisecond', v.entered_at, coalesce(v.left_at, cutoff)) / 86400000 AS dwell_days,
       v.threshold_days AS threshold_days, dwell_days > v.threshold_days AS over_threshold,
       arrayExists(t -> t >= v.entered_at AND t < coalesce(v.left_at, cutoff), n.times) AS compliant
FROM
(
    SELECT w.opportunity_id AS opportunity_id, w.stage AS stage, c.position AS position, w.entered_at AS entered_at,
           w.left_at AS left_at, w.next_stage AS next_stage, c.threshold_days AS threshold_days,
           c.required_activity AS required_activity
    FROM
    (
        SELECT opportunity_id, to_stage AS stage, ts AS entered_at,
               leadInFrame(toNullable(ts)) OVER w AS left_at, leadInFrame(to_stage) OVER w AS next_stage
        FROM {db}.stage_events
        WHERE ts <= cutoff
        WINDOW w AS (PARTITION BY opportunity_id ORDER BY ts, event_id ROWS BETWEEN CURRENT ROW AND 1 FOLLOWING)
    ) AS w
    INNER JOIN {db}.stage_config AS c ON c.stage = w.stage
    WHERE c.kind = 'open'
) AS v
LEFT JOIN
(
    SELECT opportunity_id, type, groupArray(ts) AS times
    FROM {db}.opportunity_activity
    WHERE ts <= cutoff AND type IN (SELECT required_activity FROM {db}.stage_config)
    GROUP BY opportunity_id, type
) AS n ON n.opportunity_id = v.opportunity_id AND n.type = v.required_activity;

-- The same with the opportunity's dimensions (health metrics read the facts above: no join needed there).
CREATE VIEW IF NOT EXISTS {db}.stage_visits_at AS
SELECT f.*, d.account_id AS account_id, d.lead_id AS lead_id, d.region AS region, d.industry AS industry,
       d.product_line AS product_line, d.owner AS owner, d.team AS team
FROM {db}.stage_visit_facts_at(as_of = {as_of:DateTime64(3, 'UTC')}) AS f
LEFT JOIN {db}.dim_opportunities AS d ON d.opportunity_id = f.opportunity_id;

CREATE VIEW IF NOT EXISTS {db}.stage_visits AS
SELECT * FROM {db}.stage_visits_at(as_of = '2100-01-01 00:00:00');

CREATE VIEW IF NOT EXISTS {db}.stage_dwell AS
SELECT stage, position, count() AS visits, countIf(NOT is_current) AS completed,
       round(avgIf(dwell_days, NOT is_current), 3) AS avg_dwell_days,
       round(quantileExactInclusiveIf(0.5)(dwell_days, NOT is_current), 3) AS p50_dwell_days,
       round(quantileExactInclusiveIf(0.9)(dwell_days, NOT is_current), 3) AS p90_dwell_days,
       any(threshold_days) AS stall_threshold_days, round(countIf(over_threshold) / count(), 4) AS blocking_rate,
       countIf(is_current AND over_threshold) AS stalled_now
FROM {db}.stage_visits
GROUP BY stage, position
ORDER BY position;

-- Opportunities sitting in an open stage longer than its threshold, as of the newest event.
CREATE VIEW IF NOT EXISTS {db}.stalled_opportunities_at AS
WITH least({as_of:DateTime64(3, 'UTC')}, (SELECT max(max_ts) FROM {db}.event_watermark)) AS cutoff
SELECT s.opportunity_id AS opportunity_id, s.stage AS stage, s.entered_at AS entered_at,
       round(s.dwell_days, 3) AS days_in_stage, s.threshold_days AS threshold_days,
       round(s.dwell_days - s.threshold_days, 3) AS days_stalled,
       if(a.last_activity IS NULL, NULL, round(dateDiff('millisecond', a.last_activity, cutoff) / 86400000, 3))
           AS days_since_activity,
       s.owner AS owner, s.team AS team, s.account_id AS account_id, s.region AS region,
       s.product_line AS product_line
FROM {db}.stage_visits_at(as_of = {as_of:DateTime64(3, 'UTC')}) AS s
LEFT JOIN
(
    SELECT opportunity_id, toNullable(max(ts)) AS last_activity
    FROM {db}.opportunity_activity
    WHERE ts <= cutoff
    GROUP BY opportunity_id
) AS a ON a.opportunity_id = s.opportunity_id
WHERE s.is_current AND s.over_threshold
ORDER BY days_stalled DESC, opportunity_id;

CREATE VIEW IF NOT EXISTS {db}.stalled_opportunities AS
SELECT * FROM {db}.stalled_opportunities_at(as_of = '2100-01-01 00:00:00');

-- Customer health per account: usage (feature_use events) and support tickets opened in the last three complete
-- weeks (Monday-based, UTC); warn after two weeks running of falling usage or rising tickets.
CREATE VIEW IF NOT EXISTS {db}.customer_health_at AS
WITH least({as_of:DateTime64(3, 'UTC')}, (SELECT max(max_ts) FROM {db}.event_watermark)) AS cutoff,
     toMonday(cutoff) AS this_week
SELECT account_id,
       sumIf(events, type = 'feature_use' AND day >= this_week - 7) AS usage_week_1,
       sumIf(events, type = 'feature_use' AND day >= this_week - 14 AND day < this_week - 7) AS usage_week_2,
       sumIf(events, type = 'feature_use' AND day < this_week - 14) AS usage_week_3,
       sumIf(tickets_opened, day >= this_week - 7) AS tickets_week_1,
       sumIf(tickets_opened, day >= this_week - 14 AND day < this_week - 7) AS tickets_week_2,
       sumIf(tickets_opened, day < this_week - 14) AS tickets_week_3,
       usage_week_1 < usage_week_2 AND usage_week_2 < usage_week_3 AS usage_declining,
       tickets_week_1 > tickets_week_2 AND tickets_week_2 > tickets_week_3 AS tickets_rising,
       if(usage_declining OR tickets_rising, 'warn', 'ok') AS status
FROM {db}.daily_account_activity
WHERE day >= this_week - 21 AND day < this_week
GROUP BY account_id
HAVING usage_week_1 + usage_week_2 + usage_week_3 + tickets_week_1 + tickets_week_2 + tickets_week_3 > 0;

CREATE VIEW IF NOT EXISTS {db}.customer_health AS
SELECT * FROM {db}.customer_health_at(as_of = '2100-01-01 00:00:00');

-- Sales health: each metric with its value, target and status, for stage entries / wins in [since, until).
CREATE VIEW IF NOT EXISTS {db}.sales_health_at AS
SELECT m.metric AS metric, round(if(m.denominator = 0, NULL, m.numerator / m.denominator), 4) AS value,
       m.numerator AS numerator, m.denominator AS denominator, t.target AS target, t.direction AS direction,
       multiIf(m.denominator = 0, 'no_data',
               (t.direction = 'min' AND value >= t.target) OR (t.direction = 'max' AND value <= t.target), 'ok',
               'warn') AS status,
       t.description AS description
FROM
(
    -- reach metrics: of the opportunities entering from_stage in the period, how many reached to_stage or later
    SELECT t.metric AS metric,
           toFloat64(countIf(arrayExists(e -> e.2 >= tc.position AND e.3 != 'lost' AND e.1 >= s.entered_at,
                                         s.path))) AS numerator,
           toFloat64(count()) AS denominator
    FROM {db}.health_targets AS t
    INNER JOIN {db}.stage_config AS tc ON tc.stage = t.to_stage
    INNER JOIN
    (
        SELECT stage, entered_at, path
        FROM {db}.stage_entries_at(as_of = {until:DateTime64(3, 'UTC')})
        WHERE entered_at >= {since:DateTime64(3, 'UTC')} AND entered_at < {until:DateTime64(3, 'UTC')}
    ) AS s ON s.stage = t.from_stage
    GROUP BY t.metric
    UNION ALL
    -- compliance: completed visits entered in the period that had the stage's required activity
    SELECT 'opportunity_compliance', toFloat64(countIf(compliant)), toFloat64(count())
    FROM {db}.stage_visit_facts_at(as_of = {until:DateTime64(3, 'UTC')})
    WHERE NOT is_current AND entered_at >= {since:DateTime64(3, 'UTC')} AND entered_at < {until:DateTime64(3, 'UTC')}
    UNION ALL
    -- deal cycle: days from the first stage entry to won, for deals won in the period
    SELECT 'deal_cycle_days', sum(days), toFloat64(count())
    FROM
    (
        SELECT e.opportunity_id AS opportunity_id,
               dateDiff('millisecond', min(e.ts), minIf(e.ts, c.kind = 'won')) / 86400000 AS days,
               minIf(e.ts, c.kind = 'won') AS won_at
        FROM {db}.stage_events AS e
        INNER JOIN {db}.stage_config AS c ON c.stage = e.to_stage
        WHERE e.ts <= least({until:DateTime64(3, 'UTC')}, (SELECT max(max_ts) FROM {db}.event_watermark))
        GROUP BY opportunity_id
        HAVING countIf(c.kind = 'won') > 0
    )
    WHERE won_at >= {since:DateTime64(3, 'UTC')} AND won_at < {until:DateTime64(3, 'UTC')}
    UNION ALL
    -- customer health: share of active accounts without two weeks running of decline
    SELECT 'customer_health', toFloat64(countIf(status = 'ok')), toFloat64(count())
    FROM {db}.customer_health_at(as_of = {until:DateTime64(3, 'UTC')})
) AS m
INNER JOIN {db}.health_targets AS t ON t.metric = m.metric
ORDER BY metric;

CREATE VIEW IF NOT EXISTS {db}.sales_health AS
SELECT * FROM {db}.sales_health_at(since = '1970-01-01 00:00:00', until = '2100-01-01 00:00:00');

-- +down
DROP VIEW IF EXISTS {db}.sales_health;
DROP VIEW IF EXISTS {db}.sales_health_at;
DROP VIEW IF EXISTS {db}.customer_health;
DROP VIEW IF EXISTS {db}.customer_health_at;
DROP VIEW IF EXISTS {db}.stalled_opportunities;
DROP VIEW IF EXISTS {db}.stalled_opportunities_at;
DROP VIEW IF EXISTS {db}.stage_dwell;
DROP VIEW IF EXISTS {db}.stage_visits;
DROP VIEW IF EXISTS {db}.stage_visits_at;
DROP VIEW IF EXISTS {db}.stage_visit_facts_at;
DROP VIEW IF EXISTS {db}.funnel;
DROP VIEW IF EXISTS {db}.funnel_steps;
DROP VIEW IF EXISTS {db}.funnel_steps_at;
DROP VIEW IF EXISTS {db}.stage_entries_at;
DROP VIEW IF EXISTS {db}.dim_opportunities;
DROP VIEW IF EXISTS {db}.dim_accounts;
DROP TABLE IF EXISTS {db}.opportunity_attributes;
DROP VIEW IF EXISTS {db}.account_attributes_mv;
DROP TABLE IF EXISTS {db}.account_attributes;
DROP VIEW IF EXISTS {db}.daily_account_activity_mv;
DROP TABLE IF EXISTS {db}.daily_account_activity;
DROP VIEW IF EXISTS {db}.opportunity_activity_mv;
DROP TABLE IF EXISTS {db}.opportunity_activity;
DROP VIEW IF EXISTS {db}.stage_events_mv;
DROP TABLE IF EXISTS {db}.stage_events;
DROP TABLE IF EXISTS {db}.health_targets;
DROP VIEW IF EXISTS {db}.event_watermark_mv;
DROP TABLE IF EXISTS {db}.event_watermark;
DROP TABLE IF EXISTS {db}.stage_config;
