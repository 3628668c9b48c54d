//! The ingest service: `POST /v1/events` takes one usage event or a JSON array of them.
//!
//! Contract:
//! - Every event of a request is validated first; if any is invalid the answer is 400 naming
//!   the `index` and the `field`, and nothing of the request is produced (never half-applied).
//! - Valid events are produced to the usage topic in canonical form (raw API keys replaced by
//!   their SHA-256), keyed by subject so a subject's events stay on one partition.
//! - The answer is 202 `{"accepted": n}` only after the broker acknowledged every event.
//!   If the broker does not, the answer is 503 and the gateway retries with the same ids;
//!   the aggregator's dedupe makes the retry safe.
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
use rdkafka::producer::{FutureProducer, FutureRecord};
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
}

struct Metrics {
    registry: Registry,
    accepted: Counter,
    rejected: Counter,
    broker_failures: Counter,
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
    producer: FutureProducer,
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
        .route("/healthz", get(|| async { "ok" }))
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
    match produce_all(&state, &events).await {
        Ok(()) => {
            state.metrics.produce.record(started.elapsed());
            state.metrics.accepted.add(events.len() as u64);
            (StatusCode::ACCEPTED, Json(serde_json::json!({ "accepted": events.len() }))).into_response()
        }
        Err(e) => {
            state.metrics.broker_failures.inc();
            tracing::warn!(error = %e, events = events.len(), "broker did not acknowledge a batch");
            error(StatusCode::SERVICE_UNAVAILABLE, "the broker did not acknowledge the events; retry with the same ids".into(), None, None)
        }
    }
}

/// Produces every event and waits for every acknowledgement.
async fn produce_all(state: &AppState, events: &[UsageEvent]) -> anyhow::Result<()> {
    let payloads: Vec<Vec<u8>> = events.iter().map(UsageEvent::to_canonical_json).collect();
    let deliveries = events.iter().zip(&payloads).map(|(event, payload)| {
        let record = FutureRecord::to(&state.topic).key(event.subject.as_bytes()).payload(payload.as_slice());
        state.producer.send(record, Duration::from_secs(30))
    });
    for result in futures::future::join_all(deliveries).await {
        result.map_err(|(e, _)| anyhow::anyhow!("produce failed: {e}"))?;
    }
    Ok(())
}

/// Runs the ingest service until `shutdown` resolves.
pub async fn run(
    settings: IngestSettings,
    kafka: KafkaSettings,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let producer: FutureProducer = kafka.producer_config().create().context("failed to create the Kafka producer")?;
    let state = Arc::new(AppState {
        producer,
        topic: kafka.usage_topic.clone(),
        max_batch: settings.max_batch,
        metrics: Metrics::new(),
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
            let producer: FutureProducer =
                rdkafka::ClientConfig::new().set("bootstrap.servers", "127.0.0.1:1").create().unwrap();
            let state = Arc::new(AppState {
                producer,
                topic: "t".into(),
                max_batch: 10,
                metrics: Metrics::new(),
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
    fn single_event_and_limits() {
        let one = json!({"id": "a", "subject": "s", "time": "2026-11-22T10:00:00Z"});
        assert_eq!(validate(one.clone(), 10).unwrap().len(), 1);
        let (status, _) = status_and_body(validate(json!([]), 10).unwrap_err());
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let (status, _) = status_and_body(validate(json!([one.clone(), one]), 1).unwrap_err());
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    }
}
