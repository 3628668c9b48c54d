//! The admin API: tiers, groups and members, assignments, overrides, API keys and budgets.
//!
//! Contract:
//! - Every change goes through [`crate::configs::Editor::edit`]: one change to the latest
//!   configuration document (`tally_domain::config::ConfigDocument`, typed), validated as
//!   a whole before anything is written, stored as a new version (the same data
//!   `tally config apply` writes), announced on the control topic. Bad input is a 400
//!   `{"error", "field"}` naming the request's field and writes nothing; a change that
//!   would break a reference elsewhere in the configuration is a 409 naming the
//!   configuration path.
//! - Items are answered as the configuration writes them (a tier, an assignment, an
//!   override with its `id` and whether it is `active` now), in typed answer structs.
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
//! - A group is a group of the configuration when it is mapped to a tier (`groups`) or has a
//!   budget; members may be added to either. Deleting a group's tier mapping removes its
//!   memberships only when no budget keeps the group.
//! - Budgets are named by owner kind (`api_key`, `group`, `tier`; another is a 400 naming
//!   `kind`) and name ([`crate::budgets`]: an API key's by the SHA-256 hex of the key or the
//!   key's id). `PUT` takes `{"timezone"?, "quotas": [...]}` (quotas as the configuration
//!   writes them) and creates or replaces the owner's one budget; a tier pool needs the tier.

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
use serde_json::Value as Json_;
use sha2::{Digest, Sha256};
use tally_common::config_store;
use tally_domain::budget::{BudgetOwner, OwnerKind};
use tally_domain::config::{ApiKeyEntry, AssignmentEntry, BudgetEntry, ConfigDocument, OverrideEntry, QuotaEntry, TierEntry};
use tally_domain::event::hash_api_key;
use tally_domain::rate::Rate;

use crate::budgets::{owner_kind, owner_of};
use crate::configs::read_document;
use crate::error::{AppError, JsonBody};
use crate::keys;
use crate::paging::{page_limit, Keyed, Page};
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

/// One page of `items`, as the list answers it.
fn page<T: Serialize>(items: Vec<Keyed<T>>, p: &PageParams, max: usize) -> Answer {
    let limit = page_limit(p.limit.as_deref(), max)?;
    Ok(Json(Page::of(items, p.cursor.as_deref(), limit)).into_response())
}

// ---- the configuration in force ----

/// The latest stored document (the built-in default when none).
async fn latest(state: &AppState) -> Result<ConfigDocument, AppError> {
    match config_store::latest(&state.pool).await? {
        Some(stored) => read_document(stored.version, &stored.document),
        None => read_document(0, config_store::BUILTIN_DOCUMENT),
    }
}

fn name_param(v: &str, field: &str) -> Result<(), AppError> {
    if v.trim().is_empty() || v.len() > 256 {
        return Err(AppError::bad(field, "must be 1..256 characters"));
    }
    Ok(())
}

fn answer<T: Serialize>(status: StatusCode, body: T) -> Answer {
    Ok((status, Json(body)).into_response())
}

/// `GET /v1/admin/config`: the version in force.
#[derive(Serialize)]
struct ConfigAnswer {
    version: i64,
    document: String,
    source: String,
    /// `null` for the built-in default.
    applied_at: Option<DateTime<Utc>>,
}

/// A deletion: what went, and the version without it.
#[derive(Serialize)]
struct Deleted {
    deleted: String,
    version: i64,
}

// ---- configuration ----

pub async fn config_show(State(state): State<Arc<AppState>>) -> Answer {
    let shown = match config_store::latest(&state.pool).await? {
        Some(v) => ConfigAnswer { version: v.version, document: v.document, source: v.source, applied_at: Some(v.applied_at) },
        None => ConfigAnswer {
            version: 0,
            document: config_store::BUILTIN_DOCUMENT.to_string(),
            source: config_store::BUILTIN_SOURCE.to_string(),
            applied_at: None,
        },
    };
    answer(StatusCode::OK, shown)
}

// ---- tiers ----

#[derive(Serialize)]
struct TierChanged {
    tier: TierEntry,
    version: i64,
}

fn tier_index(document: &ConfigDocument, name: &str) -> Option<usize> {
    document.tiers.iter().position(|t| t.name == name)
}

fn require_tier(document: &ConfigDocument, name: &str) -> Result<(), AppError> {
    match document.tier(name) {
        Some(_) => Ok(()),
        None => Err(AppError::bad("tier", format!("no tier named {name:?}"))),
    }
}

pub async fn tiers_list(State(state): State<Arc<AppState>>, q: Q) -> Answer {
    let p = params(q)?;
    let document = latest(&state).await?;
    // Keyed by name, which validation keeps distinct.
    let tiers: BTreeMap<String, TierEntry> = document.tiers.into_iter().map(|t| (t.name.clone(), t)).collect();
    page(tiers.into_iter().map(|(name, t)| Keyed::new(name, t)).collect(), &p, state.max_page)
}

pub async fn tier_get(State(state): State<Arc<AppState>>, Path(name): Path<String>) -> Answer {
    let document = latest(&state).await?;
    match document.tier(&name) {
        Some(t) => answer(StatusCode::OK, t),
        None => Err(AppError::not_found("name", format!("no tier named {name:?}"))),
    }
}

/// The tier of a request, named `name`: a tier object as the configuration writes it, whose
/// `name`, when given, must be `name`. A field the format does not have, or of the wrong
/// type, is a 400 naming it.
fn tier_body(body: &Json_, name: &str) -> Result<TierEntry, AppError> {
    let Json_::Object(obj) = body else { return Err(AppError::bad("body", "a tier is a JSON object")) };
    if let Some(n) = obj.get("name") {
        if n.as_str() != Some(name) {
            return Err(AppError::bad("name", "must match the tier name in the path"));
        }
    }
    let mut obj = obj.clone();
    obj.insert("name".into(), Json_::String(name.to_string()));
    Ok(tally_common::http::from_json_value::<TierEntry>(Json_::Object(obj))?)
}

pub async fn tier_create(State(state): State<Arc<AppState>>, JsonBody(body): JsonBody<Json_>) -> Answer {
    let name = body.get("name").and_then(Json_::as_str).ok_or_else(|| AppError::bad("name", "required"))?.to_string();
    name_param(&name, "name")?;
    let tier = tier_body(&body, &name)?;
    let prefix = format!("tiers.{name}");
    let edited = state
        .editor
        .edit("admin api: create tier", &prefix, |document| {
            if tier_index(document, &name).is_some() {
                return Err(AppError::conflict(Some("name"), format!("a tier named {name:?} exists")));
            }
            document.tiers.push(tier.clone());
            Ok(())
        })
        .await?;
    answer(StatusCode::CREATED, TierChanged { tier, version: edited.version })
}

pub async fn tier_put(State(state): State<Arc<AppState>>, Path(name): Path<String>, JsonBody(body): JsonBody<Json_>) -> Answer {
    name_param(&name, "name")?;
    let tier = tier_body(&body, &name)?;
    let prefix = format!("tiers.{name}");
    let edited = state
        .editor
        .edit("admin api: put tier", &prefix, |document| {
            match tier_index(document, &name) {
                Some(i) => document.tiers[i] = tier.clone(),
                None => document.tiers.push(tier.clone()),
            }
            Ok(())
        })
        .await?;
    answer(StatusCode::OK, TierChanged { tier, version: edited.version })
}

pub async fn tier_delete(State(state): State<Arc<AppState>>, Path(name): Path<String>) -> Answer {
    let prefix = format!("tiers.{name}");
    let edited = state
        .editor
        .edit("admin api: delete tier", &prefix, |document| {
            let i = tier_index(document, &name).ok_or_else(|| AppError::not_found("name", format!("no tier named {name:?}")))?;
            document.tiers.remove(i);
            Ok(())
        })
        .await?;
    answer(StatusCode::OK, Deleted { deleted: name, version: edited.version })
}

// ---- groups and members ----

#[derive(Serialize)]
struct GroupListed {
    group: String,
    tier: String,
    /// How many subjects are members.
    members: usize,
}

#[derive(Serialize)]
struct GroupShown {
    group: String,
    tier: String,
}

#[derive(Serialize)]
struct GroupChanged {
    group: String,
    tier: String,
    version: i64,
}

#[derive(Serialize)]
struct GroupDeleted {
    deleted: String,
    /// The subjects that were members, sorted.
    members_removed: Vec<String>,
    version: i64,
}

#[derive(Serialize)]
struct Member {
    subject: String,
}

#[derive(Serialize)]
struct MemberAdded {
    group: String,
    subject: String,
    version: i64,
}

#[derive(Serialize)]
struct MemberRemoved {
    group: String,
    removed: String,
    version: i64,
}

fn no_group(group: &str) -> AppError {
    AppError::not_found("group", format!("no group named {group:?}"))
}

/// Whether `group` is a group of `document`: one mapped to a tier or one with a budget.
fn knows_group(document: &ConfigDocument, group: &str) -> bool {
    let owner = BudgetOwner::new(OwnerKind::Group, group);
    document.groups.contains_key(group) || budget_index(document, &owner).is_some()
}

/// The subjects whose groups include `group`.
fn members_of<'a>(document: &'a ConfigDocument, group: &'a str) -> impl Iterator<Item = &'a String> + 'a {
    document.members.iter().filter(move |(_, groups)| groups.iter().any(|g| g == group)).map(|(subject, _)| subject)
}

pub async fn groups_list(State(state): State<Arc<AppState>>, q: Q) -> Answer {
    let p = params(q)?;
    let document = latest(&state).await?;
    let items = document
        .groups
        .iter()
        .map(|(group, tier)| {
            let members = members_of(&document, group).count();
            Keyed::new(group.clone(), GroupListed { group: group.clone(), tier: tier.clone(), members })
        })
        .collect();
    page(items, &p, state.max_page)
}

pub async fn group_get(State(state): State<Arc<AppState>>, Path(group): Path<String>) -> Answer {
    let document = latest(&state).await?;
    match document.groups.get(&group) {
        Some(tier) => answer(StatusCode::OK, GroupShown { tier: tier.clone(), group }),
        None => Err(no_group(&group)),
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
        .edit("admin api: put group", &prefix, |document| {
            require_tier(document, &body.tier)?;
            document.groups.insert(group.clone(), body.tier.clone());
            Ok(())
        })
        .await?;
    answer(StatusCode::OK, GroupChanged { group, tier: body.tier, version: edited.version })
}

pub async fn group_delete(State(state): State<Arc<AppState>>, Path(group): Path<String>) -> Answer {
    let prefix = format!("groups.{group}");
    let edited = state
        .editor
        .edit("admin api: delete group", &prefix, |document| {
            if document.groups.shift_remove(&group).is_none() {
                return Err(no_group(&group));
            }
            // A group with a budget stays a group (a team), members and all.
            if knows_group(document, &group) {
                return Ok(Vec::new());
            }
            // Its memberships go with it, and a subject left in no group is no member.
            let mut removed: Vec<String> = members_of(document, &group).cloned().collect();
            for groups in document.members.values_mut() {
                groups.retain(|g| *g != group);
            }
            document.members.retain(|_, groups| !groups.is_empty());
            removed.sort();
            Ok(removed)
        })
        .await?;
    answer(StatusCode::OK, GroupDeleted { deleted: group, members_removed: edited.value, version: edited.version })
}

pub async fn members_list(State(state): State<Arc<AppState>>, Path(group): Path<String>, q: Q) -> Answer {
    let p = params(q)?;
    let document = latest(&state).await?;
    if !knows_group(&document, &group) {
        return Err(no_group(&group));
    }
    let items = members_of(&document, &group).map(|s| Keyed::new(s.clone(), Member { subject: s.clone() })).collect();
    page(items, &p, state.max_page)
}

pub async fn member_put(State(state): State<Arc<AppState>>, Path((group, subject)): Path<(String, String)>) -> Answer {
    name_param(&subject, "subject")?;
    let prefix = format!("members.{subject}");
    let edited = state
        .editor
        .edit("admin api: add member", &prefix, |document| {
            if !knows_group(document, &group) {
                return Err(no_group(&group));
            }
            let groups = document.members.entry(subject.clone()).or_default();
            if !groups.contains(&group) {
                groups.push(group.clone());
            }
            Ok(())
        })
        .await?;
    answer(StatusCode::OK, MemberAdded { group, subject, version: edited.version })
}

pub async fn member_delete(State(state): State<Arc<AppState>>, Path((group, subject)): Path<(String, String)>) -> Answer {
    let prefix = format!("members.{subject}");
    let not_member = || AppError::not_found("subject", format!("{subject:?} is not in group {group:?}"));
    let edited = state
        .editor
        .edit("admin api: remove member", &prefix, |document| {
            let groups = document.members.get_mut(&subject).ok_or_else(not_member)?;
            let before = groups.len();
            groups.retain(|g| *g != group);
            if groups.len() == before {
                return Err(not_member());
            }
            if groups.is_empty() {
                document.members.shift_remove(&subject);
            }
            Ok(())
        })
        .await?;
    answer(StatusCode::OK, MemberRemoved { group, removed: subject, version: edited.version })
}

// ---- assignments ----

/// A stored time (RFC 3339 text); one that does not parse bounds nothing.
fn stored_time(text: Option<&str>) -> Option<DateTime<Utc>> {
    text.and_then(|t| t.parse::<DateTime<Utc>>().ok())
}

/// Whether `now` is within `[starts_at, expires_at)` (an absent bound is no bound).
fn active_at(starts_at: Option<&str>, expires_at: Option<&str>, now: DateTime<Utc>) -> bool {
    stored_time(expires_at).is_none_or(|end| now < end) && stored_time(starts_at).is_none_or(|start| start <= now)
}

/// An assignment as the admin API shows it.
#[derive(Serialize)]
struct AssignmentShown {
    #[serde(flatten)]
    assignment: AssignmentEntry,
    active: bool,
}

impl AssignmentShown {
    fn at(assignment: AssignmentEntry, now: DateTime<Utc>) -> AssignmentShown {
        let active = active_at(None, assignment.expires_at.as_deref(), now);
        AssignmentShown { assignment, active }
    }
}

#[derive(Serialize)]
struct AssignmentChanged {
    assignment: AssignmentEntry,
    version: i64,
}

fn no_assignment(subject: &str) -> AppError {
    AppError::not_found("subject", format!("{subject:?} has no assignment"))
}

pub async fn assignments_list(State(state): State<Arc<AppState>>, q: Q) -> Answer {
    let p = params(q)?;
    let document = latest(&state).await?;
    let now = Utc::now();
    let items = document.assignments.into_iter().map(|a| Keyed::new(a.subject.clone(), AssignmentShown::at(a, now))).collect();
    page(items, &p, state.max_page)
}

pub async fn assignment_get(State(state): State<Arc<AppState>>, Path(subject): Path<String>) -> Answer {
    let document = latest(&state).await?;
    match document.assignments.into_iter().find(|a| a.subject == subject) {
        Some(a) => answer(StatusCode::OK, AssignmentShown::at(a, Utc::now())),
        None => Err(no_assignment(&subject)),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AssignmentBody {
    tier: String,
    expires_at: Option<DateTime<Utc>>,
    reason: Option<String>,
}

/// How the admin API writes a time into the configuration.
fn written_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
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
    let assignment =
        AssignmentEntry { subject: subject.clone(), tier: body.tier, expires_at: body.expires_at.map(written_time), reason: body.reason };
    let edited = state
        .editor
        .edit("admin api: put assignment", "assignments", |document| {
            require_tier(document, &assignment.tier)?;
            document.assignments.retain(|a| a.subject != subject);
            document.assignments.push(assignment.clone());
            Ok(())
        })
        .await?;
    answer(StatusCode::OK, AssignmentChanged { assignment, version: edited.version })
}

pub async fn assignment_delete(State(state): State<Arc<AppState>>, Path(subject): Path<String>) -> Answer {
    let edited = state
        .editor
        .edit("admin api: delete assignment", "assignments", |document| {
            let before = document.assignments.len();
            document.assignments.retain(|a| a.subject != subject);
            if document.assignments.len() == before {
                return Err(no_assignment(&subject));
            }
            Ok(())
        })
        .await?;
    answer(StatusCode::OK, Deleted { deleted: subject, version: edited.version })
}

// ---- overrides ----

/// The id of an override: what it targets and when.
pub fn override_id(o: &OverrideEntry) -> String {
    let part = |v: Option<&str>| v.unwrap_or("").to_string();
    let text = [
        part(Some(&o.subject)),
        part(o.scope.as_deref()),
        part(o.quota.as_deref()),
        part(o.starts_at.as_deref()),
        part(Some(&o.expires_at)),
    ]
    .join("\u{1f}");
    format!("ovr_{}", &hex::encode(Sha256::digest(text.as_bytes()))[..16])
}

/// An override as the admin API shows it.
#[derive(Serialize)]
struct OverrideShown {
    #[serde(flatten)]
    entry: OverrideEntry,
    active: bool,
    id: String,
}

impl OverrideShown {
    fn at(entry: OverrideEntry, now: DateTime<Utc>) -> OverrideShown {
        let active = active_at(entry.starts_at.as_deref(), Some(&entry.expires_at), now);
        OverrideShown { id: override_id(&entry), entry, active }
    }
}

#[derive(Serialize)]
struct OverrideCreated {
    #[serde(rename = "override")]
    created: OverrideShown,
    version: i64,
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

fn no_override(id: &str) -> AppError {
    AppError::not_found("id", format!("no override {id:?}"))
}

pub async fn overrides_list(State(state): State<Arc<AppState>>, q: Q) -> Answer {
    let p = params(q)?;
    let document = latest(&state).await?;
    let now = Utc::now();
    let items = document
        .overrides
        .into_iter()
        .filter(|o| p.subject.as_deref().is_none_or(|s| o.subject == s))
        .map(|o| OverrideShown::at(o, now))
        .map(|o| Keyed::new(o.id.clone(), o))
        .collect();
    page(items, &p, state.max_page)
}

pub async fn override_get(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Answer {
    let document = latest(&state).await?;
    match document.overrides.into_iter().find(|o| override_id(o) == id) {
        Some(o) => answer(StatusCode::OK, OverrideShown::at(o, Utc::now())),
        None => Err(no_override(&id)),
    }
}

/// The override a request asks for, checked field by field (see the module docs); `now`
/// is when it is asked.
fn override_entry(body: OverrideBody, now: DateTime<Utc>) -> Result<OverrideEntry, AppError> {
    let subject = required(body.subject, "subject")?;
    name_param(&subject, "subject")?;
    if let Some(scope) = &body.scope {
        name_param(scope, "scope")?;
    }
    let (rate, limit) = match (body.rate, body.limit) {
        (Some(_), Some(_)) => return Err(AppError::bad("rate", "give `rate` or `limit`, not both")),
        (None, None) => return Err(AppError::bad("rate", "required (or `limit`)")),
        (Some(rate), None) => {
            Rate::from_str(&rate).map_err(|e| AppError::bad("rate", e.to_string()))?;
            (Some(rate), None)
        }
        (None, Some(limit)) if limit < 1 => return Err(AppError::bad("limit", "must be at least 1")),
        (None, Some(limit)) => (None, Some(limit)),
    };
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
    Ok(OverrideEntry {
        subject,
        scope: body.scope,
        quota: body.quota,
        rate,
        limit,
        starts_at: body.starts_at.map(written_time),
        expires_at: written_time(expires_at),
        reason: required(body.reason, "reason")?,
        created_by: required(body.created_by, "created_by")?,
    })
}

pub async fn override_create(State(state): State<Arc<AppState>>, JsonBody(body): JsonBody<OverrideBody>) -> Answer {
    // Everything is checked before anything is written.
    let now = Utc::now();
    let entry = override_entry(body, now)?;
    let edited = state
        .editor
        .edit("admin api: create override", "overrides", |document| {
            document.overrides.push(entry.clone());
            Ok(())
        })
        .await?;
    answer(StatusCode::CREATED, OverrideCreated { created: OverrideShown::at(entry, now), version: edited.version })
}

pub async fn override_delete(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Answer {
    let edited = state
        .editor
        .edit("admin api: delete override", "overrides", |document| {
            let before = document.overrides.len();
            document.overrides.retain(|o| override_id(o) != id);
            if document.overrides.len() == before {
                return Err(no_override(&id));
            }
            Ok(())
        })
        .await?;
    answer(StatusCode::OK, Deleted { deleted: id, version: edited.version })
}

// ---- budgets ----

/// A budget as the admin API shows it.
#[derive(Serialize)]
struct BudgetShown {
    kind: OwnerKind,
    /// A group's or a tier's name, or the SHA-256 hex of an API key.
    name: String,
    /// For an API key's budget: the key's id, as the key routes name it.
    #[serde(skip_serializing_if = "Option::is_none")]
    key_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    timezone: Option<String>,
    quotas: Vec<QuotaEntry>,
}

impl BudgetShown {
    fn new(owner: BudgetOwner, entry: BudgetEntry) -> BudgetShown {
        let key_id = (owner.kind == OwnerKind::ApiKey).then(|| keys::key_id(&owner.name));
        BudgetShown { kind: owner.kind, name: owner.name, key_id, timezone: entry.timezone, quotas: entry.quotas }
    }
}

#[derive(Serialize)]
struct BudgetChanged {
    budget: BudgetShown,
    version: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetBody {
    /// Calendar periods' timezone (default: a tier pool's tier's, else the configuration's).
    timezone: Option<String>,
    quotas: Vec<QuotaEntry>,
}

/// The budget of `owner` in `document`, by position.
fn budget_index(document: &ConfigDocument, owner: &BudgetOwner) -> Option<usize> {
    document.budgets.iter().position(|b| b.owner().as_ref() == Some(owner))
}

/// The owner named by a path, against `document`'s keys (an API key may be named by its id).
fn budget_owner(document: &ConfigDocument, kind: OwnerKind, name: &str) -> Result<BudgetOwner, AppError> {
    let hashes: Vec<String> = document.api_keys.iter().map(normalized_sha).collect();
    owner_of(kind, name, hashes.iter().map(String::as_str))
}

fn no_budget(owner: &BudgetOwner) -> AppError {
    AppError::not_found("name", format!("no budget for {owner}"))
}

pub async fn budgets_list(State(state): State<Arc<AppState>>, q: Q) -> Answer {
    let p = params(q)?;
    let document = latest(&state).await?;
    // Keyed by `kind/name`, which validation keeps distinct.
    let budgets: BTreeMap<String, BudgetShown> = document
        .budgets
        .into_iter()
        .filter_map(|b| b.owner().map(|owner| (format!("{}/{}", owner.kind, owner.name), BudgetShown::new(owner, b))))
        .collect();
    page(budgets.into_iter().map(|(key, b)| Keyed::new(key, b)).collect(), &p, state.max_page)
}

pub async fn budget_get(State(state): State<Arc<AppState>>, Path((kind, name)): Path<(String, String)>) -> Answer {
    let kind = owner_kind(&kind)?;
    let mut document = latest(&state).await?;
    let owner = budget_owner(&document, kind, &name)?;
    match budget_index(&document, &owner) {
        Some(i) => answer(StatusCode::OK, BudgetShown::new(owner, document.budgets.swap_remove(i))),
        None => Err(no_budget(&owner)),
    }
}

pub async fn budget_put(
    State(state): State<Arc<AppState>>,
    Path((kind, name)): Path<(String, String)>,
    JsonBody(body): JsonBody<BudgetBody>,
) -> Answer {
    let kind = owner_kind(&kind)?;
    if body.quotas.is_empty() {
        return Err(AppError::bad("quotas", "must list at least one quota"));
    }
    let edited = state
        .editor
        .edit("admin api: put budget", "budgets", |document| {
            let owner = budget_owner(document, kind, &name)?;
            if kind == OwnerKind::Tier && document.tier(&owner.name).is_none() {
                return Err(AppError::bad("name", format!("no tier named {:?}", owner.name)));
            }
            let mut entry = BudgetEntry::for_owner(&owner, body.quotas.clone());
            entry.timezone = body.timezone.clone();
            match budget_index(document, &owner) {
                Some(i) => document.budgets[i] = entry.clone(),
                None => document.budgets.push(entry.clone()),
            }
            Ok(BudgetShown::new(owner, entry))
        })
        .await?;
    answer(StatusCode::OK, BudgetChanged { budget: edited.value, version: edited.version })
}

pub async fn budget_delete(State(state): State<Arc<AppState>>, Path((kind, name)): Path<(String, String)>) -> Answer {
    let kind = owner_kind(&kind)?;
    let edited = state
        .editor
        .edit("admin api: delete budget", "budgets", |document| {
            let owner = budget_owner(document, kind, &name)?;
            let i = budget_index(document, &owner).ok_or_else(|| no_budget(&owner))?;
            document.budgets.remove(i);
            Ok(owner)
        })
        .await?;
    answer(StatusCode::OK, Deleted { deleted: edited.value.to_string(), version: edited.version })
}

// ---- API keys ----

/// A key's row in `api_key_usage`: when it was created, revoked and last used.
#[derive(sqlx::FromRow)]
struct KeyUsage {
    key_sha256: String,
    key_id: String,
    created_at: Option<DateTime<Utc>>,
    revoked_at: Option<DateTime<Utc>>,
    last_used_at: Option<DateTime<Utc>>,
}

/// An API key as the admin API shows it: its entry in the configuration (none once revoked)
/// and its usage row (none for a key written into a file by hand and never used).
#[derive(Serialize)]
struct KeyShown {
    id: String,
    tier: Option<String>,
    subject: Option<String>,
    label: Option<String>,
    /// In the configuration in force.
    active: bool,
    created_at: Option<DateTime<Utc>>,
    revoked_at: Option<DateTime<Utc>>,
    last_used_at: Option<DateTime<Utc>>,
}

impl KeyShown {
    fn new(id: String, entry: Option<ApiKeyEntry>, usage: Option<&KeyUsage>) -> KeyShown {
        let active = entry.is_some();
        let (tier, subject, label) = match entry {
            Some(e) => (Some(e.tier), e.subject, e.label),
            None => (None, None, None),
        };
        KeyShown {
            id,
            tier,
            subject,
            label,
            active,
            created_at: usage.and_then(|u| u.created_at),
            revoked_at: usage.and_then(|u| u.revoked_at),
            last_used_at: usage.and_then(|u| u.last_used_at),
        }
    }
}

#[derive(Serialize)]
struct KeyRevoked {
    revoked: String,
    revoked_at: DateTime<Utc>,
    version: i64,
}

/// A key's SHA-256 hex as the configuration compares it.
fn normalized_sha(entry: &ApiKeyEntry) -> String {
    entry.key_sha256.as_deref().unwrap_or_default().trim().to_ascii_lowercase()
}

async fn key_usage(state: &AppState) -> Result<BTreeMap<String, KeyUsage>, AppError> {
    let rows: Vec<KeyUsage> =
        sqlx::query_as("SELECT key_sha256, key_id, created_at, revoked_at, last_used_at FROM api_key_usage").fetch_all(&state.pool).await?;
    Ok(rows.into_iter().map(|r| (r.key_sha256.clone(), r)).collect())
}

/// Every key, active (in the configuration) or revoked (only in `api_key_usage`), by id.
async fn all_keys(state: &AppState) -> Result<BTreeMap<String, KeyShown>, AppError> {
    let document = latest(state).await?;
    let mut usage = key_usage(state).await?;
    let mut out = BTreeMap::new();
    for entry in document.api_keys {
        let sha = normalized_sha(&entry);
        let id = keys::key_id(&sha);
        let row = usage.remove(&sha);
        out.insert(id.clone(), KeyShown::new(id, Some(entry), row.as_ref()));
    }
    for row in usage.into_values() {
        out.entry(row.key_id.clone()).or_insert_with(|| KeyShown::new(row.key_id.clone(), None, Some(&row)));
    }
    Ok(out)
}

pub async fn keys_list(State(state): State<Arc<AppState>>, q: Q) -> Answer {
    let p = params(q)?;
    let items = all_keys(&state).await?.into_iter().map(|(id, k)| Keyed::new(id, k)).collect();
    page(items, &p, state.max_page)
}

pub async fn key_get(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Answer {
    match all_keys(&state).await?.remove(&id) {
        Some(k) => answer(StatusCode::OK, k),
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
    let entry = ApiKeyEntry::new(sha.clone(), tier.clone(), body.label.clone(), body.subject.clone());
    let edited = state
        .editor
        .edit("admin api: create api key", "api_keys", |document| {
            require_tier(document, &tier)?;
            document.api_keys.push(entry.clone());
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
        .edit("admin api: revoke api key", "api_keys", |document| {
            let i = document
                .api_keys
                .iter()
                .position(|k| keys::key_id(&normalized_sha(k)) == id)
                .ok_or_else(|| AppError::not_found("id", format!("no active API key {id:?}")))?;
            Ok(normalized_sha(&document.api_keys.remove(i)))
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
    answer(StatusCode::OK, KeyRevoked { revoked: id, revoked_at, version: edited.version })
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

    fn entry(expires_at: &str) -> OverrideEntry {
        OverrideEntry {
            subject: "a".into(),
            scope: None,
            quota: None,
            rate: None,
            limit: Some(5),
            starts_at: None,
            expires_at: expires_at.into(),
            reason: "r".into(),
            created_by: "c".into(),
        }
    }

    #[test]
    fn override_ids_depend_on_target_and_time() {
        let a = entry("2026-01-01T00:00:00Z");
        let b = entry("2026-01-02T00:00:00Z");
        assert_ne!(override_id(&a), override_id(&b));
        assert_eq!(override_id(&a), override_id(&a.clone()));
        assert!(override_id(&a).starts_with("ovr_"));
        // The id of a stored override never changes: it is the hash of these fields as text.
        assert_eq!(
            override_id(&a),
            "ovr_".to_string() + &hex::encode(Sha256::digest("a\u{1f}\u{1f}\u{1f}\u{1f}2026-01-01T00:00:00Z"))[..16]
        );
    }

    #[test]
    fn activity_is_within_the_start_and_the_expiry() {
        let now: DateTime<Utc> = "2026-06-01T00:00:00Z".parse().unwrap();
        assert!(active_at(None, None, now));
        assert!(active_at(Some("2026-06-01T00:00:00Z"), Some("2026-06-02T00:00:00Z"), now), "the start is inclusive");
        assert!(!active_at(None, Some("2026-06-01T00:00:00Z"), now), "the expiry is exclusive");
        assert!(!active_at(Some("2026-06-01T00:00:01Z"), None, now));
    }

    #[test]
    fn an_override_request_is_checked_field_by_field() {
        let now: DateTime<Utc> = "2026-06-01T00:00:00Z".parse().unwrap();
        let body = |rate: Option<&str>, limit: Option<i64>| OverrideBody {
            subject: Some("carol".into()),
            rate: rate.map(str::to_string),
            limit,
            scope: None,
            quota: None,
            duration: Some("2h".into()),
            starts_at: None,
            expires_at: None,
            reason: Some("launch".into()),
            created_by: Some("ops".into()),
        };
        let e = override_entry(body(Some("1000/h"), None), now).unwrap();
        assert_eq!((e.rate.as_deref(), e.limit, e.expires_at.as_str()), (Some("1000/h"), None, "2026-06-01T02:00:00.000Z"));
        assert_eq!(override_entry(body(None, Some(0)), now).unwrap_err().field.as_deref(), Some("limit"));
        assert_eq!(override_entry(body(Some("1/h"), Some(3)), now).unwrap_err().field.as_deref(), Some("rate"));
    }
}
