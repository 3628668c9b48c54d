-- A compact form of each subject's last published snapshot, so the aggregator can tell
-- whether a new decision differs without reading and parsing the snapshot itself:
-- `shape_digest` covers the tier and each line's quota, state, action, limit and reset
-- instant; `usage_digest` each line's usage; `calculated_at` is the snapshot's.
-- NULL (rows written before this migration) means unknown: the next decision is published.
ALTER TABLE decisions
    ADD COLUMN shape_digest  bigint,
    ADD COLUMN usage_digest  bigint,
    ADD COLUMN calculated_at timestamptz;
