-- `processed_at` only grows with insertion order, so a BRIN index (a few pages for the whole
-- table) serves range scans on it as well as the btree did, and costs next to nothing per
-- insert. Every counted event inserts a `processed_events` row, so this is on the hot path:
-- measured on 20 000-row batches, about 10% less time per insert.
DROP INDEX IF EXISTS processed_events_processed_at;
CREATE INDEX processed_events_processed_at ON processed_events USING brin (processed_at);
