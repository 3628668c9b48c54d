//! Period strings.
//!
//! - parsing never panics, and an accepted spec's `Display` parses back to the same spec;
//! - its window, next window and reset time never panic, and a tiling window holds its
//!   instant, at an instant and in a timezone written after the spec
//!   (`month@31|1700000000|Europe/London`: seconds since the epoch; UTC and 0 when absent)
//!   and at the ends of chrono's range.
#![no_main]

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use libfuzzer_sys::fuzz_target;
use tally_domain::period::PeriodSpec;

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else { return };
    let mut parts = input.split('|');
    let text = parts.next().unwrap_or_default();
    let seconds = parts.next().and_then(|s| s.trim().parse::<i64>().ok()).unwrap_or(0);
    let tz = parts.next().and_then(|s| s.trim().parse::<Tz>().ok()).unwrap_or(Tz::UTC);
    let Ok(spec) = text.parse::<PeriodSpec>() else { return };
    let shown = spec.to_string();
    assert_eq!(shown.parse::<PeriodSpec>(), Ok(spec), "`{text}` displays as `{shown}`, which parses to another spec");
    let _ = spec.nominal_seconds();
    let at = DateTime::from_timestamp(seconds, 0).unwrap_or(DateTime::<Utc>::UNIX_EPOCH);
    for at in [at, DateTime::<Utc>::MIN_UTC, DateTime::<Utc>::MAX_UTC] {
        let w = spec.window(at, tz);
        assert!(w.start <= w.end, "{spec} at {at}: {w:?}");
        if spec.tiles() && at != DateTime::<Utc>::MAX_UTC {
            assert!(spec.includes(&w, at), "{spec} at {at} in {tz}: {w:?}");
        }
        let _ = spec.next(&w, tz);
        let _ = spec.resets_at(at, tz);
    }
});
