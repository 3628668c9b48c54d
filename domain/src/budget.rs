//! Budgets beside a subject's own quotas: an API key's, a group's (a team or organisation,
//! one pooled ledger for all its members) and a tier pool's (one ledger for every subject
//! whose effective tier it is).
//!
//! # Contract
//! - A usage event counts in its subject's own quotas ([`crate::precedence::resolve`]) and in
//!   every quota of every budget it *meets* ([`budgets_met`]; for an event,
//!   [`event_budgets`]): the budget of its API key, the budgets of its subject's configured
//!   groups and of the group the event names, and the pool of its subject's effective tier.
//!   Within a budget, a quota counts the event when its scope and models match
//!   ([`crate::tier::EffectiveQuota::counts`]; the ledgers an event counts in:
//!   [`ledgers_counted`]).
//! - A budget's ledger rows and decision belong to a *budget subject*, a reserved name
//!   ([`BudgetOwner::ledger_subject`], `__tally_budget__/<kind>/<name>`) that no event's
//!   subject may take ([`is_reserved_subject`]), so a budget's ledger can never be confused
//!   with a subject's.
//! - Every budget a request meets must pass; the strictest decides (the API combines the
//!   decisions).
//! - A quota narrowed to models keeps its ledger rows apart from an unnarrowed quota of the
//!   same metric, scope and period: the rows' scope key carries the models ([`ledger_scope`]).

use std::fmt;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

use crate::tier::{EffectiveQuota, QuotaDef};

/// The start of every budget subject's name. Events may not use it as their subject.
pub const BUDGET_SUBJECT_PREFIX: &str = "__tally_budget__/";

/// Whether `subject` is a name Tally keeps for its own records (budgets, heartbeats).
pub fn is_reserved_subject(subject: &str) -> bool {
    subject.starts_with(BUDGET_SUBJECT_PREFIX) || subject.starts_with(crate::heartbeat::HEARTBEAT_KEY_PREFIX)
}

/// What owns a budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OwnerKind {
    /// An API key, named by the SHA-256 hex of the key.
    ApiKey,
    /// A group used as a team or organisation.
    Group,
    /// Every subject whose effective tier is this tier.
    Tier,
}

impl OwnerKind {
    pub const ALL: [OwnerKind; 3] = [OwnerKind::ApiKey, OwnerKind::Group, OwnerKind::Tier];

    pub fn as_str(self) -> &'static str {
        match self {
            OwnerKind::ApiKey => "api_key",
            OwnerKind::Group => "group",
            OwnerKind::Tier => "tier",
        }
    }

    pub fn parse(text: &str) -> Option<OwnerKind> {
        OwnerKind::ALL.into_iter().find(|k| k.as_str() == text)
    }
}

impl fmt::Display for OwnerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The owner of a budget: its kind and name (a group's name, a tier's name, a key's SHA-256
/// hex).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BudgetOwner {
    pub kind: OwnerKind,
    pub name: String,
}

impl BudgetOwner {
    pub fn new(kind: OwnerKind, name: impl Into<String>) -> BudgetOwner {
        BudgetOwner { kind, name: name.into() }
    }

    /// The subject its ledger rows and decisions are kept under.
    pub fn ledger_subject(&self) -> String {
        format!("{BUDGET_SUBJECT_PREFIX}{}/{}", self.kind, self.name)
    }

    /// The owner as queries and exports name it: `<kind>:<name>` (`group:eng`,
    /// `api_key:<64 hex>`, `tier:pro`).
    pub fn spec(&self) -> String {
        format!("{}:{}", self.kind, self.name)
    }

    /// The owner named `<kind>:<name>` ([`BudgetOwner::spec`]); `None` when the kind is
    /// unknown or the name empty.
    pub fn parse_spec(text: &str) -> Option<BudgetOwner> {
        let (kind, name) = text.split_once(':')?;
        let kind = OwnerKind::parse(kind)?;
        (!name.is_empty()).then(|| BudgetOwner { kind, name: name.to_string() })
    }

    /// The owner whose budget subject `subject` is; `None` for any other subject.
    pub fn from_ledger_subject(subject: &str) -> Option<BudgetOwner> {
        let rest = subject.strip_prefix(BUDGET_SUBJECT_PREFIX)?;
        let (kind, name) = rest.split_once('/')?;
        Some(BudgetOwner { kind: OwnerKind::parse(kind)?, name: name.to_string() })
    }
}

impl fmt::Display for BudgetOwner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind, self.name)
    }
}

/// A budget as configured (the `budgets` section).
#[derive(Debug, Clone, PartialEq)]
pub struct Budget {
    pub owner: BudgetOwner,
    /// Calendar periods' timezone; `None`: a tier pool's tier's, else the configuration's.
    pub timezone: Option<Tz>,
    /// Never empty.
    pub quotas: Vec<QuotaDef>,
}

impl Budget {
    /// The budget's quotas as they apply: limits as written (no tier multiplies them), each
    /// quota's action or `block`.
    pub fn effective_quotas(&self) -> Vec<EffectiveQuota> {
        self.quotas
            .iter()
            .map(|q| EffectiveQuota {
                name: q.name.clone(),
                metric: q.metric,
                period: q.period,
                limit: q.limit,
                burst: q.burst,
                scope: q.scope.clone(),
                models: q.models.clone(),
                thresholds: q.thresholds.clone(),
                action: q.action.clone().unwrap_or_default(),
            })
            .collect()
    }
}

/// What decides which budgets a request meets.
#[derive(Debug, Clone, Copy)]
pub struct BudgetFacts<'a> {
    pub subject: &'a str,
    /// The SHA-256 hex of the request's API key.
    pub api_key_sha256: Option<&'a str>,
    /// Groups the request names (an event's `group`, a check's `groups`), beside the
    /// subject's configured ones. Groups without a budget are passed over.
    pub groups: &'a [String],
    /// The subject's effective tier.
    pub tier: &'a str,
}

/// The budgets a request meets, each once, in a fixed order: the API key's, the groups' by
/// name, the tier pool.
pub fn budgets_met<'a>(config: &'a crate::config::Config, facts: &BudgetFacts<'_>) -> Vec<&'a Budget> {
    if config.budgets.is_empty() {
        return Vec::new();
    }
    let mut met: Vec<&Budget> = Vec::new();
    if let Some(key) = facts.api_key_sha256 {
        met.extend(config.budget(&BudgetOwner::new(OwnerKind::ApiKey, key)));
    }
    let configured = config.members.get(facts.subject).map(Vec::as_slice).unwrap_or_default();
    let mut groups: Vec<&String> = configured.iter().chain(facts.groups).collect();
    groups.sort_unstable();
    groups.dedup();
    for group in groups {
        met.extend(config.budget(&BudgetOwner::new(OwnerKind::Group, group.as_str())));
    }
    met.extend(config.budget(&BudgetOwner::new(OwnerKind::Tier, facts.tier)));
    met
}

/// What of a usage event decides which budgets it met: its subject, the SHA-256 hex of its API
/// key and the group it names. The event's dedupe record keeps each of them
/// (`processed_events`), so a correction reverts, and history records, the budgets the count
/// met.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EventFacts<'a> {
    pub subject: &'a str,
    pub api_key_sha256: Option<&'a str>,
    /// The group the event names (`group` or `org`).
    pub group: Option<&'a str>,
}

/// The budgets an event at `at` met under `config`: [`budgets_met`] with the subject's
/// effective tier at `at` ([`crate::precedence::effective_tier`] of the subject and API key;
/// the event's group names a budget, never a tier) and the group the event names. The
/// aggregator counts with it and the history writer records what it returns on each raw
/// row, so the ledger and history cannot disagree about which budgets an event met.
pub fn event_budgets<'a>(config: &'a crate::config::Config, facts: &EventFacts<'_>, at: DateTime<Utc>) -> Vec<&'a Budget> {
    if config.budgets.is_empty() {
        return Vec::new();
    }
    let subject = crate::precedence::SubjectFacts { subject: facts.subject, groups: &[], api_key_sha256: facts.api_key_sha256, scope: "" };
    event_budgets_on_tier(config, facts, &crate::precedence::effective_tier(config, &subject, at))
}

/// [`event_budgets`] for a caller that resolved the subject's effective tier at the event's
/// time already (the aggregator's resolution of the event's quotas): the same rule, without
/// resolving the tier a second time.
pub fn event_budgets_on_tier<'a>(config: &'a crate::config::Config, facts: &EventFacts<'_>, tier: &str) -> Vec<&'a Budget> {
    if config.budgets.is_empty() {
        return Vec::new();
    }
    let groups: Vec<String> = facts.group.map(str::to_string).into_iter().collect();
    budgets_met(config, &BudgetFacts { subject: facts.subject, api_key_sha256: facts.api_key_sha256, groups: &groups, tier })
}

/// The name of one budget ledger: the key of its ledger rows without the period start
/// (budget subject, metric, scope key as [`ledger_scope`] writes it, period), as the JSON
/// array of the four, so that two keys never share a name whatever their parts hold. A raw
/// history row lists the names of the budget ledgers its event counted in
/// ([`ledgers_counted`]); reconciliation finds the events of a ledger row by the row's name
/// and window.
pub fn ledger_name(subject: &str, metric: &str, scope_key: &str, period: &str) -> String {
    serde_json::Value::from(vec![subject, metric, scope_key, period]).to_string()
}

/// The names ([`ledger_name`]) of the ledgers of `budgets` that an event in `scope` for
/// `model` counts in: every quota whose scope and models match it
/// ([`EffectiveQuota::counts`], as the aggregator counts), each name once, sorted.
pub fn ledgers_counted(budgets: &[&Budget], scope: &str, model: Option<&str>) -> Vec<String> {
    let mut names: Vec<String> = budgets
        .iter()
        .flat_map(|b| {
            let subject = b.owner.ledger_subject();
            b.effective_quotas()
                .into_iter()
                .filter(|q| q.counts(scope, model))
                .map(move |q| ledger_name(&subject, q.metric.as_str(), &q.ledger_scope(), &q.period.to_string()))
        })
        .collect();
    names.sort_unstable();
    names.dedup();
    names
}

/// The timezone of a budget's calendar periods: its own, else its tier's (a tier pool), else
/// the configuration's.
pub fn budget_timezone(config: &crate::config::Config, budget: &Budget) -> Tz {
    let tier_tz = || match budget.owner.kind {
        OwnerKind::Tier => config.tier(&budget.owner.name).and_then(|t| t.timezone),
        _ => None,
    };
    budget.timezone.or_else(tier_tz).unwrap_or(config.timezone)
}

/// The `scope` column of a quota's ledger rows: `*` for every scope, else the scope; a quota
/// narrowed to models adds `|models=` and the models, comma-separated, so its rows never
/// share a key with a quota that counts other models. Configured scopes and models hold no
/// `|` or `,` (validation refuses them).
pub fn ledger_scope(scope: Option<&str>, models: Option<&[String]>) -> String {
    let scope = scope.unwrap_or("*");
    match models {
        None => scope.to_string(),
        Some(models) => format!("{scope}{MODELS_MARK}{}", models.join(",")),
    }
}

const MODELS_MARK: &str = "|models=";

/// The scope (`None`: every scope) and models (`None`: every model) of a ledger row's scope
/// key: the inverse of [`ledger_scope`].
pub fn parse_ledger_scope(key: &str) -> (Option<String>, Option<Vec<String>>) {
    let (scope, models) = match key.split_once(MODELS_MARK) {
        Some((scope, models)) => (scope, Some(models.split(',').map(str::to_string).collect())),
        None => (key, None),
    };
    ((scope != "*").then(|| scope.to_string()), models)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn a_budget_subject_names_its_owner_and_reads_back() {
        let owner = BudgetOwner::new(OwnerKind::Group, "eng/platform");
        assert_eq!(owner.ledger_subject(), "__tally_budget__/group/eng/platform");
        assert_eq!(BudgetOwner::from_ledger_subject(&owner.ledger_subject()), Some(owner));
        assert_eq!(BudgetOwner::from_ledger_subject("alice"), None);
        assert_eq!(BudgetOwner::from_ledger_subject("__tally_budget__/team/x"), None, "an unknown kind");
        assert!(is_reserved_subject("__tally_budget__/anything"));
        assert!(is_reserved_subject("__tally_heartbeat__/0"));
        assert!(!is_reserved_subject("__tally_budget"));
    }

    #[test]
    fn ledger_scope_keys_keep_model_budgets_apart_and_read_back() {
        let models = vec!["gpt-4o".to_string(), "o1".to_string()];
        assert_eq!(ledger_scope(None, None), "*");
        assert_eq!(ledger_scope(Some("chat"), None), "chat");
        assert_eq!(ledger_scope(None, Some(&models)), "*|models=gpt-4o,o1");
        assert_eq!(parse_ledger_scope("*|models=gpt-4o,o1"), (None, Some(models.clone())));
        assert_eq!(parse_ledger_scope("chat|models=gpt-4o,o1"), (Some("chat".into()), Some(models)));
        assert_eq!(parse_ledger_scope("*"), (None, None));
        assert_eq!(parse_ledger_scope("batch"), (Some("batch".into()), None));
    }

    fn config() -> Config {
        let key = crate::event::hash_api_key("sk-team");
        Config::from_yaml_str(&format!(
            "default_tier: free\n\
             quotas:\n  - {{name: monthly, metric: total_tokens, period: month, limit: 1000}}\n\
             tiers:\n  - {{name: free, priority: 0}}\n  - {{name: pro, priority: 10, timezone: Europe/Paris}}\n\
             groups: {{staff: pro}}\n\
             members: {{alice: [eng, staff], bob: [eng]}}\n\
             budgets:\n\
             \x20 - group: eng\n    quotas: [{{name: team_month, metric: cost_micros, period: month, limit: 1000000}}]\n\
             \x20 - api_key: {key}\n    quotas: [{{name: key_cap, metric: total_tokens, period: day, limit: 500}}]\n\
             \x20 - tier: pro\n    quotas: [{{name: pool, metric: total_tokens, period: day, limit: 10000, models: [gpt-4o]}}]\n\
             \x20 - group: research\n    timezone: Asia/Tokyo\n    quotas: [{{name: r, metric: requests, rate: 10/m}}]\n"
        ))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn a_request_meets_its_keys_its_groups_and_its_tiers_budgets_once_each_in_order() {
        let config = config();
        let key = crate::event::hash_api_key("sk-team");
        let owners = |facts: BudgetFacts| budgets_met(&config, &facts).iter().map(|b| b.owner.to_string()).collect::<Vec<_>>();
        let facts = BudgetFacts { subject: "alice", api_key_sha256: Some(&key), groups: &[], tier: "pro" };
        assert_eq!(owners(facts), [format!("api_key {key}"), "group eng".into(), "tier pro".into()]);
        let named = ["research".to_string(), "eng".to_string(), "nobody".to_string()];
        let facts = BudgetFacts { subject: "carol", api_key_sha256: None, groups: &named, tier: "free" };
        assert_eq!(owners(facts), ["group eng", "group research"], "the event's groups, once each, sorted; no pool for free");
        let facts = BudgetFacts { subject: "bob", api_key_sha256: None, groups: &["eng".to_string()], tier: "free" };
        assert_eq!(owners(facts), ["group eng"], "a group met twice counts once");
    }

    #[test]
    fn an_owner_spec_reads_back() {
        let owner = BudgetOwner::new(OwnerKind::Group, "eng:platform");
        assert_eq!(owner.spec(), "group:eng:platform");
        assert_eq!(BudgetOwner::parse_spec(&owner.spec()), Some(owner));
        assert_eq!(BudgetOwner::parse_spec("tier:pro"), Some(BudgetOwner::new(OwnerKind::Tier, "pro")));
        for bad in ["team:eng", "group:", "group", ""] {
            assert_eq!(BudgetOwner::parse_spec(bad), None, "{bad}");
        }
    }

    #[test]
    fn an_events_budgets_follow_its_tier_at_its_time_and_the_group_it_names() {
        let key = crate::event::hash_api_key("sk-team");
        let config = Config::from_yaml_str(&format!(
            "default_tier: free\n\
             tiers:\n  - {{name: free}}\n  - {{name: pro, priority: 10}}\n\
             groups: {{staff: pro}}\n\
             members: {{alice: [eng]}}\n\
             assignments:\n  - {{subject: carol, tier: pro, expires_at: 2026-11-15T00:00:00Z}}\n\
             api_keys:\n  - {{key_sha256: \"{key}\", tier: pro}}\n\
             budgets:\n\
             \x20 - group: eng\n    quotas: [{{name: team, metric: total_tokens, period: month, limit: 1000}}]\n\
             \x20 - tier: pro\n    quotas: [{{name: pool, metric: requests, period: day, limit: 10}}]\n"
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        let owners = |facts: EventFacts, at: &str| {
            event_budgets(&config, &facts, at.parse().unwrap()).iter().map(|b| b.owner.spec()).collect::<Vec<_>>()
        };
        let carol = EventFacts { subject: "carol", api_key_sha256: None, group: None };
        assert_eq!(owners(carol, "2026-11-14T23:59:59Z"), ["tier:pro"], "assigned pro until the 15th");
        assert!(owners(carol, "2026-11-15T00:00:00Z").is_empty(), "free from the 15th: no pool");
        let with_key = EventFacts { subject: "dave", api_key_sha256: Some(&key), group: Some("eng") };
        assert_eq!(owners(with_key, "2026-11-20T00:00:00Z"), ["group:eng", "tier:pro"], "the key's tier, the event's group");
        // A group named by the event gives no tier: `staff` grants pro to members only.
        let named = EventFacts { subject: "erin", api_key_sha256: None, group: Some("staff") };
        assert!(owners(named, "2026-11-20T00:00:00Z").is_empty());
        let alice = EventFacts { subject: "alice", api_key_sha256: None, group: None };
        assert_eq!(owners(alice, "2026-11-20T00:00:00Z"), ["group:eng"]);
    }

    #[test]
    fn an_event_counts_in_the_ledgers_whose_scope_and_models_match_once_each() {
        let config = Config::from_yaml_str(
            "default_tier: free\ntiers:\n  - {name: free}\n\
             budgets:\n\
             \x20 - group: eng\n    quotas:\n\
             \x20     - {name: all, metric: total_tokens, period: month, limit: 1000}\n\
             \x20     - {name: gpt, metric: total_tokens, period: month, limit: 500, models: [gpt-4o, o1]}\n\
             \x20     - {name: chat, metric: requests, period: day, limit: 5, scope: chat}\n\
             \x20     - {name: all_again, metric: total_tokens, period: month, limit: 2000, action: soft}\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let eng = config.budget(&BudgetOwner::new(OwnerKind::Group, "eng")).unwrap();
        let subject = "__tally_budget__/group/eng";
        let all = ledger_name(subject, "total_tokens", "*", "month");
        let gpt = ledger_name(subject, "total_tokens", "*|models=gpt-4o,o1", "month");
        let chat = ledger_name(subject, "requests", "chat", "day");
        assert_eq!(all, r#"["__tally_budget__/group/eng","total_tokens","*","month"]"#);
        let mut expected = vec![all.clone(), gpt, chat];
        expected.sort();
        assert_eq!(ledgers_counted(&[eng], "chat", Some("o1")), expected);
        assert_eq!(ledgers_counted(&[eng], "batch", Some("o1")).len(), 2);
        assert_eq!(
            ledgers_counted(&[eng], "batch", Some("gpt-4o-mini")),
            std::slice::from_ref(&all),
            "another model: only the unnarrowed quota"
        );
        assert_eq!(ledgers_counted(&[eng], "batch", None), [all]);
        assert!(ledgers_counted(&[], "chat", Some("o1")).is_empty());
        // Names never collide, whatever the parts hold.
        assert_ne!(ledger_name("a\",\"b", "c", "d", "e"), ledger_name("a", "b\",\"c", "d", "e"));
    }

    #[test]
    fn a_budgets_timezone_is_its_own_else_its_tiers_else_the_configurations() {
        let config = config();
        let tz = |kind, name: &str| budget_timezone(&config, config.budget(&BudgetOwner::new(kind, name)).unwrap());
        assert_eq!(tz(OwnerKind::Group, "research"), chrono_tz::Asia::Tokyo);
        assert_eq!(tz(OwnerKind::Tier, "pro"), chrono_tz::Europe::Paris);
        assert_eq!(tz(OwnerKind::Group, "eng"), chrono_tz::UTC);
    }

    #[test]
    fn budget_quotas_keep_their_limits_and_block_by_default() {
        let config = config();
        let pool = config.budget(&BudgetOwner::new(OwnerKind::Tier, "pro")).unwrap().effective_quotas();
        assert_eq!((pool[0].limit, &pool[0].action), (10_000, &crate::decision::Action::Block));
        assert!(pool[0].counts("", Some("gpt-4o")));
        assert!(!pool[0].counts("", Some("gpt-4o-mini")));
        assert!(!pool[0].counts("", None), "an event naming no model is not in a model's budget");
        assert_eq!(pool[0].ledger_scope(), "*|models=gpt-4o");
    }
}

#[cfg(test)]
mod validation_tests {
    use crate::config::Config;

    fn errors(budgets: &str) -> Vec<String> {
        let text = format!("default_tier: free\ntiers:\n  - {{name: free}}\nmembers: {{alice: [ghost]}}\nbudgets:\n{budgets}");
        match Config::from_yaml_str(&text) {
            Ok(_) => Vec::new(),
            Err(e) => e.0.iter().map(|e| format!("{}: {}", e.path, e.message)).collect(),
        }
    }

    #[test]
    fn every_bad_budget_field_is_named() {
        let found = errors(
            "  - {group: a, tier: free, quotas: [{name: q, metric: requests, rate: 1/m}]}\n\
             \x20 - {api_key: sk-plain, quotas: [{name: q, metric: requests, rate: 1/m}]}\n\
             \x20 - {tier: gold, quotas: [{name: q, metric: requests, rate: 1/m}]}\n\
             \x20 - {group: t, quotas: []}\n\
             \x20 - {group: m, quotas: [{name: q, metric: requests, rate: 1/m, models: [a, a, 'b,c'], scope: 'x|y'}]}\n\
             \x20 - {group: m, quotas: [{name: q, metric: requests, rate: 1/m, models: []}]}\n",
        );
        let expected = [
            "budgets[0]: needs exactly one owner",
            "budgets[1].api_key: must be 64 hex characters",
            "budgets[2].tier: unknown tier `gold`",
            "budgets[3].quotas: must list at least one quota",
            "budgets[4].quotas[0].scope: must not contain `|`",
            "budgets[4].quotas[0].models[1]: model `a` is listed twice",
            "budgets[4].quotas[0].models[2]: model `b,c` must not contain",
            "budgets[5].quotas[0].models: must name at least one model",
            "members.alice[0]: unknown group `ghost`",
        ];
        for e in expected {
            assert!(found.iter().any(|f| f.starts_with(e)), "missing {e:?} in {found:#?}");
        }
    }

    #[test]
    fn a_second_budget_for_one_owner_is_refused() {
        let found = errors(
            "  - {group: eng, quotas: [{name: q, metric: requests, rate: 1/m}]}\n\
             \x20 - {group: eng, quotas: [{name: r, metric: requests, rate: 2/m}]}\n",
        );
        assert!(found.iter().any(|f| f.starts_with("budgets[1]: a second budget for group eng")), "{found:#?}");
    }

    #[test]
    fn a_group_with_only_a_budget_is_known_to_members_and_events() {
        let config = Config::from_yaml_str(
            "default_tier: free\ntiers:\n  - {name: free}\nmembers: {alice: [eng]}\n\
             budgets:\n  - {group: eng, quotas: [{name: q, metric: requests, rate: 1/m}]}\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(config.knows_group("eng"));
        assert!(!config.knows_group("ops"));
    }
}

#[cfg(test)]
mod example_tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn the_budget_examples_are_valid_and_meet_what_they_say() {
        let budgets = Config::from_yaml_str(include_str!("../../examples/budgets.yaml")).unwrap_or_else(|e| panic!("{e}"));
        let ci_key = crate::event::hash_api_key("sk-acme-ci");
        let facts = BudgetFacts { subject: "alice", api_key_sha256: Some(&ci_key), groups: &[], tier: "free" };
        let owners: Vec<String> = budgets_met(&budgets, &facts).iter().map(|b| b.owner.to_string()).collect();
        assert_eq!(owners, [format!("api_key {ci_key}"), "group acme".into(), "group acme-research".into(), "tier free".into()]);
        let shared = Config::from_yaml_str(include_str!("../../examples/shared-bucket.yaml")).unwrap_or_else(|e| panic!("{e}"));
        let pool = |tier: &str| {
            let facts = BudgetFacts { subject: "ann", api_key_sha256: None, groups: &[], tier };
            budgets_met(&shared, &facts).len()
        };
        assert_eq!((pool("free"), pool("pro")), (1, 0), "only free shares the bucket");
    }
}
