//! tally-aggregator
