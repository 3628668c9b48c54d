//! The metrics Tally derives from a usage event.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A quantity a quota can limit. `total_tokens` is `input_tokens + output_tokens`
/// (cached tokens are reported separately and are not part of the total).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    Requests,
    InputTokens,
    OutputTokens,
    CachedTokens,
    TotalTokens,
    CostMicros,
}

impl Metric {
    pub const ALL: [Metric; 6] =
        [Metric::Requests, Metric::InputTokens, Metric::OutputTokens, Metric::CachedTokens, Metric::TotalTokens, Metric::CostMicros];

    pub fn as_str(self) -> &'static str {
        match self {
            Metric::Requests => "requests",
            Metric::InputTokens => "input_tokens",
            Metric::OutputTokens => "output_tokens",
            Metric::CachedTokens => "cached_tokens",
            Metric::TotalTokens => "total_tokens",
            Metric::CostMicros => "cost_micros",
        }
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error for a metric name that is not one of [`Metric::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown metric {0:?}: expected one of requests, input_tokens, output_tokens, cached_tokens, total_tokens, cost_micros")]
pub struct UnknownMetric(pub String);

impl FromStr for Metric {
    type Err = UnknownMetric;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Metric::ALL.into_iter().find(|m| m.as_str() == s).ok_or_else(|| UnknownMetric(s.to_string()))
    }
}

/// The largest amount Tally counts, in any metric's unit: 10^15 (tokens, requests or
/// micro-dollars, which makes $1 000 000 000 of cost).
///
/// It bounds each amount of an event and each ledger row's `used`. A year of a very large
/// platform's traffic fits one row: 10^15 tokens a year is about 32 million tokens a second,
/// all year, for one subject. Every sum of bounded values stays far inside `i64` (the sum of
/// two rows, or an event's `input_tokens + output_tokens`, is at most 2 x 10^15 against
/// 9.2 x 10^18), so arithmetic near the bound is exact, and a sum that passes the bound is
/// refused (quarantined as `overflow`) rather than wrapped or clamped.
pub const MAX_AMOUNT: i64 = 1_000_000_000_000_000;

/// The amounts of every metric carried by one event (or a sum of events). Sums saturate at
/// `i64`'s ends instead of wrapping: a saturated sum is far past [`MAX_AMOUNT`], so whatever
/// checks it against the bound refuses it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Amounts {
    pub requests: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cached_tokens: i64,
    pub cost_micros: i64,
}

impl Amounts {
    pub fn get(&self, metric: Metric) -> i64 {
        match metric {
            Metric::Requests => self.requests,
            Metric::InputTokens => self.input_tokens,
            Metric::OutputTokens => self.output_tokens,
            Metric::CachedTokens => self.cached_tokens,
            Metric::TotalTokens => self.input_tokens.saturating_add(self.output_tokens),
            Metric::CostMicros => self.cost_micros,
        }
    }

    /// The amounts with every sign flipped: what a correction applies to revert an event.
    pub fn negated(&self) -> Amounts {
        Amounts {
            requests: self.requests.saturating_neg(),
            input_tokens: self.input_tokens.saturating_neg(),
            output_tokens: self.output_tokens.saturating_neg(),
            cached_tokens: self.cached_tokens.saturating_neg(),
            cost_micros: self.cost_micros.saturating_neg(),
        }
    }
}

impl std::ops::AddAssign for Amounts {
    fn add_assign(&mut self, other: Amounts) {
        self.requests = self.requests.saturating_add(other.requests);
        self.input_tokens = self.input_tokens.saturating_add(other.input_tokens);
        self.output_tokens = self.output_tokens.saturating_add(other.output_tokens);
        self.cached_tokens = self.cached_tokens.saturating_add(other.cached_tokens);
        self.cost_micros = self.cost_micros.saturating_add(other.cost_micros);
    }
}

impl std::ops::SubAssign for Amounts {
    fn sub_assign(&mut self, other: Amounts) {
        self.requests = self.requests.saturating_sub(other.requests);
        self.input_tokens = self.input_tokens.saturating_sub(other.input_tokens);
        self.output_tokens = self.output_tokens.saturating_sub(other.output_tokens);
        self.cached_tokens = self.cached_tokens.saturating_sub(other.cached_tokens);
        self.cost_micros = self.cost_micros.saturating_sub(other.cost_micros);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_add_and_subtract_every_metric() {
        let a = Amounts { requests: 1, input_tokens: 10, output_tokens: 5, cached_tokens: 2, cost_micros: 7 };
        let mut sum = a;
        sum += a;
        assert_eq!(sum, Amounts { requests: 2, input_tokens: 20, output_tokens: 10, cached_tokens: 4, cost_micros: 14 });
        sum -= a;
        assert_eq!(sum, a);
    }

    #[test]
    fn sums_saturate_instead_of_wrapping() {
        let big = Amounts { requests: i64::MAX, input_tokens: i64::MAX, output_tokens: 1, cached_tokens: i64::MIN, cost_micros: 0 };
        let mut sum = big;
        sum += big;
        assert_eq!(sum.requests, i64::MAX);
        assert_eq!(sum.get(Metric::TotalTokens), i64::MAX);
        let mut low = big;
        low -= Amounts { cached_tokens: 1, ..Amounts::default() };
        assert_eq!(low.cached_tokens, i64::MIN);
        assert_eq!(big.negated().cached_tokens, i64::MAX);
    }

    #[test]
    fn the_sum_of_two_bounded_rows_is_exact() {
        let row = Amounts { input_tokens: MAX_AMOUNT, output_tokens: MAX_AMOUNT, ..Amounts::default() };
        let mut sum = row;
        sum += row;
        assert_eq!(sum.get(Metric::TotalTokens), 4 * MAX_AMOUNT);
    }

    #[test]
    fn total_tokens_is_input_plus_output_without_cached() {
        let a = Amounts { requests: 1, input_tokens: 10, output_tokens: 5, cached_tokens: 7, cost_micros: 3 };
        assert_eq!(a.get(Metric::TotalTokens), 15);
        assert_eq!(a.negated().get(Metric::TotalTokens), -15);
    }

    #[test]
    fn metric_names_round_trip_and_unknown_is_named() {
        for m in Metric::ALL {
            assert_eq!(m.as_str().parse::<Metric>(), Ok(m));
        }
        let err = "tokens".parse::<Metric>().unwrap_err();
        assert!(err.to_string().contains("\"tokens\""));
    }
}
