//! The public probes: `/healthz` (the process answers), `/readyz` (its dependencies do) and
//! `/metrics` (Prometheus text).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::Utc;
use serde::Serialize;

use crate::state::AppState;

pub async fn healthz() -> &'static str {
    "ok"
}

pub async fn metrics(State(state): State<Arc<AppState>>) -> String {
    let mut text = state.registry.render();
    text.push_str(&format!(
        "# HELP tally_api_view_subjects subjects in the decision view\n# TYPE tally_api_view_subjects gauge\ntally_api_view_subjects {}\n",
        state.view.len()
    ));
    if let Some(s) = state.view.staleness(Utc::now()) {
        text.push_str(&format!(
            "# HELP tally_api_view_staleness_milliseconds time since the decision view last caught up with its topic\n# TYPE tally_api_view_staleness_milliseconds gauge\ntally_api_view_staleness_milliseconds {}\n",
            s.num_milliseconds()
        ));
    }
    text.push_str(&format!(
        "# HELP tally_api_config_version the tier configuration version the API knows\n# TYPE tally_api_config_version gauge\ntally_api_config_version {}\n",
        state.configs.current().version
    ));
    text
}

#[derive(Serialize)]
struct Readiness {
    ready: bool,
    postgres: &'static str,
    broker: &'static str,
    decision_view: &'static str,
    /// How far behind the aggregators' decisions the view may be (see [`crate::view`]);
    /// informative: a stale view does not make the API unready, checks answer by policy.
    decision_staleness_ms: Option<i64>,
    /// The state of each Kafka client ([`tally_common::health`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    clients: Vec<tally_common::health::ClientStatus>,
}

/// Ready when Postgres answers, the broker answers, no Kafka client is disconnected or broken
/// and the decision view caught up once.
pub async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let postgres = match tokio::time::timeout(Duration::from_secs(2), sqlx::query("SELECT 1").execute(&state.pool)).await {
        Ok(Ok(_)) => "ok",
        _ => "unavailable",
    };
    let (broker, clients) = match &state.broker {
        None => ("not_checked", None),
        Some(b) => {
            let client = b.producer.producer();
            let probe = tokio::task::spawn_blocking(move || {
                rdkafka::producer::Producer::client(&client).fetch_metadata(None, Duration::from_secs(2)).is_ok()
            });
            let broker = if matches!(probe.await, Ok(true)) { "ok" } else { "unavailable" };
            (broker, Some(b.clients.report(std::time::Instant::now())))
        }
    };
    let decision_view = if state.view.caught_up_at().is_some() { "caught_up" } else { "catching_up" };
    let clients_ready = clients.as_ref().is_none_or(|c| c.ready);
    let ready = postgres == "ok" && broker != "unavailable" && clients_ready && decision_view == "caught_up";
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let decision_staleness_ms = state.view.staleness(Utc::now()).map(|s| s.num_milliseconds());
    let clients = clients.map(|c| c.clients).unwrap_or_default();
    (status, Json(Readiness { ready, postgres, broker, decision_view, decision_staleness_ms, clients })).into_response()
}
