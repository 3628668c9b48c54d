//! Rates ("10/m", "5000/h", "100000/month") and how a tier changes a limit.
//!
//! # Grammar
//!
//! `<limit>/<window>`, spaces allowed around `/`. `<limit>` is a whole number (`_` may
//! separate digit groups: `100_000`). `<window>` is any [`PeriodSpec`] (see
//! [`crate::period`]), so:
//! - `s`, `m`/`min`, `h`, `N s|m|h|d` (`5/30s`, `2/3h`, `10/1d`) are fixed windows aligned
//!   to the UTC epoch;
//! - the calendar units `d`/`day`, `w`/`week`, `mo`/`month`, `y`/`year` (`100/d`,
//!   `1000/day`, `100000/month`, `1/week`) are calendar periods in the subject's
//!   timezone; `month@15` and `rolling 7d` work too.
//!
//! `Display` prints `<limit>/<canonical window>` (`10/m` prints `10/1m`), which parses back
//! to the same rate.
//!
//! [`Rate::window_seconds`] is the window's nominal length ([`PeriodSpec::nominal_seconds`]):
//! exact for fixed and rolling windows; for calendar units day = 86 400, week = 604 800,
//! month = 30 days = 2 592 000 and year = 365 days = 31 536 000. Quotas use the calendar
//! period itself, never this number.
//!
//! # Tiers
//!
//! [`apply_tier`] multiplies a base limit by a tier's `rate_multiplier`, rounding to the
//! nearest integer with ties to even, never below 1. The multiplier is taken as the decimal
//! the operator wrote (the shortest decimal that reads back as the same `f64`), and the
//! product is computed exactly, so `10 × 0.35` is `3.5`, rounded to `4`, not the `3` a
//! binary `0.34999…` would give. [`tiered_rate`] adds the rule that an explicit limit for
//! the active scope replaces the base rate outright.

use std::fmt;
use std::str::FromStr;

use crate::period::{PeriodError, PeriodSpec};

/// A limit per window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rate {
    pub limit: u64,
    pub period: PeriodSpec,
}

impl Rate {
    /// The window's nominal length in seconds (see the module docs).
    pub fn window_seconds(&self) -> u64 {
        self.period.nominal_seconds()
    }
}

/// Why a rate string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RateError {
    #[error("empty rate: expected <limit>/<window>, e.g. 10/m")]
    Empty,
    #[error("`{input}` has no `/`: expected <limit>/<window>, e.g. 10/m")]
    MissingSlash { input: String },
    #[error("missing number before `/` in `{input}`: expected e.g. 10/m")]
    MissingLimit { input: String },
    #[error("negative limit in `{input}`: the limit must be 0 or more")]
    NegativeLimit { input: String },
    #[error("limit `{limit}` in `{input}` is not a whole number")]
    BadLimit { limit: String, input: String },
    #[error("limit in `{input}` is too large (at most {max})", max = u64::MAX)]
    LimitTooLarge { input: String },
    #[error("missing window after `/` in `{input}`: expected e.g. 10/m")]
    MissingWindow { input: String },
    #[error("bad window in rate `{input}`: {source}")]
    Window { input: String, source: PeriodError },
}

fn parse_limit(text: &str, input: &str) -> Result<u64, RateError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(RateError::MissingLimit { input: input.to_string() });
    }
    if text.starts_with('-') {
        return Err(RateError::NegativeLimit { input: input.to_string() });
    }
    let well_formed = text.starts_with(|c: char| c.is_ascii_digit())
        && !text.ends_with('_')
        && !text.contains("__")
        && text.chars().all(|c| c.is_ascii_digit() || c == '_');
    if !well_formed {
        return Err(RateError::BadLimit { limit: text.to_string(), input: input.to_string() });
    }
    text.replace('_', "").parse().map_err(|_| RateError::LimitTooLarge { input: input.to_string() })
}

impl FromStr for Rate {
    type Err = RateError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let input = s.trim();
        if input.is_empty() {
            return Err(RateError::Empty);
        }
        let Some((limit, window)) = input.split_once('/') else {
            return Err(if input.chars().all(|c| c.is_ascii_digit()) {
                RateError::MissingWindow { input: input.to_string() }
            } else {
                RateError::MissingSlash { input: input.to_string() }
            });
        };
        let limit = parse_limit(limit, input)?;
        if window.trim().is_empty() {
            return Err(RateError::MissingWindow { input: input.to_string() });
        }
        let period = window.parse().map_err(|source| RateError::Window { input: input.to_string(), source })?;
        Ok(Rate { limit, period })
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.limit, self.period)
    }
}

impl serde::Serialize for Rate {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Rate {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Whether `multiplier` is usable as a tier's `rate_multiplier`: finite and above zero.
pub fn valid_multiplier(multiplier: f64) -> bool {
    multiplier.is_finite() && multiplier > 0.0
}

/// `base × multiplier`, rounded to the nearest integer with ties to even, never below 1,
/// saturating at `u64::MAX`. A multiplier of exactly 1 returns `base` unchanged (even 0).
/// The multiplier is read as the decimal it prints as (see the module docs). An invalid
/// multiplier (see [`valid_multiplier`]; configuration validation rejects those) also
/// returns `base` unchanged.
pub fn apply_tier(base: u64, multiplier: f64) -> u64 {
    if multiplier == 1.0 || !valid_multiplier(multiplier) {
        return base;
    }
    let Some((digits, exponent)) = decimal_parts(multiplier) else {
        return base;
    };
    // At most 17 significant digits: digits < 10^17, so the product fits in a u128.
    let product = u128::from(base) * digits;
    let rounded = if exponent >= 0 {
        10u128.checked_pow(exponent.unsigned_abs()).and_then(|p| product.checked_mul(p)).unwrap_or(u128::MAX)
    } else {
        match 10u128.checked_pow(exponent.unsigned_abs()) {
            Some(denominator) => divide_round_half_even(product, denominator),
            // 10^39 and beyond: the product is below 0.01.
            None => 0,
        }
    };
    u64::try_from(rounded).unwrap_or(u64::MAX).max(1)
}

/// `value = digits × 10^exponent`, from the shortest decimal that reads back as `value`.
fn decimal_parts(value: f64) -> Option<(u128, i32)> {
    let text = format!("{value}");
    let (int, frac) = text.split_once('.').unwrap_or((text.as_str(), ""));
    let mut digits: String = format!("{int}{frac}").trim_start_matches('0').to_string();
    let mut exponent = -i32::try_from(frac.len()).ok()?;
    while digits.len() > 1 && digits.ends_with('0') {
        digits.pop();
        exponent += 1;
    }
    if digits.is_empty() {
        return Some((0, 0));
    }
    Some((digits.parse().ok()?, exponent))
}

fn divide_round_half_even(numerator: u128, denominator: u128) -> u128 {
    let quotient = numerator / denominator;
    let remainder = numerator % denominator;
    let twice = remainder.saturating_mul(2);
    if twice > denominator || (twice == denominator && quotient % 2 == 1) {
        quotient + 1
    } else {
        quotient
    }
}

/// The rate that applies in `scope` under a tier: the tier's explicit rate for that scope
/// if it has one (the first match in `explicit`); otherwise the base limit multiplied by
/// the tier's multiplier ([`apply_tier`]) over the base window; with no tier
/// (`multiplier = None`) the base rate unchanged.
pub fn tiered_rate(base: &Rate, multiplier: Option<f64>, explicit: &[(String, Rate)], scope: Option<&str>) -> Rate {
    if let Some(scope) = scope {
        if let Some((_, rate)) = explicit.iter().find(|(s, _)| s == scope) {
            return *rate;
        }
    }
    match multiplier {
        Some(m) => Rate { limit: apply_tier(base.limit, m), period: base.period },
        None => *base,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rate(s: &str) -> Rate {
        s.parse().unwrap()
    }

    #[test]
    fn parses_rates() {
        let cases: &[(&str, u64, PeriodSpec, u64)] = &[
            ("10/m", 10, PeriodSpec::Fixed { seconds: 60 }, 60),
            ("10/min", 10, PeriodSpec::Fixed { seconds: 60 }, 60),
            ("10/minute", 10, PeriodSpec::Fixed { seconds: 60 }, 60),
            ("5000/h", 5000, PeriodSpec::Fixed { seconds: 3_600 }, 3_600),
            ("5/30s", 5, PeriodSpec::Fixed { seconds: 30 }, 30),
            ("2/3h", 2, PeriodSpec::Fixed { seconds: 10_800 }, 10_800),
            ("1/s", 1, PeriodSpec::Fixed { seconds: 1 }, 1),
            ("10/1d", 10, PeriodSpec::Fixed { seconds: 86_400 }, 86_400),
            ("100/d", 100, PeriodSpec::Day, 86_400),
            ("1000/day", 1000, PeriodSpec::Day, 86_400),
            ("1/week", 1, PeriodSpec::Week, 604_800),
            ("100000/month", 100_000, PeriodSpec::Month, 2_592_000),
            ("100_000/mo", 100_000, PeriodSpec::Month, 2_592_000),
            ("12/year", 12, PeriodSpec::Year, 31_536_000),
            ("50/month@15", 50, PeriodSpec::MonthAnchored { day: 15 }, 2_592_000),
            ("700/rolling 7d", 700, PeriodSpec::Rolling { days: 7 }, 604_800),
            (" 10 / m ", 10, PeriodSpec::Fixed { seconds: 60 }, 60),
            ("0/m", 0, PeriodSpec::Fixed { seconds: 60 }, 60),
        ];
        for (text, limit, period, seconds) in cases {
            let r = rate(text);
            assert_eq!((r.limit, r.period, r.window_seconds()), (*limit, *period, *seconds), "{text}");
        }
    }

    #[test]
    fn rejects_with_the_reason() {
        let window = |check: fn(&PeriodError) -> bool| move |e: &RateError| matches!(e, RateError::Window { source, .. } if check(source));
        type Check = Box<dyn Fn(&RateError) -> bool>;
        let cases: Vec<(&str, Check)> = vec![
            ("", Box::new(|e| matches!(e, RateError::Empty))),
            ("/m", Box::new(|e| matches!(e, RateError::MissingLimit { .. }))),
            ("-5/m", Box::new(|e| matches!(e, RateError::NegativeLimit { .. }))),
            ("ten/m", Box::new(|e| matches!(e, RateError::BadLimit { .. }))),
            ("1.5/m", Box::new(|e| matches!(e, RateError::BadLimit { .. }))),
            ("99999999999999999999/m", Box::new(|e| matches!(e, RateError::LimitTooLarge { .. }))),
            ("10", Box::new(|e| matches!(e, RateError::MissingWindow { .. }))),
            ("10/", Box::new(|e| matches!(e, RateError::MissingWindow { .. }))),
            ("10m", Box::new(|e| matches!(e, RateError::MissingSlash { .. }))),
            ("5/0s", Box::new(window(|p| matches!(p, PeriodError::ZeroWindow { .. })))),
            ("5/-30s", Box::new(window(|p| matches!(p, PeriodError::NegativeWindow { .. })))),
            ("5/fortnight", Box::new(window(|p| matches!(p, PeriodError::UnknownUnit { unit, .. } if unit == "fortnight")))),
            ("5/m extra", Box::new(window(|p| matches!(p, PeriodError::TrailingGarbage { garbage, .. } if garbage == "extra")))),
            ("5/m/h", Box::new(window(|p| matches!(p, PeriodError::TrailingGarbage { garbage, .. } if garbage == "/h")))),
            ("5/30", Box::new(window(|p| matches!(p, PeriodError::MissingUnit { .. })))),
            ("5/2month", Box::new(window(|p| matches!(p, PeriodError::CountOnCalendarUnit { .. })))),
        ];
        for (text, check) in cases {
            let err = text.parse::<Rate>().expect_err(text);
            assert!(check(&err), "{text:?} gave {err:?}");
        }
    }

    #[test]
    fn error_messages_say_what_is_wrong() {
        let msg = |s: &str| s.parse::<Rate>().unwrap_err().to_string();
        assert!(msg("5/0s").contains("zero-length window"), "{}", msg("5/0s"));
        assert!(msg("5/-3s").contains("negative window"));
        assert!(msg("/m").contains("missing number"));
        assert!(msg("5/parsec").contains("unknown unit `parsec`"));
        assert!(msg("5/m!!").contains("trailing `!!`"));
    }

    #[test]
    fn apply_tier_rounds_half_to_even_and_never_below_one() {
        let cases: &[(u64, f64, u64)] = &[
            (10, 3.0, 30),
            (10, 1.0, 10),
            (0, 1.0, 0),
            (10, 0.25, 2), // 2.5 -> 2
            (10, 0.35, 4), // 3.5 -> 4 (decimal 0.35, not binary 0.34999...)
            (10, 0.45, 4), // 4.5 -> 4
            (10, 0.55, 6), // 5.5 -> 6
            (3, 1.5, 4),   // 4.5 -> 4
            (5, 1.5, 8),   // 7.5 -> 8
            (1001, 0.5, 500),
            (1003, 0.5, 502),
            (1000, 1.0005, 1000), // 1000.5 -> 1000
            (1, 0.1, 1),          // 0.1 -> 0 -> at least 1
            (1, 1e-300, 1),
            (0, 2.0, 1),
            (7, 2.675, 19), // 18.725 -> 19
            (u64::MAX, 2.0, u64::MAX),
            (1_000_000, 1e300, u64::MAX),
            (100, f64::NAN, 100),
            (100, -2.0, 100),
            (100, 0.0, 100),
        ];
        for &(base, m, want) in cases {
            assert_eq!(apply_tier(base, m), want, "{base} x {m}");
        }
    }

    #[test]
    fn explicit_scope_limit_wins_over_the_multiplier() {
        let base = rate("10/m");
        let explicit = vec![("api".to_string(), rate("5000/h"))];
        let tripled = tiered_rate(&base, Some(3.0), &explicit, None);
        assert_eq!((tripled.limit, tripled.window_seconds()), (30, 60));
        let api = tiered_rate(&base, Some(3.0), &explicit, Some("api"));
        assert_eq!((api.limit, api.window_seconds()), (5000, 3600));
        let other_scope = tiered_rate(&base, Some(3.0), &explicit, Some("chat"));
        assert_eq!((other_scope.limit, other_scope.window_seconds()), (30, 60));
        let no_tier = tiered_rate(&base, None, &[], Some("api"));
        assert_eq!((no_tier.limit, no_tier.window_seconds()), (10, 60));
    }

    proptest! {
        #[test]
        fn rounding_never_returns_zero(base in 0u64..u64::MAX, m in 1e-12f64..1e12) {
            prop_assume!(m != 1.0);
            prop_assert!(apply_tier(base, m) >= 1);
        }

        #[test]
        fn multiplier_one_is_identity(base in any::<u64>()) {
            prop_assert_eq!(apply_tier(base, 1.0), base);
        }

        #[test]
        fn result_is_the_nearest_integer(base in 1u64..1_000_000_000, m in 0.001f64..1000.0) {
            let got = apply_tier(base, m) as f64;
            let exact = base as f64 * m;
            // Within half a unit of the product (plus float noise), unless clamped to 1.
            prop_assert!((got - exact).abs() <= 0.5 + exact * 1e-12 || (got == 1.0 && exact < 1.0), "{base} x {m} = {got}");
        }

        #[test]
        fn monotone_in_the_base(a in 0u64..1_000_000_000_000, b in 0u64..1_000_000_000_000, m in 0.001f64..1000.0) {
            let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
            prop_assert!(apply_tier(lo, m) <= apply_tier(hi, m));
        }

        #[test]
        fn display_round_trips(limit in any::<u64>(), text in proptest::sample::select(vec!["m", "30s", "2h", "day", "week", "month", "year", "month@31", "rolling 30d", "5d"])) {
            let r = Rate { limit, period: text.parse().unwrap() };
            prop_assert_eq!(r.to_string().parse::<Rate>(), Ok(r));
        }
    }
}
