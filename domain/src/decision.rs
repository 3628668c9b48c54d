//! Decisions: what a ledger implies for a subject, and the snapshot Tally publishes.
//!
//! [`DecisionSnapshot`] is the wire format of `tally.decisions.v1` (key = subject) and of the
//! API's `GET /v1/subjects/{subject}/decision`. Its `version` only grows per subject.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::metric::Metric;

/// What happens when a quota is breached.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Action {
    /// Refuse requests until the period resets (the default).
    #[default]
    Block,
    /// Allow, but route to a cheaper model.
    Degrade { fallback_model: String },
    /// Refuse for now; the caller retries at the quota's `resets_at`.
    Queue,
    /// Allow and flag the overage.
    Soft,
}

impl Action {
    /// Whether a breach under this action refuses the request.
    pub fn denies(&self) -> bool {
        matches!(self, Action::Block | Action::Queue)
    }
}

/// The state of one quota for one subject and period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuotaState {
    Ok,
    Warning,
    Breached,
}

/// The state of a quota given its usage, its limit, burst headroom and warning thresholds
/// (in percent of `limit`). Breached once `used` reaches `limit + burst`: at that point the
/// next unit would exceed the budget. Warning once a threshold below 100% is reached.
pub fn quota_state(used: i64, limit: i64, burst: i64, thresholds_percent: &[u32]) -> QuotaState {
    if used >= limit.saturating_add(burst) {
        return QuotaState::Breached;
    }
    let warned = thresholds_percent.iter().filter(|&&t| t < 100).any(|&t| (used as i128) * 100 >= (limit as i128) * (t as i128));
    if warned {
        QuotaState::Warning
    } else {
        QuotaState::Ok
    }
}

/// Every threshold (percent of the limit) that `used` has reached, ascending. The
/// aggregator records fired thresholds so each fires once per subject, quota and period.
pub fn thresholds_reached(used: i64, limit: i64, thresholds_percent: &[u32]) -> Vec<u32> {
    let mut reached: Vec<u32> =
        thresholds_percent.iter().copied().filter(|&t| (used as i128) * 100 >= (limit as i128) * (t as i128)).collect();
    reached.sort_unstable();
    reached.dedup();
    reached
}

/// What may still be used before the quota is breached: `max(limit + burst - used, 0)`,
/// with `limit + burst` saturating as in [`quota_state`], so it is 0 exactly when the
/// quota is breached. Exact for every `i64` input (a negative `used`, which corrections
/// can leave, included), saturating at `i64::MAX`.
pub fn remaining(used: i64, limit: i64, burst: i64) -> i64 {
    let left = i128::from(limit.saturating_add(burst)) - i128::from(used);
    i64::try_from(left.max(0)).unwrap_or(i64::MAX)
}

/// One quota's line in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaDecision {
    /// The quota's name within its tier, e.g. `monthly_tokens`.
    pub quota: String,
    pub metric: Metric,
    /// The period spec as configured, e.g. `month`, `day`, `60s`, `rolling 7d`.
    pub period: String,
    /// The scope the quota applies to; `null` for all scopes.
    pub scope: Option<String>,
    /// The models the quota counts; absent for every model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<Vec<String>>,
    pub state: QuotaState,
    pub action: Action,
    pub used: i64,
    pub limit: i64,
    /// `max(limit + burst - used, 0)`.
    pub remaining: i64,
    pub resets_at: DateTime<Utc>,
    /// Thresholds (percent of `limit`) that fired with this snapshot. Each threshold fires
    /// once per subject, quota and period, in the first snapshot after usage reached it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fired: Vec<u32>,
}

/// A per-subject decision snapshot, as published on `tally.decisions.v1`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecisionSnapshot {
    pub subject: String,
    /// False when any quota with a denying action (`block`, `queue`) is breached.
    pub allowed: bool,
    /// Grows with every snapshot published for this subject.
    pub version: i64,
    pub calculated_at: DateTime<Utc>,
    /// The effective tier the quotas came from; for a budget, the tier of a tier pool and
    /// empty for any other budget.
    pub tier: String,
    /// The budget this snapshot is of, when `subject` is a budget subject
    /// ([`crate::budget::BudgetOwner::ledger_subject`]); absent for a subject's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<crate::budget::BudgetOwner>,
    pub quotas: Vec<QuotaDecision>,
}

impl DecisionSnapshot {
    pub fn allowed_for(quotas: &[QuotaDecision]) -> bool {
        !quotas.iter().any(|q| q.state == QuotaState::Breached && q.action.denies())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breached_at_limit_plus_burst_not_before() {
        assert_eq!(quota_state(99, 100, 0, &[80]), QuotaState::Warning);
        assert_eq!(quota_state(100, 100, 0, &[80]), QuotaState::Breached);
        assert_eq!(quota_state(100, 100, 10, &[80]), QuotaState::Warning);
        assert_eq!(quota_state(110, 100, 10, &[80]), QuotaState::Breached);
        assert_eq!(quota_state(79, 100, 0, &[80]), QuotaState::Ok);
        assert_eq!(quota_state(0, 100, 0, &[]), QuotaState::Ok);
    }

    #[test]
    fn thresholds_reached_are_every_one_at_or_below_usage() {
        assert_eq!(thresholds_reached(79, 100, &[80, 100]), Vec::<u32>::new());
        assert_eq!(thresholds_reached(80, 100, &[80, 100]), vec![80]);
        assert_eq!(thresholds_reached(150, 100, &[100, 80, 80]), vec![80, 100]);
    }

    #[test]
    fn remaining_is_what_is_left_before_the_breach_and_never_wraps() {
        assert_eq!(remaining(30, 100, 10), 80);
        assert_eq!(remaining(110, 100, 10), 0);
        assert_eq!(remaining(500, 100, 0), 0);
        // A ledger that corrections left negative, under the largest limit and burst a
        // configuration can give: `limit + burst - used` would overflow an i64.
        assert_eq!(remaining(-5, i64::MAX, i64::MAX), i64::MAX);
        assert_eq!(remaining(i64::MIN, 0, 0), i64::MAX);
        assert_eq!(remaining(i64::MAX, i64::MAX, i64::MAX), 0);
        assert_eq!(quota_state(i64::MAX, i64::MAX, i64::MAX, &[80]), QuotaState::Breached);
    }

    #[test]
    fn only_block_and_queue_deny() {
        let q = |action| QuotaDecision {
            quota: "q".into(),
            metric: Metric::TotalTokens,
            period: "month".into(),
            scope: None,
            models: None,
            state: QuotaState::Breached,
            action,
            used: 10,
            limit: 10,
            remaining: 0,
            resets_at: DateTime::<Utc>::UNIX_EPOCH,
            fired: vec![],
        };
        assert!(!DecisionSnapshot::allowed_for(&[q(Action::Block)]));
        assert!(!DecisionSnapshot::allowed_for(&[q(Action::Queue)]));
        assert!(DecisionSnapshot::allowed_for(&[q(Action::Soft)]));
        assert!(DecisionSnapshot::allowed_for(&[q(Action::Degrade { fallback_model: "small".into() })]));
    }

    #[test]
    fn action_wire_format_is_tagged() {
        let json = serde_json::to_string(&Action::Degrade { fallback_model: "m".into() }).unwrap();
        assert_eq!(json, r#"{"type":"degrade","fallback_model":"m"}"#);
        assert_eq!(serde_json::to_string(&Action::Block).unwrap(), r#"{"type":"block"}"#);
    }
}
