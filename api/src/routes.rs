//! HTTP routes of the API service.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use tally_common::metrics::{Counter, Registry};
use tally_domain::decision::DecisionSnapshot;

use crate::view::DecisionView;

pub struct AppState {
    view: Arc<DecisionView>,
    pool: PgPool,
    registry: Registry,
    decisions_from_view: Counter,
    decisions_from_database: Counter,
}

impl AppState {
    pub fn new(view: Arc<DecisionView>, pool: PgPool) -> Arc<Self> {
        let registry = Registry::default();
        let served = "tally_api_decisions_served_total";
        let help = "decision answers by where they came from";
        Arc::new(AppState {
            decisions_from_view: registry.counter(served, help, &[("source", "view")]),
            decisions_from_database: registry.counter(served, help, &[("source", "database")]),
            view,
            pool,
            registry,
        })
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/subjects/{subject}/decision", get(decision))
        .route("/v1/subjects/{subject}/usage", get(usage))
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// A JSON error: `{"error", "field"}`.
#[derive(Serialize)]
struct ApiError {
    error: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'static str>,
}

fn api_error(status: StatusCode, error: impl Into<String>, field: Option<&'static str>) -> Response {
    (status, Json(ApiError { error: error.into(), field })).into_response()
}

fn internal(e: sqlx::Error) -> Response {
    tracing::error!(error = %e, "database query failed");
    api_error(StatusCode::SERVICE_UNAVAILABLE, "the ledger database is unavailable", None)
}

async fn metrics(State(state): State<Arc<AppState>>) -> String {
    let mut text = state.registry.render();
    text.push_str(&format!(
        "# HELP tally_api_view_subjects subjects in the decision view\n# TYPE tally_api_view_subjects gauge\ntally_api_view_subjects {}\n",
        state.view.len()
    ));
    text
}

#[derive(Serialize)]
struct DecisionAnswer {
    #[serde(flatten)]
    snapshot: DecisionSnapshot,
    /// Milliseconds between the snapshot's calculation and this answer.
    age_ms: i64,
    /// `view` (the in-memory view) or `database` (the Postgres fallback).
    source: &'static str,
}

async fn latest_decision(state: &AppState, subject: &str) -> Result<Option<(DecisionSnapshot, &'static str)>, sqlx::Error> {
    if let Some(s) = state.view.get(subject) {
        state.decisions_from_view.inc();
        return Ok(Some((s, "view")));
    }
    let row: Option<(sqlx::types::Json<DecisionSnapshot>,)> =
        sqlx::query_as("SELECT snapshot FROM decisions WHERE subject = $1").bind(subject).fetch_optional(&state.pool).await?;
    Ok(row.map(|(s,)| {
        state.decisions_from_database.inc();
        (s.0, "database")
    }))
}

async fn decision(State(state): State<Arc<AppState>>, Path(subject): Path<String>) -> Response {
    match latest_decision(&state, &subject).await {
        Ok(Some((snapshot, source))) => {
            let age_ms = (Utc::now() - snapshot.calculated_at).num_milliseconds().max(0);
            Json(DecisionAnswer { snapshot, age_ms, source }).into_response()
        }
        Ok(None) => api_error(StatusCode::NOT_FOUND, format!("no decision for subject {subject:?} yet"), Some("subject")),
        Err(e) => internal(e),
    }
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

type LedgerRow = (String, String, String, String, DateTime<Utc>, DateTime<Utc>, i64, i64);

async fn usage(State(state): State<Arc<AppState>>, Path(subject): Path<String>) -> Response {
    let rows: Vec<LedgerRow> = match sqlx::query_as(
        "SELECT quota, metric, scope, period, period_start, period_end, used, limit_value FROM ledgers
         WHERE subject = $1 ORDER BY period_start DESC, metric, scope, period LIMIT 1000",
    )
    .bind(&subject)
    .fetch_all(&state.pool)
    .await
    {
        Ok(rows) => rows,
        Err(e) => return internal(e),
    };
    let ledgers = rows
        .into_iter()
        .map(|(quota, metric, scope, period, period_start, period_end, used, limit)| UsageRow {
            quota,
            metric,
            scope: (scope != "*").then_some(scope),
            period,
            period_start,
            period_end,
            used,
            limit,
        })
        .collect();
    Json(UsageAnswer { subject, ledgers }).into_response()
}
