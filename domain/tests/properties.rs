//! Properties of the parsers and the arithmetic at their bounds, over generated and hostile
//! input. They are the fuzz targets' properties (fuzz/README.md) at a size the test suite
//! can afford: the fuzzers run for minutes, these in about a second.
//!
//! - events: any bytes or JSON-ish object never panic `parse_event`, the fingerprinting
//!   parser agrees with it, and an accepted event stays within `MAX_AMOUNT` and round-trips
//!   through its canonical form;
//! - rates and periods: any string never panics, and an accepted one prints back to itself;
//! - the configuration: mutations of a valid document never panic, every error has a
//!   location, and the limits a valid one resolves to are decided without overflow;
//! - the ledger: `Amounts` saturate exactly where the exact sum leaves `i64`, sums of
//!   bounded amounts are exact, and the decision math matches an `i128` reference.

use chrono::{DateTime, Utc};
use proptest::prelude::*;
use serde_json::{json, Map, Value};
use tally_domain::config::{Config, ModelPrice};
use tally_domain::decision::{quota_state, remaining, thresholds_reached, QuotaState};
use tally_domain::event::{parse_event, parse_event_with_fingerprint, EventError, UsageEvent};
use tally_domain::metric::{Amounts, Metric, MAX_AMOUNT};
use tally_domain::period::PeriodSpec;
use tally_domain::precedence::{resolve, SubjectFacts};
use tally_domain::rate::{apply_tier, Rate};
use tally_domain::tier::{tier_quotas, EffectiveQuota};

// ---- events ----

/// The properties every input to the event parsers keeps (see the module docs).
fn check_event_input(bytes: &[u8]) -> Result<Option<UsageEvent>, TestCaseError> {
    let plain = parse_event(bytes);
    let fast = parse_event_with_fingerprint(bytes);
    let event = match (plain, fast) {
        (Ok(e), Ok((f, fp))) => {
            prop_assert_eq!(&e, &f);
            prop_assert_eq!(fp, e.fingerprint());
            e
        }
        (Err(a), Err(b)) => {
            prop_assert_eq!(&a, &b);
            // Only an unknown field may be named "": its key is the empty string.
            prop_assert!(!a.field.is_empty() || a.message.starts_with("unknown field"), "{}", a);
            return Ok(None);
        }
        (a, b) => return Err(TestCaseError::fail(format!("the parsers disagree: {a:?} / {b:?}"))),
    };
    let amounts = event.amounts();
    for m in Metric::ALL {
        let bound = if m == Metric::TotalTokens { 2 * MAX_AMOUNT } else { MAX_AMOUNT };
        prop_assert!((0..=bound).contains(&amounts.get(m)), "{m} of {event:?}");
    }
    let canonical = event.to_canonical_json();
    let again: Result<UsageEvent, EventError> = parse_event(&canonical);
    prop_assert_eq!(again.as_ref(), Ok(&event), "canonical form {}", String::from_utf8_lossy(&canonical));
    prop_assert_eq!(parse_event_with_fingerprint(&canonical), Ok((event.clone(), event.fingerprint())));
    Ok(Some(event))
}

const EVENT_FIELDS: &[&str] = &[
    "id",
    "subject",
    "time",
    "api_key",
    "api_key_sha256",
    "scope",
    "model",
    "requests",
    "input_tokens",
    "output_tokens",
    "cached_tokens",
    "cost_micros",
    "attributes",
    "corrects",
];
const CLOUDEVENT_FIELDS: &[&str] = &["specversion", "id", "source", "type", "subject", "time", "data", "datacontenttype"];

/// A JSON value such as a sender might put in a field: amounts at and past the bounds,
/// floats, strings of every shape, times at the ends of RFC 3339, nulls, objects.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        prop_oneof![Just(0i64), Just(1), Just(MAX_AMOUNT), Just(MAX_AMOUNT + 1), Just(i64::MAX), Just(-1), Just(i64::MIN), 0..=MAX_AMOUNT,]
            .prop_map(Value::from),
        Just(json!(u64::MAX)),
        prop_oneof![Just(1.5f64), Just(1e15), Just(1e300), Just(-0.0)].prop_map(Value::from),
        prop_oneof![
            Just("2026-11-22T10:00:00Z"),
            Just("2026-11-22T10:00:00.123456789+05:30"),
            Just("2026-06-30T23:59:60Z"),
            Just("0000-01-01T00:00:00Z"),
            Just("0000-01-01T00:00:00+01:00"),
            Just("9999-12-31T23:59:59Z"),
            Just("9999-12-31T23:59:59-01:00"),
            Just("1.0"),
            Just(""),
            Just("9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"),
        ]
        .prop_map(Value::from),
        "[a-zé\"\\\\\n\u{1}😀]{0,6}".prop_map(Value::from),
        Just(Value::String("x".repeat(129))),
    ];
    leaf.prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            proptest::collection::btree_map("[a-z_]{1,6}", inner.clone(), 0..3).prop_map(|m| Value::Object(m.into_iter().collect())),
            proptest::collection::vec(inner, 0..3).prop_map(Value::Array),
        ]
    })
}

/// A plausible value of the field `name`.
fn valid_value(name: &str) -> Value {
    match name {
        "id" => json!("e1"),
        "subject" => json!("alice"),
        "time" => json!("2026-11-22T10:00:00Z"),
        "specversion" => json!("1.0"),
        "source" | "type" => json!("gw"),
        "data" => json!({}),
        "api_key" => json!("sk-1"),
        "attributes" => json!({"k": "v"}),
        "datacontenttype" => json!("application/json"),
        "scope" | "model" | "corrects" => json!("x"),
        _ => json!(7),
    }
}

/// One of `names` with a plausible or a hostile value.
fn event_field(names: &'static [&'static str]) -> impl Strategy<Value = (String, Value)> {
    (proptest::sample::select(names), prop_oneof![3 => Just(None), 2 => json_value().prop_map(Some)])
        .prop_map(|(name, v)| (name.to_string(), v.unwrap_or_else(|| valid_value(name))))
}

/// Now and then a field no event has.
fn unknown_field() -> impl Strategy<Value = Option<(String, Value)>> {
    proptest::option::weighted(0.1, ("[a-z_]{1,12}", json_value()))
}

/// An object with some of an event's fields (or a CloudEvent's, `data` holding the rest),
/// maybe an unknown one, each with a plausible or a hostile value.
fn event_object() -> impl Strategy<Value = Value> {
    let plain = proptest::collection::vec(event_field(EVENT_FIELDS), 0..8);
    let data = proptest::collection::vec(event_field(&EVENT_FIELDS[3..]), 0..5);
    let envelope = (proptest::collection::vec(event_field(CLOUDEVENT_FIELDS), 0..8), data);
    prop_oneof![
        (plain, unknown_field()).prop_map(|(fields, extra)| {
            let mut obj: Map<String, Value> = ["id", "subject", "time"].iter().map(|n| (n.to_string(), valid_value(n))).collect();
            obj.extend(fields);
            obj.extend(extra);
            Value::Object(obj)
        }),
        (envelope, unknown_field()).prop_map(|((fields, data), extra)| {
            let mut obj: Map<String, Value> = CLOUDEVENT_FIELDS[..6].iter().map(|n| (n.to_string(), valid_value(n))).collect();
            obj.extend(fields);
            if let Some(Value::Object(d)) = obj.get_mut("data") {
                d.extend(data);
            }
            obj.extend(extra);
            Value::Object(obj)
        }),
    ]
}

/// Canonical bytes of valid events, the fast path's input.
fn canonical_event() -> impl Strategy<Value = Vec<u8>> {
    let amount = prop_oneof![Just(0i64), Just(MAX_AMOUNT), 0..=MAX_AMOUNT];
    (amount.clone(), amount.clone(), proptest::option::of(amount), "[a-z\"é]{1,4}", 0i64..253_402_300_799).prop_map(
        |(input, output, cost, model, secs)| {
            let e = json!({"id": "e1", "subject": "a", "time": DateTime::from_timestamp(secs, 0).unwrap(),
                           "model": model, "input_tokens": input, "output_tokens": output, "cost_micros": cost});
            parse_event(&serde_json::to_vec(&e).unwrap()).unwrap().to_canonical_json()
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn any_bytes_never_panic_the_event_parsers(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        check_event_input(&bytes)?;
    }

    #[test]
    fn json_ish_events_are_accepted_within_bounds_and_round_trip(obj in event_object(), pretty in any::<bool>()) {
        let bytes = if pretty { serde_json::to_vec_pretty(&obj) } else { serde_json::to_vec(&obj) }.unwrap();
        check_event_input(&bytes)?;
    }

    #[test]
    fn mutated_canonical_events_keep_the_properties(
        bytes in canonical_event(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0..3u8), 1..3),
    ) {
        prop_assert!(check_event_input(&bytes)?.is_some());
        let mut bytes = bytes;
        for (at, byte, kind) in edits {
            let i = at.index(bytes.len() + 1);
            match kind {
                0 if i < bytes.len() => bytes[i] = byte,
                1 => bytes.insert(i, byte),
                _ if i < bytes.len() => { bytes.remove(i); }
                _ => {}
            }
        }
        check_event_input(&bytes)?;
    }
}

#[test]
fn an_offset_time_outside_years_0_to_9999_in_utc_is_refused_naming_time() {
    // RFC 3339 writes years 0000 to 9999 only. These times are in range as written, but
    // not in UTC, where the canonical form would carry `-0001` or `+10000` and be refused.
    for time in ["0000-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"] {
        let e = parse_event(json!({"id": "e", "subject": "a", "time": time}).to_string().as_bytes()).unwrap_err();
        assert_eq!(e.field, "time", "{time}: {e}");
    }
    for time in ["0000-01-01T00:00:00Z", "0000-01-01T01:00:00+01:00", "9999-12-31T23:59:59.999999999Z"] {
        let bytes = json!({"id": "e", "subject": "a", "time": time}).to_string();
        assert!(check_event_input(bytes.as_bytes()).unwrap().is_some(), "{time}");
    }
}

// ---- rates and periods ----

const WINDOW_WORDS: &[&str] = &[
    "s",
    "sec",
    "second",
    "m",
    "min",
    "minutes",
    "h",
    "hr",
    "hours",
    "d",
    "day",
    "days",
    "w",
    "wk",
    "week",
    "mo",
    "mon",
    "month",
    "months",
    "y",
    "yr",
    "year",
    "rolling",
    "month@",
    "@",
    "fortnight",
    "",
];

/// A window as an operator might write it: a number or none, spaces, a unit word, an
/// anchor, `rolling` before or after.
fn window_text() -> impl Strategy<Value = String> {
    let count = prop_oneof![
        Just(String::new()),
        (0u64..400).prop_map(|n| n.to_string()),
        Just("31622400".to_string()),
        Just("31622401".to_string()),
        Just("18446744073709551616".to_string()),
        Just("-5".to_string()),
    ];
    let space = prop_oneof![Just(""), Just(" "), Just("  ")];
    let anchor = prop_oneof![3 => Just(String::new()), 1 => (0u32..40).prop_map(|d| format!("@{d}")), 1 => Just("@x".to_string())];
    let rolling = prop_oneof![3 => Just(0u8), 1 => Just(1), 1 => Just(2)];
    (count, space, proptest::sample::select(WINDOW_WORDS), anchor, rolling).prop_map(|(n, sp, word, anchor, rolling)| {
        let body = format!("{n}{sp}{word}{anchor}");
        match rolling {
            1 => format!("rolling{sp} {body}"),
            2 => format!("{body} rolling"),
            _ => body,
        }
    })
}

fn limit_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<u64>().prop_map(|n| n.to_string()),
        (0u64..1_000_000).prop_map(|n| n.to_string()),
        Just("100_000".to_string()),
        Just("1__0".to_string()),
        Just("18446744073709551616".to_string()),
        Just("-1".to_string()),
        Just("1.5".to_string()),
        Just(String::new()),
    ]
}

fn check_period_text(text: &str) -> Result<(), TestCaseError> {
    if let Ok(spec) = text.parse::<PeriodSpec>() {
        let shown = spec.to_string();
        prop_assert_eq!(shown.parse::<PeriodSpec>(), Ok(spec), "`{}` displays as `{}`", text, shown);
    }
    Ok(())
}

fn check_rate_text(text: &str) -> Result<(), TestCaseError> {
    if let Ok(rate) = text.parse::<Rate>() {
        let shown = rate.to_string();
        prop_assert_eq!(shown.parse::<Rate>(), Ok(rate), "`{}` displays as `{}`", text, shown);
        prop_assert_eq!(shown.parse::<Rate>().unwrap().to_string(), shown);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn any_string_never_panics_the_rate_and_period_parsers(text in prop_oneof![any::<String>(), "[0-9a-z _/@|.-]{0,16}"]) {
        check_period_text(&text)?;
        check_rate_text(&text)?;
    }

    #[test]
    fn written_periods_and_rates_round_trip(window in window_text(), limit in limit_text(), slash in prop_oneof![Just("/"), Just(" / ")]) {
        check_period_text(&window)?;
        check_rate_text(&format!("{limit}{slash}{window}"))?;
    }

    #[test]
    fn fixed_windows_parse_to_their_length(n in 1u64..=366, unit in proptest::sample::select(vec![("s", 1u64), ("m", 60), ("h", 3_600), ("d", 86_400)])) {
        let text = format!("{n}{}", unit.0);
        let seconds = n * unit.1;
        let parsed = text.parse::<PeriodSpec>();
        if seconds <= 366 * 86_400 {
            prop_assert_eq!(parsed, Ok(PeriodSpec::Fixed { seconds }));
        } else {
            prop_assert!(parsed.is_err());
        }
    }

    #[test]
    fn windows_at_any_instant_never_panic(window in window_text(), secs in prop_oneof![Just(i64::MIN), Just(i64::MAX), -9_000_000_000_000i64..9_000_000_000_000]) {
        let Ok(spec) = window.parse::<PeriodSpec>() else { return Ok(()) };
        let at = DateTime::from_timestamp(secs, 0).unwrap_or(DateTime::<Utc>::MIN_UTC);
        for tz in [chrono_tz::Tz::UTC, chrono_tz::Tz::America__Santiago, chrono_tz::Tz::Pacific__Chatham] {
            let w = spec.window(at, tz);
            prop_assert!(w.start <= w.end);
            let _ = spec.resets_at(at, tz);
            let _ = spec.next(&w, tz);
        }
    }
}

// ---- the configuration ----

const DOCUMENT: &str = "\
default_tier: free
timezone: UTC
quotas:
  - name: rpm
    metric: requests
    rate: 20/m
    burst: 5
  - name: monthly_tokens
    metric: total_tokens
    period: month
    limit: 1000000
    thresholds: [80, 95, 100]
tiers:
  - name: free
    rate_multiplier: 1
  - name: pro
    priority: 10
    rate_multiplier: 10
    action: degrade
    fallback_model: small
    explicit_limits:
      - {scope: batch, metric: requests, quota: rpm, rate: 5000/h}
    quotas:
      - {name: daily_cost, metric: cost_micros, period: day, limit: 1000000, scope: chat}
groups: {staff: pro}
members: {alice: [staff]}
assignments:
  - {subject: bob, tier: pro, expires_at: 2027-01-01T00:00:00Z}
overrides:
  - {subject: carol, quota: rpm, limit: 1000, expires_at: 2027-01-01T00:00:00Z, reason: r, created_by: ops}
prices:
  m: {input: 2500000, output: 10000000}
";

/// Values that test each field's checks: the ends of the integer types, floats that are
/// not numbers, YAML's special forms, the wrong shapes.
const HOSTILE: &[&str] = &[
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775808",
    "18446744073709551615",
    "-1",
    "0",
    "1.7976931348623157e308",
    "5e-324",
    ".inf",
    "-.inf",
    ".nan",
    "~",
    "[]",
    "{}",
    "''",
    "\"\"",
    "x",
    "9223372036854775807/m",
    "18446744073709551615/s",
    "0/rolling 366d",
    "month@31",
    "&a 1",
    "*a",
    "!!binary AAAA",
    "0000-01-01T00:00:00+01:00",
    "[1000, 1000]",
    "[0]",
    "block",
    "degrade",
    "Europe/London",
];

/// How to mutate one line of the document.
#[derive(Debug, Clone)]
enum Edit {
    /// Replace the value after the line's first `: ` (or the whole line) with a hostile one.
    Value(&'static str),
    Delete,
    Duplicate,
    /// Indent the line by one more or one fewer space.
    Indent(bool),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        6 => proptest::sample::select(HOSTILE).prop_map(Edit::Value),
        1 => Just(Edit::Delete),
        1 => Just(Edit::Duplicate),
        1 => any::<bool>().prop_map(Edit::Indent),
    ]
}

fn mutate(doc: &str, edits: &[(prop::sample::Index, Edit)]) -> String {
    let mut lines: Vec<String> = doc.lines().map(str::to_string).collect();
    for (at, edit) in edits {
        let i = at.index(lines.len());
        match edit {
            Edit::Value(v) => {
                let line = &lines[i];
                lines[i] = match line.find(": ") {
                    Some(c) => format!("{}: {v}", &line[..c]),
                    None => format!("{}{v}", &line[..line.len() - line.trim_start().len()]),
                };
            }
            Edit::Delete => {
                lines.remove(i);
            }
            Edit::Duplicate => lines.insert(i, lines[i].clone()),
            Edit::Indent(deeper) => {
                lines[i] = if *deeper { format!(" {}", lines[i]) } else { lines[i].strip_prefix(' ').unwrap_or(&lines[i]).to_string() }
            }
        }
        if lines.is_empty() {
            break;
        }
    }
    lines.join("\n")
}

const USED: [i64; 8] = [0, 1, MAX_AMOUNT - 1, MAX_AMOUNT, 2 * MAX_AMOUNT, 4 * MAX_AMOUNT, i64::MAX, -MAX_AMOUNT];

fn check_quotas(quotas: &[EffectiveQuota]) -> Result<(), TestCaseError> {
    for q in quotas {
        prop_assert!(q.limit >= 0 && q.burst >= 0, "{:?}", q);
        for used in USED {
            let state = quota_state(used, q.limit, q.burst, &q.thresholds);
            let _ = thresholds_reached(used, q.limit, &q.thresholds);
            prop_assert_eq!(remaining(used, q.limit, q.burst) == 0, state == QuotaState::Breached);
        }
    }
    Ok(())
}

/// Every error of a refused configuration says where; a valid one resolves, for each
/// tier, subject and scope it names, to quotas decided without overflow.
fn check_config(text: &str) -> Result<(), TestCaseError> {
    let config = match Config::from_yaml_str(text) {
        Ok(c) => c,
        Err(errors) => {
            prop_assert!(!errors.0.is_empty());
            for e in &errors.0 {
                prop_assert!(
                    !e.path.is_empty() || e.line.is_some() || e.message.contains("configuration is empty"),
                    "no location: {:?}",
                    e
                );
            }
            return Ok(());
        }
    };
    let mut scopes = vec![String::new(), "batch".to_string(), "chat".to_string()];
    scopes.extend(config.overrides.iter().filter_map(|o| o.scope.clone()));
    let mut subjects: Vec<String> = config.overrides.iter().map(|o| o.subject.clone()).collect();
    subjects.extend(config.assignments.iter().map(|a| a.subject.clone()));
    subjects.extend(config.members.keys().cloned());
    subjects.push("nobody".into());
    let at: DateTime<Utc> = "2026-11-22T10:00:00Z".parse().unwrap();
    for scope in &scopes {
        check_quotas(&tier_quotas(&config.quotas, None, scope))?;
        for tier in &config.tiers {
            check_quotas(&tier_quotas(&config.quotas, Some(tier), scope))?;
        }
        for subject in &subjects {
            let r = resolve(&config, &SubjectFacts { subject, groups: &[], api_key_sha256: None, scope }, at);
            check_quotas(&r.quotas)?;
        }
    }
    for price in config.prices.values() {
        prop_assert!(price.cost_micros(MAX_AMOUNT, MAX_AMOUNT, MAX_AMOUNT) >= 0);
    }
    Ok(())
}

#[test]
fn the_document_mutated_here_is_valid() {
    let c = Config::from_yaml_str(DOCUMENT).unwrap();
    assert_eq!(c.tiers.len(), 2);
    check_config(DOCUMENT).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn mutated_configurations_never_panic_and_errors_say_where(edits in proptest::collection::vec((any::<prop::sample::Index>(), edit()), 1..4)) {
        check_config(&mutate(DOCUMENT, &edits))?;
    }

    #[test]
    fn any_limit_times_any_multiplier_resolves_within_i64(
        limit in prop_oneof![Just(i64::MAX), Just(MAX_AMOUNT), 0i64..=i64::MAX],
        burst in prop_oneof![Just(0i64), Just(i64::MAX), 0i64..=i64::MAX],
        multiplier in prop_oneof![Just(f64::MAX), Just(f64::MIN_POSITIVE), Just(5e-324), Just(1.0000000000000002), 1e-12f64..1e12],
    ) {
        let text = format!(
            "default_tier: t\nquotas: [{{name: q, metric: requests, period: day, limit: {limit}, burst: {burst}, thresholds: [1, 99, 1000]}}]\ntiers: [{{name: t, rate_multiplier: {multiplier:e}}}]\n"
        );
        let config = Config::from_yaml_str(&text).unwrap();
        let tier = config.tier("t").unwrap();
        prop_assert_eq!(tier.rate_multiplier, multiplier);
        let quotas = tier_quotas(&config.quotas, Some(tier), "");
        let expected = i64::try_from(apply_tier(limit as u64, multiplier)).unwrap_or(i64::MAX);
        prop_assert_eq!(quotas[0].limit, expected);
        check_quotas(&quotas)?;
    }
}

// ---- the ledger ----

fn clamp(n: i128) -> i64 {
    i64::try_from(n).unwrap_or(if n < 0 { i64::MIN } else { i64::MAX })
}

fn any_amounts(value: impl Strategy<Value = i64> + Clone) -> impl Strategy<Value = Amounts> {
    (value.clone(), value.clone(), value.clone(), value.clone(), value).prop_map(
        |(requests, input_tokens, output_tokens, cached_tokens, cost_micros)| Amounts {
            requests,
            input_tokens,
            output_tokens,
            cached_tokens,
            cost_micros,
        },
    )
}

fn fields(a: &Amounts) -> [i64; 5] {
    [a.requests, a.input_tokens, a.output_tokens, a.cached_tokens, a.cost_micros]
}

/// Usage as a ledger may hold it: at the bound and a few times past it, negative after
/// corrections, and at the ends of i64.
fn any_used() -> impl Strategy<Value = i64> {
    prop_oneof![Just(0i64), Just(MAX_AMOUNT), Just(i64::MAX), Just(i64::MIN), -MAX_AMOUNT..=4 * MAX_AMOUNT, any::<i64>(),]
}

/// Limits and bursts up to the largest a configuration gives (`i64::MAX`).
fn any_limit() -> impl Strategy<Value = i64> {
    prop_oneof![Just(0i64), Just(1), Just(MAX_AMOUNT), Just(i64::MAX), 0..=4 * MAX_AMOUNT, 0..=i64::MAX]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn amounts_saturate_exactly_where_the_sum_leaves_i64(a in any_amounts(any::<i64>()), b in any_amounts(prop_oneof![Just(i64::MIN), Just(i64::MAX), any::<i64>()])) {
        let mut sum = a;
        sum += b;
        let mut difference = a;
        difference -= b;
        for ((x, y), (s, d)) in fields(&a).into_iter().zip(fields(&b)).zip(fields(&sum).into_iter().zip(fields(&difference))) {
            prop_assert_eq!(s, clamp(i128::from(x) + i128::from(y)));
            prop_assert_eq!(d, clamp(i128::from(x) - i128::from(y)));
        }
        for (x, n) in fields(&a).into_iter().zip(fields(&a.negated())) {
            prop_assert_eq!(n, clamp(-i128::from(x)));
        }
        prop_assert_eq!(a.get(Metric::TotalTokens), clamp(i128::from(a.input_tokens) + i128::from(a.output_tokens)));
    }

    #[test]
    fn sums_of_bounded_amounts_are_exact(rows in proptest::collection::vec(any_amounts(prop_oneof![Just(MAX_AMOUNT), 0..=MAX_AMOUNT]), 0..9)) {
        let mut sum = Amounts::default();
        for row in &rows {
            sum += *row;
        }
        for m in Metric::ALL {
            let exact: i128 = rows.iter().map(|r| i128::from(r.get(m))).sum();
            prop_assert_eq!(i128::from(sum.get(m)), exact);
        }
        // Taking each row back out returns to zero, exactly.
        for row in &rows {
            sum -= *row;
        }
        prop_assert_eq!(sum, Amounts::default());
    }

    #[test]
    fn decisions_match_an_i128_reference(
        used in any_used(),
        limit in any_limit(),
        burst in prop_oneof![Just(0i64), any_limit()],
        thresholds in proptest::collection::vec(1u32..=1000, 0..4),
    ) {
        let cap = i128::from(limit.saturating_add(burst));
        let breached = i128::from(used) >= cap;
        let reached: Vec<u32> = {
            let mut r: Vec<u32> = thresholds.iter().copied().filter(|&t| i128::from(used) * 100 >= i128::from(limit) * i128::from(t)).collect();
            r.sort_unstable();
            r.dedup();
            r
        };
        let state = quota_state(used, limit, burst, &thresholds);
        let expected = if breached {
            QuotaState::Breached
        } else if reached.iter().any(|&t| t < 100) {
            QuotaState::Warning
        } else {
            QuotaState::Ok
        };
        prop_assert_eq!(state, expected);
        prop_assert_eq!(thresholds_reached(used, limit, &thresholds), reached);
        let left = remaining(used, limit, burst);
        prop_assert_eq!(i128::from(left), (cap - i128::from(used)).clamp(0, i128::from(i64::MAX)));
        prop_assert_eq!(left == 0, breached);
    }

    #[test]
    fn prices_never_overflow(
        tokens in (any_used(), any_used(), any_used()),
        price in (any::<u64>(), any::<u64>(), any::<u64>()),
    ) {
        let p = ModelPrice { input: price.0, output: price.1, cached: price.2 };
        let cost = p.cost_micros(tokens.0, tokens.1, tokens.2);
        let terms = [
            i128::from(tokens.0) * i128::from(p.input),
            i128::from(tokens.1) * i128::from(p.output),
            i128::from(tokens.2) * i128::from(p.cached),
        ];
        // The exact sum, if it fits an i128: some order of the three additions does not
        // overflow then (opposite signs first).
        let orders = [[0, 1, 2], [0, 2, 1], [1, 2, 0]];
        let exact = orders.iter().find_map(|[a, b, c]| terms[*a].checked_add(terms[*b])?.checked_add(terms[*c]));
        match exact {
            Some(total) => {
                let (q, r) = (total.div_euclid(1_000_000), total.rem_euclid(1_000_000));
                let q = if r > 500_000 || (r == 500_000 && q % 2 != 0) { q + 1 } else { q };
                prop_assert_eq!(cost, clamp(q));
            }
            // Out of i128: far out of i64, on the side of the terms.
            None => prop_assert!(cost == i64::MAX || cost == i64::MIN),
        }
    }
}

#[test]
fn bounded_amounts_priced_at_any_price_stay_within_i64() {
    let dear = ModelPrice { input: u64::MAX, output: u64::MAX, cached: u64::MAX };
    assert_eq!(dear.cost_micros(MAX_AMOUNT, MAX_AMOUNT, MAX_AMOUNT), i64::MAX);
    // Two terms that overflow an i128 together, cancelled by the third.
    assert_eq!(dear.cost_micros(i64::MAX, 2, i64::MIN), 18_446_744_073_710);
}
