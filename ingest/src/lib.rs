//! tally-ingest
