//! The tier policy the aggregator applies: the YAML configuration (see
//! `tally_domain::config`) and the effective quotas of a subject at an instant.
//!
//! Rolling-window quotas need per-event history rather than one ledger row per period; the
//! ledger path does not count them yet (issue 4) and leaves them out of decisions, rather
//! than counting them wrongly.

use std::path::Path;

use anyhow::Context;
use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use tally_domain::config::Config;
use tally_domain::period::PeriodSpec;
use tally_domain::precedence::{resolve, SubjectFacts};

pub use tally_domain::tier::EffectiveQuota as Quota;

/// The built-in configuration: one default tier with a monthly token budget.
pub const DEFAULT_CONFIG: &str = include_str!("../../config/default.yaml");

/// A subject's effective tier and quotas at one instant.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub tier: String,
    pub timezone: Tz,
    pub quotas: Vec<Quota>,
}

/// The loaded tier configuration.
#[derive(Debug, Clone)]
pub struct Policy {
    config: Config,
}

impl Policy {
    pub fn from_yaml(text: &str, origin: &str) -> anyhow::Result<Policy> {
        let config = Config::from_yaml_str(text).map_err(|e| anyhow::anyhow!("invalid tier configuration {origin}:\n{e}"))?;
        Ok(Policy { config })
    }

    /// Loads `path`, or the built-in default configuration when there is none.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Policy> {
        match path {
            None => Policy::from_yaml(DEFAULT_CONFIG, "(built-in default)"),
            Some(p) => {
                let text = std::fs::read_to_string(p).with_context(|| format!("failed to read {}", p.display()))?;
                Policy::from_yaml(&text, &p.display().to_string())
            }
        }
    }

    /// The effective tier and the quotas the ledger path counts, for `subject` at `at`.
    pub fn resolve(&self, subject: &str, api_key_sha256: Option<&str>, scope: &str, at: DateTime<Utc>) -> Resolved {
        let facts = SubjectFacts { subject, groups: &[], api_key_sha256, scope };
        let r = resolve(&self.config, &facts, at);
        let quotas = r.quotas.into_iter().filter(|q| !matches!(q.period, PeriodSpec::Rolling { .. })).collect();
        Resolved { tier: r.tier, timezone: r.timezone, quotas }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_default_has_a_monthly_token_quota() {
        let policy = Policy::load(None).unwrap();
        let r = policy.resolve("anyone", None, "", "2026-11-22T10:00:00Z".parse().unwrap());
        assert_eq!(r.tier, "default");
        assert_eq!(r.quotas.len(), 1);
        assert_eq!(r.quotas[0].metric, tally_domain::metric::Metric::TotalTokens);
        assert_eq!(r.quotas[0].limit, 1_000_000);
        assert_eq!(r.quotas[0].period, PeriodSpec::Month);
    }

    #[test]
    fn the_example_configuration_loads_and_assignments_apply() {
        let policy = Policy::from_yaml(include_str!("../../examples/tiers.yaml"), "examples/tiers.yaml").unwrap();
        let r = policy.resolve("bob", None, "", "2026-11-22T10:00:00Z".parse().unwrap());
        assert_eq!(r.tier, "enterprise");
        assert!(r.quotas.iter().all(|q| !matches!(q.period, PeriodSpec::Rolling { .. })));
    }
}
