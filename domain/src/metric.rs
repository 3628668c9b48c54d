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
    pub const ALL: [Metric; 6] = [
        Metric::Requests,
        Metric::InputTokens,
        Metric::OutputTokens,
        Metric::CachedTokens,
        Metric::TotalTokens,
        Metric::CostMicros,
    ];

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
        Metric::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| UnknownMetric(s.to_string()))
    }
}

/// The amounts of every metric carried by one event (or a sum of events).
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
            Metric::TotalTokens => self.input_tokens + self.output_tokens,
            Metric::CostMicros => self.cost_micros,
        }
    }

    /// The amounts with every sign flipped: what a correction applies to revert an event.
    pub fn negated(&self) -> Amounts {
        Amounts {
            requests: -self.requests,
            input_tokens: -self.input_tokens,
            output_tokens: -self.output_tokens,
            cached_tokens: -self.cached_tokens,
            cost_micros: -self.cost_micros,
        }
    }
}

impl std::ops::AddAssign for Amounts {
    fn add_assign(&mut self, other: Amounts) {
        self.requests += other.requests;
        self.input_tokens += other.input_tokens;
        self.output_tokens += other.output_tokens;
        self.cached_tokens += other.cached_tokens;
        self.cost_micros += other.cost_micros;
    }
}

impl std::ops::SubAssign for Amounts {
    fn sub_assign(&mut self, other: Amounts) {
        self.requests -= other.requests;
        self.input_tokens -= other.input_tokens;
        self.output_tokens -= other.output_tokens;
        self.cached_tokens -= other.cached_tokens;
        self.cost_micros -= other.cost_micros;
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
