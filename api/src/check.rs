//! `POST /v1/check`: "may this subject make this request now?"
//!
//! Contract:
//! - The request names a `subject`, or an `api_key` bound to one (`api_keys[].subject` in the
//!   configuration), or both (then they must agree). A key that is not in the configuration
//!   in force (unknown or revoked) is refused with 403 and nothing else is looked at.
//! - The answer comes from the in-memory decision view. No database round trip happens on
//!   this path once the view has caught up with the decisions topic. Only before that
//!   (right after start) is the subject looked up in Postgres too, and the newer of the two
//!   snapshots answers.
//! - A subject with no decision at all has used nothing: it is allowed, and the limits shown
//!   are those of its effective tier in the configuration in force (`source: "policy"`).
//! - Only quotas that apply to the request's scope count (all-scopes quotas and quotas of
//!   that scope). A quota whose `resets_at` has passed counts as reset (used 0), whatever
//!   the snapshot said.
//! - Denied when a quota whose action is `block` or `queue` is breached, or when the
//!   optional estimate (`estimated_tokens` against `total_tokens` quotas,
//!   `estimated_cost_micros` against `cost_micros` quotas) exceeds what such a quota has
//!   left. A breached `degrade` quota allows with the fallback model; a breached `soft` one
//!   allows and flags the overage. The strictest action wins: block, queue, degrade, soft.
//! - Headers: `X-RateLimit-Limit`, `-Remaining` and `-Reset` (seconds until the reset) of the
//!   most constraining quota (the denying one when denied, else the one with the smallest
//!   share left), `Retry-After` (seconds) on denial, `X-Tally-Decision-Age-Ms`.
//! - Staleness ([`crate::view`]): the view is stale when it has not caught up with the topic,
//!   or has read neither a snapshot nor an aggregator heartbeat on some partition, for longer
//!   than the configured bound (or never did: `staleness_ms` is then `null`). A stale view
//!   means decisions may have stopped reaching it, e.g. no aggregator runs or the relay cannot
//!   publish, so a block may be missing. The configured policy answers instead: `open`
//!   allows, `closed` denies (Retry-After 1). The answer says so (`stale`, `staleness_ms`,
//!   `stale_policy`, `reason`).
//! - The status is 200 whenever the question could be answered, allowed or not; gateways
//!   read `allowed` (or map a denial to their own 429).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tally_domain::decision::{Action, DecisionSnapshot, QuotaDecision, QuotaState};
use tally_domain::event::hash_api_key;
use tally_domain::metric::Metric;
use tally_domain::precedence::{resolve, SubjectFacts};

use crate::error::{AppError, JsonBody};
use crate::state::{AppState, StalePolicy};
use crate::subjects::stored_decision;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckRequest {
    pub subject: Option<String>,
    pub api_key: Option<String>,
    pub scope: Option<String>,
    pub model: Option<String>,
    pub estimated_tokens: Option<i64>,
    pub estimated_cost_micros: Option<i64>,
}

/// The quota an answer is about.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct QuotaLine {
    pub quota: String,
    pub metric: Metric,
    pub scope: Option<String>,
    pub used: i64,
    pub limit: i64,
    pub remaining: i64,
    pub resets_at: DateTime<Utc>,
}

#[derive(Debug, Serialize)]
pub struct CheckAnswer {
    pub allowed: bool,
    pub subject: String,
    pub tier: String,
    /// The breach action that applies (`null` when no quota is breached).
    pub action: Option<Action>,
    /// The model to use: the fallback when degraded, else the requested one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// `ok`, `quota_breached`, `estimate_exceeds_remaining`, `overage` (soft),
    /// `degraded`, `stale_fail_open` or `stale_fail_closed`.
    pub reason: &'static str,
    /// The most constraining quota, if any applies.
    pub quota: Option<QuotaLine>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_seconds: Option<i64>,
    /// The snapshot's version; 0 when the subject has no decision yet.
    pub version: i64,
    /// Milliseconds since the snapshot was calculated; `null` without one.
    pub decision_age_ms: Option<i64>,
    /// `view`, `database` (before the view caught up) or `policy` (no decision yet).
    pub source: &'static str,
    pub stale: bool,
    /// How far behind the aggregators' decisions the view may be; `null` before it caught up
    /// or heard from every partition.
    pub staleness_ms: Option<i64>,
    pub stale_policy: StalePolicy,
}

/// The verdict on a set of quota lines, before staleness is considered.
#[derive(Debug, PartialEq)]
pub struct Verdict {
    pub allowed: bool,
    pub action: Option<Action>,
    pub reason: &'static str,
    pub quota: Option<QuotaLine>,
    pub retry_at: Option<DateTime<Utc>>,
}

fn severity(a: &Action) -> u8 {
    match a {
        Action::Block => 4,
        Action::Queue => 3,
        Action::Degrade { .. } => 2,
        Action::Soft => 1,
    }
}

/// A snapshot's quota line as it stands for one request (reset lines count as unused).
#[derive(Clone, Copy)]
struct Standing<'a> {
    quota: &'a QuotaDecision,
    used: i64,
    remaining: i64,
    breached: bool,
    /// Not breached, but the request's estimate exceeds what is left.
    by_estimate: bool,
}

impl<'a> Standing<'a> {
    fn of(q: &'a QuotaDecision, estimated_tokens: i64, estimated_cost: i64, now: DateTime<Utc>) -> Self {
        let reset = now >= q.resets_at;
        let (used, remaining, state) = if reset { (0, q.limit, QuotaState::Ok) } else { (q.used, q.remaining, q.state) };
        let estimate = match q.metric {
            Metric::TotalTokens => estimated_tokens,
            Metric::CostMicros => estimated_cost,
            _ => 0,
        };
        let breached = state == QuotaState::Breached;
        Standing { quota: q, used, remaining, breached, by_estimate: !breached && estimate > remaining }
    }

    /// Whether this line decides against the request (an estimate only counts for a
    /// denying action).
    fn counts_against(&self) -> bool {
        self.breached || (self.by_estimate && self.quota.action.denies())
    }

    /// The share of the limit left, in millionths.
    fn share_left(&self) -> i128 {
        (self.remaining as i128) * 1_000_000 / (self.quota.limit.max(1) as i128)
    }

    fn line(&self) -> QuotaLine {
        let q = self.quota;
        QuotaLine {
            quota: q.quota.clone(),
            metric: q.metric,
            scope: q.scope.clone(),
            used: self.used,
            limit: q.limit,
            remaining: self.remaining,
            resets_at: q.resets_at,
        }
    }
}

/// Decides from `quotas` (a snapshot's lines) for a request in `scope` at `now`; pure.
/// Only the line it reports is copied out of the snapshot.
pub fn evaluate(quotas: &[QuotaDecision], scope: &str, estimated_tokens: i64, estimated_cost: i64, now: DateTime<Utc>) -> Verdict {
    let standing = quotas
        .iter()
        .filter(|q| q.scope.as_deref().is_none_or(|s| s == scope))
        .map(|q| Standing::of(q, estimated_tokens, estimated_cost, now));
    // The strictest action among the lines against the request (ties: the later reset).
    let worst = standing
        .clone()
        .filter(Standing::counts_against)
        .max_by(|a, b| severity(&a.quota.action).cmp(&severity(&b.quota.action)).then(a.quota.resets_at.cmp(&b.quota.resets_at)));
    if let Some(worst) = worst {
        let action = worst.quota.action.clone();
        let denies = action.denies();
        let reason = match (&action, worst.breached) {
            (a, false) if a.denies() => "estimate_exceeds_remaining",
            (a, true) if a.denies() => "quota_breached",
            (Action::Degrade { .. }, _) => "degraded",
            _ => "overage",
        };
        return Verdict {
            allowed: !denies,
            retry_at: denies.then_some(worst.quota.resets_at),
            reason,
            quota: Some(worst.line()),
            action: Some(action),
        };
    }
    // Otherwise the quota with the smallest share left (ties: the later reset).
    let tightest = standing.min_by(|a, b| a.share_left().cmp(&b.share_left()).then(b.quota.resets_at.cmp(&a.quota.resets_at)));
    Verdict { allowed: true, action: None, reason: "ok", quota: tightest.map(|s| s.line()), retry_at: None }
}

/// What the configuration in force says of a subject with no decision.
struct PolicyLines {
    tier: String,
    /// Its effective tier's quotas, unused.
    lines: Vec<QuotaDecision>,
}

/// The lines a subject with no decision would have: its effective tier's quotas, unused.
fn policy_lines(state: &AppState, subject: &str, key_sha: Option<&str>, scope: &str, now: DateTime<Utc>) -> PolicyLines {
    let loaded = state.configs.current();
    let facts = SubjectFacts { subject, groups: &[], api_key_sha256: key_sha, scope };
    let r = resolve(&loaded.config, &facts, now);
    let lines = r
        .quotas
        .iter()
        .map(|q| QuotaDecision {
            quota: q.name.clone(),
            metric: q.metric,
            period: String::new(),
            scope: q.scope.clone(),
            models: q.models.clone(),
            state: QuotaState::Ok,
            action: q.action.clone(),
            used: 0,
            limit: q.limit,
            remaining: q.limit.saturating_add(q.burst),
            resets_at: r.resets_at(q, now),
            fired: vec![],
        })
        .collect();
    PolicyLines { tier: r.tier.clone(), lines }
}

fn non_negative(v: Option<i64>, field: &str) -> Result<i64, AppError> {
    match v {
        Some(n) if n < 0 => Err(AppError::bad(field, "must not be negative")),
        Some(n) => Ok(n),
        None => Ok(0),
    }
}

pub async fn check(State(state): State<Arc<AppState>>, JsonBody(req): JsonBody<CheckRequest>) -> Result<Response, AppError> {
    let now = Utc::now();
    let estimated_tokens = non_negative(req.estimated_tokens, "estimated_tokens")?;
    let estimated_cost = non_negative(req.estimated_cost_micros, "estimated_cost_micros")?;
    let scope = req.scope.unwrap_or_default();
    if scope.len() > 256 {
        return Err(AppError::bad("scope", "at most 256 characters"));
    }
    // The key first: an unknown or revoked key is refused before anything else.
    let mut key_sha = None;
    let mut bound_subject = None;
    if let Some(key) = req.api_key.as_deref() {
        let sha = hash_api_key(key);
        let loaded = state.configs.current();
        let Some(entry) = loaded.config.api_keys.get(&sha) else {
            state.metrics.refused_keys.inc();
            return Err(AppError::new(axum::http::StatusCode::FORBIDDEN, "unknown or revoked API key", Some("api_key")));
        };
        state.last_use.note(&sha, now);
        bound_subject = entry.subject.clone();
        key_sha = Some(sha);
    }
    let subject = match (req.subject, bound_subject) {
        (Some(s), Some(b)) if s != b => {
            return Err(AppError::new(axum::http::StatusCode::FORBIDDEN, "the API key belongs to another subject", Some("api_key")))
        }
        (Some(s), _) | (None, Some(s)) => s,
        (None, None) => {
            let why = if key_sha.is_some() {
                "required: the API key is not bound to a subject"
            } else {
                "required (or an api_key bound to a subject)"
            };
            return Err(AppError::bad("subject", why));
        }
    };
    if subject.trim().is_empty() || subject.len() > 256 {
        return Err(AppError::bad("subject", "must be 1..256 characters"));
    }

    let staleness = state.view.staleness(now);
    let fresh = staleness.is_some_and(|s| s <= state.check.max_staleness);
    let mut source = "view";
    let mut snapshot: Option<Arc<DecisionSnapshot>> = state.view.get(&subject);
    let mut unavailable = false;
    if state.view.caught_up_at().is_none() {
        // Only before the view first caught up: the view may lack a decision, or hold an
        // older one; the newer of the two answers.
        match stored_decision(&state, &subject).await {
            Ok(found) => {
                source = "database";
                if let Some(f) = found {
                    if snapshot.as_ref().is_none_or(|v| v.version < f.version) {
                        snapshot = Some(Arc::new(f));
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "decision fallback to Postgres failed");
                unavailable = true;
            }
        }
    }
    let decided_fresh = fresh || (source == "database" && !unavailable);
    let policy_answer;
    let (tier, version, age, lines): (String, i64, Option<i64>, &[QuotaDecision]) = match &snapshot {
        Some(s) => (s.tier.clone(), s.version, Some((now - s.calculated_at).num_milliseconds().max(0)), &s.quotas),
        None => {
            source = "policy";
            policy_answer = policy_lines(&state, &subject, key_sha.as_deref(), &scope, now);
            (policy_answer.tier.clone(), 0, None, &policy_answer.lines)
        }
    };
    let mut verdict = evaluate(lines, &scope, estimated_tokens, estimated_cost, now);
    let stale = !decided_fresh;
    if stale {
        verdict.reason = match state.check.stale_policy {
            StalePolicy::Open => "stale_fail_open",
            StalePolicy::Closed => "stale_fail_closed",
        };
        verdict.allowed = state.check.stale_policy == StalePolicy::Open;
        verdict.retry_at = (!verdict.allowed).then(|| now + chrono::Duration::seconds(1));
        state.metrics.stale_answers.inc();
    }
    let model = match &verdict.action {
        Some(Action::Degrade { fallback_model }) if verdict.allowed => Some(fallback_model.clone()),
        _ => req.model,
    };
    let retry_after_seconds = verdict.retry_at.map(|t| ceil_seconds(t - now).max(1));
    if verdict.allowed {
        state.metrics.allowed.inc()
    } else {
        state.metrics.denied.inc()
    }
    let answer = CheckAnswer {
        allowed: verdict.allowed,
        subject,
        tier,
        action: verdict.action,
        model,
        reason: verdict.reason,
        quota: verdict.quota,
        retry_at: verdict.retry_at,
        retry_after_seconds,
        version,
        decision_age_ms: age,
        source,
        stale,
        staleness_ms: staleness.map(|s| s.num_milliseconds()),
        stale_policy: state.check.stale_policy,
    };
    let mut headers = HeaderMap::new();
    if let Some(q) = &answer.quota {
        put(&mut headers, "x-ratelimit-limit", q.limit);
        put(&mut headers, "x-ratelimit-remaining", q.remaining.max(0));
        put(&mut headers, "x-ratelimit-reset", ceil_seconds(q.resets_at - now).max(0));
    }
    if let Some(s) = retry_after_seconds {
        put(&mut headers, "retry-after", s);
    }
    if let Some(a) = age {
        put(&mut headers, "x-tally-decision-age-ms", a);
    }
    Ok((headers, Json(answer)).into_response())
}

fn ceil_seconds(d: chrono::Duration) -> i64 {
    let ms = d.num_milliseconds();
    ms.div_euclid(1000) + i64::from(ms.rem_euclid(1000) != 0)
}

fn put(headers: &mut HeaderMap, name: &'static str, value: i64) {
    headers.insert(HeaderName::from_static(name), HeaderValue::from(value));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn q(name: &str, metric: Metric, scope: Option<&str>, used: i64, limit: i64, action: Action, resets: &str) -> QuotaDecision {
        let state = tally_domain::decision::quota_state(used, limit, 0, &[80]);
        QuotaDecision {
            quota: name.into(),
            metric,
            period: "month".into(),
            scope: scope.map(str::to_string),
            models: None,
            state,
            action,
            used,
            limit,
            remaining: (limit - used).max(0),
            resets_at: t(resets),
            fired: vec![],
        }
    }

    const NOW: &str = "2026-11-22T10:00:00Z";

    #[test]
    fn a_breached_block_quota_denies_until_its_reset() {
        let lines = [
            q("rpm", Metric::Requests, None, 1, 10, Action::Block, "2026-11-22T10:01:00Z"),
            q("month", Metric::TotalTokens, None, 100, 100, Action::Block, "2026-12-01T00:00:00Z"),
        ];
        let v = evaluate(&lines, "", 0, 0, t(NOW));
        assert!(!v.allowed);
        assert_eq!(v.reason, "quota_breached");
        assert_eq!(v.quota.unwrap().quota, "month");
        assert_eq!(v.retry_at, Some(t("2026-12-01T00:00:00Z")));
        // After the reset instant the quota counts as reset.
        let v = evaluate(&lines, "", 0, 0, t("2026-12-01T00:00:00Z"));
        assert!(v.allowed);
        assert_eq!(v.reason, "ok");
    }

    #[test]
    fn scoped_quotas_apply_only_to_their_scope() {
        let lines = [q("batch", Metric::Requests, Some("batch"), 5, 5, Action::Block, "2026-11-22T11:00:00Z")];
        assert!(!evaluate(&lines, "batch", 0, 0, t(NOW)).allowed);
        let v = evaluate(&lines, "chat", 0, 0, t(NOW));
        assert!(v.allowed && v.quota.is_none());
    }

    #[test]
    fn degrade_soft_and_the_strictest_action() {
        let degrade = Action::Degrade { fallback_model: "small".into() };
        let d = [q("m", Metric::TotalTokens, None, 100, 100, degrade.clone(), "2026-12-01T00:00:00Z")];
        let v = evaluate(&d, "", 0, 0, t(NOW));
        assert!(v.allowed);
        assert_eq!((v.reason, v.action), ("degraded", Some(degrade.clone())));
        let s = [q("m", Metric::TotalTokens, None, 100, 100, Action::Soft, "2026-12-01T00:00:00Z")];
        assert_eq!(evaluate(&s, "", 0, 0, t(NOW)).reason, "overage");
        let both = [d[0].clone(), q("r", Metric::Requests, None, 3, 3, Action::Queue, "2026-11-22T10:01:00Z")];
        let v = evaluate(&both, "", 0, 0, t(NOW));
        assert!(!v.allowed);
        assert_eq!(v.action, Some(Action::Queue));
        assert_eq!(v.retry_at, Some(t("2026-11-22T10:01:00Z")));
    }

    #[test]
    fn an_estimate_larger_than_what_is_left_denies() {
        let lines = [q("m", Metric::TotalTokens, None, 90, 100, Action::Block, "2026-12-01T00:00:00Z")];
        assert!(evaluate(&lines, "", 10, 0, t(NOW)).allowed);
        let v = evaluate(&lines, "", 11, 0, t(NOW));
        assert!(!v.allowed);
        assert_eq!(v.reason, "estimate_exceeds_remaining");
        // The cost estimate does not count against a token quota.
        assert!(evaluate(&lines, "", 0, 1_000_000, t(NOW)).allowed);
    }

    #[test]
    fn the_tightest_quota_is_reported_when_allowed() {
        let lines = [
            q("rpm", Metric::Requests, None, 8, 10, Action::Block, "2026-11-22T10:01:00Z"),
            q("month", Metric::TotalTokens, None, 10, 100, Action::Block, "2026-12-01T00:00:00Z"),
        ];
        let v = evaluate(&lines, "", 0, 0, t(NOW));
        assert_eq!(v.quota.unwrap().quota, "rpm");
    }

    #[test]
    fn seconds_round_up() {
        assert_eq!(ceil_seconds(chrono::Duration::milliseconds(1001)), 2);
        assert_eq!(ceil_seconds(chrono::Duration::milliseconds(1000)), 1);
        assert_eq!(ceil_seconds(chrono::Duration::milliseconds(-1500)), -1);
    }
}
