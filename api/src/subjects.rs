//! `GET /v1/subjects/{subject}/decision` and `.../usage`: a subject's latest decision (from
//! the view, else Postgres) and its ledger rows.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tally_domain::decision::DecisionSnapshot;

use crate::error::AppError;
use crate::paging::page_limit;
use crate::state::AppState;

/// A decision snapshot as the API answers it: the snapshot with its age and source.
#[derive(Serialize)]
pub(crate) struct DecisionAnswer<'a> {
    #[serde(flatten)]
    pub snapshot: &'a DecisionSnapshot,
    /// Milliseconds between the snapshot's calculation and this answer.
    pub age_ms: i64,
    /// `view` (the in-memory view) or `database` (the Postgres fallback).
    pub source: &'static str,
}

/// The stored decision of `subject` in Postgres.
pub(crate) async fn stored_decision(state: &AppState, subject: &str) -> Result<Option<DecisionSnapshot>, sqlx::Error> {
    let row: Option<sqlx::types::Json<DecisionSnapshot>> =
        sqlx::query_scalar("SELECT snapshot FROM decisions WHERE subject = $1").bind(subject).fetch_optional(&state.pool).await?;
    let found = row.map(|s| s.0);
    if found.is_some() {
        state.metrics.decisions_from_database.inc();
    }
    Ok(found)
}

/// A subject's latest decision and where it came from.
pub(crate) struct FoundDecision {
    pub snapshot: Arc<DecisionSnapshot>,
    /// `view` or `database`.
    pub source: &'static str,
}

impl FoundDecision {
    pub fn answer(&self, now: DateTime<Utc>) -> DecisionAnswer<'_> {
        DecisionAnswer {
            snapshot: &self.snapshot,
            age_ms: (now - self.snapshot.calculated_at).num_milliseconds().max(0),
            source: self.source,
        }
    }
}

/// The latest decision of `subject` (a subject or a budget subject): the view's, else the
/// one stored in Postgres.
pub(crate) async fn latest_decision(state: &AppState, subject: &str) -> Result<Option<FoundDecision>, sqlx::Error> {
    if let Some(snapshot) = state.view.get(subject) {
        state.metrics.decisions_from_view.inc();
        return Ok(Some(FoundDecision { snapshot, source: "view" }));
    }
    Ok(stored_decision(state, subject).await?.map(|s| FoundDecision { snapshot: Arc::new(s), source: "database" }))
}

/// Whether an `If-None-Match` value matches the (weak) entity tag `etag`.
fn none_match(header: &str, etag: &str) -> bool {
    let strip = |t: &str| t.trim().trim_start_matches("W/").to_string();
    header.split(',').any(|t| t.trim() == "*" || strip(t) == strip(etag))
}

/// `GET /v1/subjects/{subject}/decision`, with a weak ETag of the snapshot's version: the
/// body's `age_ms` changes with time, the decision only with a new version.
pub async fn decision(State(state): State<Arc<AppState>>, Path(subject): Path<String>, headers: HeaderMap) -> Result<Response, AppError> {
    let missing = || AppError::not_found("subject", format!("no decision for subject {subject:?} yet"));
    decision_response(&state, &subject, &headers, missing).await
}

/// The latest decision of `subject` (a subject or a budget subject) with its weak ETag, or
/// 304 for a matching `If-None-Match`, or `missing()` when it has none.
pub(crate) async fn decision_response(
    state: &AppState,
    subject: &str,
    headers: &HeaderMap,
    missing: impl FnOnce() -> AppError,
) -> Result<Response, AppError> {
    let Some(found) = latest_decision(state, subject).await? else {
        return Err(missing());
    };
    let etag = format!("W/\"{}\"", found.snapshot.version);
    let etag_value = HeaderValue::from_str(&etag).map_err(|e| AppError::unavailable("encoder", e))?;
    let inm = headers.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok());
    if inm.is_some_and(|h| none_match(h, &etag)) {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag_value)]).into_response());
    }
    Ok(([(header::ETAG, etag_value), (header::CACHE_CONTROL, HeaderValue::from_static("no-cache"))], Json(found.answer(Utc::now())))
        .into_response())
}

#[derive(Serialize)]
struct UsageRow {
    quota: String,
    metric: String,
    /// `null` for a quota over all scopes.
    scope: Option<String>,
    period: String,
    period_start: DateTime<Utc>,
    period_end: DateTime<Utc>,
    used: i64,
    limit: i64,
}

#[derive(Serialize)]
struct UsageAnswer {
    subject: String,
    ledgers: Vec<UsageRow>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageParams {
    limit: Option<String>,
}

/// A row of `ledgers` as the usage route reads it.
#[derive(sqlx::FromRow)]
struct LedgerRow {
    quota: String,
    metric: String,
    /// `*` for a quota over all scopes.
    scope: String,
    period: String,
    period_start: DateTime<Utc>,
    period_end: DateTime<Utc>,
    used: i64,
    limit_value: i64,
}

impl From<LedgerRow> for UsageRow {
    fn from(r: LedgerRow) -> UsageRow {
        UsageRow {
            quota: r.quota,
            metric: r.metric,
            scope: (r.scope != "*").then_some(r.scope),
            period: r.period,
            period_start: r.period_start,
            period_end: r.period_end,
            used: r.used,
            limit: r.limit_value,
        }
    }
}

/// `GET /v1/subjects/{subject}/usage?limit=N`: the latest ledger rows, newest period first.
pub async fn usage(
    State(state): State<Arc<AppState>>,
    Path(subject): Path<String>,
    params: Result<Query<UsageParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, AppError> {
    let Query(params) = params.map_err(|e| AppError::bad("query", e.body_text()))?;
    let limit = page_limit(params.limit.as_deref(), state.max_page.max(1000))?;
    let rows: Vec<LedgerRow> = sqlx::query_as(
        "SELECT quota, metric, scope, period, period_start, period_end, used, limit_value FROM ledgers
         WHERE subject = $1 ORDER BY period_start DESC, metric, scope, period LIMIT $2",
    )
    .bind(&subject)
    .bind(limit as i64)
    .fetch_all(&state.pool)
    .await?;
    let ledgers = rows.into_iter().map(UsageRow::from).collect();
    Ok(Json(UsageAnswer { subject, ledgers }).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn if_none_match_compares_weakly() {
        assert!(none_match("W/\"7\"", "W/\"7\""));
        assert!(none_match("\"7\"", "W/\"7\""));
        assert!(none_match("\"3\", W/\"7\"", "W/\"7\""));
        assert!(none_match("*", "W/\"7\""));
        assert!(!none_match("W/\"8\"", "W/\"7\""));
    }
}
