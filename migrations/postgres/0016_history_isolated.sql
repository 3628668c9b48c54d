-- Events the history writer could not write because ClickHouse refused them on their own
-- (history/src/isolate.rs): counted by the ledger, absent from history. Written in the
-- transaction that advances the writer past them, so reconciliation can name the
-- difference they leave.
CREATE TABLE history_isolated (
    group_id    text        NOT NULL,
    event_id    text        NOT NULL,
    subject     text        NOT NULL,
    event_time  timestamptz NOT NULL,
    reason      text        NOT NULL,
    isolated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, event_id)
);
