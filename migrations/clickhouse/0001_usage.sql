-- Superseded: 0004_current_server.sql renames these tables, copies their rows into the current
-- schema and drops them. Kept so that every database, old or new, goes through the same steps.
--
-- Usage history: one row per event the ledger counted. Written for ClickHouse 18.16 and
-- current releases alike: no DateTime64 (milliseconds in their own column), no
-- LowCardinality, no insert deduplication relied upon.
--
-- Replay safety: the sort key (subject, time, event_id) is fixed by a counted event (the
-- same id always comes with the same canonical form, hence the same subject and time), so a
-- replayed insert is collapsed by ReplacingMergeTree. The writer also skips ids already
-- present, so physical duplicates only exist after a crash between insert and progress
-- commit; every read uses FINAL.
CREATE TABLE IF NOT EXISTS usage_events (
    event_id       String,
    subject        String,
    time           DateTime('UTC'),
    time_ms        UInt16,
    scope          String,
    model          String,
    api_key_sha256 String,
    requests       Int64,
    input_tokens   Int64,
    output_tokens  Int64,
    cached_tokens  Int64,
    cost_micros    Int64,
    fingerprint    String,
    inserted_at    DateTime('UTC')
) ENGINE = ReplacingMergeTree(inserted_at)
PARTITION BY toYYYYMM(time)
ORDER BY (subject, time, event_id);
