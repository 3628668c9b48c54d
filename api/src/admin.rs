//! The admin API: tiers, groups and members, assignments, overrides and API keys.
//!
//! Contract:
//! - Every change goes through [`crate::configs::Editor::edit`]: one change to the latest
//!   configuration document, validated as a whole before anything is written, stored as a
//!   new version (the same data `tally config apply` writes), announced on the control topic.
//!   Bad input is a 400 `{"error", "field"}` and writes nothing; a change that would break a
//!   reference elsewhere in the configuration is a 409 naming the configuration path.
//! - Reads answer from the latest stored version. Lists are sorted by their key and paged:
//!   `?limit=` (default 100, at most the configured page size) and `?cursor=` (the
//!   `next_cursor` of the previous page).
//! - Overrides take a `rate` ("1000/h") or a `limit`, an optional `scope` and `quota`, either
//!   a `duration` ("90s", "30m", "1h", "2d"; default one hour) or an absolute `expires_at`
//!   but not both, an optional `starts_at`, a `reason` and `created_by`. Their id is derived
//!   from what they target and when (`ovr_` + 16 hex).
//! - API keys are generated here and returned once; the configuration keeps their SHA-256.
//!   Revoking removes the key from the configuration (checks refuse it from the next
//!   version on) and records `revoked_at` in `api_key_usage`.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value as Json_};
use serde_yaml::{Mapping, Value};
use sha2::{Digest, Sha256};
use tally_common::config_store;
use tally_domain::event::hash_api_key;
use tally_domain::rate::Rate;

use crate::error::{AppError, JsonBody};
use crate::keys;
use crate::paging::page_limit;
use crate::state::AppState;

type Answer = Result<Response, AppError>;
type Q = Result<Query<PageParams>, QueryRejection>;

// ---- paging ----

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageParams {
    limit: Option<String>,
    cursor: Option<String>,
    /// Only for the override list: one subject's overrides.
    subject: Option<String>,
}

fn params(q: Q) -> Result<PageParams, AppError> {
    q.map(|Query(p)| p).map_err(|e| AppError::bad("query", e.body_text()))
}

/// One page of `items` (already sorted by key).
fn page(items: Vec<(String, Json_)>, p: &PageParams, max: usize) -> Answer {
    let limit = page_limit(p.limit.as_deref(), max)?;
    let mut rest: Vec<(String, Json_)> = items.into_iter().filter(|(k, _)| p.cursor.as_ref().is_none_or(|c| k > c)).collect();
    let more = rest.len() > limit;
    rest.truncate(limit);
    let next_cursor = if more { rest.last().map(|(k, _)| k.clone()) } else { None };
    let items: Vec<Json_> = rest.into_iter().map(|(_, v)| v).collect();
    Ok(Json(json!({"items": items, "next_cursor": next_cursor})).into_response())
}

// ---- YAML tree helpers ----

fn key(s: &str) -> Value {
    Value::String(s.to_string())
}

fn root(tree: &mut Value) -> Result<&mut Mapping, AppError> {
    match tree {
        Value::Mapping(m) => Ok(m),
        _ => Err(AppError::unavailable("configuration in force", "the document is not a mapping")),
    }
}

fn seq<'a>(tree: &'a mut Value, name: &str) -> Result<&'a mut Vec<Value>, AppError> {
    let entry = root(tree)?.entry(key(name)).or_insert(Value::Sequence(vec![]));
    if entry.is_null() {
        *entry = Value::Sequence(vec![]);
    }
    match entry {
        Value::Sequence(s) => Ok(s),
        _ => Err(AppError::unavailable("configuration in force", format!("`{name}` is not a list"))),
    }
}

fn map<'a>(tree: &'a mut Value, name: &str) -> Result<&'a mut Mapping, AppError> {
    let entry = root(tree)?.entry(key(name)).or_insert(Value::Mapping(Mapping::new()));
    if entry.is_null() {
        *entry = Value::Mapping(Mapping::new());
    }
    match entry {
        Value::Mapping(m) => Ok(m),
        _ => Err(AppError::unavailable("configuration in force", format!("`{name}` is not a mapping"))),
    }
}

fn str_field<'a>(item: &'a Value, field: &str) -> Option<&'a str> {
    item.get(field).and_then(Value::as_str)
}

fn to_json(v: &Value) -> Json_ {
    serde_json::to_value(v).unwrap_or(Json_::Null)
}

fn to_yaml(v: &Json_) -> Result<Value, AppError> {
    serde_yaml::to_value(v).map_err(|e| AppError::bad("body", e.to_string()))
}

/// The latest stored document as a tree, with its version.
async fn latest(state: &AppState) -> Result<(i64, Value), AppError> {
    let (version, document) = match config_store::latest(&state.pool).await? {
        Some(stored) => (stored.version, stored.document),
        None => (0, config_store::BUILTIN_DOCUMENT.to_string()),
    };
    let tree: Value = serde_yaml::from_str(&document).map_err(|e| AppError::unavailable("configuration in force", e))?;
    Ok((version, if tree.is_null() { Value::Mapping(Mapping::new()) } else { tree }))
}

fn name_param(v: &str, field: &str) -> Result<(), AppError> {
    if v.trim().is_empty() || v.len() > 256 {
        return Err(AppError::bad(field, "must be 1..256 characters"));
    }
    Ok(())
}

fn changed(status: StatusCode, body: Json_) -> Answer {
    Ok((status, Json(body)).into_response())
}

// ---- configuration ----

pub async fn config_show(State(state): State<Arc<AppState>>) -> Answer {
    Ok(Json(match config_store::latest(&state.pool).await? {
        Some(v) => json!({"version": v.version, "document": v.document, "source": v.source, "applied_at": v.applied_at}),
        None => {
            json!({"version": 0, "document": config_store::BUILTIN_DOCUMENT, "source": config_store::BUILTIN_SOURCE, "applied_at": null})
        }
    })
    .into_response())
}

// ---- tiers ----

fn tier_index(tree: &mut Value, name: &str) -> Result<Option<usize>, AppError> {
    Ok(seq(tree, "tiers")?.iter().position(|t| str_field(t, "name") == Some(name)))
}

pub async fn tiers_list(State(state): State<Arc<AppState>>, q: Q) -> Answer {
    let p = params(q)?;
    let (_, mut tree) = latest(&state).await?;
    let items = seq(&mut tree, "tiers")?
        .iter()
        .map(|t| (str_field(t, "name").unwrap_or_default().to_string(), to_json(t)))
        .collect::<BTreeMap<_, _>>();
    page(items.into_iter().collect(), &p, state.max_page)
}

pub async fn tier_get(State(state): State<Arc<AppState>>, Path(name): Path<String>) -> Answer {
    let (_, mut tree) = latest(&state).await?;
    let tiers = seq(&mut tree, "tiers")?;
    match tiers.iter().find(|t| str_field(t, "name") == Some(name.as_str())) {
        Some(t) => Ok(Json(to_json(t)).into_response()),
        None => Err(AppError::not_found("name", format!("no tier named {name:?}"))),
    }
}

/// The tier object of a request, with its name set to `name`.
fn tier_body(body: &Json_, name: &str) -> Result<Value, AppError> {
    let Json_::Object(obj) = body else { return Err(AppError::bad("body", "a tier is a JSON object")) };
    if let Some(n) = obj.get("name") {
        if n.as_str() != Some(name) {
            return Err(AppError::bad("name", "must match the tier name in the path"));
        }
    }
    let mut obj = obj.clone();
    obj.insert("name".into(), Json_::String(name.to_string()));
    to_yaml(&Json_::Object(obj))
}

pub async fn tier_create(State(state): State<Arc<AppState>>, JsonBody(body): JsonBody<Json_>) -> Answer {
    let name = body.get("name").and_then(Json_::as_str).ok_or_else(|| AppError::bad("name", "required"))?.to_string();
    name_param(&name, "name")?;
    let tier = tier_body(&body, &name)?;
    let prefix = format!("tiers.{name}");
    let edited = state
        .editor
        .edit("admin api: create tier", &prefix, |tree| {
            if tier_index(tree, &name)?.is_some() {
                return Err(AppError::conflict(Some("name"), format!("a tier named {name:?} exists")));
            }
            seq(tree, "tiers")?.push(tier.clone());
            Ok(())
        })
        .await?;
    changed(StatusCode::CREATED, json!({"tier": to_json(&tier), "version": edited.version}))
}

pub async fn tier_put(State(state): State<Arc<AppState>>, Path(name): Path<String>, JsonBody(body): JsonBody<Json_>) -> Answer {
    name_param(&name, "name")?;
    let tier = tier_body(&body, &name)?;
    let prefix = format!("tiers.{name}");
    let edited = state
        .editor
        .edit("admin api: put tier", &prefix, |tree| {
            match tier_index(tree, &name)? {
                Some(i) => seq(tree, "tiers")?[i] = tier.clone(),
                None => seq(tree, "tiers")?.push(tier.clone()),
            }
            Ok(())
        })
        .await?;
    changed(StatusCode::OK, json!({"tier": to_json(&tier), "version": edited.version}))
}

pub async fn tier_delete(State(state): State<Arc<AppState>>, Path(name): Path<String>) -> Answer {
    let prefix = format!("tiers.{name}");
    let edited = state
        .editor
        .edit("admin api: delete tier", &prefix, |tree| {
            let i = tier_index(tree, &name)?.ok_or_else(|| AppError::not_found("name", format!("no tier named {name:?}")))?;
            seq(tree, "tiers")?.remove(i);
            Ok(())
        })
        .await?;
    changed(StatusCode::OK, json!({"deleted": name, "version": edited.version}))
}

// ---- groups and members ----

pub async fn groups_list(State(state): State<Arc<AppState>>, q: Q) -> Answer {
    let p = params(q)?;
    let (_, mut tree) = latest(&state).await?;
    let members = map(&mut tree, "members")?.clone();
    let groups = map(&mut tree, "groups")?;
    let mut items: Vec<(String, Json_)> = groups
        .iter()
        .filter_map(|(g, t)| {
            let g = g.as_str()?.to_string();
            let count = members.values().filter(|v| v.as_sequence().is_some_and(|s| s.iter().any(|x| x.as_str() == Some(&g)))).count();
            Some((g.clone(), json!({"group": g, "tier": to_json(t), "members": count})))
        })
        .collect();
    items.sort_by(|a, b| a.0.cmp(&b.0));
    page(items, &p, state.max_page)
}

pub async fn group_get(State(state): State<Arc<AppState>>, Path(group): Path<String>) -> Answer {
    let (_, mut tree) = latest(&state).await?;
    match map(&mut tree, "groups")?.get(key(&group)) {
        Some(t) => Ok(Json(json!({"group": group, "tier": to_json(t)})).into_response()),
        None => Err(AppError::not_found("group", format!("no group named {group:?}"))),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupBody {
    tier: String,
}

pub async fn group_put(State(state): State<Arc<AppState>>, Path(group): Path<String>, JsonBody(body): JsonBody<GroupBody>) -> Answer {
    name_param(&group, "group")?;
    let prefix = format!("groups.{group}");
    let edited = state
        .editor
        .edit("admin api: put group", &prefix, |tree| {
            if tier_index(tree, &body.tier)?.is_none() {
                return Err(AppError::bad("tier", format!("no tier named {:?}", body.tier)));
            }
            map(tree, "groups")?.insert(key(&group), key(&body.tier));
            Ok(())
        })
        .await?;
    changed(StatusCode::OK, json!({"group": group, "tier": body.tier, "version": edited.version}))
}

pub async fn group_delete(State(state): State<Arc<AppState>>, Path(group): Path<String>) -> Answer {
    let prefix = format!("groups.{group}");
    let edited = state
        .editor
        .edit("admin api: delete group", &prefix, |tree| {
            if map(tree, "groups")?.remove(key(&group)).is_none() {
                return Err(AppError::not_found("group", format!("no group named {group:?}")));
            }
            // Its memberships go with it.
            let members = map(tree, "members")?;
            let mut removed = Vec::new();
            for (subject, groups) in members.iter_mut() {
                if let Value::Sequence(s) = groups {
                    let before = s.len();
                    s.retain(|g| g.as_str() != Some(group.as_str()));
                    if s.len() != before {
                        removed.push(subject.as_str().unwrap_or_default().to_string());
                    }
                }
            }
            members.retain(|_, g| g.as_sequence().is_none_or(|s| !s.is_empty()));
            removed.sort();
            Ok(removed)
        })
        .await?;
    changed(StatusCode::OK, json!({"deleted": group, "members_removed": edited.value, "version": edited.version}))
}

pub async fn members_list(State(state): State<Arc<AppState>>, Path(group): Path<String>, q: Q) -> Answer {
    let p = params(q)?;
    let (_, mut tree) = latest(&state).await?;
    if !map(&mut tree, "groups")?.contains_key(key(&group)) {
        return Err(AppError::not_found("group", format!("no group named {group:?}")));
    }
    let mut items: Vec<(String, Json_)> = map(&mut tree, "members")?
        .iter()
        .filter(|(_, g)| g.as_sequence().is_some_and(|s| s.iter().any(|x| x.as_str() == Some(group.as_str()))))
        .filter_map(|(s, _)| s.as_str().map(|s| (s.to_string(), json!({"subject": s}))))
        .collect();
    items.sort_by(|a, b| a.0.cmp(&b.0));
    page(items, &p, state.max_page)
}

pub async fn member_put(State(state): State<Arc<AppState>>, Path((group, subject)): Path<(String, String)>) -> Answer {
    name_param(&subject, "subject")?;
    let prefix = format!("members.{subject}");
    let edited = state
        .editor
        .edit("admin api: add member", &prefix, |tree| {
            if !map(tree, "groups")?.contains_key(key(&group)) {
                return Err(AppError::not_found("group", format!("no group named {group:?}")));
            }
            let entry = map(tree, "members")?.entry(key(&subject)).or_insert(Value::Sequence(vec![]));
            if let Value::Sequence(s) = entry {
                if !s.iter().any(|g| g.as_str() == Some(group.as_str())) {
                    s.push(key(&group));
                }
            }
            Ok(())
        })
        .await?;
    changed(StatusCode::OK, json!({"group": group, "subject": subject, "version": edited.version}))
}

pub async fn member_delete(State(state): State<Arc<AppState>>, Path((group, subject)): Path<(String, String)>) -> Answer {
    let prefix = format!("members.{subject}");
    let edited = state
        .editor
        .edit("admin api: remove member", &prefix, |tree| {
            let members = map(tree, "members")?;
            let Some(Value::Sequence(s)) = members.get_mut(key(&subject)) else {
                return Err(AppError::not_found("subject", format!("{subject:?} is not in group {group:?}")));
            };
            let before = s.len();
            s.retain(|g| g.as_str() != Some(group.as_str()));
            if s.len() == before {
                return Err(AppError::not_found("subject", format!("{subject:?} is not in group {group:?}")));
            }
            if s.is_empty() {
                members.remove(key(&subject));
            }
            Ok(())
        })
        .await?;
    changed(StatusCode::OK, json!({"group": group, "removed": subject, "version": edited.version}))
}

// ---- assignments ----

fn with_status(item: &Value, now: DateTime<Utc>, field: &str) -> Json_ {
    let mut j = to_json(item);
    let end = str_field(item, field).and_then(|t| t.parse::<DateTime<Utc>>().ok());
    let start = str_field(item, "starts_at").and_then(|t| t.parse::<DateTime<Utc>>().ok());
    let active = end.is_none_or(|e| now < e) && start.is_none_or(|s| s <= now);
    if let Json_::Object(o) = &mut j {
        o.insert("active".into(), Json_::Bool(active));
    }
    j
}

pub async fn assignments_list(State(state): State<Arc<AppState>>, q: Q) -> Answer {
    let p = params(q)?;
    let (_, mut tree) = latest(&state).await?;
    let now = Utc::now();
    let mut items: Vec<(String, Json_)> = seq(&mut tree, "assignments")?
        .iter()
        .map(|a| (str_field(a, "subject").unwrap_or_default().to_string(), with_status(a, now, "expires_at")))
        .collect();
    items.sort_by(|a, b| a.0.cmp(&b.0));
    page(items, &p, state.max_page)
}

pub async fn assignment_get(State(state): State<Arc<AppState>>, Path(subject): Path<String>) -> Answer {
    let (_, mut tree) = latest(&state).await?;
    match seq(&mut tree, "assignments")?.iter().find(|a| str_field(a, "subject") == Some(subject.as_str())) {
        Some(a) => Ok(Json(with_status(a, Utc::now(), "expires_at")).into_response()),
        None => Err(AppError::not_found("subject", format!("{subject:?} has no assignment"))),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AssignmentBody {
    tier: String,
    expires_at: Option<DateTime<Utc>>,
    reason: Option<String>,
}

pub async fn assignment_put(
    State(state): State<Arc<AppState>>,
    Path(subject): Path<String>,
    JsonBody(body): JsonBody<AssignmentBody>,
) -> Answer {
    name_param(&subject, "subject")?;
    if body.expires_at.is_some_and(|t| t <= Utc::now()) {
        return Err(AppError::bad("expires_at", "must be in the future"));
    }
    let mut item = Mapping::new();
    item.insert(key("subject"), key(&subject));
    item.insert(key("tier"), key(&body.tier));
    if let Some(t) = body.expires_at {
        item.insert(key("expires_at"), key(&t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)));
    }
    if let Some(r) = &body.reason {
        item.insert(key("reason"), key(r));
    }
    let item = Value::Mapping(item);
    let edited = state
        .editor
        .edit("admin api: put assignment", "assignments", |tree| {
            if tier_index(tree, &body.tier)?.is_none() {
                return Err(AppError::bad("tier", format!("no tier named {:?}", body.tier)));
            }
            let list = seq(tree, "assignments")?;
            list.retain(|a| str_field(a, "subject") != Some(subject.as_str()));
            list.push(item.clone());
            Ok(())
        })
        .await?;
    changed(StatusCode::OK, json!({"assignment": to_json(&item), "version": edited.version}))
}

pub async fn assignment_delete(State(state): State<Arc<AppState>>, Path(subject): Path<String>) -> Answer {
    let edited = state
        .editor
        .edit("admin api: delete assignment", "assignments", |tree| {
            let list = seq(tree, "assignments")?;
            let before = list.len();
            list.retain(|a| str_field(a, "subject") != Some(subject.as_str()));
            if list.len() == before {
                return Err(AppError::not_found("subject", format!("{subject:?} has no assignment")));
            }
            Ok(())
        })
        .await?;
    changed(StatusCode::OK, json!({"deleted": subject, "version": edited.version}))
}

// ---- overrides ----

/// The id of an override: what it targets and when.
pub fn override_id(item: &Value) -> String {
    let part = |f: &str| str_field(item, f).unwrap_or("").to_string();
    let text = ["subject", "scope", "quota", "starts_at", "expires_at"].map(part).join("\u{1f}");
    format!("ovr_{}", &hex::encode(Sha256::digest(text.as_bytes()))[..16])
}

fn override_json(item: &Value, now: DateTime<Utc>) -> Json_ {
    let mut j = with_status(item, now, "expires_at");
    if let Json_::Object(o) = &mut j {
        o.insert("id".into(), Json_::String(override_id(item)));
    }
    j
}

/// A duration such as `90s`, `30m`, `1h`, `2d` (or plain seconds).
pub fn parse_duration(text: &str) -> Option<chrono::Duration> {
    let text = text.trim();
    let (digits, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
    let n: i64 = digits.parse().ok().filter(|n| *n > 0)?;
    let seconds = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return None,
    };
    n.checked_mul(seconds).filter(|s| *s <= 366 * 86_400).map(chrono::Duration::seconds)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverrideBody {
    subject: Option<String>,
    rate: Option<String>,
    limit: Option<i64>,
    scope: Option<String>,
    quota: Option<String>,
    duration: Option<String>,
    starts_at: Option<DateTime<Utc>>,
    expires_at: Option<DateTime<Utc>>,
    reason: Option<String>,
    created_by: Option<String>,
}

fn required(v: Option<String>, field: &str) -> Result<String, AppError> {
    match v {
        Some(s) if !s.trim().is_empty() => Ok(s),
        _ => Err(AppError::bad(field, "required")),
    }
}

pub async fn overrides_list(State(state): State<Arc<AppState>>, q: Q) -> Answer {
    let p = params(q)?;
    let (_, mut tree) = latest(&state).await?;
    let now = Utc::now();
    let mut items: Vec<(String, Json_)> = seq(&mut tree, "overrides")?
        .iter()
        .filter(|o| p.subject.as_deref().is_none_or(|s| str_field(o, "subject") == Some(s)))
        .map(|o| (override_id(o), override_json(o, now)))
        .collect();
    items.sort_by(|a, b| a.0.cmp(&b.0));
    page(items, &p, state.max_page)
}

pub async fn override_get(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Answer {
    let (_, mut tree) = latest(&state).await?;
    match seq(&mut tree, "overrides")?.iter().find(|o| override_id(o) == id) {
        Some(o) => Ok(Json(override_json(o, Utc::now())).into_response()),
        None => Err(AppError::not_found("id", format!("no override {id:?}"))),
    }
}

pub async fn override_create(State(state): State<Arc<AppState>>, JsonBody(body): JsonBody<OverrideBody>) -> Answer {
    // Everything is checked before anything is written.
    let subject = required(body.subject, "subject")?;
    name_param(&subject, "subject")?;
    let mut item = Mapping::new();
    item.insert(key("subject"), key(&subject));
    if let Some(scope) = &body.scope {
        name_param(scope, "scope")?;
        item.insert(key("scope"), key(scope));
    }
    if let Some(quota) = &body.quota {
        item.insert(key("quota"), key(quota));
    }
    match (&body.rate, body.limit) {
        (Some(_), Some(_)) => return Err(AppError::bad("rate", "give `rate` or `limit`, not both")),
        (None, None) => return Err(AppError::bad("rate", "required (or `limit`)")),
        (Some(rate), None) => {
            Rate::from_str(rate).map_err(|e| AppError::bad("rate", e.to_string()))?;
            item.insert(key("rate"), key(rate));
        }
        (None, Some(limit)) => {
            if limit < 1 {
                return Err(AppError::bad("limit", "must be at least 1"));
            }
            item.insert(key("limit"), Value::Number(limit.into()));
        }
    }
    let now = Utc::now();
    let expires_at = match (&body.duration, body.expires_at) {
        (Some(_), Some(_)) => return Err(AppError::bad("expires_at", "give `duration` or `expires_at`, not both")),
        (Some(d), None) => {
            let d =
                parse_duration(d).ok_or_else(|| AppError::bad("duration", "a duration such as 90s, 30m, 1h or 2d (at most 366 days)"))?;
            body.starts_at.unwrap_or(now) + d
        }
        (None, Some(t)) => t,
        (None, None) => body.starts_at.unwrap_or(now) + chrono::Duration::hours(1),
    };
    if expires_at <= now {
        return Err(AppError::bad("expires_at", "must be in the future"));
    }
    if body.starts_at.is_some_and(|s| s >= expires_at) {
        return Err(AppError::bad("starts_at", "must be before the expiry"));
    }
    let fmt = |t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    if let Some(s) = body.starts_at {
        item.insert(key("starts_at"), key(&fmt(s)));
    }
    item.insert(key("expires_at"), key(&fmt(expires_at)));
    item.insert(key("reason"), key(&required(body.reason, "reason")?));
    item.insert(key("created_by"), key(&required(body.created_by, "created_by")?));
    let item = Value::Mapping(item);
    let edited = state
        .editor
        .edit("admin api: create override", "overrides", |tree| {
            seq(tree, "overrides")?.push(item.clone());
            Ok(())
        })
        .await?;
    changed(StatusCode::CREATED, json!({"override": override_json(&item, now), "version": edited.version}))
}

pub async fn override_delete(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Answer {
    let edited = state
        .editor
        .edit("admin api: delete override", "overrides", |tree| {
            let list = seq(tree, "overrides")?;
            let before = list.len();
            list.retain(|o| override_id(o) != id);
            if list.len() == before {
                return Err(AppError::not_found("id", format!("no override {id:?}")));
            }
            Ok(())
        })
        .await?;
    changed(StatusCode::OK, json!({"deleted": id, "version": edited.version}))
}

// ---- API keys ----

type KeyRow = (String, String, Option<DateTime<Utc>>, Option<DateTime<Utc>>, Option<DateTime<Utc>>);

async fn key_rows(state: &AppState) -> Result<BTreeMap<String, KeyRow>, AppError> {
    let rows: Vec<KeyRow> =
        sqlx::query_as("SELECT key_sha256, key_id, created_at, revoked_at, last_used_at FROM api_key_usage").fetch_all(&state.pool).await?;
    Ok(rows.into_iter().map(|r| (r.0.clone(), r)).collect())
}

fn key_json(id: &str, entry: Option<&Value>, row: Option<&KeyRow>) -> Json_ {
    json!({
        "id": id,
        "tier": entry.and_then(|e| str_field(e, "tier")),
        "subject": entry.and_then(|e| str_field(e, "subject")),
        "label": entry.and_then(|e| str_field(e, "label")),
        "active": entry.is_some(),
        "created_at": row.and_then(|r| r.2),
        "revoked_at": row.and_then(|r| r.3),
        "last_used_at": row.and_then(|r| r.4),
    })
}

async fn all_keys(state: &AppState) -> Result<Vec<(String, Json_)>, AppError> {
    let (_, mut tree) = latest(state).await?;
    let mut rows = key_rows(state).await?;
    let mut out = BTreeMap::new();
    for entry in seq(&mut tree, "api_keys")?.iter() {
        let sha = str_field(entry, "key_sha256").unwrap_or_default().trim().to_ascii_lowercase();
        let id = keys::key_id(&sha);
        out.insert(id.clone(), key_json(&id, Some(entry), rows.remove(&sha).as_ref()));
    }
    for (_, row) in rows {
        out.entry(row.1.clone()).or_insert_with(|| key_json(&row.1, None, Some(&row)));
    }
    Ok(out.into_iter().collect())
}

pub async fn keys_list(State(state): State<Arc<AppState>>, q: Q) -> Answer {
    let p = params(q)?;
    page(all_keys(&state).await?, &p, state.max_page)
}

pub async fn key_get(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Answer {
    match all_keys(&state).await?.into_iter().find(|(k, _)| *k == id) {
        Some((_, v)) => Ok(Json(v).into_response()),
        None => Err(AppError::not_found("id", format!("no API key {id:?}"))),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyBody {
    tier: Option<String>,
    subject: Option<String>,
    label: Option<String>,
}

#[derive(Serialize)]
struct CreatedKey {
    id: String,
    /// The key itself: shown once, never stored.
    key: String,
    tier: String,
    subject: Option<String>,
    label: Option<String>,
    created_at: DateTime<Utc>,
    version: i64,
}

pub async fn key_create(State(state): State<Arc<AppState>>, JsonBody(body): JsonBody<KeyBody>) -> Answer {
    let tier = required(body.tier, "tier")?;
    if let Some(s) = &body.subject {
        name_param(s, "subject")?;
    }
    let key = keys::generate().map_err(|e| AppError::unavailable("random source", e))?;
    let sha = hash_api_key(&key);
    let id = keys::key_id(&sha);
    let mut item = Mapping::new();
    item.insert(self::key("key_sha256"), self::key(&sha));
    item.insert(self::key("tier"), self::key(&tier));
    if let Some(l) = &body.label {
        item.insert(self::key("label"), self::key(l));
    }
    if let Some(s) = &body.subject {
        item.insert(self::key("subject"), self::key(s));
    }
    let item = Value::Mapping(item);
    let edited = state
        .editor
        .edit("admin api: create api key", "api_keys", |tree| {
            if tier_index(tree, &tier)?.is_none() {
                return Err(AppError::bad("tier", format!("no tier named {tier:?}")));
            }
            seq(tree, "api_keys")?.push(item.clone());
            Ok(())
        })
        .await?;
    let created_at = Utc::now();
    sqlx::query(
        "INSERT INTO api_key_usage (key_sha256, key_id, created_at) VALUES ($1, $2, $3)
         ON CONFLICT (key_sha256) DO UPDATE SET created_at = EXCLUDED.created_at, revoked_at = NULL",
    )
    .bind(&sha)
    .bind(&id)
    .bind(created_at)
    .execute(&state.pool)
    .await?;
    tracing::info!(key_id = %id, tier = %tier, "api key created");
    let answer = CreatedKey { id, key, tier, subject: body.subject, label: body.label, created_at, version: edited.version };
    Ok((StatusCode::CREATED, [(axum::http::header::CACHE_CONTROL, "no-store")], Json(answer)).into_response())
}

pub async fn key_delete(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Answer {
    let edited = state
        .editor
        .edit("admin api: revoke api key", "api_keys", |tree| {
            let list = seq(tree, "api_keys")?;
            let i = list
                .iter()
                .position(|k| str_field(k, "key_sha256").is_some_and(|h| keys::key_id(&h.trim().to_ascii_lowercase()) == id))
                .ok_or_else(|| AppError::not_found("id", format!("no active API key {id:?}")))?;
            let removed = list.remove(i);
            Ok(str_field(&removed, "key_sha256").unwrap_or_default().trim().to_ascii_lowercase())
        })
        .await?;
    let revoked_at = Utc::now();
    sqlx::query(
        "INSERT INTO api_key_usage (key_sha256, key_id, revoked_at) VALUES ($1, $2, $3)
         ON CONFLICT (key_sha256) DO UPDATE SET revoked_at = EXCLUDED.revoked_at",
    )
    .bind(&edited.value)
    .bind(&id)
    .bind(revoked_at)
    .execute(&state.pool)
    .await?;
    tracing::info!(key_id = %id, "api key revoked");
    changed(StatusCode::OK, json!({"revoked": id, "revoked_at": revoked_at, "version": edited.version}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Some(chrono::Duration::seconds(90)));
        assert_eq!(parse_duration("30m"), Some(chrono::Duration::minutes(30)));
        assert_eq!(parse_duration("2d"), Some(chrono::Duration::days(2)));
        assert_eq!(parse_duration("15"), Some(chrono::Duration::seconds(15)));
        assert_eq!(parse_duration("0h"), None);
        assert_eq!(parse_duration("1w"), None);
        assert_eq!(parse_duration("400d"), None);
        assert_eq!(parse_duration(""), None);
    }

    #[test]
    fn override_ids_depend_on_target_and_time() {
        let a: Value = serde_yaml::from_str("{subject: a, expires_at: '2026-01-01T00:00:00Z'}").unwrap();
        let b: Value = serde_yaml::from_str("{subject: a, expires_at: '2026-01-02T00:00:00Z'}").unwrap();
        assert_ne!(override_id(&a), override_id(&b));
        assert_eq!(override_id(&a), override_id(&a.clone()));
        assert!(override_id(&a).starts_with("ovr_"));
    }
}
