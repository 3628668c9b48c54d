//! The ingest service: `POST /v1/events` takes one usage event or a JSON array of them.
//!
//! Contract:
//! - Every event of a request is validated first; if any is invalid the answer is 400 naming
//!   the `index` and the `field`, and nothing of the request is produced (never half-applied).
//! - Valid events are produced to the usage topic in canonical form (raw API keys replaced by
//!   their SHA-256), keyed by subject so a subject's events stay on one partition.
//! - The answer is 202 `{"accepted": n}` only after the broker acknowledged every event.
//!   If the broker does not within `TALLY_INGEST_ACK_TIMEOUT_MS` (5 s), or refuses, the
//!   answer is 503 with `Retry-After` and the gateway retries with the same ids. The events
//!   of a request that timed out may still be delivered later (librdkafka goes on trying
//!   for `message.timeout.ms`); the aggregator's dedupe makes the retry safe either way.
//! - The producer replaces itself after a fatal error (e.g. fenced once the broker is back
//!   after an outage; [`tally_common::producing`]); the request that met it is sent again on
//!   the new producer within its timeout.
//! - `/healthz` (liveness) answers 200 with the producer's state unless the producer stayed
//!   broken for 30 s; `/readyz` answers 503 while the producer cannot reach the broker or is
//!   broken ([`tally_common::health`]).
//! - With an ingest token configured (`TALLY_INGEST_TOKEN`), `POST /v1/events` needs
//!   `Authorization: Bearer <token>` (compared in constant time, never logged) and answers
//!   401 without producing anything; without one it is open, and says so loudly at start.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tally_common::health::Clients;
use tally_common::producing::{Outgoing, RebuildingProducer};
use serde::Serialize;
use serde_json::Value;
use tally_common::kafka::KafkaSettings;
use tally_common::metrics::{Counter, Registry, Timing};
use tally_domain::event::{event_from_value, UsageEvent};

/// The ingest service's own settings.
#[derive(Debug, Clone, clap::Args)]
pub struct IngestSettings {
    /// Address to listen on.
    #[arg(long = "listen", env = "TALLY_INGEST_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Most events accepted in one request.
    #[arg(long, env = "TALLY_INGEST_MAX_BATCH", default_value_t = 10_000)]
    pub max_batch: usize,
    /// Largest request body accepted, in bytes.
    #[arg(long, env = "TALLY_INGEST_MAX_BODY_BYTES", default_value_t = 8 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Bearer token gateways must present on `POST /v1/events`. Without it ingest is open.
    #[arg(long = "ingest-token", env = "TALLY_INGEST_TOKEN", hide_env_values = true)]
    pub token: Option<tally_common::auth::Token>,
    /// Longest wait, in milliseconds, for the broker to acknowledge a request's events; then
    /// the answer is 503 with `Retry-After`. Keep it below what gateways wait for an answer.
    #[arg(long, env = "TALLY_INGEST_ACK_TIMEOUT_MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..))]
    pub ack_timeout_ms: u64,
}

/// What a 503 asks the gateway to wait before retrying, in seconds.
const RETRY_AFTER_SECONDS: u64 = 1;

struct Metrics {
    registry: Registry,
    accepted: Counter,
    rejected: Counter,
    broker_failures: Counter,
    ack_timeouts: Counter,
    producer_rebuilds: Counter,
    unauthorized: Counter,
    produce: Timing,
}

impl Metrics {
    fn new() -> Self {
        let registry = Registry::default();
        Metrics {
            accepted: registry.counter("tally_ingest_events_total", "events accepted and acknowledged by the broker", &[]),
            rejected: registry.counter("tally_ingest_rejected_requests_total", "requests refused for invalid input", &[]),
            broker_failures: registry.counter(
                "tally_ingest_broker_failures_total",
                "requests answered 503 because the broker did not acknowledge",
                &[],
            ),
            ack_timeouts: registry.counter(
                "tally_ingest_ack_timeouts_total",
                "requests answered 503 because the acknowledgements took longer than the ack timeout",
                &[],
            ),
            producer_rebuilds: registry.counter(
                "tally_kafka_producer_rebuilds_total",
                "producers replaced after a fatal error",
                &[("client", "ingest")],
            ),
            unauthorized: registry.counter("tally_ingest_unauthorized_total", "requests refused for a missing or wrong token", &[]),
            produce: Timing::new(
                &registry,
                "tally_ingest_produce_micros_total",
                "tally_ingest_produce_batches_total",
                "time spent waiting for broker acknowledgements",
            ),
            registry,
        }
    }
}

struct AppState {
    producer: Arc<RebuildingProducer>,
    clients: Clients,
    ack_timeout: Duration,
    topic: String,
    max_batch: usize,
    metrics: Metrics,
    token: Option<tally_common::auth::Token>,
}

/// A JSON error body: `{"error", "field", "index"}`.
#[derive(Debug, Serialize)]
pub struct ErrorBody {
    pub error: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
}

fn error(status: StatusCode, error: String, field: Option<String>, index: Option<usize>) -> Response {
    (status, Json(ErrorBody { error, field, index })).into_response()
}

/// Builds the router; the producer must be connected to the broker that owns `topic`.
fn router(state: Arc<AppState>, max_body_bytes: usize) -> Router {
    let events = Router::new()
        .route("/v1/events", post(post_events))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .merge(events)
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

/// Refuses requests without the ingest token, when one is configured.
async fn require_token(State(state): State<Arc<AppState>>, req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let Some(token) = &state.token else { return next.run(req).await };
    let header = req.headers().get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    if tally_common::auth::authorized(header, [token]) {
        next.run(req).await
    } else {
        state.metrics.unauthorized.inc();
        let mut r = error(StatusCode::UNAUTHORIZED, "a valid bearer token is required".into(), Some("authorization".into()), None);
        r.headers_mut().insert(axum::http::header::WWW_AUTHENTICATE, axum::http::HeaderValue::from_static("Bearer"));
        r
    }
}

/// Liveness: 200 with the clients' states unless one stayed broken (see the module docs).
async fn healthz(State(state): State<Arc<AppState>>) -> Response {
    let report = state.clients.report(Instant::now());
    let status = if report.live { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(report)).into_response()
}

/// Readiness: 503 while the producer is disconnected from the broker or broken.
async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let report = state.clients.report(Instant::now());
    let status = if report.ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(report)).into_response()
}

/// A 503 the gateway should retry with the same ids after `Retry-After`.
fn unavailable(message: String) -> Response {
    let mut r = error(StatusCode::SERVICE_UNAVAILABLE, message, None, None);
    r.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from(RETRY_AFTER_SECONDS));
    r
}

async fn metrics(State(state): State<Arc<AppState>>) -> String {
    state.metrics.registry.render()
}

/// Validates every event of the body; the first invalid one refuses the whole request.
fn validate(body: Value, max_batch: usize) -> Result<Vec<UsageEvent>, Response> {
    let (items, single) = match body {
        Value::Array(items) => (items, false),
        other => (vec![other], true),
    };
    if items.is_empty() {
        return Err(error(StatusCode::BAD_REQUEST, "the batch is empty".into(), None, None));
    }
    if items.len() > max_batch {
        return Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("{} events in one request; the limit is {max_batch}", items.len()),
            None,
            None,
        ));
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            event_from_value(item).map_err(|e| {
                let index = if single { None } else { Some(i) };
                let at = index.map(|i| format!("event {i}: ")).unwrap_or_default();
                error(StatusCode::BAD_REQUEST, format!("{at}{e}"), Some(e.field), index)
            })
        })
        .collect()
}

async fn post_events(State(state): State<Arc<AppState>>, body: Result<Json<Value>, axum::extract::rejection::JsonRejection>) -> Response {
    let Json(body) = match body {
        Ok(b) => b,
        Err(rejection) => {
            state.metrics.rejected.inc();
            return error(rejection.status(), rejection.body_text(), None, None);
        }
    };
    let events = match validate(body, state.max_batch) {
        Ok(events) => events,
        Err(response) => {
            state.metrics.rejected.inc();
            return response;
        }
    };
    let started = Instant::now();
    match tokio::time::timeout(state.ack_timeout, produce_all(&state, &events)).await {
        Ok(Ok(())) => {
            state.metrics.produce.record(started.elapsed());
            state.metrics.accepted.add(events.len() as u64);
            (StatusCode::ACCEPTED, Json(serde_json::json!({ "accepted": events.len() }))).into_response()
        }
        Ok(Err(e)) => {
            state.metrics.broker_failures.inc();
            tracing::warn!(error = %e, events = events.len(), "broker did not acknowledge a batch");
            unavailable("the broker did not acknowledge the events; retry with the same ids".into())
        }
        Err(_) => {
            state.metrics.broker_failures.inc();
            state.metrics.ack_timeouts.inc();
            let ms = state.ack_timeout.as_millis();
            tracing::warn!(events = events.len(), timeout_ms = ms as u64, "broker did not acknowledge a batch in time");
            unavailable(format!("the broker did not acknowledge the events within {ms} ms; retry with the same ids"))
        }
    }
}

/// Produces every event and waits for every acknowledgement (the caller bounds the wait).
async fn produce_all(state: &AppState, events: &[UsageEvent]) -> anyhow::Result<()> {
    let payloads: Vec<Vec<u8>> = events.iter().map(UsageEvent::to_canonical_json).collect();
    let deliveries = events.iter().zip(&payloads).map(|(event, payload)| {
        state.producer.send(Outgoing::new(&state.topic, event.subject.as_bytes(), payload), state.ack_timeout)
    });
    for result in futures::future::join_all(deliveries).await {
        result.map_err(|e| anyhow::anyhow!("produce failed: {e}"))?;
    }
    Ok(())
}

/// The ingest producer, reported in `clients`.
fn producer(kafka: &KafkaSettings, clients: &Clients, metrics: &Metrics) -> anyhow::Result<Arc<RebuildingProducer>> {
    RebuildingProducer::new(kafka.producer_config(), clients.register("ingest producer"), Some(metrics.producer_rebuilds.clone()))
}

/// Runs the ingest service until `shutdown` resolves.
pub async fn run(
    settings: IngestSettings,
    kafka: KafkaSettings,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (clients, metrics) = (Clients::default(), Metrics::new());
    let producer = producer(&kafka, &clients, &metrics)?;
    let state = Arc::new(AppState {
        producer,
        clients,
        ack_timeout: Duration::from_millis(settings.ack_timeout_ms),
        topic: kafka.usage_topic.clone(),
        max_batch: settings.max_batch,
        metrics,
        token: settings.token.clone(),
    });
    if state.token.is_none() {
        tracing::warn!("no ingest token configured (TALLY_INGEST_TOKEN): anyone who can reach this address can send usage");
    }
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("failed to listen on {}", settings.listen))?;
    tracing::info!(listen = %settings.listen, topic = %kafka.usage_topic, "ingest listening");
    axum::serve(listener, router(state, settings.max_body_bytes))
        .with_graceful_shutdown(shutdown)
        .await
        .context("ingest server failed")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn status_and_body(r: Response) -> (StatusCode, Value) {
        let status = r.status();
        let body = futures::executor::block_on(axum::body::to_bytes(r.into_body(), usize::MAX)).unwrap();
        (status, serde_json::from_slice(&body).unwrap())
    }

    #[test]
    fn a_bad_event_in_a_batch_names_index_and_field() {
        let body = json!([
            {"id": "a", "subject": "s", "time": "2026-11-22T10:00:00Z"},
            {"id": "b", "subject": "s", "time": "2026-11-22T10:00:00Z", "input_tokens": "many"}
        ]);
        let (status, body) = status_and_body(validate(body, 10).unwrap_err());
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["index"], 1);
        assert_eq!(body["field"], "input_tokens");
    }

    #[test]
    fn the_ingest_token_is_required_when_configured() {
        use tower::ServiceExt;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let (clients, metrics) = (Clients::default(), Metrics::new());
            let mut config = rdkafka::ClientConfig::new();
            config.set("bootstrap.servers", "127.0.0.1:1");
            let producer = RebuildingProducer::new(config, clients.register("ingest producer"), None).unwrap();
            let state = Arc::new(AppState {
                producer,
                clients,
                ack_timeout: Duration::from_millis(100),
                topic: "t".into(),
                max_batch: 10,
                metrics,
                token: Some(tally_common::auth::Token::new("ingest-token-0123456789")),
            });
            let app = router(state, 1024);
            let req = |auth: Option<&str>| {
                let mut b = axum::http::Request::post("/v1/events").header("content-type", "application/json");
                if let Some(a) = auth {
                    b = b.header("authorization", a);
                }
                b.body(axum::body::Body::from("[]")).unwrap()
            };
            assert_eq!(app.clone().oneshot(req(None)).await.unwrap().status(), StatusCode::UNAUTHORIZED);
            assert_eq!(app.clone().oneshot(req(Some("Bearer wrong-token"))).await.unwrap().status(), StatusCode::UNAUTHORIZED);
            // With the token the request reaches validation (an empty batch is a 400).
            let ok = app.clone().oneshot(req(Some("Bearer ingest-token-0123456789"))).await.unwrap();
            assert_eq!(ok.status(), StatusCode::BAD_REQUEST);
            let health = axum::http::Request::get("/healthz").body(axum::body::Body::empty()).unwrap();
            assert_eq!(app.oneshot(health).await.unwrap().status(), StatusCode::OK);
        });
    }

    #[test]
    fn an_unacknowledged_request_is_a_503_with_retry_after_within_the_ack_timeout() {
        use tower::ServiceExt;
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        rt.block_on(async {
            let (clients, metrics) = (Clients::default(), Metrics::new());
            let mut config = rdkafka::ClientConfig::new();
            config.set("bootstrap.servers", "127.0.0.1:1").set("message.timeout.ms", "60000");
            let producer = RebuildingProducer::new(config, clients.register("ingest producer"), None).unwrap();
            let state = Arc::new(AppState {
                producer,
                clients,
                ack_timeout: Duration::from_millis(300),
                topic: "t".into(),
                max_batch: 10,
                metrics,
                token: None,
            });
            let app = router(state, 4096);
            let body = r#"{"id": "a", "subject": "s", "time": "2026-11-22T10:00:00Z"}"#;
            let req = axum::http::Request::post("/v1/events").header("content-type", "application/json").body(axum::body::Body::from(body)).unwrap();
            let started = Instant::now();
            let r = app.clone().oneshot(req).await.unwrap();
            assert!(started.elapsed() < Duration::from_secs(3), "answered after {:?}", started.elapsed());
            assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(r.headers()[axum::http::header::RETRY_AFTER], "1");
            let (_, body) = status_and_body(r);
            assert!(body["error"].as_str().unwrap().contains("within 300 ms"), "{body}");
            // Nothing reachable: readiness says so once the grace has passed, liveness does not.
            let ready = |path: &'static str| axum::http::Request::get(path).body(axum::body::Body::empty()).unwrap();
            let mut last = StatusCode::OK;
            for _ in 0..50 {
                last = app.clone().oneshot(ready("/readyz")).await.unwrap().status();
                if last == StatusCode::SERVICE_UNAVAILABLE {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert_eq!(last, StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(app.oneshot(ready("/healthz")).await.unwrap().status(), StatusCode::OK);
        });
    }

    #[test]
    fn single_event_and_limits() {
        let one = json!({"id": "a", "subject": "s", "time": "2026-11-22T10:00:00Z"});
        assert_eq!(validate(one.clone(), 10).unwrap().len(), 1);
        let (status, _) = status_and_body(validate(json!([]), 10).unwrap_err());
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let (status, _) = status_and_body(validate(json!([one.clone(), one]), 1).unwrap_err());
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    }
}
