//! Usage events, plain and CloudEvents: any bytes.
//!
//! - `parse_event` and `parse_event_with_fingerprint` never panic and agree, the error too;
//! - an accepted event is one the aggregator counts: every amount in 0..=MAX_AMOUNT;
//! - its canonical bytes parse back to the same event, by both functions (the second one
//!   takes its fast path there), with the same fingerprint.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tally_domain::event::{parse_event, parse_event_with_fingerprint, UsageEvent};
use tally_domain::metric::{Metric, MAX_AMOUNT};

fn check_bounds(e: &UsageEvent) {
    let amounts = e.amounts();
    for m in Metric::ALL {
        let n = amounts.get(m);
        let max = if m == Metric::TotalTokens { 2 * MAX_AMOUNT } else { MAX_AMOUNT };
        assert!((0..=max).contains(&n), "accepted {m} = {n}: {e:?}");
    }
    if let Some(cost) = e.cost_micros {
        assert!((0..=MAX_AMOUNT).contains(&cost), "accepted cost_micros = {cost}");
    }
}

fuzz_target!(|data: &[u8]| {
    let plain = parse_event(data);
    let fast = parse_event_with_fingerprint(data);
    let event = match (plain, fast) {
        (Ok(e), Ok((f, fp))) => {
            assert_eq!(e, f, "the two parsers disagree");
            assert_eq!(fp, e.fingerprint(), "fingerprint differs from fingerprint()");
            e
        }
        (Err(a), Err(b)) => {
            assert_eq!(a, b, "the two parsers refuse differently");
            // Only an unknown field may be named "": its key is the empty string.
            assert!(!a.field.is_empty() || a.message.starts_with("unknown field"), "an error names no field: {a}");
            return;
        }
        (a, b) => panic!("one parser accepts, the other refuses: {a:?} / {b:?}"),
    };
    check_bounds(&event);
    let canonical = event.to_canonical_json();
    let again = parse_event(&canonical).unwrap_or_else(|e| panic!("canonical form refused: {e}: {}", String::from_utf8_lossy(&canonical)));
    assert_eq!(again, event, "canonical form parses to another event");
    let (fast_again, fp) = parse_event_with_fingerprint(&canonical).expect("fast path refuses the canonical form");
    assert_eq!(fast_again, event);
    assert_eq!(fp, event.fingerprint());
    assert_eq!(again.to_canonical_json(), canonical, "canonical form is not a fixed point");
});
