-- Usage history. Written for ClickHouse 18.16 and current releases alike: no DateTime64
-- (milliseconds in their own column), no LowCardinality.
CREATE TABLE IF NOT EXISTS `{database}`.usage_events (
    event_id       String,
    subject        String,
    time           DateTime,
    time_ms        UInt16,
    scope          String,
    model          String,
    api_key_sha256 String,
    requests       Int64,
    input_tokens   Int64,
    output_tokens  Int64,
    cached_tokens  Int64,
    cost_micros    Int64,
    inserted_at    DateTime
) ENGINE = ReplacingMergeTree(inserted_at)
PARTITION BY toYYYYMM(time)
ORDER BY (subject, time, event_id);
