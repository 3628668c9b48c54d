//! The budgets of each history row: which budgets its event met and which budget ledgers it
//! counted in, exactly as the ledger counted it.
//!
//! # Contract
//! - An event's budgets follow from its subject, API key, the group it names, its time, scope
//!   and model, under the configuration version the ledger counted it under (its dedupe
//!   record's `config_version`), through the domain's functions the aggregator counts with
//!   ([`tally_domain::budget::event_budgets`], [`tally_domain::budget::ledgers_counted`]).
//!   Nothing here decides on its own, so history and the ledger cannot disagree.
//! - A counted correction's row carries its target's budgets: computed from the target's
//!   dedupe record (its version, model and group), which is what the aggregator reverted.
//!   Its `model` column may differ (it is the target's raw row's, see [`crate::plan`]); the
//!   budgets never read it.
//! - A row lists the budget subjects met (`budgets`, `__tally_budget__/<kind>/<name>`, what
//!   history queries and exports group by) and the names of the budget ledgers counted in
//!   (`budget_ledgers`, [`tally_domain::budget::ledger_name`]: a ledger row's key without its
//!   period start, what reconciliation sums by). A budget met whose quotas all pass the
//!   event over (another model, another scope) is in the first and not the second.
//! - Configuration versions are immutable once stored, so each is loaded once
//!   ([`ConfigVersions`]); version 0 is the built-in default, as in the aggregator.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use sqlx::PgPool;
use tally_common::config_store;
use tally_domain::budget::{event_budgets, ledgers_counted, EventFacts};
use tally_domain::config::Config;

use crate::sink::Counted;

/// What an event's budgets follow from besides the event: the configuration version the
/// ledger counted it under and the model it was counted with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Basis {
    pub version: i64,
    pub model: Option<String>,
}

/// The budgets of one row.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Budgets {
    /// Budget subjects the event met, in [`tally_domain::budget::budgets_met`]'s order.
    pub subjects: Vec<String>,
    /// Names of the budget ledgers it counted in, sorted.
    pub ledgers: Vec<String>,
}

/// Why a configuration version could not be had.
#[derive(Debug, thiserror::Error)]
pub enum VersionError {
    #[error("failed to read configuration version {version}: {source}")]
    Database { version: i64, source: sqlx::Error },
    /// The ledger counted under a version that is not stored, or no longer validates: every
    /// retry meets it again.
    #[error("configuration version {version} {problem}")]
    Unusable { version: i64, problem: String },
}

/// Every configuration version loaded so far, by version.
#[derive(Default)]
pub struct ConfigVersions {
    loaded: HashMap<i64, Arc<Config>>,
}

impl ConfigVersions {
    /// Loads the versions among `versions` not loaded yet.
    pub async fn load(&mut self, pool: &PgPool, versions: impl IntoIterator<Item = i64>) -> Result<(), VersionError> {
        let wanted: BTreeSet<i64> = versions.into_iter().filter(|v| !self.loaded.contains_key(v)).collect();
        for version in wanted {
            let text = if version == 0 {
                config_store::BUILTIN_DOCUMENT.to_string()
            } else {
                let stored = config_store::at_version(pool, version).await.map_err(|source| VersionError::Database { version, source })?;
                let Some(stored) = stored else {
                    return Err(VersionError::Unusable { version, problem: "is not stored".to_string() });
                };
                stored.document
            };
            let config = Config::from_yaml_str(&text)
                .map_err(|e| VersionError::Unusable { version, problem: format!("does not validate:\n{e}") })?;
            self.loaded.insert(version, Arc::new(config));
        }
        Ok(())
    }

    /// A version loaded before.
    pub fn get(&self, version: i64) -> Option<&Config> {
        self.loaded.get(&version).map(Arc::as_ref)
    }

    /// Puts a configuration in as `version` (tests).
    pub fn insert(&mut self, version: i64, config: Config) {
        self.loaded.insert(version, Arc::new(config));
    }
}

/// The budgets of `counted` under `config` (see the module docs).
pub fn budgets_of(counted: &Counted, config: &Config) -> Budgets {
    let e = &counted.event;
    let facts = EventFacts { subject: &e.subject, api_key_sha256: e.api_key_sha256.as_deref(), group: e.group.as_deref() };
    let met = event_budgets(config, &facts, e.time);
    if met.is_empty() {
        return Budgets::default();
    }
    Budgets {
        subjects: met.iter().map(|b| b.owner.ledger_subject()).collect(),
        ledgers: ledgers_counted(&met, &e.scope, counted.basis.model.as_deref()),
    }
}

/// Gives every event of `counted` its budgets, from the version it was counted under, which
/// `versions` must hold. Returns the first version missing, if any (nothing is changed then).
pub fn assign(counted: &mut [Counted], versions: &ConfigVersions) -> Result<(), i64> {
    if let Some(missing) = counted.iter().map(|c| c.basis.version).find(|v| versions.get(*v).is_none()) {
        return Err(missing);
    }
    for c in counted.iter_mut() {
        let Some(config) = versions.get(c.basis.version) else { continue };
        c.budgets = budgets_of(c, config);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_domain::event::parse_event;

    fn config(budgets: &str) -> Config {
        let text = format!("default_tier: free\ntiers:\n  - {{name: free}}\nmembers: {{alice: [eng]}}\nbudgets:\n{budgets}");
        Config::from_yaml_str(&text).unwrap_or_else(|e| panic!("{e}"))
    }

    fn counted(json: &str, version: i64) -> Counted {
        let event = parse_event(json.as_bytes()).expect("a valid event");
        let mut c = Counted::new(event, String::new());
        c.basis.version = version;
        c
    }

    #[test]
    fn each_row_gets_the_budgets_of_the_version_it_was_counted_under() {
        let mut versions = ConfigVersions::default();
        versions.insert(1, config("  - {group: eng, quotas: [{name: all, metric: total_tokens, period: month, limit: 9}]}\n"));
        versions.insert(
            2,
            config(
                "  - {group: eng, quotas: [{name: o1, metric: total_tokens, period: day, limit: 9, models: [o1]}]}\n\
                 \x20 - {group: ops, quotas: [{name: ops, metric: requests, period: day, limit: 9}]}\n",
            ),
        );
        let at = r#""time": "2026-11-22T10:00:00Z""#;
        let mut rows = vec![
            counted(&format!(r#"{{"id": "a", "subject": "alice", {at}, "model": "gpt-4o"}}"#), 1),
            counted(&format!(r#"{{"id": "b", "subject": "alice", {at}, "model": "gpt-4o", "group": "ops"}}"#), 2),
            counted(&format!(r#"{{"id": "c", "subject": "bob", {at}, "model": "o1"}}"#), 2),
        ];
        // A correction's row: its model column is its target's raw row's, its budgets follow
        // the model the ledger reverted with.
        rows.push(counted(&format!(r#"{{"id": "d", "subject": "alice", {at}, "model": "gpt-4o"}}"#), 2));
        rows[3].basis.model = Some("o1".to_string());
        assign(&mut rows, &versions).expect("every version is loaded");
        let eng = "__tally_budget__/group/eng";
        let ops = "__tally_budget__/group/ops";
        let all = tally_domain::budget::ledger_name(eng, "total_tokens", "*", "month");
        let o1 = tally_domain::budget::ledger_name(eng, "total_tokens", "*|models=o1", "day");
        let ops_day = tally_domain::budget::ledger_name(ops, "requests", "*", "day");
        assert_eq!(rows[0].budgets, Budgets { subjects: vec![eng.into()], ledgers: vec![all] });
        assert_eq!(
            rows[1].budgets,
            Budgets { subjects: vec![eng.into(), ops.into()], ledgers: vec![ops_day] },
            "eng met, but its quota counts o1 only"
        );
        assert_eq!(rows[2].budgets, Budgets::default(), "bob is in no group");
        assert_eq!(rows[3].budgets, Budgets { subjects: vec![eng.into()], ledgers: vec![o1] });
        let mut unknown = vec![counted(&format!(r#"{{"id": "e", "subject": "alice", {at}}}"#), 7)];
        assert_eq!(assign(&mut unknown, &versions), Err(7));
        assert_eq!(unknown[0].budgets, Budgets::default());
    }
}
