//! Reading the canonical form in one pass, without a JSON parser.
//!
//! Tally's ingest (and the bench, and most gateways that use the client) produce events in
//! their canonical form: the fields in the order of [`UsageEvent`], optional ones left out
//! when empty, no spaces, integers without leading zeros, the time in RFC 3339 with `Z` and
//! 0, 3, 6 or 9 fraction digits. The aggregator parses every event it receives, so this is
//! its hottest code.
//!
//! # Contract
//! [`read`] returns `Some(event)` only when `bytes` are exactly `event.to_canonical_json()`.
//! It does not check the event's limits ([`UsageEvent::is_valid`] does) and it declines
//! (`None`) whatever it does not handle itself: any other byte order or spacing, strings
//! with escapes, leap seconds, years outside 0000-9999. A declined input takes the general
//! parser, which gives the same event for canonical bytes and names the bad field for the
//! rest. The tests hold the contract by round trips and by mutating canonical bytes.

use std::collections::BTreeMap;

use chrono::{DateTime, NaiveDate, Utc};

use super::UsageEvent;

/// The event whose canonical form `bytes` are, when this reader handles it (module docs).
pub(super) fn read(bytes: &[u8]) -> Option<UsageEvent> {
    let mut c = Cursor { rest: bytes };
    let id = c.field(b"{\"id\":", Cursor::string)?;
    let subject = c.field(b",\"subject\":", Cursor::string)?;
    let time = c.field(b",\"time\":", Cursor::time)?;
    let api_key_sha256 = c.optional(b",\"api_key_sha256\":", Cursor::string)?;
    let scope = c.field(b",\"scope\":", Cursor::string)?;
    let model = c.optional(b",\"model\":", Cursor::string)?;
    let group = c.optional(b",\"group\":", Cursor::string)?;
    let requests = c.field(b",\"requests\":", Cursor::integer)?;
    let input_tokens = c.field(b",\"input_tokens\":", Cursor::integer)?;
    let output_tokens = c.field(b",\"output_tokens\":", Cursor::integer)?;
    let cached_tokens = c.field(b",\"cached_tokens\":", Cursor::integer)?;
    let cost_micros = c.optional(b",\"cost_micros\":", Cursor::integer)?;
    let attributes = c.optional(b",\"attributes\":", Cursor::attributes)?.unwrap_or_default();
    let corrects = c.optional(b",\"corrects\":", Cursor::string)?;
    c.literal(b"}")?;
    if !c.rest.is_empty() {
        return None;
    }
    Some(UsageEvent {
        id,
        subject,
        time,
        api_key_sha256,
        scope,
        model,
        group,
        requests,
        input_tokens,
        output_tokens,
        cached_tokens,
        cost_micros,
        attributes,
        corrects,
    })
}

/// The bytes not read yet. Every method consumes what it read and returns `None` when the
/// bytes are not what the canonical form has there.
struct Cursor<'a> {
    rest: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn literal(&mut self, expected: &[u8]) -> Option<()> {
        self.rest = self.rest.strip_prefix(expected)?;
        Some(())
    }

    /// A field that is always there: its key, then its value in canonical form.
    fn field<T>(&mut self, key: &[u8], value: fn(&mut Self) -> Option<T>) -> Option<T> {
        self.literal(key)?;
        value(self)
    }

    /// `Some(None)` when the optional field's key is absent, `Some(Some(value))` when it is
    /// there with a value in canonical form, `None` when its value is not.
    fn optional<T>(&mut self, key: &[u8], value: fn(&mut Self) -> Option<T>) -> Option<Option<T>> {
        match self.literal(key) {
            Some(()) => value(self).map(Some),
            None => Some(None),
        }
    }

    /// A JSON string without escapes. serde_json escapes `"`, `\` and the control
    /// characters and writes everything else as is, so a string that needs no escape has
    /// no backslash and no control character between its quotes.
    fn string(&mut self) -> Option<String> {
        self.literal(b"\"")?;
        let end = self.rest.iter().position(|&b| b == b'"' || b == b'\\' || b < 0x20)?;
        if self.rest[end] != b'"' {
            return None;
        }
        let text = std::str::from_utf8(&self.rest[..end]).ok()?;
        self.rest = &self.rest[end + 1..];
        Some(text.to_owned())
    }

    /// An `i64` as serde_json writes it: `0`, or digits without a leading zero, with a `-`
    /// before negative numbers.
    fn integer(&mut self) -> Option<i64> {
        let negative = self.literal(b"-").is_some();
        let len = self.digit_run();
        let digits = &self.rest[..len];
        if digits.is_empty() || (digits[0] == b'0' && (len > 1 || negative)) {
            return None;
        }
        let mut value: i64 = 0;
        for &d in digits {
            let d = i64::from(d - b'0');
            value = value.checked_mul(10)?;
            value = if negative { value.checked_sub(d)? } else { value.checked_add(d)? };
        }
        self.rest = &self.rest[len..];
        Some(value)
    }

    /// How many ASCII digits come next.
    fn digit_run(&self) -> usize {
        self.rest.iter().position(|b| !b.is_ascii_digit()).unwrap_or(self.rest.len())
    }

    /// Exactly `n` ASCII digits, as a number.
    fn digits(&mut self, n: usize) -> Option<u32> {
        let digits = self.rest.get(..n)?;
        let mut value = 0u32;
        for &d in digits {
            if !d.is_ascii_digit() {
                return None;
            }
            value = value * 10 + u32::from(d - b'0');
        }
        self.rest = &self.rest[n..];
        Some(value)
    }

    /// A time as chrono serializes a `DateTime<Utc>`: `"YYYY-MM-DDTHH:MM:SS[.f]Z"`, where
    /// the fraction is left out at zero nanoseconds and otherwise has 3, 6 or 9 digits,
    /// the fewest that hold the value exactly.
    fn time(&mut self) -> Option<DateTime<Utc>> {
        self.literal(b"\"")?;
        let year = self.digits(4)?;
        self.literal(b"-")?;
        let month = self.digits(2)?;
        self.literal(b"-")?;
        let day = self.digits(2)?;
        self.literal(b"T")?;
        let hour = self.digits(2)?;
        self.literal(b":")?;
        let minute = self.digits(2)?;
        self.literal(b":")?;
        let second = self.digits(2)?;
        let nanos = self.fraction()?;
        self.literal(b"Z\"")?;
        // A second of 60 is a leap second, which chrono keeps in the nanoseconds: declined.
        if second > 59 {
            return None;
        }
        let date = NaiveDate::from_ymd_opt(i32::try_from(year).ok()?, month, day)?;
        Some(date.and_hms_nano_opt(hour, minute, second, nanos)?.and_utc())
    }

    /// The nanoseconds of an optional fraction, only in the form chrono chooses for them.
    fn fraction(&mut self) -> Option<u32> {
        if self.literal(b".").is_none() {
            return Some(0);
        }
        let len = self.digit_run();
        let (nanos, finer) = match len {
            3 => (self.digits(3)? * 1_000_000, 1_000_000_000),
            6 => (self.digits(6)? * 1_000, 1_000_000),
            9 => (self.digits(9)?, 1_000),
            _ => return None,
        };
        // With fewer digits chrono would have written it, or none at all.
        (nanos % finer != 0).then_some(nanos)
    }

    /// A non-empty object of strings, its keys in strictly ascending order (a `BTreeMap`).
    fn attributes(&mut self) -> Option<BTreeMap<String, String>> {
        self.literal(b"{")?;
        let mut attributes = BTreeMap::new();
        loop {
            let key = self.string()?;
            self.literal(b":")?;
            let value = self.string()?;
            if attributes.last_key_value().is_some_and(|(last, _)| *last >= key) {
                return None;
            }
            attributes.insert(key, value);
            if self.literal(b"}").is_some() {
                return Some(attributes);
            }
            self.literal(b",")?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn event(time: &str) -> UsageEvent {
        UsageEvent {
            id: "e1".into(),
            subject: "s1".into(),
            time: time.parse().unwrap(),
            api_key_sha256: None,
            scope: "chat".into(),
            model: Some("gpt-4o-mini".into()),
            group: None,
            requests: 1,
            input_tokens: 300,
            output_tokens: 100,
            cached_tokens: 0,
            cost_micros: None,
            attributes: BTreeMap::new(),
            corrects: None,
        }
    }

    /// `read` keeps its contract on `bytes`: it declines them, or they are the canonical
    /// form of what it read.
    fn holds_contract(bytes: &[u8]) -> Result<(), String> {
        match read(bytes) {
            Some(e) if e.to_canonical_json() != bytes => Err(format!(
                "read {:?} as an event whose canonical form is {:?}",
                String::from_utf8_lossy(bytes),
                String::from_utf8_lossy(&e.to_canonical_json())
            )),
            _ => Ok(()),
        }
    }

    #[test]
    fn reads_the_canonical_form_of_a_typical_event() {
        let e = UsageEvent {
            api_key_sha256: Some("ab".repeat(32)),
            cost_micros: Some(1234),
            attributes: [("a".to_string(), "1".to_string()), ("b".to_string(), "é".to_string())].into(),
            corrects: Some("e0".into()),
            ..event("2026-12-07T04:29:39.759464415Z")
        };
        assert_eq!(read(&e.to_canonical_json()), Some(e));
    }

    #[test]
    fn reads_each_fraction_length_chrono_writes() {
        for time in ["2026-12-07T04:29:39Z", "2026-12-07T04:29:39.759Z", "2026-12-07T04:29:39.759464Z", "2026-12-07T04:29:39.000000001Z"] {
            let e = event(time);
            let bytes = e.to_canonical_json();
            assert!(String::from_utf8_lossy(&bytes).contains(time), "{time} is not written as itself");
            assert_eq!(read(&bytes), Some(e), "{time}");
        }
    }

    #[test]
    fn declines_what_chrono_would_write_otherwise() {
        let canonical = String::from_utf8(event("2026-12-07T04:29:39.100Z").to_canonical_json()).unwrap();
        for other in [
            "04:29:39.100000Z",
            "04:29:39.1Z",
            "04:29:39.10Z",
            "04:29:39.100000000Z",
            "04:29:39.000Z",
            "04:29:60.100Z",
            "04:29:39.100+00:00",
        ] {
            let bytes = canonical.replace("04:29:39.100Z", other);
            assert_eq!(read(bytes.as_bytes()), None, "{other}");
        }
    }

    #[test]
    fn declines_integers_and_strings_written_otherwise() {
        let canonical = String::from_utf8(event("2026-12-07T04:29:39Z").to_canonical_json()).unwrap();
        for (from, to) in [
            ("\"input_tokens\":300", "\"input_tokens\":0300"),
            ("\"input_tokens\":300", "\"input_tokens\":300.0"),
            ("\"input_tokens\":300", "\"input_tokens\":-0"),
            ("\"input_tokens\":300", "\"input_tokens\":99999999999999999999"),
            ("\"input_tokens\":300", "\"input_tokens\": 300"),
            ("\"subject\":\"s1\"", "\"subject\":\"s\\u0031\""),
            ("\"model\":\"gpt-4o-mini\"", "\"model\":null"),
            ("\"cached_tokens\":0}", "\"cached_tokens\":0,\"attributes\":{}}"),
            ("\"cached_tokens\":0}", "\"cached_tokens\":0,\"attributes\":{\"b\":\"1\",\"a\":\"2\"}}"),
            ("\"cached_tokens\":0}", "\"cached_tokens\":0} "),
        ] {
            let bytes = canonical.replace(from, to);
            assert_ne!(bytes, canonical);
            assert_eq!(read(bytes.as_bytes()), None, "{to}");
        }
    }

    /// Events of every shape the reader must handle, with strings that need no escape.
    fn plain_event() -> impl Strategy<Value = UsageEvent> {
        let text = "[a-zé😀/ ]{0,6}";
        let count = prop_oneof![Just(0i64), Just(1), Just(300), Just(-1), Just(i64::MAX), Just(i64::MIN), any::<i64>()];
        let nanos = prop_oneof![
            Just(0u32),
            (0u32..1000).prop_map(|ms| ms * 1_000_000),
            (0u32..1_000_000).prop_map(|us| us * 1000),
            0u32..1_000_000_000
        ];
        (
            (text, text, -62_167_219_200i64..253_402_300_800, nanos, proptest::option::of("[0-9a-f]{64}"), text),
            (proptest::option::of(text), count.clone(), count.clone(), count.clone(), count.clone(), proptest::option::of(count)),
            (proptest::collection::btree_map(text, text, 0..3), proptest::option::of(text), proptest::option::of(text)),
        )
            .prop_map(crate::event::tests::fast_path::event_of_parts)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn reads_back_every_event_whose_strings_need_no_escape(e in plain_event()) {
            prop_assert_eq!(read(&e.to_canonical_json()), Some(e));
        }

        #[test]
        fn a_changed_byte_is_declined_or_still_canonical(e in plain_event(), at in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let mut bytes = e.to_canonical_json();
            let i = at.index(bytes.len());
            bytes[i] = byte;
            holds_contract(&bytes).map_err(TestCaseError::fail)?;
        }

        #[test]
        fn a_removed_or_inserted_byte_is_declined_or_still_canonical(e in plain_event(), at in any::<prop::sample::Index>(), byte in prop::sample::select(b"0123456789.,:\"-{}Z ".to_vec())) {
            let canonical = e.to_canonical_json();
            let i = at.index(canonical.len());
            let mut removed = canonical.clone();
            removed.remove(i);
            holds_contract(&removed).map_err(TestCaseError::fail)?;
            let mut inserted = canonical;
            inserted.insert(i, byte);
            holds_contract(&inserted).map_err(TestCaseError::fail)?;
        }
    }
}
