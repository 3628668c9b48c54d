//! tally-common
