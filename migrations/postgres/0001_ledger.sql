-- Tally's ledger schema. Only the aggregator writes these tables.

-- Consumed offsets are Tally's, not the broker's: they advance in the same transaction as the
-- ledger deltas they account for. `owner` and `epoch` fence a stale instance: a batch commits
-- only if its instance still owns the partition at the epoch it claimed and the batch starts
-- exactly at `next_offset`.
CREATE TABLE consumer_offsets (
    group_id    text        NOT NULL,
    topic       text        NOT NULL,
    partition   integer     NOT NULL,
    next_offset bigint      NOT NULL DEFAULT 0,
    owner       text        NOT NULL,
    epoch       bigint      NOT NULL DEFAULT 1,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, topic, partition)
);

-- One row per counted event: the dedupe record. Kept at least as long as the lateness window.
CREATE TABLE processed_events (
    event_id     text        PRIMARY KEY,
    fingerprint  text        NOT NULL,
    subject      text        NOT NULL,
    event_time   timestamptz NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX processed_events_processed_at ON processed_events (processed_at);

-- Usage per subject, metric, scope ('*' = all scopes) and period. Keyed by what is counted,
-- not by a tier's quota name, so usage carries over when a subject changes tier mid-period.
CREATE TABLE ledgers (
    subject      text        NOT NULL,
    metric       text        NOT NULL,
    scope        text        NOT NULL,
    period       text        NOT NULL,
    period_start timestamptz NOT NULL,
    period_end   timestamptz NOT NULL,
    used         bigint      NOT NULL,
    -- The quota and limit in force at the last update (the live limit is in the decision).
    quota        text        NOT NULL,
    limit_value  bigint      NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (subject, metric, scope, period, period_start)
);

-- The latest decision snapshot per subject; `version` only grows.
CREATE TABLE decisions (
    subject      text        PRIMARY KEY,
    version      bigint      NOT NULL,
    snapshot     jsonb       NOT NULL,
    published_at timestamptz NOT NULL DEFAULT now()
);

-- Messages to publish, written in the same transaction as the state they describe and relayed
-- to Kafka afterwards (decisions, quarantined events).
CREATE TABLE outbox (
    id         bigserial   PRIMARY KEY,
    topic      text        NOT NULL,
    key        text        NOT NULL,
    payload    bytea       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
