-- Time-driven decisions: when a subject's decision must be looked at again with no new
-- traffic (a period rollover of a quota that is not ok, an override or assignment starting
-- or ending), and the API key its latest event came with (for the key's tier).
ALTER TABLE decisions ADD COLUMN api_key_sha256 text;
ALTER TABLE decisions ADD COLUMN next_check_at timestamptz;
CREATE INDEX decisions_next_check_at ON decisions (next_check_at) WHERE next_check_at IS NOT NULL;

-- Each threshold fires once per subject, quota and period: the row is written in the same
-- transaction as the usage that crossed it, so redeliveries cannot fire it again.
CREATE TABLE thresholds_fired (
    subject      text        NOT NULL,
    quota        text        NOT NULL,
    period_start timestamptz NOT NULL,
    threshold    integer     NOT NULL,
    fired_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (subject, quota, period_start, threshold)
);

-- The tier configuration (YAML), one row per applied version; the highest version is in
-- force. Written by `tally config apply` (and the admin API), read by the aggregators.
CREATE TABLE config_versions (
    version    bigserial   PRIMARY KEY,
    document   text        NOT NULL,
    sha256     text        NOT NULL,
    source     text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- The configuration version whose consequences the scheduler has already evaluated: when a
-- newer version is applied, every subject's decision is looked at again once.
CREATE TABLE scheduler_state (
    id             integer PRIMARY KEY CHECK (id = 1),
    config_version bigint  NOT NULL
);
INSERT INTO scheduler_state (id, config_version) VALUES (1, 0);
