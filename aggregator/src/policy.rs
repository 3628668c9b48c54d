//! The tier policy the aggregator applies: the YAML configuration (see
//! `tally_domain::config`) and the effective quotas of a subject at an instant.
//!
//! The configuration lives in the configuration store (`tally_common::config_store`, the
//! highest version in force), written by `tally config apply`, the admin API, or an
//! aggregator started with `--config FILE` on an empty store. Every batch and every
//! scheduler pass first checks, inside its transaction, that it decides with the version in
//! force ([`PolicyHandle::sync`]), so a change applies from the next batch on.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use anyhow::Context;
use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use sqlx::{PgConnection, PgPool};
use tally_common::config_store::{self, Base, CheckedDocument, StoredVersion};
use tally_domain::budget::{budget_timezone, event_budgets_on_tier, BudgetOwner, EventFacts, OwnerKind};
use tally_domain::config::Config;
use tally_domain::precedence::{next_change_after, resolve, SubjectFacts};

pub use tally_common::config_store::Applied;
pub use tally_domain::tier::EffectiveQuota as Quota;

/// The built-in configuration: one default tier with a monthly token budget.
pub const DEFAULT_CONFIG: &str = config_store::BUILTIN_DOCUMENT;

/// A subject's effective tier and quotas at one instant; or a budget's quotas, when the
/// subject is a budget subject.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub tier: String,
    pub timezone: Tz,
    pub quotas: Vec<Quota>,
    /// The budget whose quotas these are; `None` for a subject's own.
    pub budget: Option<BudgetOwner>,
}

/// A budget a request meets: the budget subject its ledger rows are kept under, its
/// calendar timezone and its quotas.
#[derive(Debug, Clone)]
pub struct BudgetTarget {
    pub subject: String,
    pub timezone: Tz,
    pub quotas: Vec<Quota>,
}

/// One version of the tier configuration.
#[derive(Debug, Clone)]
pub struct Policy {
    config: Config,
    /// The scopes the configuration names anywhere, worked out once: every decision of
    /// every subject lists the quotas of each ([`Policy::resolve_all_scopes`]).
    named_scopes: Vec<String>,
    /// Every budget as the ledger path counts it, made once: a batch resolves thousands of
    /// subjects, and each shares these rather than copying the budget's quotas.
    budget_targets: HashMap<BudgetOwner, Arc<BudgetTarget>>,
    /// The stored version it came from; 0 for the built-in default.
    pub version: i64,
}

impl Policy {
    pub fn from_yaml(text: &str, origin: &str) -> anyhow::Result<Policy> {
        let config = Config::from_yaml_str(text).map_err(|e| anyhow::anyhow!("invalid tier configuration {origin}:\n{e}"))?;
        let named_scopes = named_scopes(&config);
        let budget_targets = config
            .budgets
            .values()
            .map(|b| {
                let target =
                    BudgetTarget { subject: b.owner.ledger_subject(), timezone: budget_timezone(&config, b), quotas: b.effective_quotas() };
                (b.owner.clone(), Arc::new(target))
            })
            .collect();
        Ok(Policy { config, named_scopes, budget_targets, version: 0 })
    }

    /// The policy of a stored version.
    fn stored(stored: &StoredVersion) -> anyhow::Result<Policy> {
        let mut policy = Policy::from_yaml(&stored.document, &format!("(config version {})", stored.version))?;
        policy.version = stored.version;
        Ok(policy)
    }

    /// The built-in default configuration.
    pub fn builtin() -> Policy {
        // The built-in file is checked by a unit test; fall back to nothing would hide a bug.
        Policy::from_yaml(DEFAULT_CONFIG, "(built-in default)").unwrap_or_else(|e| panic!("{e}"))
    }

    /// The effective tier and the quotas the ledger path counts, for `subject` at `at`.
    pub fn resolve(&self, subject: &str, api_key_sha256: Option<&str>, scope: &str, at: DateTime<Utc>) -> Resolved {
        let facts = SubjectFacts { subject, groups: &[], api_key_sha256, scope };
        let r = resolve(&self.config, &facts, at);
        Resolved { tier: r.tier, timezone: r.timezone, quotas: r.quotas, budget: None }
    }

    /// The budgets an event meets, its subject's effective tier at the event's time being
    /// `tier` ([`tally_domain::budget::event_budgets_on_tier`]: the rule the history writer
    /// records on each raw row, with the tier [`Policy::resolve`] already found).
    pub fn budgets_met(&self, facts: &EventFacts<'_>, tier: &str) -> Vec<Arc<BudgetTarget>> {
        event_budgets_on_tier(&self.config, facts, tier).into_iter().filter_map(|b| self.budget_targets.get(&b.owner).cloned()).collect()
    }

    /// Whether an event may name `group`: the configuration knows it.
    pub fn knows_group(&self, group: &str) -> bool {
        self.config.knows_group(group)
    }

    /// What a decision of `subject` lists: for a budget subject, its budget's quotas (none
    /// once the budget is removed, which unblocks everyone it blocked); for any other, the
    /// subject's quotas across scopes ([`Policy::resolve_all_scopes`]).
    pub fn resolve_for_decision(&self, subject: &str, api_key_sha256: Option<&str>, at: DateTime<Utc>) -> Resolved {
        let Some(owner) = BudgetOwner::from_ledger_subject(subject) else {
            return self.resolve_all_scopes(subject, api_key_sha256, at);
        };
        let budget = self.config.budget(&owner);
        Resolved {
            tier: if owner.kind == OwnerKind::Tier { owner.name.clone() } else { String::new() },
            timezone: budget.map_or(self.config.timezone, |b| budget_timezone(&self.config, b)),
            quotas: budget.map(|b| b.effective_quotas()).unwrap_or_default(),
            budget: Some(owner),
        }
    }

    /// Every quota of the subject at `at`, across scopes: the quotas of the default scope plus
    /// those scoped to any scope the configuration names. This is what a decision snapshot
    /// lists; events are counted with [`Policy::resolve`] for their own scope.
    pub fn resolve_all_scopes(&self, subject: &str, api_key_sha256: Option<&str>, at: DateTime<Utc>) -> Resolved {
        let mut all = self.resolve(subject, api_key_sha256, "", at);
        for scope in &self.named_scopes {
            let scoped = self.resolve(subject, api_key_sha256, scope, at);
            for q in scoped.quotas.into_iter().filter(|q| q.scope.is_some()) {
                if !all.quotas.iter().any(|known| known.name == q.name && known.scope == q.scope) {
                    all.quotas.push(q);
                }
            }
        }
        all
    }

    /// The event's cost: as sent, or when absent priced from the model price table (micro-
    /// dollars per million tokens, rounded half to even); `None` when neither is known.
    pub fn cost_micros(&self, event: &tally_domain::event::UsageEvent) -> Option<i64> {
        event.cost_micros.or_else(|| {
            let price = self.config.price(event.model.as_deref()?)?;
            Some(price.cost_micros(event.input_tokens, event.output_tokens, event.cached_tokens))
        })
    }

    /// The next instant after `at` at which the subject's resolution may change by itself
    /// (an override or assignment starting or ending).
    pub fn next_change_after(&self, subject: &str, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
        next_change_after(&self.config, subject, at)
    }
}

/// The policy in force, shared by the consume loop and the scheduler of one instance.
#[derive(Clone)]
pub struct PolicyHandle {
    current: Arc<RwLock<Arc<Policy>>>,
}

impl PolicyHandle {
    pub fn new(policy: Policy) -> Self {
        PolicyHandle { current: Arc::new(RwLock::new(Arc::new(policy))) }
    }

    pub fn current(&self) -> Arc<Policy> {
        match self.current.read() {
            Ok(p) => p.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn replace(&self, policy: Policy) {
        match self.current.write() {
            Ok(mut p) => *p = Arc::new(policy),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(policy),
        }
    }

    /// Makes sure the policy is the version in force, loading it on `conn` (usually the
    /// caller's transaction) if a newer one was applied. Returns the policy to decide with.
    pub async fn sync(&self, conn: &mut PgConnection) -> anyhow::Result<Arc<Policy>> {
        let latest = config_store::latest_version(&mut *conn).await?;
        let current = self.current();
        match latest {
            Some(v) if v != current.version => {
                let stored =
                    config_store::at_version(&mut *conn, v).await?.with_context(|| format!("configuration version {v} is missing"))?;
                let policy = Policy::stored(&stored)?;
                tracing::info!(version = v, "tier configuration loaded");
                self.replace(policy);
                Ok(self.current())
            }
            _ => Ok(current),
        }
    }
}

/// The scopes `config` names anywhere (quotas, explicit limits, overrides), in order.
fn named_scopes(c: &Config) -> Vec<String> {
    let quota_scopes = c.quotas.iter().chain(c.tiers.iter().flat_map(|t| t.quotas.iter())).filter_map(|q| q.scope.clone());
    let explicit = c.tiers.iter().flat_map(|t| t.explicit_limits.iter().map(|e| e.scope.clone()));
    let overrides = c.overrides.iter().filter_map(|o| o.scope.clone());
    let distinct: std::collections::BTreeSet<String> = quota_scopes.chain(explicit).chain(overrides).filter(|s| !s.is_empty()).collect();
    distinct.into_iter().collect()
}

/// Earlier configuration versions, loaded on demand: a correction reverts an event with
/// the version it was counted under, so it touches exactly the ledger rows the event did.
#[derive(Clone, Default)]
pub struct PolicyHistory {
    cache: Arc<Mutex<HashMap<i64, Arc<Policy>>>>,
}

impl PolicyHistory {
    /// The policy of `version` (0: the built-in default); `current` when it is that version.
    pub async fn version(&self, conn: &mut PgConnection, version: i64, current: &Policy) -> anyhow::Result<Arc<Policy>> {
        if version == current.version {
            return Ok(Arc::new(current.clone()));
        }
        if let Some(p) = self.cache.lock().ok().and_then(|c| c.get(&version).cloned()) {
            return Ok(p);
        }
        let policy = if version == 0 {
            Policy::builtin()
        } else {
            let stored = config_store::at_version(&mut *conn, version)
                .await?
                .with_context(|| format!("configuration version {version} is missing"))?;
            Policy::stored(&stored)?
        };
        let policy = Arc::new(policy);
        if let Ok(mut cache) = self.cache.lock() {
            cache.insert(version, policy.clone());
        }
        Ok(policy)
    }
}

/// Applies `path` only when no configuration has been stored yet: an aggregator started with
/// `--config` seeds a fresh database, and never overwrites changes made since through
/// `tally config apply` or the admin API. Returns what was applied, if anything.
pub async fn seed_from_file(pool: &PgPool, path: &Path) -> anyhow::Result<Option<Applied>> {
    if config_store::latest_version(pool).await?.is_some() {
        return Ok(None);
    }
    let file = read_file(path)?;
    match config_store::apply(pool, &file.document, &file.source, Base::Version(0)).await {
        Ok(applied) => Ok(Some(applied)),
        // Another writer stored a version since: it is not overwritten.
        Err(config_store::ApplyError::Stale { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// A configuration file that validated, and the source it is stored under.
struct ConfigFile {
    document: CheckedDocument,
    /// `file NAME`.
    source: String,
}

/// Reads and validates a configuration file; an invalid one is an error listing every
/// problem with its location.
fn read_file(path: &Path) -> anyhow::Result<ConfigFile> {
    let text = std::fs::read_to_string(path).with_context(|| format!("failed to read {}", path.display()))?;
    let source = file_source(path);
    let document = CheckedDocument::parse(text).map_err(|e| anyhow::anyhow!("invalid tier configuration {source}:\n{e}"))?;
    Ok(ConfigFile { document, source })
}

/// The source a configuration file is stored under: `file NAME`.
pub fn file_source(path: &Path) -> String {
    let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    format!("file {name}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_domain::period::PeriodSpec;

    #[test]
    fn builtin_default_has_a_monthly_token_quota() {
        let policy = Policy::builtin();
        let r = policy.resolve("anyone", None, "", "2026-11-22T10:00:00Z".parse().unwrap());
        assert_eq!(r.tier, "default");
        assert_eq!(r.quotas.len(), 1);
        assert_eq!(r.quotas[0].metric, tally_domain::metric::Metric::TotalTokens);
        assert_eq!(r.quotas[0].limit, 1_000_000);
        assert_eq!(r.quotas[0].period, PeriodSpec::Month);
    }

    #[test]
    fn a_snapshot_lists_scoped_quotas_of_every_named_scope() {
        let policy = Policy::from_yaml(include_str!("../../examples/tiers.yaml"), "examples/tiers.yaml").unwrap();
        let at = "2026-11-22T10:00:00Z".parse().unwrap();
        let plain = policy.resolve("alice", None, "", at);
        let all = policy.resolve_all_scopes("alice", None, at);
        assert!(all.quotas.len() > plain.quotas.len(), "pro's explicit batch limit is scoped to `batch`");
        assert!(all.quotas.iter().any(|q| q.scope.as_deref() == Some("batch")));
        assert_eq!(all.quotas.iter().filter(|q| q.scope.is_none()).count(), plain.quotas.iter().filter(|q| q.scope.is_none()).count());
    }

    #[test]
    fn an_event_without_cost_is_priced_from_its_model() {
        let policy = Policy::from_yaml(include_str!("../../examples/tiers.yaml"), "examples/tiers.yaml").unwrap();
        let event = |model: &str, cost: Option<i64>| {
            let mut e = tally_domain::event::event_from_value(serde_json::json!({
                "id": "e", "subject": "s", "time": "2026-11-22T10:00:00Z", "model": model,
                "input_tokens": 1000, "output_tokens": 500, "cached_tokens": 0
            }))
            .unwrap();
            e.cost_micros = cost;
            e
        };
        // gpt-4o: 2.5 $/M input, 10 $/M output: 1000 * 2.5 + 500 * 10 = 7500 micro-dollars.
        assert_eq!(policy.cost_micros(&event("gpt-4o", None)), Some(7500));
        assert_eq!(policy.cost_micros(&event("gpt-4o", Some(3))), Some(3), "a sent cost wins");
        assert_eq!(policy.cost_micros(&event("unknown-model", None)), None);
    }

    #[test]
    fn the_example_configuration_loads_and_assignments_apply() {
        let policy = Policy::from_yaml(include_str!("../../examples/tiers.yaml"), "examples/tiers.yaml").unwrap();
        let r = policy.resolve("bob", None, "", "2026-11-22T10:00:00Z".parse().unwrap());
        assert_eq!(r.tier, "enterprise");
        assert!(r.quotas.iter().any(|q| matches!(q.period, PeriodSpec::Rolling { .. })));
    }
}
