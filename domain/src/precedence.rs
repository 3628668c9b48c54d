//! Precedence: the effective tier and quotas of a subject at an instant.
//!
//! [`resolve`] applies the product's order (docs/semantics.md), first match wins:
//! 1. **Override**: active overrides for the subject (`starts_at` inclusive, `expires_at`
//!    exclusive) set the limit (and, with a rate, the window) of the quotas they target.
//!    For each quota the most specific active override applies: one scoped to the request's
//!    scope beats an all-scopes one, and one naming the quota beats one for every quota.
//!    (Validation refuses overlapping overrides with the same subject, scope and quota, so
//!    there is never a tie.) Overrides change limits, not the tier: the tier still comes
//!    from the levels below, and `level` reports `Override` when any override applied.
//! 2. **Assignment**: the subject's explicit tier, unless expired (`at >= expires_at`).
//! 3. **Group**: the highest-priority tier among the subject's groups (the config's
//!    `members` plus the caller's `facts.groups`; unknown groups are ignored); equal
//!    priorities go to the tier whose name sorts first, so the order of groups never
//!    matters.
//! 4. **ApiKey**: the tier of the API key the request came with (by SHA-256 hex).
//! 5. **Default**: the configuration's default tier.
//!
//! The quotas are those of the tier for the request's scope (see [`crate::tier`]). The
//! timezone of calendar periods is the subject's, else the tier's, else the
//! configuration's (UTC by default).
//!
//! Resolution is a pure function of the configuration, the facts and `at`; it changes only
//! at the instants [`next_change_after`] reports (or when the configuration changes).

use std::fmt;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use serde::Serialize;

use crate::config::{Config, Override, OverrideLimit};
use crate::period::PeriodSpec;
use crate::tier::tier_quotas;
pub use crate::tier::EffectiveQuota;

/// What is known about the subject of a request.
#[derive(Debug, Clone, Copy)]
pub struct SubjectFacts<'a> {
    pub subject: &'a str,
    /// Groups from the caller (e.g. an identity provider), added to the configured ones.
    pub groups: &'a [String],
    /// The SHA-256 hex of the request's API key ([`crate::event::hash_api_key`]).
    pub api_key_sha256: Option<&'a str>,
    /// The request's scope; `""` is the default scope.
    pub scope: &'a str,
}

/// The precedence level that decided a resolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    Override,
    Assignment,
    Group,
    ApiKey,
    Default,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Override => "override",
            Level::Assignment => "assignment",
            Level::Group => "group",
            Level::ApiKey => "api_key",
            Level::Default => "default",
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An override that changed one quota.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedOverride {
    /// The quota it changed.
    pub quota: String,
    /// The override's scope (`None`: all scopes).
    pub scope: Option<String>,
    pub starts_at: Option<DateTime<Utc>>,
    pub expires_at: DateTime<Utc>,
    pub reason: String,
    pub created_by: String,
}

/// A subject's effective tier and quotas at an instant, for one scope.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolution {
    pub tier: String,
    /// The level that decided the limits: `Override` when an override applied, else
    /// `tier_level`.
    pub level: Level,
    /// The level that decided the tier (never `Override`).
    pub tier_level: Level,
    pub timezone: Tz,
    pub quotas: Vec<EffectiveQuota>,
    pub overrides: Vec<AppliedOverride>,
}

/// Resolves the subject's effective tier and quotas at `at`; see the module docs.
pub fn resolve(config: &Config, facts: &SubjectFacts, at: DateTime<Utc>) -> Resolution {
    let (tier_name, tier_level) = pick_tier(config, facts, at);
    let tier = config.tier(&tier_name);
    let mut quotas = tier_quotas(&config.quotas, tier, facts.scope);
    let overrides = apply_overrides(config, facts, at, &mut quotas);
    let timezone =
        config.subject_timezones.get(facts.subject).copied().or_else(|| tier.and_then(|t| t.timezone)).unwrap_or(config.timezone);
    Resolution {
        tier: tier_name,
        level: if overrides.is_empty() { tier_level } else { Level::Override },
        tier_level,
        timezone,
        quotas,
        overrides,
    }
}

/// The subject's effective tier at `at`: the tier part of [`resolve`] (an assignment, else its
/// groups', else its API key's, else the default). It does not depend on the scope.
pub fn effective_tier(config: &Config, facts: &SubjectFacts, at: DateTime<Utc>) -> String {
    pick_tier(config, facts, at).0
}

fn pick_tier(config: &Config, facts: &SubjectFacts, at: DateTime<Utc>) -> (String, Level) {
    let assigned = config.assignments.iter().find(|a| a.subject == facts.subject && a.active_at(at) && config.tier(&a.tier).is_some());
    if let Some(a) = assigned {
        return (a.tier.clone(), Level::Assignment);
    }
    if let Some(tier) = group_tier(config, facts) {
        return (tier, Level::Group);
    }
    let by_key = facts.api_key_sha256.and_then(|hash| config.api_key_tier(&hash.to_ascii_lowercase())).filter(|t| config.tier(t).is_some());
    if let Some(tier) = by_key {
        return (tier.to_string(), Level::ApiKey);
    }
    (config.default_tier.clone(), Level::Default)
}

/// The highest-priority tier among the subject's groups; ties go to the first name.
fn group_tier(config: &Config, facts: &SubjectFacts) -> Option<String> {
    let configured = config.members.get(facts.subject).map(Vec::as_slice).unwrap_or_default();
    configured
        .iter()
        .chain(facts.groups.iter())
        .filter_map(|g| config.groups.get(g))
        .filter_map(|name| config.tier(name))
        .min_by(|a, b| b.priority.cmp(&a.priority).then_with(|| a.name.cmp(&b.name)))
        .map(|t| t.name.clone())
}

/// How specific an override is for a request: scoped beats all-scopes, then a named quota
/// beats every quota.
fn specificity(o: &Override) -> (bool, bool) {
    (o.scope.is_some(), o.quota.is_some())
}

fn apply_overrides(config: &Config, facts: &SubjectFacts, at: DateTime<Utc>, quotas: &mut [EffectiveQuota]) -> Vec<AppliedOverride> {
    let active: Vec<&Override> = config
        .overrides
        .iter()
        .filter(|o| o.subject == facts.subject && o.active_at(at))
        .filter(|o| o.scope.as_deref().is_none_or(|s| s == facts.scope))
        .collect();
    let mut applied = Vec::new();
    for q in quotas.iter_mut() {
        let best = active.iter().filter(|o| o.quota.as_deref().is_none_or(|n| n == q.name)).max_by_key(|o| specificity(o));
        let Some(o) = best else { continue };
        match o.limit {
            OverrideLimit::Limit(limit) => q.limit = limit,
            OverrideLimit::Rate(rate) => {
                q.limit = i64::try_from(rate.limit).unwrap_or(i64::MAX);
                q.period = rate.period;
            }
        }
        applied.push(AppliedOverride {
            quota: q.name.clone(),
            scope: o.scope.clone(),
            starts_at: o.starts_at,
            expires_at: o.expires_at,
            reason: o.reason.clone(),
            created_by: o.created_by.clone(),
        });
    }
    applied
}

/// The earliest instant after `at` at which the subject's resolution may change because of
/// time alone: an override for the subject starting or expiring, or its assignment
/// expiring. `None` when nothing is scheduled. Period rollovers are separate (see
/// [`PeriodSpec::next`]).
pub fn next_change_after(config: &Config, subject: &str, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let overrides = config.overrides.iter().filter(|o| o.subject == subject).flat_map(|o| [o.starts_at, Some(o.expires_at)]);
    let assignments = config.assignments.iter().filter(|a| a.subject == subject).map(|a| a.expires_at);
    overrides.chain(assignments).flatten().filter(|t| *t > at).min()
}

/// The period spec and window helpers callers usually need next to a resolution.
impl Resolution {
    /// The quota with this name, if the subject has it in this scope.
    pub fn quota(&self, name: &str) -> Option<&EffectiveQuota> {
        self.quotas.iter().find(|q| q.name == name)
    }

    /// When the period of `q` containing `at` ends, in this resolution's timezone.
    pub fn resets_at(&self, q: &EffectiveQuota, at: DateTime<Utc>) -> DateTime<Utc> {
        PeriodSpec::resets_at(&q.period, at, self.timezone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::Action;
    use crate::event::hash_api_key;
    use crate::metric::Metric;
    use proptest::prelude::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn config() -> Config {
        let yaml = format!(
            "default_tier: free
timezone: America/Los_Angeles
quotas:
  - {{name: rpm, metric: requests, rate: 10/m}}
  - {{name: monthly_tokens, metric: total_tokens, period: month, limit: 100000}}
tiers:
  - {{name: free}}
  - name: pro
    priority: 10
    rate_multiplier: 3
    timezone: Europe/London
    explicit_limits: [{{scope: api, metric: requests, rate: 5000/h}}]
  - {{name: team, priority: 10, rate_multiplier: 2}}
  - name: enterprise
    priority: 20
    rate_multiplier: 10
    action: degrade
    fallback_model: small
groups: {{eng: pro, sales: team, big: enterprise, ghost: enterprise}}
members: {{erin: [big], gina: [sales, eng]}}
subjects: {{tom: {{timezone: Asia/Tokyo}}}}
assignments:
  - {{subject: bob, tier: enterprise, expires_at: 2026-12-01T00:00:00Z}}
  - {{subject: erin, tier: free}}
overrides:
  - {{subject: carol, limit: 999, starts_at: 2026-11-10T00:00:00Z, expires_at: 2026-11-20T00:00:00Z, reason: launch, created_by: ops}}
  - {{subject: carol, scope: api, quota: rpm, rate: 42/h, starts_at: 2026-11-15T00:00:00Z, expires_at: 2026-11-17T00:00:00Z, reason: api test, created_by: ops}}
api_keys:
  - {{key_sha256: {key}, tier: pro}}
",
            key = hash_api_key("sk-pro")
        );
        Config::from_yaml_str(&yaml).unwrap_or_else(|e| panic!("{e}"))
    }

    struct Case {
        subject: &'static str,
        groups: &'static [&'static str],
        key: Option<&'static str>,
        scope: &'static str,
        at: &'static str,
        tier: &'static str,
        level: Level,
        rpm: (i64, u64),
    }

    fn run(config: &Config, c: &Case) -> Resolution {
        let groups: Vec<String> = c.groups.iter().map(|g| g.to_string()).collect();
        let hash = c.key.map(hash_api_key);
        let facts = SubjectFacts { subject: c.subject, groups: &groups, api_key_sha256: hash.as_deref(), scope: c.scope };
        resolve(config, &facts, utc(c.at))
    }

    #[test]
    fn precedence_table() {
        let config = config();
        let now = "2026-11-15T12:00:00Z";
        let cases = [
            // No facts: default tier, base quotas unchanged: 10/m.
            Case { subject: "nobody", groups: &[], key: None, scope: "", at: now, tier: "free", level: Level::Default, rpm: (10, 60) },
            // API key: pro, 10/m × 3 = 30 per 60 s.
            Case { subject: "k", groups: &[], key: Some("sk-pro"), scope: "", at: now, tier: "pro", level: Level::ApiKey, rpm: (30, 60) },
            Case {
                subject: "k",
                groups: &[],
                key: Some("sk-unknown"),
                scope: "",
                at: now,
                tier: "free",
                level: Level::Default,
                rpm: (10, 60),
            },
            // Explicit limit for the active scope wins: 5000 per 3600 s.
            Case {
                subject: "k",
                groups: &[],
                key: Some("sk-pro"),
                scope: "api",
                at: now,
                tier: "pro",
                level: Level::ApiKey,
                rpm: (5000, 3600),
            },
            // A group beats the API key.
            Case {
                subject: "k",
                groups: &["sales"],
                key: Some("sk-pro"),
                scope: "",
                at: now,
                tier: "team",
                level: Level::Group,
                rpm: (20, 60),
            },
            // Equal priority (pro, team): the first name wins, in any order.
            Case {
                subject: "x",
                groups: &["sales", "eng"],
                key: None,
                scope: "",
                at: now,
                tier: "pro",
                level: Level::Group,
                rpm: (30, 60),
            },
            Case {
                subject: "x",
                groups: &["eng", "sales"],
                key: None,
                scope: "",
                at: now,
                tier: "pro",
                level: Level::Group,
                rpm: (30, 60),
            },
            Case { subject: "gina", groups: &[], key: None, scope: "", at: now, tier: "pro", level: Level::Group, rpm: (30, 60) },
            // Higher priority wins; configured and given groups combine; unknown ignored.
            Case {
                subject: "gina",
                groups: &["big", "nosuch"],
                key: None,
                scope: "",
                at: now,
                tier: "enterprise",
                level: Level::Group,
                rpm: (100, 60),
            },
            // An assignment beats groups and keys, until it expires (exclusive).
            Case {
                subject: "bob",
                groups: &["eng"],
                key: Some("sk-pro"),
                scope: "",
                at: "2026-11-30T23:59:59Z",
                tier: "enterprise",
                level: Level::Assignment,
                rpm: (100, 60),
            },
            Case {
                subject: "bob",
                groups: &["eng"],
                key: Some("sk-pro"),
                scope: "",
                at: "2026-12-01T00:00:00Z",
                tier: "pro",
                level: Level::Group,
                rpm: (30, 60),
            },
            // A never-expiring assignment beats a higher-priority group.
            Case { subject: "erin", groups: &[], key: None, scope: "", at: now, tier: "free", level: Level::Assignment, rpm: (10, 60) },
            // Overrides: start inclusive, end exclusive.
            Case {
                subject: "carol",
                groups: &[],
                key: None,
                scope: "",
                at: "2026-11-09T23:59:59Z",
                tier: "free",
                level: Level::Default,
                rpm: (10, 60),
            },
            Case {
                subject: "carol",
                groups: &[],
                key: None,
                scope: "",
                at: "2026-11-10T00:00:00Z",
                tier: "free",
                level: Level::Override,
                rpm: (999, 60),
            },
            Case {
                subject: "carol",
                groups: &[],
                key: None,
                scope: "",
                at: "2026-11-19T23:59:59Z",
                tier: "free",
                level: Level::Override,
                rpm: (999, 60),
            },
            Case {
                subject: "carol",
                groups: &[],
                key: None,
                scope: "",
                at: "2026-11-20T00:00:00Z",
                tier: "free",
                level: Level::Default,
                rpm: (10, 60),
            },
            // The scoped override beats the all-scopes one in its scope only.
            Case { subject: "carol", groups: &[], key: None, scope: "api", at: now, tier: "free", level: Level::Override, rpm: (42, 3600) },
            Case { subject: "carol", groups: &[], key: None, scope: "chat", at: now, tier: "free", level: Level::Override, rpm: (999, 60) },
            // An override beats an assignment for the limit; the tier stays the assignment's.
            Case {
                subject: "carol",
                groups: &["big"],
                key: None,
                scope: "",
                at: now,
                tier: "enterprise",
                level: Level::Override,
                rpm: (999, 60),
            },
        ];
        for (i, c) in cases.iter().enumerate() {
            let r = run(&config, c);
            let rpm = r.quota("rpm").unwrap();
            assert_eq!(
                (r.tier.as_str(), r.level, (rpm.limit, rpm.period.nominal_seconds())),
                (c.tier, c.level, c.rpm),
                "case {i}: {} groups {:?} key {:?} scope {:?} at {}",
                c.subject,
                c.groups,
                c.key,
                c.scope,
                c.at
            );
        }
    }

    #[test]
    fn override_details_and_untouched_quotas() {
        let config = config();
        let c = Case {
            subject: "carol",
            groups: &[],
            key: None,
            scope: "api",
            at: "2026-11-15T12:00:00Z",
            tier: "free",
            level: Level::Override,
            rpm: (42, 3600),
        };
        let r = run(&config, &c);
        assert_eq!(r.tier_level, Level::Default);
        // The all-scopes override (no quota named) also sets monthly_tokens.
        assert_eq!(r.quota("monthly_tokens").unwrap().limit, 999);
        let reasons: Vec<(&str, &str)> = r.overrides.iter().map(|o| (o.quota.as_str(), o.reason.as_str())).collect();
        assert_eq!(reasons, [("rpm", "api test"), ("monthly_tokens", "launch")]);
    }

    #[test]
    fn timezone_is_subject_then_tier_then_config() {
        let config = config();
        let facts = |subject, key: Option<&'static str>| (subject, key.map(hash_api_key));
        let tz_of = |(subject, hash): (&str, Option<String>)| {
            resolve(
                &config,
                &SubjectFacts { subject, groups: &[], api_key_sha256: hash.as_deref(), scope: "" },
                utc("2026-11-15T00:00:00Z"),
            )
            .timezone
        };
        assert_eq!(tz_of(facts("tom", Some("sk-pro"))), chrono_tz::Asia::Tokyo);
        assert_eq!(tz_of(facts("k", Some("sk-pro"))), chrono_tz::Europe::London);
        assert_eq!(tz_of(facts("k", None)), chrono_tz::America::Los_Angeles);
    }

    #[test]
    fn tier_action_reaches_base_quotas() {
        let config = config();
        let r = resolve(
            &config,
            &SubjectFacts { subject: "erin2", groups: &["big".to_string()], api_key_sha256: None, scope: "" },
            utc("2026-11-15T00:00:00Z"),
        );
        assert!(r.quotas.iter().all(|q| q.action == Action::Degrade { fallback_model: "small".into() }));
        assert_eq!(r.quota("monthly_tokens").map(|q| (q.metric, q.limit)), Some((Metric::TotalTokens, 1_000_000)));
    }

    #[test]
    fn next_change_is_the_earliest_future_boundary() {
        let config = config();
        let t = utc;
        assert_eq!(next_change_after(&config, "carol", t("2026-11-01T00:00:00Z")), Some(t("2026-11-10T00:00:00Z")));
        // At a start, the next change is the next boundary after it.
        assert_eq!(next_change_after(&config, "carol", t("2026-11-10T00:00:00Z")), Some(t("2026-11-15T00:00:00Z")));
        assert_eq!(next_change_after(&config, "carol", t("2026-11-16T00:00:00Z")), Some(t("2026-11-17T00:00:00Z")));
        assert_eq!(next_change_after(&config, "carol", t("2026-11-17T00:00:00Z")), Some(t("2026-11-20T00:00:00Z")));
        assert_eq!(next_change_after(&config, "carol", t("2026-11-20T00:00:00Z")), None);
        assert_eq!(next_change_after(&config, "bob", t("2026-11-20T00:00:00Z")), Some(t("2026-12-01T00:00:00Z")));
        assert_eq!(next_change_after(&config, "erin", t("2026-11-20T00:00:00Z")), None);
    }

    proptest! {
        #[test]
        fn group_order_never_matters(
            groups in proptest::sample::subsequence(vec!["eng", "sales", "big", "ghost", "nosuch"], 0..=5),
            seed in any::<u64>(),
        ) {
            let config = config();
            let mut a: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
            let mut b = a.clone();
            // A deterministic shuffle from the seed.
            let n = b.len();
            for i in (1..n).rev() {
                let j = (seed.wrapping_mul(6364136223846793005).wrapping_add(i as u64) % (i as u64 + 1)) as usize;
                b.swap(i, j);
            }
            a.reverse();
            let at = utc("2026-11-15T00:00:00Z");
            let ra = resolve(&config, &SubjectFacts { subject: "p", groups: &a, api_key_sha256: None, scope: "" }, at);
            let rb = resolve(&config, &SubjectFacts { subject: "p", groups: &b, api_key_sha256: None, scope: "" }, at);
            prop_assert_eq!(ra, rb);
        }
    }
}
