-- The history writer's and billing's tables. Only the history writer writes
-- `history_offsets`; only `tally close-period` writes the billing tables.

-- Consumed offsets of the history writer's own consumer group: the next offset whose event
-- is not yet in ClickHouse (raw rows and rollups). Advanced only after ClickHouse accepted the
-- batch; `owner` and `epoch` fence a stale instance as in `consumer_offsets`.
CREATE TABLE history_offsets (
    group_id    text        NOT NULL,
    topic       text        NOT NULL,
    partition   integer     NOT NULL,
    next_offset bigint      NOT NULL DEFAULT 0,
    owner       text        NOT NULL,
    epoch       bigint      NOT NULL DEFAULT 1,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, topic, partition)
);

-- A billing period closed by `tally close-period`: immutable once written.
CREATE TABLE billing_periods (
    period       text        PRIMARY KEY,          -- 'YYYY-MM'
    closed_at    timestamptz NOT NULL DEFAULT now(),
    closed_by    text        NOT NULL,
    grace_hours  integer     NOT NULL,
    summary      jsonb       NOT NULL              -- the reconciliation summary at closing
);

-- The billing lines frozen at closing: one per subject, model and metric. Usage counted for
-- the period later is exported as adjustments (current minus frozen), never written here.
CREATE TABLE billing_lines (
    period                 text   NOT NULL REFERENCES billing_periods (period),
    subject                text   NOT NULL,
    model                  text   NOT NULL,
    metric                 text   NOT NULL,
    window_start           timestamptz NOT NULL,
    window_end             timestamptz NOT NULL,
    quantity               bigint NOT NULL,
    unit_price_per_million bigint,
    cost_micros            bigint NOT NULL,
    PRIMARY KEY (period, subject, model, metric)
);

CREATE FUNCTION billing_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'billing period data is immutable once closed (% on %)', TG_OP, TG_TABLE_NAME;
END;
$$;

CREATE TRIGGER billing_periods_immutable BEFORE UPDATE OR DELETE ON billing_periods
    FOR EACH ROW EXECUTE FUNCTION billing_immutable();
CREATE TRIGGER billing_lines_immutable BEFORE UPDATE OR DELETE ON billing_lines
    FOR EACH ROW EXECUTE FUNCTION billing_immutable();
