//! Usage history routes, answered from ClickHouse (see `tally_history::query` for the
//! contract: ranges, buckets, limits, which rollup answers):
//!
//! - `GET /v1/history/series?metric=&from=&to=&granularity=hour|day|month&tz=&subject=&scope=&model=&api_key_sha256=&budget=&group_by=model|scope|subject|api_key|budget&limit=`
//!   (`budget=group:eng`: the events that met that budget; `group_by=budget`: one series per
//!   budget, by owner)
//! - `GET /v1/subjects/{subject}/history?...`: the same for one subject
//! - `GET /v1/history/top?metric=&from=&to=&scope=&model=&api_key_sha256=&budget=&limit=`: top-N subjects
//! - `GET /v1/reconcile?period=YYYY-MM&subject=&budget=`: the reconciliation report (every
//!   subject's and budget's ledger rows; or one subject's; or one budget's, `budget=group:eng`);
//!   200 with `"ok": true` only with zero drift, else 409 with the same report
//!
//! Bad input is a 400 `{"error", "field"}`; an unavailable ClickHouse or Postgres a 503 with a
//! generic message (the cause is logged, never sent).

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tally_domain::budget::BudgetOwner;
use tally_history::client::Ch;
use tally_history::query::{self, Params, QueryError, SeriesQuery, TopQuery};
use tally_history::reconcile::{self, Month, Only};

pub struct HistoryState {
    pub ch: Ch,
    pub pool: PgPool,
}

pub fn router(state: Arc<HistoryState>) -> Router {
    Router::new()
        .route("/v1/history/series", get(series))
        .route("/v1/history/top", get(top))
        .route("/v1/subjects/{subject}/history", get(subject_series))
        .route("/v1/reconcile", get(reconcile_period))
        .with_state(state)
}

#[derive(Serialize)]
struct ApiError {
    error: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'static str>,
}

fn bad_request(e: QueryError) -> Response {
    (StatusCode::BAD_REQUEST, Json(ApiError { error: e.message, field: Some(e.field) })).into_response()
}

/// The query string's parameters, or a 400 in JSON naming `query` (e.g. a repeated parameter).
fn params<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, Response> {
    q.map(|Query(p)| p)
        .map_err(|e| (StatusCode::BAD_REQUEST, Json(ApiError { error: e.body_text(), field: Some("query") })).into_response())
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> Response {
    tracing::error!(error = %e, "history query failed");
    (StatusCode::SERVICE_UNAVAILABLE, Json(ApiError { error: format!("the {what} is unavailable"), field: None })).into_response()
}

async fn run_series(state: &HistoryState, p: &Params) -> Response {
    let q = match SeriesQuery::parse(p) {
        Ok(q) => q,
        Err(e) => return bad_request(e),
    };
    match query::series(&state.ch, &q).await {
        Ok(answer) => Json(answer).into_response(),
        Err(e) => unavailable("history database", e),
    }
}

async fn series(State(state): State<Arc<HistoryState>>, q: Result<Query<Params>, QueryRejection>) -> Response {
    match params(q) {
        Ok(p) => run_series(&state, &p).await,
        Err(refused) => refused,
    }
}

async fn subject_series(
    State(state): State<Arc<HistoryState>>,
    Path(subject): Path<String>,
    q: Result<Query<Params>, QueryRejection>,
) -> Response {
    let mut p = match params(q) {
        Ok(p) => p,
        Err(refused) => return refused,
    };
    p.subject = Some(subject);
    run_series(&state, &p).await
}

async fn top(State(state): State<Arc<HistoryState>>, q: Result<Query<Params>, QueryRejection>) -> Response {
    let p = match params(q) {
        Ok(p) => p,
        Err(refused) => return refused,
    };
    let q = match TopQuery::parse(&p) {
        Ok(q) => q,
        Err(e) => return bad_request(e),
    };
    match query::top(&state.ch, &q).await {
        Ok(answer) => Json(answer).into_response(),
        Err(e) => unavailable("history database", e),
    }
}

#[derive(Deserialize)]
struct ReconcileParams {
    period: Option<String>,
    subject: Option<String>,
    budget: Option<String>,
}

async fn reconcile_period(State(state): State<Arc<HistoryState>>, q: Result<Query<ReconcileParams>, QueryRejection>) -> Response {
    let p = match params(q) {
        Ok(p) => p,
        Err(refused) => return refused,
    };
    let Some(period) = p.period else {
        return bad_request(QueryError { field: "period", message: "required (YYYY-MM)".into() });
    };
    let month = match Month::parse(&period) {
        Ok(m) => m,
        Err(message) => return bad_request(QueryError { field: "period", message }),
    };
    let budget = match p.budget.as_deref().map(|spec| (spec, BudgetOwner::parse_spec(spec))) {
        None => None,
        Some((_, Some(owner))) => Some(owner),
        Some((spec, None)) => {
            let message = format!("{spec:?} names no budget owner: expected group:<name>, api_key:<sha256 hex> or tier:<name>");
            return bad_request(QueryError { field: "budget", message });
        }
    };
    let only = match (&budget, p.subject.as_deref()) {
        (Some(_), Some(_)) => return bad_request(QueryError { field: "budget", message: "give subject or budget, not both".into() }),
        (Some(owner), None) => Only::Budget(owner),
        (None, Some(subject)) => Only::Subject(subject),
        (None, None) => Only::All,
    };
    match reconcile::reconcile_only(&state.pool, &state.ch, month, only).await {
        Ok(report) => {
            let status = if report.ok { StatusCode::OK } else { StatusCode::CONFLICT };
            (status, Json(report)).into_response()
        }
        Err(e) => unavailable("ledger or history database", e),
    }
}
