//! `POST /v1/check`: "may this subject make this request now?"
//!
//! Contract:
//! - The request names a `subject`, or an `api_key` bound to one (`api_keys[].subject` in the
//!   configuration), or both (then they must agree). A key that is not in the configuration
//!   in force (unknown or revoked) is refused with 403 and nothing else is looked at. It may
//!   name `groups` it is made for, beside the subject's configured ones; a group the
//!   configuration does not know is a 400 naming `groups[i]`.
//! - The answer comes from the in-memory decision view. No database round trip happens on
//!   this path once the view has caught up with the decisions topic. Only before that
//!   (right after start) is each ledger looked up in Postgres too, and the newer of the two
//!   snapshots answers.
//! - A subject with no decision at all has used nothing: it is allowed, and the limits shown
//!   are those of its effective tier in the configuration in force (`source: "policy"`).
//! - Budgets ([`tally_domain::budget`]): the request meets the budget of its API key, of the
//!   subject's configured groups and of the request's `groups`, and the pool of the
//!   subject's effective tier (the snapshot's `tier`, else the configuration's), each once
//!   ([`tally_domain::budget::budgets_met`]). Each budget's lines come from its snapshot in
//!   the view, under its budget subject; a budget with no decision yet has used nothing.
//!   Every budget must pass: the verdict is taken over the subject's own lines and every
//!   budget's together, and `budgets` lists each budget with what it alone says.
//! - Only quotas that apply to the request count: their scope matches (all-scopes quotas
//!   and quotas of that scope) and so do their models (a quota narrowed to `models` counts
//!   only for a request naming one of them). A quota whose `resets_at` has passed counts as
//!   reset (used 0), whatever the snapshot said.
//! - Denied when a quota whose action is `block` or `queue` is breached, or when the
//!   optional estimate (`estimated_tokens` against `total_tokens` quotas,
//!   `estimated_cost_micros` against `cost_micros` quotas) exceeds what such a quota has
//!   left. A breached `degrade` quota allows with the fallback model; a breached `soft` one
//!   allows and flags the overage. The strictest action wins: block, queue, degrade, soft.
//!   The reported `quota` is that line (its `budget` names the budget it belongs to, `null`
//!   for the subject's own).
//! - Headers: `X-RateLimit-Limit`, `-Remaining` and `-Reset` (seconds until the reset) of the
//!   most constraining quota (the denying one when denied, else the one with the smallest
//!   share left, over the subject's and every budget's), `X-Tally-Budget` naming its budget
//!   ([`budget_header`]; absent for the subject's own), `Retry-After` (seconds) on denial,
//!   `X-Tally-Decision-Age-Ms` (of the subject's snapshot).
//! - Staleness ([`crate::view`]): the view is stale when it has not caught up with the topic,
//!   or has read neither a snapshot nor an aggregator heartbeat on some partition, for longer
//!   than the configured bound (or never did: `staleness_ms` is then `null`). A stale view
//!   means decisions may have stopped reaching it, e.g. no aggregator runs or the relay cannot
//!   publish, so a block may be missing. The configured policy answers instead: `open`
//!   allows, `closed` denies (Retry-After 1). The answer says so (`stale`, `staleness_ms`,
//!   `stale_policy`, `reason`).
//! - The status is 200 whenever the question could be answered, allowed or not; gateways
//!   read `allowed` (or map a denial to their own 429).

use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tally_domain::budget::{budget_timezone, budgets_met, is_reserved_subject, Budget, BudgetFacts, BudgetOwner};
use tally_domain::config::Config;
use tally_domain::decision::{Action, DecisionSnapshot, QuotaDecision, QuotaState};
use tally_domain::event::hash_api_key;
use tally_domain::metric::Metric;
use tally_domain::precedence::{resolve, SubjectFacts};
use tally_domain::tier::counts_model;

use crate::error::{AppError, JsonBody};
use crate::state::{AppState, StalePolicy};
use crate::subjects::stored_decision;

/// At most this many `groups` in one check.
const MAX_GROUPS: usize = 64;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckRequest {
    pub subject: Option<String>,
    pub api_key: Option<String>,
    pub scope: Option<String>,
    pub model: Option<String>,
    /// Groups the request is made for, beside the subject's configured ones: their budgets
    /// apply too.
    pub groups: Option<Vec<String>>,
    pub estimated_tokens: Option<i64>,
    pub estimated_cost_micros: Option<i64>,
}

/// The quota an answer is about.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct QuotaLine {
    pub quota: String,
    pub metric: Metric,
    pub scope: Option<String>,
    /// The models the quota counts; absent for every model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub models: Option<Vec<String>>,
    pub used: i64,
    pub limit: i64,
    pub remaining: i64,
    pub resets_at: DateTime<Utc>,
    /// The budget the quota belongs to; `null` for the subject's own quotas.
    pub budget: Option<BudgetOwner>,
}

/// One budget the request meets, as the answer lists it.
#[derive(Debug, Serialize)]
pub struct BudgetMet {
    /// The owner: `kind` (`api_key`, `group`, `tier`) and `name`.
    #[serde(flatten)]
    pub owner: BudgetOwner,
    /// What this budget's decision alone says of the request (staleness aside).
    pub allowed: bool,
    pub action: Option<Action>,
    pub reason: &'static str,
    /// Its deciding quota, else its tightest one; `null` when none of its quotas applies
    /// to the request's scope and model.
    pub quota: Option<QuotaLine>,
    /// The budget's snapshot version; 0 when it has no decision yet.
    pub version: i64,
    pub decision_age_ms: Option<i64>,
    /// `view`, `database` or `policy` (no decision yet: its quotas, unused).
    pub source: &'static str,
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
    /// The quota that decides: the strictest against the request over the subject's own
    /// quotas and every budget's, else the one with the smallest share left. Its `budget`
    /// names the budget it belongs to (`null`: the subject's own).
    pub quota: Option<QuotaLine>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_seconds: Option<i64>,
    /// The subject's snapshot version; 0 when the subject has no decision yet.
    pub version: i64,
    /// Milliseconds since the subject's snapshot was calculated; `null` without one.
    pub decision_age_ms: Option<i64>,
    /// `view`, `database` (before the view caught up) or `policy` (no decision yet).
    pub source: &'static str,
    /// Every budget the request meets (its API key's, its groups', its tier's pool).
    pub budgets: Vec<BudgetMet>,
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

/// What a request asks, as the verdict needs it.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    /// `""` is the default scope.
    pub scope: &'a str,
    /// `None`: the request names no model, and meets no quota narrowed to models.
    pub model: Option<&'a str>,
    pub estimated_tokens: i64,
    pub estimated_cost: i64,
}

/// The quota lines of one ledger a request meets: the subject's own (`budget: None`) or a
/// budget's.
#[derive(Debug, Clone, Copy)]
pub struct Lines<'a> {
    pub budget: Option<&'a BudgetOwner>,
    pub quotas: &'a [QuotaDecision],
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
    budget: Option<&'a BudgetOwner>,
    used: i64,
    remaining: i64,
    breached: bool,
    /// Not breached, but the request's estimate exceeds what is left.
    by_estimate: bool,
}

impl<'a> Standing<'a> {
    fn of(q: &'a QuotaDecision, budget: Option<&'a BudgetOwner>, ask: &Ask<'_>, now: DateTime<Utc>) -> Self {
        let reset = now >= q.resets_at;
        let (used, remaining, state) = if reset { (0, q.limit, QuotaState::Ok) } else { (q.used, q.remaining, q.state) };
        let estimate = match q.metric {
            Metric::TotalTokens => ask.estimated_tokens,
            Metric::CostMicros => ask.estimated_cost,
            _ => 0,
        };
        let breached = state == QuotaState::Breached;
        Standing { quota: q, budget, used, remaining, breached, by_estimate: !breached && estimate > remaining }
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
            models: q.models.clone(),
            used: self.used,
            limit: q.limit,
            remaining: self.remaining,
            resets_at: q.resets_at,
            budget: self.budget.cloned(),
        }
    }
}

/// Whether a snapshot's line applies to the request: its scope matches (an all-scopes line
/// always does) and so do its models (a line for every model always does; one narrowed to
/// models only when the request names one of them).
pub fn applies(q: &QuotaDecision, ask: &Ask<'_>) -> bool {
    q.scope.as_deref().is_none_or(|s| s == ask.scope) && counts_model(q.models.as_deref(), ask.model)
}

/// Decides from the lines of every ledger the request meets (the subject's own and each
/// budget's) for a request at `now`; pure. Every ledger must pass: the strictest action
/// against the request decides, over all of them. Only the line it reports is copied out
/// of the snapshots.
pub fn evaluate(ledgers: &[Lines<'_>], ask: &Ask<'_>, now: DateTime<Utc>) -> Verdict {
    let standing = ledgers
        .iter()
        .flat_map(|l| l.quotas.iter().filter(|q| applies(q, ask)).map(move |q| (q, l.budget)))
        .map(|(q, budget)| Standing::of(q, budget, ask, now));
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
fn policy_lines(config: &Config, subject: &str, key_sha: Option<&str>, scope: &str, now: DateTime<Utc>) -> PolicyLines {
    let facts = SubjectFacts { subject, groups: &[], api_key_sha256: key_sha, scope };
    let r = resolve(config, &facts, now);
    let lines = r.quotas.iter().map(|q| q.decision_line(0, r.resets_at(q, now))).collect();
    PolicyLines { tier: r.tier.clone(), lines }
}

/// The lines a budget with no decision would have: its quotas, unused.
pub fn budget_policy_lines(config: &Config, budget: &Budget, now: DateTime<Utc>) -> Vec<QuotaDecision> {
    let tz = budget_timezone(config, budget);
    budget.effective_quotas().iter().map(|q| q.decision_line(0, q.period.resets_at(now, tz))).collect()
}

fn non_negative(v: Option<i64>, field: &str) -> Result<i64, AppError> {
    match v {
        Some(n) if n < 0 => Err(AppError::bad(field, "must not be negative")),
        Some(n) => Ok(n),
        None => Ok(0),
    }
}

/// The request's `groups`, each a group of the configuration in force.
fn request_groups(groups: Option<Vec<String>>, config: &Config) -> Result<Vec<String>, AppError> {
    let groups = groups.unwrap_or_default();
    if groups.len() > MAX_GROUPS {
        return Err(AppError::bad("groups", format!("at most {MAX_GROUPS} groups")));
    }
    for (i, group) in groups.iter().enumerate() {
        if !config.knows_group(group) {
            return Err(AppError::bad(
                &format!("groups[{i}]"),
                format!("unknown group {group:?}: not a group of the configuration in force"),
            ));
        }
    }
    Ok(groups)
}

/// A ledger's latest decision for a check, and where it came from.
struct Looked {
    snapshot: Option<Arc<DecisionSnapshot>>,
    /// `view` or `database` (before the view caught up).
    source: &'static str,
    /// Postgres could not be asked (before the view caught up).
    unavailable: bool,
}

/// The latest decision of `subject` (a subject or a budget subject): from the view, and only
/// before the view first caught up also from Postgres (the view may lack a decision, or hold
/// an older one; the newer of the two answers).
async fn look_up(state: &AppState, subject: &str) -> Looked {
    let mut snapshot = state.view.get(subject);
    if state.view.caught_up_at().is_some() {
        return Looked { snapshot, source: "view", unavailable: false };
    }
    match stored_decision(state, subject).await {
        Ok(found) => {
            if let Some(f) = found {
                if snapshot.as_ref().is_none_or(|v| v.version < f.version) {
                    snapshot = Some(Arc::new(f));
                }
            }
            Looked { snapshot, source: "database", unavailable: false }
        }
        Err(e) => {
            tracing::warn!(error = %e, "decision fallback to Postgres failed");
            Looked { snapshot, source: "view", unavailable: true }
        }
    }
}

fn age_ms(snapshot: &DecisionSnapshot, now: DateTime<Utc>) -> i64 {
    (now - snapshot.calculated_at).num_milliseconds().max(0)
}

/// A budget the request meets with the lines it is decided on.
struct MetBudget<'a> {
    budget: &'a Budget,
    looked: Looked,
    /// Its quotas, unused, when it has no decision yet.
    policy: Vec<QuotaDecision>,
}

impl MetBudget<'_> {
    fn quotas(&self) -> &[QuotaDecision] {
        match &self.looked.snapshot {
            Some(s) => &s.quotas,
            None => &self.policy,
        }
    }

    fn lines(&self) -> Lines<'_> {
        Lines { budget: Some(&self.budget.owner), quotas: self.quotas() }
    }

    fn answer(&self, ask: &Ask<'_>, now: DateTime<Utc>) -> BudgetMet {
        let alone = evaluate(&[self.lines()], ask, now);
        let snapshot = self.looked.snapshot.as_deref();
        BudgetMet {
            owner: self.budget.owner.clone(),
            allowed: alone.allowed,
            action: alone.action,
            reason: alone.reason,
            quota: alone.quota,
            version: snapshot.map_or(0, |s| s.version),
            decision_age_ms: snapshot.map(|s| age_ms(s, now)),
            source: if snapshot.is_some() { self.looked.source } else { "policy" },
        }
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
    // One configuration version answers the whole check.
    let loaded = state.configs.current();
    let config = &loaded.config;
    // The key first: an unknown or revoked key is refused before anything else.
    let mut key_sha = None;
    let mut bound_subject = None;
    if let Some(key) = req.api_key.as_deref() {
        let sha = hash_api_key(key);
        let Some(entry) = config.api_keys.get(&sha) else {
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
    if is_reserved_subject(&subject) {
        return Err(AppError::bad("subject", "is a name Tally keeps for budgets and heartbeats"));
    }
    let groups = request_groups(req.groups, config)?;

    let staleness = state.view.staleness(now);
    let fresh = staleness.is_some_and(|s| s <= state.check.max_staleness);
    let own = look_up(&state, &subject).await;
    let mut unavailable = own.unavailable;
    let mut source = own.source;
    let policy_answer;
    let (tier, version, age, own_lines): (String, i64, Option<i64>, &[QuotaDecision]) = match &own.snapshot {
        Some(s) => (s.tier.clone(), s.version, Some(age_ms(s, now)), &s.quotas),
        None => {
            source = "policy";
            policy_answer = policy_lines(config, &subject, key_sha.as_deref(), &scope, now);
            (policy_answer.tier.clone(), 0, None, &policy_answer.lines)
        }
    };
    // Every budget the request meets, each with its decision (or its quotas, unused).
    let facts = BudgetFacts { subject: &subject, api_key_sha256: key_sha.as_deref(), groups: &groups, tier: &tier };
    let mut met = Vec::new();
    for budget in budgets_met(config, &facts) {
        let looked = look_up(&state, &budget.owner.ledger_subject()).await;
        unavailable |= looked.unavailable;
        let policy = if looked.snapshot.is_none() { budget_policy_lines(config, budget, now) } else { Vec::new() };
        met.push(MetBudget { budget, looked, policy });
    }
    let ask = Ask { scope: &scope, model: req.model.as_deref(), estimated_tokens, estimated_cost };
    let ledgers: Vec<Lines<'_>> =
        std::iter::once(Lines { budget: None, quotas: own_lines }).chain(met.iter().map(MetBudget::lines)).collect();
    let mut verdict = evaluate(&ledgers, &ask, now);
    let budgets: Vec<BudgetMet> = met.iter().map(|b| b.answer(&ask, now)).collect();

    // Before the view caught up, the answer is as fresh as Postgres when every lookup read it.
    let from_database = own.source == "database" && met.iter().all(|b| b.looked.source == "database");
    let decided_fresh = fresh || (from_database && !unavailable);
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
        budgets,
        stale,
        staleness_ms: staleness.map(|s| s.num_milliseconds()),
        stale_policy: state.check.stale_policy,
    };
    let mut headers = HeaderMap::new();
    if let Some(q) = &answer.quota {
        put(&mut headers, "x-ratelimit-limit", q.limit);
        put(&mut headers, "x-ratelimit-remaining", q.remaining.max(0));
        put(&mut headers, "x-ratelimit-reset", ceil_seconds(q.resets_at - now).max(0));
        if let Some(owner) = &q.budget {
            headers.insert(HeaderName::from_static("x-tally-budget"), budget_header(owner));
        }
    }
    if let Some(s) = retry_after_seconds {
        put(&mut headers, "retry-after", s);
    }
    if let Some(a) = age {
        put(&mut headers, "x-tally-decision-age-ms", a);
    }
    Ok((headers, Json(answer)).into_response())
}

/// `X-Tally-Budget`: the kind, a space, and the name with every byte that is not visible
/// ASCII (and `%`) percent-encoded, e.g. `group eng`, `group caf%C3%A9`.
pub fn budget_header(owner: &BudgetOwner) -> HeaderValue {
    let mut text = format!("{} ", owner.kind);
    for b in owner.name.bytes() {
        if b.is_ascii_graphic() && b != b'%' {
            text.push(char::from(b));
        } else {
            let _ = write!(text, "%{b:02X}");
        }
    }
    HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
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

    /// The verdict on the subject's own lines alone, for a request naming no model.
    fn own(lines: &[QuotaDecision], scope: &str, tokens: i64, cost: i64, now: DateTime<Utc>) -> Verdict {
        let ask = Ask { scope, model: None, estimated_tokens: tokens, estimated_cost: cost };
        evaluate(&[Lines { budget: None, quotas: lines }], &ask, now)
    }

    fn ask<'a>(model: Option<&'a str>) -> Ask<'a> {
        Ask { scope: "", model, estimated_tokens: 0, estimated_cost: 0 }
    }

    fn narrowed(mut line: QuotaDecision, models: &[&str]) -> QuotaDecision {
        line.models = Some(models.iter().map(|m| m.to_string()).collect());
        line
    }

    #[test]
    fn a_breached_block_quota_denies_until_its_reset() {
        let lines = [
            q("rpm", Metric::Requests, None, 1, 10, Action::Block, "2026-11-22T10:01:00Z"),
            q("month", Metric::TotalTokens, None, 100, 100, Action::Block, "2026-12-01T00:00:00Z"),
        ];
        let v = own(&lines, "", 0, 0, t(NOW));
        assert!(!v.allowed);
        assert_eq!(v.reason, "quota_breached");
        assert_eq!(v.quota.unwrap().quota, "month");
        assert_eq!(v.retry_at, Some(t("2026-12-01T00:00:00Z")));
        // After the reset instant the quota counts as reset.
        let v = own(&lines, "", 0, 0, t("2026-12-01T00:00:00Z"));
        assert!(v.allowed);
        assert_eq!(v.reason, "ok");
    }

    #[test]
    fn scoped_quotas_apply_only_to_their_scope() {
        let lines = [q("batch", Metric::Requests, Some("batch"), 5, 5, Action::Block, "2026-11-22T11:00:00Z")];
        assert!(!own(&lines, "batch", 0, 0, t(NOW)).allowed);
        let v = own(&lines, "chat", 0, 0, t(NOW));
        assert!(v.allowed && v.quota.is_none());
    }

    #[test]
    fn degrade_soft_and_the_strictest_action() {
        let degrade = Action::Degrade { fallback_model: "small".into() };
        let d = [q("m", Metric::TotalTokens, None, 100, 100, degrade.clone(), "2026-12-01T00:00:00Z")];
        let v = own(&d, "", 0, 0, t(NOW));
        assert!(v.allowed);
        assert_eq!((v.reason, v.action), ("degraded", Some(degrade.clone())));
        let s = [q("m", Metric::TotalTokens, None, 100, 100, Action::Soft, "2026-12-01T00:00:00Z")];
        assert_eq!(own(&s, "", 0, 0, t(NOW)).reason, "overage");
        let both = [d[0].clone(), q("r", Metric::Requests, None, 3, 3, Action::Queue, "2026-11-22T10:01:00Z")];
        let v = own(&both, "", 0, 0, t(NOW));
        assert!(!v.allowed);
        assert_eq!(v.action, Some(Action::Queue));
        assert_eq!(v.retry_at, Some(t("2026-11-22T10:01:00Z")));
    }

    #[test]
    fn an_estimate_larger_than_what_is_left_denies() {
        let lines = [q("m", Metric::TotalTokens, None, 90, 100, Action::Block, "2026-12-01T00:00:00Z")];
        assert!(own(&lines, "", 10, 0, t(NOW)).allowed);
        let v = own(&lines, "", 11, 0, t(NOW));
        assert!(!v.allowed);
        assert_eq!(v.reason, "estimate_exceeds_remaining");
        // The cost estimate does not count against a token quota.
        assert!(own(&lines, "", 0, 1_000_000, t(NOW)).allowed);
    }

    #[test]
    fn the_tightest_quota_is_reported_when_allowed() {
        let lines = [
            q("rpm", Metric::Requests, None, 8, 10, Action::Block, "2026-11-22T10:01:00Z"),
            q("month", Metric::TotalTokens, None, 10, 100, Action::Block, "2026-12-01T00:00:00Z"),
        ];
        let v = own(&lines, "", 0, 0, t(NOW));
        assert_eq!(v.quota.unwrap().quota, "rpm");
    }

    #[test]
    fn a_quota_narrowed_to_models_applies_only_to_requests_for_them() {
        let lines =
            [narrowed(q("gpt4o_day", Metric::TotalTokens, None, 500, 500, Action::Block, "2026-11-23T00:00:00Z"), &["gpt-4o", "o1"])];
        let own_lines = [Lines { budget: None, quotas: &lines }];
        let v = evaluate(&own_lines, &ask(Some("gpt-4o")), t(NOW));
        assert!(!v.allowed, "the model's own budget is spent");
        assert_eq!(v.quota.as_ref().unwrap().models.as_deref(), Some(&["gpt-4o".to_string(), "o1".to_string()][..]));
        let v = evaluate(&own_lines, &ask(Some("gpt-4o-mini")), t(NOW));
        assert!(v.allowed && v.quota.is_none(), "another model does not meet it");
        let v = evaluate(&own_lines, &ask(None), t(NOW));
        assert!(v.allowed && v.quota.is_none(), "a request naming no model does not meet it");
        // A line for every model applies whatever the request names.
        let every = [q("month", Metric::TotalTokens, None, 10, 100, Action::Block, "2026-12-01T00:00:00Z")];
        let v = evaluate(&[Lines { budget: None, quotas: &every }], &ask(Some("anything")), t(NOW));
        assert_eq!(v.quota.unwrap().quota, "month");
    }

    #[test]
    fn a_model_over_its_budget_degrades_that_model_only() {
        let degrade = Action::Degrade { fallback_model: "gpt-4o-mini".into() };
        let pool = BudgetOwner::new(tally_domain::budget::OwnerKind::Tier, "free");
        let budget =
            [narrowed(q("free_gpt4o", Metric::TotalTokens, None, 2000, 2000, degrade.clone(), "2026-11-23T00:00:00Z"), &["gpt-4o"])];
        let mine = [q("month", Metric::TotalTokens, None, 10, 100, Action::Block, "2026-12-01T00:00:00Z")];
        let ledgers = [Lines { budget: None, quotas: &mine }, Lines { budget: Some(&pool), quotas: &budget }];
        let v = evaluate(&ledgers, &ask(Some("gpt-4o")), t(NOW));
        assert_eq!((v.allowed, v.reason, v.action), (true, "degraded", Some(degrade)));
        assert_eq!(v.quota.unwrap().budget, Some(pool.clone()));
        let v = evaluate(&ledgers, &ask(Some("gpt-4o-mini")), t(NOW));
        assert_eq!((v.allowed, v.reason, v.action), (true, "ok", None));
        assert_eq!(v.quota.unwrap().budget, None, "only the subject's own line applies");
    }

    #[test]
    fn a_budget_line_decides_over_the_subjects_own() {
        let team = BudgetOwner::new(tally_domain::budget::OwnerKind::Group, "eng");
        let key = BudgetOwner::new(tally_domain::budget::OwnerKind::ApiKey, "ab".repeat(32));
        // The subject has room; its team's month is spent; its key has room.
        let mine = [q("month", Metric::TotalTokens, None, 10, 1000, Action::Block, "2026-12-01T00:00:00Z")];
        let team_lines = [q("team_month", Metric::CostMicros, None, 1_000_000, 1_000_000, Action::Block, "2026-12-01T00:00:00Z")];
        let key_lines = [q("key_day", Metric::TotalTokens, None, 100, 500, Action::Block, "2026-11-23T00:00:00Z")];
        let ledgers = [
            Lines { budget: None, quotas: &mine },
            Lines { budget: Some(&key), quotas: &key_lines },
            Lines { budget: Some(&team), quotas: &team_lines },
        ];
        let v = evaluate(&ledgers, &ask(None), t(NOW));
        assert_eq!((v.allowed, v.reason), (false, "quota_breached"));
        let line = v.quota.unwrap();
        assert_eq!((line.quota.as_str(), line.budget), ("team_month", Some(team.clone())), "the team is named");
        assert_eq!(v.retry_at, Some(t("2026-12-01T00:00:00Z")));
        // The strictest action wins across ledgers: the team's soft overage does not hide
        // the key's block, and the key's block is reported.
        let soft_team = [q("team_month", Metric::CostMicros, None, 1_000_000, 1_000_000, Action::Soft, "2026-12-01T00:00:00Z")];
        let spent_key = [q("key_day", Metric::TotalTokens, None, 500, 500, Action::Block, "2026-11-23T00:00:00Z")];
        let ledgers = [
            Lines { budget: None, quotas: &mine },
            Lines { budget: Some(&key), quotas: &spent_key },
            Lines { budget: Some(&team), quotas: &soft_team },
        ];
        let v = evaluate(&ledgers, &ask(None), t(NOW));
        assert!(!v.allowed);
        assert_eq!(v.quota.unwrap().budget, Some(key));
        // Nothing breached: the line with the smallest share left is reported, wherever it is.
        let ledgers = [Lines { budget: None, quotas: &mine }, Lines { budget: Some(&team), quotas: &key_lines }];
        let v = evaluate(&ledgers, &ask(None), t(NOW));
        assert_eq!((v.allowed, v.quota.unwrap().budget), (true, Some(team)), "80% of the budget left beats 99% of the own");
    }

    #[test]
    fn an_estimate_counts_against_every_budget() {
        let team = BudgetOwner::new(tally_domain::budget::OwnerKind::Group, "eng");
        let mine = [q("month", Metric::TotalTokens, None, 0, 1000, Action::Block, "2026-12-01T00:00:00Z")];
        let team_lines = [q("team", Metric::TotalTokens, None, 950, 1000, Action::Block, "2026-12-01T00:00:00Z")];
        let ledgers = [Lines { budget: None, quotas: &mine }, Lines { budget: Some(&team), quotas: &team_lines }];
        let a = Ask { scope: "", model: None, estimated_tokens: 51, estimated_cost: 0 };
        let v = evaluate(&ledgers, &a, t(NOW));
        assert_eq!((v.allowed, v.reason), (false, "estimate_exceeds_remaining"));
        assert_eq!(v.quota.unwrap().budget, Some(team));
    }

    #[test]
    fn the_budget_header_names_kind_and_name_in_visible_ascii() {
        use tally_domain::budget::OwnerKind;
        assert_eq!(budget_header(&BudgetOwner::new(OwnerKind::Group, "eng")), "group eng");
        assert_eq!(budget_header(&BudgetOwner::new(OwnerKind::Tier, "pro")), "tier pro");
        assert_eq!(budget_header(&BudgetOwner::new(OwnerKind::Group, "café 50%")), "group caf%C3%A9%2050%25");
    }

    #[test]
    fn seconds_round_up() {
        assert_eq!(ceil_seconds(chrono::Duration::milliseconds(1001)), 2);
        assert_eq!(ceil_seconds(chrono::Duration::milliseconds(1000)), 1);
        assert_eq!(ceil_seconds(chrono::Duration::milliseconds(-1500)), -1);
    }
}
