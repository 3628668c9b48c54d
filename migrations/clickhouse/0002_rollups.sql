-- Superseded: 0004_current_server.sql renames these tables, copies their rows into the current
-- schema and drops them. Kept so that every database, old or new, goes through the same steps.
--
-- Hourly and daily rollups per subject, scope and model (UTC buckets).
--
-- No materialized view: an MV sees every inserted block, replays included, and would double
-- count. Instead the history writer RECOMPUTES each bucket it touched from the raw table
-- (FINAL) after inserting raw rows, and inserts the full bucket with a higher `version`.
-- ReplacingMergeTree keeps the highest version per key, so a re-insert replaces a bucket
-- rather than adding to it; reads use FINAL.
CREATE TABLE IF NOT EXISTS usage_hourly (
    hour           DateTime('UTC'),
    subject        String,
    scope          String,
    model          String,
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
    scope          String,
    model          String,
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
