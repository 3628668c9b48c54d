-- Budgets beside a subject's own quotas (API keys', groups', tier pools'; quotas narrowed to
-- models). A correction reverts exactly the ledger rows its target counted in, recomputed
-- from the target's dedupe record, so that record now keeps the two facts budgets read
-- beyond those it kept: the event's model and the group it named. Both are nullable columns
-- without a default: adding them rewrites no partition.
ALTER TABLE processed_events ADD COLUMN model text, ADD COLUMN event_group text;
