//! Reading budgets' decisions: `GET /v1/budgets/{kind}/{name}/decision` and
//! `GET /v1/subjects/{subject}/budgets`.
//!
//! Contract:
//! - A budget ([`tally_domain::budget`]) is named by its owner's kind (`api_key`, `group`,
//!   `tier`; any other is a 400 naming `kind`) and name: a group's or a tier's name, or for
//!   an API key the SHA-256 hex of the key or the key's id (`key_…`, as the admin API lists
//!   keys; one no configured key has is a 404 naming `name`).
//! - A budget's decision is the snapshot the aggregators publish under its budget subject
//!   (`__tally_budget__/<kind>/<name>`), read like a subject's (the view, else Postgres),
//!   with the same weak ETag; 404 naming the budget when it has none yet.
//! - The budgets of a subject are those every request of the subject meets by the
//!   configuration in force: the budgets of the API keys bound to it (`api_keys[].subject`),
//!   of its configured groups, and the pool of its effective tier (its snapshot's `tier`,
//!   else the configuration's), each with its decision or `null`. A request may meet more
//!   (the budget of another key it comes with, of a group it names): `POST /v1/check` lists
//!   those.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::Utc;
use serde::Serialize;
use tally_domain::budget::{budgets_met, BudgetFacts, BudgetOwner, OwnerKind};
use tally_domain::config::Config;
use tally_domain::precedence::{resolve, SubjectFacts};

use crate::error::AppError;
use crate::keys::key_id;
use crate::state::AppState;
use crate::subjects::{decision_response, latest_decision, DecisionAnswer};

/// The owner kind a path names; a 400 naming `kind` for any other.
pub(crate) fn owner_kind(kind: &str) -> Result<OwnerKind, AppError> {
    OwnerKind::parse(kind).ok_or_else(|| AppError::bad("kind", format!("unknown budget kind {kind:?}: expected api_key, group or tier")))
}

/// The owner a path names. For an API key, `name` is the SHA-256 hex of the key (any case)
/// or the id of one of `key_hashes` (the SHA-256 hex of the configured keys).
pub(crate) fn owner_of<'a>(kind: OwnerKind, name: &str, key_hashes: impl IntoIterator<Item = &'a str>) -> Result<BudgetOwner, AppError> {
    if name.trim().is_empty() || name.len() > 256 {
        return Err(AppError::bad("name", "must be 1..256 characters"));
    }
    if kind != OwnerKind::ApiKey {
        return Ok(BudgetOwner::new(kind, name));
    }
    if name.starts_with("key_") {
        return match key_hashes.into_iter().find(|sha| key_id(sha) == name) {
            Some(sha) => Ok(BudgetOwner::new(kind, sha)),
            None => Err(AppError::not_found("name", format!("no API key with id {name:?}"))),
        };
    }
    let sha = name.to_ascii_lowercase();
    if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(AppError::bad(
            "name",
            "an API key's budget is named by the SHA-256 hex of the key (64 hex characters) or the key's id",
        ));
    }
    Ok(BudgetOwner::new(kind, sha))
}

/// `GET /v1/budgets/{kind}/{name}/decision`: the budget's latest snapshot.
pub async fn decision(
    State(state): State<Arc<AppState>>,
    Path((kind, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, AppError> {
    let kind = owner_kind(&kind)?;
    let loaded = state.configs.current();
    let owner = owner_of(kind, &name, loaded.config.api_keys.keys().map(String::as_str))?;
    let missing = || AppError::not_found("name", format!("no decision for the budget of {owner} yet"));
    decision_response(&state, &owner.ledger_subject(), &headers, missing).await
}

/// The budgets every request of `subject` meets when its effective tier is `tier`: its bound
/// API keys' (by key hash), its configured groups' (by name), its tier's pool.
pub fn subject_budget_owners(config: &Config, subject: &str, tier: &str) -> Vec<BudgetOwner> {
    let keys = config
        .api_keys
        .values()
        .filter(|k| k.subject.as_deref() == Some(subject))
        .map(|k| BudgetOwner::new(OwnerKind::ApiKey, k.key_sha256.as_str()))
        .filter(|owner| config.budget(owner).is_some());
    let facts = BudgetFacts { subject, api_key_sha256: None, groups: &[], tier };
    keys.chain(budgets_met(config, &facts).into_iter().map(|b| b.owner.clone())).collect()
}

#[derive(Serialize)]
struct SubjectBudget<'a> {
    #[serde(flatten)]
    owner: &'a BudgetOwner,
    /// The budget's latest snapshot; `null` before its first.
    decision: Option<DecisionAnswer<'a>>,
}

#[derive(Serialize)]
struct SubjectBudgets<'a> {
    subject: &'a str,
    /// The effective tier whose pool counts.
    tier: &'a str,
    budgets: Vec<SubjectBudget<'a>>,
}

/// `GET /v1/subjects/{subject}/budgets`: every budget the subject's requests meet by
/// configuration, each with its decision.
pub async fn subject_budgets(State(state): State<Arc<AppState>>, Path(subject): Path<String>) -> Result<Response, AppError> {
    let now = Utc::now();
    let loaded = state.configs.current();
    let config = &loaded.config;
    let tier = match latest_decision(&state, &subject).await? {
        Some(found) => found.snapshot.tier.clone(),
        None => resolve(config, &SubjectFacts { subject: &subject, groups: &[], api_key_sha256: None, scope: "" }, now).tier,
    };
    let owners = subject_budget_owners(config, &subject, &tier);
    let mut found = Vec::with_capacity(owners.len());
    for owner in &owners {
        found.push(latest_decision(&state, &owner.ledger_subject()).await?);
    }
    let budgets =
        owners.iter().zip(&found).map(|(owner, found)| SubjectBudget { owner, decision: found.as_ref().map(|f| f.answer(now)) }).collect();
    Ok(Json(SubjectBudgets { subject: &subject, tier: &tier, budgets }).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_domain::event::hash_api_key;

    fn config() -> Config {
        let (bound, other, spare) = (hash_api_key("sk-bound"), hash_api_key("sk-other"), hash_api_key("sk-spare"));
        Config::from_yaml_str(&format!(
            "default_tier: free\n\
             tiers: [{{name: free}}, {{name: pro}}]\n\
             members: {{alice: [eng, ops]}}\n\
             api_keys:\n\
             \x20 - {{key_sha256: {bound}, tier: free, subject: alice}}\n\
             \x20 - {{key_sha256: {spare}, tier: free, subject: alice}}\n\
             \x20 - {{key_sha256: {other}, tier: free, subject: bob}}\n\
             budgets:\n\
             \x20 - {{api_key: {bound}, quotas: [{{name: k, metric: requests, rate: 5/m}}]}}\n\
             \x20 - {{api_key: {other}, quotas: [{{name: k, metric: requests, rate: 5/m}}]}}\n\
             \x20 - {{group: eng, quotas: [{{name: g, metric: requests, rate: 5/m}}]}}\n\
             \x20 - {{group: ops, quotas: [{{name: g, metric: requests, rate: 5/m}}]}}\n\
             \x20 - {{tier: pro, quotas: [{{name: p, metric: requests, rate: 5/m}}]}}\n"
        ))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn a_subject_meets_its_bound_keys_its_groups_and_its_tiers_budgets() {
        let config = config();
        let names =
            |subject: &str, tier: &str| subject_budget_owners(&config, subject, tier).iter().map(ToString::to_string).collect::<Vec<_>>();
        let bound = hash_api_key("sk-bound");
        assert_eq!(names("alice", "pro"), [format!("api_key {bound}"), "group eng".into(), "group ops".into(), "tier pro".into()]);
        assert_eq!(names("alice", "free"), [format!("api_key {bound}"), "group eng".into(), "group ops".into()], "free has no pool");
        assert_eq!(names("carol", "free"), Vec::<String>::new());
    }

    #[test]
    fn a_path_names_a_budget_by_kind_and_name_or_key_id() {
        assert_eq!(owner_kind("team").unwrap_err().field.as_deref(), Some("kind"));
        let sha = hash_api_key("sk-bound");
        let hashes = [sha.as_str()];
        assert_eq!(owner_of(OwnerKind::Group, "eng", hashes).unwrap(), BudgetOwner::new(OwnerKind::Group, "eng"));
        assert_eq!(owner_of(OwnerKind::ApiKey, &sha.to_ascii_uppercase(), hashes).unwrap().name, sha, "any case");
        assert_eq!(owner_of(OwnerKind::ApiKey, &key_id(&sha), hashes).unwrap().name, sha, "by the key's id");
        let e = owner_of(OwnerKind::ApiKey, "key_0000000000000000", hashes).unwrap_err();
        assert_eq!((e.status.as_u16(), e.field.as_deref()), (404, Some("name")));
        assert_eq!(owner_of(OwnerKind::ApiKey, "sk-plain", hashes).unwrap_err().field.as_deref(), Some("name"));
        assert_eq!(owner_of(OwnerKind::Group, " ", hashes).unwrap_err().field.as_deref(), Some("name"));
    }
}
