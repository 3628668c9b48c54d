-- What a counted event added, so that a correction can revert exactly that, once: its
-- amounts, scope and API key, and the configuration version it was counted under (the
-- ledger rows it touched follow from these deterministically). `corrects` is set on a
-- correction event (the id it reverts); `corrected_by` on the event it reverted.
ALTER TABLE processed_events ADD COLUMN scope text;
ALTER TABLE processed_events ADD COLUMN api_key_sha256 text;
ALTER TABLE processed_events ADD COLUMN requests bigint;
ALTER TABLE processed_events ADD COLUMN input_tokens bigint;
ALTER TABLE processed_events ADD COLUMN output_tokens bigint;
ALTER TABLE processed_events ADD COLUMN cached_tokens bigint;
ALTER TABLE processed_events ADD COLUMN cost_micros bigint;
ALTER TABLE processed_events ADD COLUMN config_version bigint;
ALTER TABLE processed_events ADD COLUMN corrects text;
ALTER TABLE processed_events ADD COLUMN corrected_by text;
