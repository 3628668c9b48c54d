//! Tiers and the quotas they imply.
//!
//! The configuration holds **base quotas** and a set of **tiers**. The quotas of tier `T`
//! for a request in scope `S` ([`tier_quotas`]) are:
//! 1. every base quota, its limit multiplied by `T.rate_multiplier` ([`apply_tier`]:
//!    nearest integer, ties to even, never below 1; a multiplier of 1 leaves it as is);
//! 2. `T`'s own quotas, taken as written (not multiplied): one with the name of a base
//!    quota replaces it, the others are added after the base quotas;
//! 3. only the quotas that count scope `S`: those without a scope and those scoped to `S`;
//! 4. `T`'s explicit limits for scope `S` replace the limit *and* window of the base
//!    quota they name (by `quota`, or the one base quota measuring their `metric`). The
//!    replaced quota is scoped to `S` (it counts usage in `S` only), so its ledger is not
//!    the all-scopes ledger of the base quota.
//!
//! A quota's breach action is its own `action`, else the tier's, else `block`.

use chrono::{DateTime, Utc};
use chrono_tz::Tz;

use crate::decision::{quota_state, remaining, Action, QuotaDecision};
use crate::metric::Metric;
use crate::period::{PeriodSpec, Window};
use crate::rate::{apply_tier, Rate};

/// The thresholds (percent of the limit) a quota warns at when none are configured.
pub const DEFAULT_THRESHOLDS: [u32; 1] = [80];

/// A quota as configured, in the base set or in a tier.
#[derive(Debug, Clone, PartialEq)]
pub struct QuotaDef {
    pub name: String,
    pub metric: Metric,
    pub period: PeriodSpec,
    /// At least 0.
    pub limit: i64,
    /// `None`: counts usage in every scope.
    pub scope: Option<String>,
    /// `None`: counts usage of every model (and of events naming none); `Some(list)`: only
    /// events whose `model` is in the list (sorted, distinct, never empty).
    pub models: Option<Vec<String>>,
    /// Headroom above `limit` before the quota is breached; at least 0.
    pub burst: i64,
    /// Sorted, distinct, each 1..=1000.
    pub thresholds: Vec<u32>,
    /// `None`: the tier's action, else `block`.
    pub action: Option<Action>,
}

/// A tier's replacement for a base quota in one scope.
#[derive(Debug, Clone, PartialEq)]
pub struct ExplicitLimit {
    pub scope: String,
    pub metric: Metric,
    /// The base quota replaced; `None` means the only base quota measuring `metric`
    /// (configuration validation guarantees there is exactly one).
    pub quota: Option<String>,
    pub rate: Rate,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Tier {
    pub name: String,
    /// Higher wins among a subject's groups.
    pub priority: i64,
    /// Finite and above 0.
    pub rate_multiplier: f64,
    pub timezone: Option<Tz>,
    pub action: Option<Action>,
    pub quotas: Vec<QuotaDef>,
    pub explicit_limits: Vec<ExplicitLimit>,
}

impl Tier {
    /// A tier that leaves the base quotas unchanged.
    pub fn plain(name: &str) -> Tier {
        Tier {
            name: name.to_string(),
            priority: 0,
            rate_multiplier: 1.0,
            timezone: None,
            action: None,
            quotas: Vec::new(),
            explicit_limits: Vec::new(),
        }
    }
}

/// One quota as it applies to a subject right now.
#[derive(Debug, Clone, PartialEq)]
pub struct EffectiveQuota {
    pub name: String,
    pub metric: Metric,
    pub period: PeriodSpec,
    pub limit: i64,
    pub burst: i64,
    /// `None`: counts usage in every scope; `Some(s)`: only usage in scope `s`.
    pub scope: Option<String>,
    /// `None`: counts every model; `Some(list)`: only events naming one of these models.
    pub models: Option<Vec<String>>,
    pub thresholds: Vec<u32>,
    pub action: Action,
}

impl EffectiveQuota {
    /// Whether usage in `scope` counts towards this quota.
    pub fn counts_scope(&self, scope: &str) -> bool {
        self.scope.as_deref().is_none_or(|s| s == scope)
    }

    /// Whether usage of `model` (`None`: the event names no model) counts towards this
    /// quota.
    pub fn counts_model(&self, model: Option<&str>) -> bool {
        counts_model(self.models.as_deref(), model)
    }

    /// Whether a request in `scope` for `model` counts towards this quota.
    pub fn counts(&self, scope: &str, model: Option<&str>) -> bool {
        self.counts_scope(scope) && self.counts_model(model)
    }

    /// The key of this quota's ledger rows' `scope` column ([`crate::budget::ledger_scope`]).
    pub fn ledger_scope(&self) -> String {
        crate::budget::ledger_scope(self.scope.as_deref(), self.models.as_deref())
    }

    /// This quota's line in a decision, with `used` counted in the period that resets at
    /// `resets_at` (nothing fired yet).
    pub fn decision_line(&self, used: i64, resets_at: DateTime<Utc>) -> QuotaDecision {
        QuotaDecision {
            quota: self.name.clone(),
            metric: self.metric,
            period: self.period.to_string(),
            scope: self.scope.clone(),
            models: self.models.clone(),
            state: quota_state(used, self.limit, self.burst, &self.thresholds),
            action: self.action.clone(),
            used,
            limit: self.limit,
            remaining: remaining(used, self.limit, self.burst),
            resets_at,
            fired: Vec::new(),
        }
    }

    /// The period of this quota containing `at`, in the subject's timezone.
    pub fn window(&self, at: DateTime<Utc>, tz: Tz) -> Window {
        self.period.window(at, tz)
    }
}

/// Whether usage of `model` counts for a quota narrowed to `models` (`None`: every model).
pub fn counts_model(models: Option<&[String]>, model: Option<&str>) -> bool {
    match models {
        None => true,
        Some(list) => model.is_some_and(|m| list.iter().any(|l| l == m)),
    }
}

fn effective(def: &QuotaDef, limit: i64, tier_action: Option<&Action>) -> EffectiveQuota {
    EffectiveQuota {
        name: def.name.clone(),
        metric: def.metric,
        period: def.period,
        limit,
        burst: def.burst,
        scope: def.scope.clone(),
        models: def.models.clone(),
        thresholds: def.thresholds.clone(),
        action: def.action.clone().or_else(|| tier_action.cloned()).unwrap_or_default(),
    }
}

fn multiplied(limit: i64, multiplier: f64) -> i64 {
    let base = u64::try_from(limit).unwrap_or(0);
    i64::try_from(apply_tier(base, multiplier)).unwrap_or(i64::MAX)
}

/// The quotas of `tier` for a request in `scope` (see the module docs). With no tier,
/// the base quotas unchanged.
pub fn tier_quotas(base: &[QuotaDef], tier: Option<&Tier>, scope: &str) -> Vec<EffectiveQuota> {
    let multiplier = tier.map_or(1.0, |t| t.rate_multiplier);
    let action = tier.and_then(|t| t.action.as_ref());
    let own: &[QuotaDef] = tier.map_or(&[], |t| &t.quotas);
    let explicit: &[ExplicitLimit] = tier.map_or(&[], |t| &t.explicit_limits);

    let mut quotas = Vec::new();
    for def in base {
        let replaced = own.iter().find(|q| q.name == def.name);
        let mut q = match replaced {
            Some(own_def) => effective(own_def, own_def.limit, action),
            None => effective(def, multiplied(def.limit, multiplier), action),
        };
        if replaced.is_none() {
            if let Some(e) = explicit_for(explicit, def, base, scope) {
                q.limit = i64::try_from(e.rate.limit).unwrap_or(i64::MAX);
                q.period = e.rate.period;
                q.scope = Some(scope.to_string());
            }
        }
        quotas.push(q);
    }
    for def in own.iter().filter(|q| !base.iter().any(|b| b.name == q.name)) {
        quotas.push(effective(def, def.limit, action));
    }
    quotas.retain(|q| q.counts_scope(scope));
    quotas
}

/// The explicit limit for `scope` that replaces base quota `def`, if any.
fn explicit_for<'a>(explicit: &'a [ExplicitLimit], def: &QuotaDef, base: &[QuotaDef], scope: &str) -> Option<&'a ExplicitLimit> {
    if def.scope.as_deref().is_some_and(|s| s != scope) {
        return None;
    }
    explicit.iter().find(|e| {
        e.scope == scope
            && e.metric == def.metric
            && match &e.quota {
                Some(name) => *name == def.name,
                None => base.iter().filter(|b| b.metric == e.metric).count() == 1,
            }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quota(name: &str, metric: Metric, rate: &str) -> QuotaDef {
        let rate: Rate = rate.parse().unwrap();
        QuotaDef {
            name: name.into(),
            metric,
            period: rate.period,
            limit: rate.limit as i64,
            scope: None,
            models: None,
            burst: 0,
            thresholds: DEFAULT_THRESHOLDS.to_vec(),
            action: None,
        }
    }

    fn summary(qs: &[EffectiveQuota]) -> Vec<(String, i64, String, Option<String>)> {
        qs.iter().map(|q| (q.name.clone(), q.limit, q.period.to_string(), q.scope.clone())).collect()
    }

    fn base() -> Vec<QuotaDef> {
        vec![quota("rpm", Metric::Requests, "10/m"), quota("monthly_tokens", Metric::TotalTokens, "100000/month")]
    }

    #[test]
    fn no_tier_keeps_the_base() {
        let qs = tier_quotas(&base(), None, "");
        assert_eq!(summary(&qs), vec![("rpm".into(), 10, "1m".into(), None), ("monthly_tokens".into(), 100_000, "month".into(), None)]);
        assert_eq!(qs[0].action, Action::Block);
    }

    #[test]
    fn multiplier_scales_base_quotas_only() {
        let mut pro = Tier::plain("pro");
        pro.rate_multiplier = 3.0;
        pro.quotas.push(quota("daily_cost", Metric::CostMicros, "5000000/day"));
        let qs = tier_quotas(&base(), Some(&pro), "");
        assert_eq!(
            summary(&qs),
            vec![
                ("rpm".into(), 30, "1m".into(), None),
                ("monthly_tokens".into(), 300_000, "month".into(), None),
                ("daily_cost".into(), 5_000_000, "day".into(), None),
            ]
        );
    }

    #[test]
    fn tier_quota_with_a_base_name_replaces_it_unmultiplied() {
        let mut pro = Tier::plain("pro");
        pro.rate_multiplier = 3.0;
        pro.quotas.push(quota("monthly_tokens", Metric::TotalTokens, "2000000/month"));
        let qs = tier_quotas(&base(), Some(&pro), "");
        assert_eq!(summary(&qs)[1], ("monthly_tokens".into(), 2_000_000, "month".into(), None));
        assert_eq!(qs.len(), 2);
    }

    #[test]
    fn explicit_limit_replaces_the_base_quota_in_its_scope() {
        let mut pro = Tier::plain("pro");
        pro.rate_multiplier = 3.0;
        pro.explicit_limits.push(ExplicitLimit {
            scope: "api".into(),
            metric: Metric::Requests,
            quota: None,
            rate: "5000/h".parse().unwrap(),
        });
        let api = tier_quotas(&base(), Some(&pro), "api");
        assert_eq!(summary(&api)[0], ("rpm".into(), 5000, "1h".into(), Some("api".into())));
        assert_eq!(api[0].period.nominal_seconds(), 3600);
        let chat = tier_quotas(&base(), Some(&pro), "chat");
        assert_eq!(summary(&chat)[0], ("rpm".into(), 30, "1m".into(), None));
    }

    #[test]
    fn scoped_quotas_only_apply_to_their_scope() {
        let mut b = base();
        b[1].scope = Some("batch".into());
        assert_eq!(tier_quotas(&b, None, "chat").len(), 1);
        assert_eq!(tier_quotas(&b, None, "batch").len(), 2);
    }

    #[test]
    fn action_falls_back_from_quota_to_tier_to_block() {
        let mut b = base();
        b[0].action = Some(Action::Soft);
        let mut t = Tier::plain("t");
        t.action = Some(Action::Degrade { fallback_model: "small".into() });
        let qs = tier_quotas(&b, Some(&t), "");
        assert_eq!(qs[0].action, Action::Soft);
        assert_eq!(qs[1].action, Action::Degrade { fallback_model: "small".into() });
    }
}
