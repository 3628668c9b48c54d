-- Every ledger row's `used` stays within the amount bound, 10^15 either way
-- (`tally_domain::metric::MAX_AMOUNT`; ARCHITECTURE.md says why that number). An upsert that
-- would take a row past it fails with this check, and the aggregator quarantines the event
-- that caused it as `overflow` instead of wrapping, clamping or half-applying it.
-- NOT VALID: rows written before are not scanned (a table of months is large); the check
-- holds for every row inserted or updated from now on.
ALTER TABLE ledgers ADD CONSTRAINT ledgers_used_within_bound
    CHECK (used BETWEEN -1000000000000000 AND 1000000000000000) NOT VALID;
