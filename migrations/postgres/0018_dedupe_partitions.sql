-- Bounded dedupe state. An event older than the lateness window, or too far ahead, is
-- quarantined before dedupe, so a dedupe record is never needed past its event time plus the
-- window. `processed_events` becomes a table partitioned by the UTC day of the event time,
-- one partition per day, dropped whole by the aggregator once the day left the window (see
-- the aggregator's `partitions` module). A DEFAULT partition catches rows of a day whose
-- partition is missing; it is normally empty.
--
-- `event_day` is a plain column the aggregator writes (the UTC date of `event_time`): a
-- generated column cannot be a partition key. The primary key (event_id, event_day) lets a
-- lookup that names the day touch that day's partition only.
--
-- Rows whose event is more than 366 days old are dropped here: their events are far past any
-- lateness window. The aggregator drops the days past its configured window when it starts.
-- The BRIN index on `processed_at` goes: nothing reads by it, and retention is by partition.

ALTER TABLE processed_events RENAME TO processed_events_unpartitioned;
ALTER INDEX processed_events_pkey RENAME TO processed_events_unpartitioned_pkey;
DROP INDEX IF EXISTS processed_events_processed_at;

CREATE TABLE processed_events (
    event_id       text        NOT NULL,
    fingerprint    text        NOT NULL,
    subject        text        NOT NULL,
    event_time     timestamptz NOT NULL,
    processed_at   timestamptz NOT NULL DEFAULT now(),
    scope          text,
    api_key_sha256 text,
    requests       bigint,
    input_tokens   bigint,
    output_tokens  bigint,
    cached_tokens  bigint,
    cost_micros    bigint,
    config_version bigint,
    corrects       text,
    corrected_by   text,
    event_day      date        NOT NULL,
    PRIMARY KEY (event_id, event_day)
) PARTITION BY RANGE (event_day);

CREATE TABLE processed_events_default PARTITION OF processed_events DEFAULT;

-- One partition per day: every day of the old rows still kept, and the default lateness
-- window (35 days) around today, so a fresh database starts with its partitions. Named as the
-- aggregator names them: processed_events_pYYYYMMDD.
DO $$
DECLARE
    day date;
BEGIN
    FOR day IN
        SELECT DISTINCT (event_time AT TIME ZONE 'UTC')::date FROM processed_events_unpartitioned
         WHERE event_time >= now() - interval '366 days'
        UNION
        SELECT generate_series(current_date - 36, current_date + 2, interval '1 day')::date
    LOOP
        EXECUTE format('CREATE TABLE %I PARTITION OF processed_events FOR VALUES FROM (%L) TO (%L)',
                       'processed_events_p' || to_char(day, 'YYYYMMDD'), day, day + 1);
    END LOOP;
END
$$;

INSERT INTO processed_events (event_id, fingerprint, subject, event_time, processed_at, scope, api_key_sha256, requests,
                              input_tokens, output_tokens, cached_tokens, cost_micros, config_version, corrects,
                              corrected_by, event_day)
SELECT event_id, fingerprint, subject, event_time, processed_at, scope, api_key_sha256, requests,
       input_tokens, output_tokens, cached_tokens, cost_micros, config_version, corrects,
       corrected_by, (event_time AT TIME ZONE 'UTC')::date
  FROM processed_events_unpartitioned
 WHERE event_time >= now() - interval '366 days';

DROP TABLE processed_events_unpartitioned;
