-- Superseded: 0004_current_server.sql renames these tables, copies their rows into the current
-- schema and drops them. Kept so that every database, old or new, goes through the same steps.
--
-- Daily totals per subject (all scopes and models), for top-N without scope or model filter.
--
-- Kept the same replay-safe way as the other rollups: after recomputing a daily bucket
-- (subject, UTC day) of `usage_daily`, the history writer recomputes the bucket's total
-- from `usage_daily` (FINAL) and inserts it with the same new `version`; ReplacingMergeTree
-- keeps the highest version per (day, subject), and reads use FINAL, so a replayed bucket
-- counts once. Why a table of its own: FINAL merges every part in one thread on ClickHouse
-- 18.16, so its cost follows the rows read, and here a subject has one row per day instead
-- of one per day, scope and model.
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

-- Backfill of the buckets written before this table existed: every daily bucket that has
-- no total yet gets one, computed from `usage_daily` and carrying the bucket's highest
-- version, so running it again (or beside a writer, which writes a higher version) changes
-- nothing. Buckets already present were written by the writer from the same rows.
INSERT INTO usage_subject_daily
SELECT day, subject, sum(events), sum(requests), sum(input_tokens), sum(output_tokens),
       sum(cached_tokens), sum(cost_micros), max(version)
FROM usage_daily FINAL
WHERE (subject, day) NOT IN (SELECT subject, day FROM usage_subject_daily)
GROUP BY day, subject;
