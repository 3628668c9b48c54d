-- History for a current server (ClickHouse 23.8 and later; tested on 25.8). Why this design is
-- exact: ARCHITECTURE.md, "history/".
--
-- What happens to the rows of the first schema (0001-0003): the tables are renamed to
-- *_v1, every raw row is copied into the new `usage_events` (its time and milliseconds become
-- one DateTime64, its UTC day is written beside it), the rollups are recomputed from the
-- copied raw rows, and the *_v1 tables are dropped. Each statement is recorded once done
-- (`tally_migrations`), so a run cut short resumes where it stopped; the copy is collapsed by
-- the raw table's key should it run twice (OPTIMIZE ... FINAL below), and the rollups are
-- versioned replacements. Stop the history writers while `tally setup` runs this.
RENAME TABLE usage_events TO usage_events_v1, usage_hourly TO usage_hourly_v1,
             usage_daily TO usage_daily_v1, usage_subject_daily TO usage_subject_daily_v1;

-- One row per event the ledger counted. An event is (event_id, event_day), as in the ledger's
-- dedupe record: the id and the UTC day of the event's own time; the same id on two days is
-- two events. `event_day` is written by the writer: for a counted correction, whose row sits
-- at the time of the event it reverts, it is the correction's own day, not the row's. The
-- same event always comes with the same subject and time, so a replayed row has the sort key
-- (subject, time, event_id, event_day) of the first and ReplacingMergeTree collapses it; the
-- writer also skips events already present, and reads use FINAL.
--
-- Insert deduplication: the writer sends each batch's raw rows with an
-- `insert_deduplication_token` derived from the batch's partition/offset ranges and the
-- events in it, and the table remembers the last 1000 inserted blocks: the same insert sent
-- again (an acknowledgement lost, or a batch replayed after the writer was killed between
-- the insert and its progress commit) stores nothing.
CREATE TABLE IF NOT EXISTS usage_events (
    event_id       String,
    event_day      Date DEFAULT toDate(time),
    subject        String,
    time           DateTime64(3, 'UTC'),
    scope          LowCardinality(String),
    model          LowCardinality(String),
    api_key_sha256 String,
    requests       Int64,
    input_tokens   Int64,
    output_tokens  Int64,
    cached_tokens  Int64,
    cost_micros    Int64,
    fingerprint    String,
    inserted_at    DateTime('UTC') DEFAULT now()
) ENGINE = ReplacingMergeTree(inserted_at)
PARTITION BY toYYYYMM(time)
ORDER BY (subject, time, event_id, event_day)
SETTINGS non_replicated_deduplication_window = 1000;

-- Rollups: hourly and daily per subject, scope and model, and daily totals per subject (UTC
-- buckets). Not materialized views: on 25.8 a deduplicated insert block still reaches a
-- dependent view (ARCHITECTURE.md). The writer recomputes every bucket it touched from the
-- raw rows (FINAL) and inserts the whole bucket with a higher `version`; ReplacingMergeTree
-- keeps the highest version per key and reads use FINAL, so a bucket written again replaces
-- itself rather than adding to itself.
CREATE TABLE IF NOT EXISTS usage_hourly (
    hour           DateTime('UTC'),
    subject        String,
    scope          LowCardinality(String),
    model          LowCardinality(String),
    events         UInt64,
    requests       Int64,
    input_tokens   Int64,
    output_tokens  Int64,
    cached_tokens  Int64,
    cost_micros    Int64,
    version        UInt64
) ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMM(hour)
ORDER BY (subject, hour, scope, model);

CREATE TABLE IF NOT EXISTS usage_daily (
    day            DateTime('UTC'),
    subject        String,
    scope          LowCardinality(String),
    model          LowCardinality(String),
    events         UInt64,
    requests       Int64,
    input_tokens   Int64,
    output_tokens  Int64,
    cached_tokens  Int64,
    cost_micros    Int64,
    version        UInt64
) ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMM(day)
ORDER BY (subject, day, scope, model);

CREATE TABLE IF NOT EXISTS usage_subject_daily (
    day            DateTime('UTC'),
    subject        String,
    events         UInt64,
    requests       Int64,
    input_tokens   Int64,
    output_tokens  Int64,
    cached_tokens  Int64,
    cost_micros    Int64,
    version        UInt64
) ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMM(day)
ORDER BY (day, subject);

-- The copy of the first schema's raw rows.
INSERT INTO usage_events (event_id, event_day, subject, time, scope, model, api_key_sha256, requests, input_tokens,
                          output_tokens, cached_tokens, cost_micros, fingerprint, inserted_at)
SELECT event_id, toDate(time), subject, fromUnixTimestamp64Milli(toInt64(toUnixTimestamp(time)) * 1000 + time_ms, 'UTC'),
       scope, model, api_key_sha256, requests, input_tokens, output_tokens, cached_tokens, cost_micros, fingerprint, inserted_at
FROM usage_events_v1 FINAL;

OPTIMIZE TABLE usage_events FINAL;

-- The rollups of the copied rows, as the writer computes them, with a version below any the
-- writer gives later (it uses the current time in microseconds).
INSERT INTO usage_hourly
SELECT toStartOfHour(time) AS hour, subject, scope, model, count(), sum(requests), sum(input_tokens), sum(output_tokens),
       sum(cached_tokens), sum(cost_micros), toUInt64(toUnixTimestamp64Micro(now64(6)))
FROM usage_events FINAL GROUP BY hour, subject, scope, model;

INSERT INTO usage_daily
SELECT toStartOfDay(hour) AS day, subject, scope, model, sum(events), sum(requests), sum(input_tokens), sum(output_tokens),
       sum(cached_tokens), sum(cost_micros), max(version)
FROM usage_hourly FINAL GROUP BY day, subject, scope, model;

INSERT INTO usage_subject_daily
SELECT day, subject, sum(events), sum(requests), sum(input_tokens), sum(output_tokens), sum(cached_tokens), sum(cost_micros),
       max(version)
FROM usage_daily FINAL GROUP BY day, subject;

DROP TABLE IF EXISTS usage_events_v1;
DROP TABLE IF EXISTS usage_hourly_v1;
DROP TABLE IF EXISTS usage_daily_v1;
DROP TABLE IF EXISTS usage_subject_daily_v1;
