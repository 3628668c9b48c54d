//! Rate strings and tier multipliers.
//!
//! - parsing never panics, and an accepted rate's `Display` parses back to the same rate
//!   (and prints the same again);
//! - `apply_tier` on the rate's limit with a multiplier (written after a `|`:
//!   `100/m|2.5`; 1 when absent) never panics, keeps a multiplier of 1 (or an invalid one) as the identity and is never
//!   below 1 otherwise.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tally_domain::rate::{apply_tier, tiered_rate, valid_multiplier, Rate};

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else { return };
    let (text, multiplier) = match input.split_once('|') {
        Some((text, m)) => (text, m.trim().parse::<f64>().unwrap_or(1.0)),
        None => (input, 1.0),
    };
    let Ok(rate) = text.parse::<Rate>() else { return };
    let shown = rate.to_string();
    assert_eq!(shown.parse::<Rate>(), Ok(rate), "`{text}` displays as `{shown}`, which parses to another rate");
    assert_eq!(shown.parse::<Rate>().map(|r| r.to_string()).as_deref(), Ok(shown.as_str()));
    let _ = rate.window_seconds();
    let tiered = apply_tier(rate.limit, multiplier);
    if multiplier == 1.0 || !valid_multiplier(multiplier) {
        assert_eq!(tiered, rate.limit);
    } else {
        assert!(tiered >= 1, "{} x {multiplier} = {tiered}", rate.limit);
        if multiplier > 1.0 {
            assert!(tiered >= rate.limit, "{} x {multiplier} = {tiered}", rate.limit);
        } else {
            assert!(tiered <= rate.limit.max(1), "{} x {multiplier} = {tiered}", rate.limit);
        }
    }
    let _ = tiered_rate(&rate, Some(multiplier), &[], None);
});
