-- Budgets in history (API keys', groups', tier pools'; see tally_domain::budget). Each raw row
-- records what the ledger counted its event in beyond its subject's own quotas, computed by
-- the writer under the configuration version the ledger counted the event under:
--   event_group    the group the event named (a correction's row: its target's); '' for none
--   config_version that version (0: the built-in default; -1: a row written before this file)
--   budgets        the budget subjects it met (`__tally_budget__/<kind>/<name>`): what history
--                  queries and the export group a budget's usage by
--   budget_ledgers the budget ledgers it counted in, each named by its ledger rows' key
--                  without the period start (a JSON array: budget subject, metric, scope key,
--                  period): reconciliation sums a budget's ledger row over the rows naming it
--                  within the row's window, so a quota added to a budget or narrowed to other
--                  models mid-period is compared with exactly the events it counted.
-- Rows written before this file keep the defaults: their events were counted before budgets
-- existed, or by a writer that did not know them (upgrade the history writers before giving a
-- configuration budgets).
--
-- The added columns are defaults until written: adding them rewrites no part. The bloom
-- filter indexes let a query for one budget or API key skip the granules without it (they
-- cover parts written or merged from now on).
ALTER TABLE usage_events ADD COLUMN IF NOT EXISTS event_group LowCardinality(String) DEFAULT '' AFTER api_key_sha256;

ALTER TABLE usage_events ADD COLUMN IF NOT EXISTS config_version Int64 DEFAULT -1 AFTER event_group;

ALTER TABLE usage_events ADD COLUMN IF NOT EXISTS budgets Array(LowCardinality(String)) DEFAULT [] AFTER config_version;

ALTER TABLE usage_events ADD COLUMN IF NOT EXISTS budget_ledgers Array(LowCardinality(String)) DEFAULT [] AFTER budgets;

ALTER TABLE usage_events ADD INDEX IF NOT EXISTS budgets_bloom budgets TYPE bloom_filter GRANULARITY 4;

ALTER TABLE usage_events ADD INDEX IF NOT EXISTS budget_ledgers_bloom budget_ledgers TYPE bloom_filter GRANULARITY 4;

ALTER TABLE usage_events ADD INDEX IF NOT EXISTS api_key_bloom api_key_sha256 TYPE bloom_filter GRANULARITY 4;
