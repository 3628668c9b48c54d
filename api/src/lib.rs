//! tally-api
