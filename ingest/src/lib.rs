//! The ingest service: `POST /v1/events` takes one usage event or a JSON array of them.
//!
//! Contract:
//! - Every event of a request is validated first; if any is invalid the answer is 400 naming
//!   the `index` and the `field`, and nothing of the request is produced (never half-applied).
//! - Valid events are produced to the usage topic in canonical form (raw API keys replaced by
//!   their SHA-256), keyed by subject so a subject's events stay on one partition.
//! - The answer is 202 `{"accepted": n}` only after the broker acknowledged every event.
//!   If the broker does not within `TALLY_INGEST_ACK_TIMEOUT_MS` (5 s), or the producer
//!   fails transiently (its queue full, a timeout, the broker unreachable or electing a
//!   leader, the producer being replaced), the answer is 503 with `Retry-After` and the
//!   gateway retries with the same ids. The events of a request that timed out may still be
//!   delivered later (librdkafka goes on trying for `message.timeout.ms`); the aggregator's
//!   dedupe makes the retry safe either way. An event larger than the broker accepts is a
//!   413 naming its `index`; any other producer failure is a 500, which a retry would meet
//!   again ([`ProduceFailure`]). The first failure in the request's order decides.
//! - The producer replaces itself after a fatal error (e.g. fenced once the broker is back
//!   after an outage; [`tally_common::producing`]); the request that met it is sent again on
//!   the new producer within its timeout.
//! - `/healthz` (liveness) answers 200 with the producer's state unless the producer stayed
//!   broken for 30 s; `/readyz` answers 503 while the producer cannot reach the broker or is
//!   broken ([`tally_common::health`]).
//! - With an ingest token configured (`TALLY_INGEST_TOKEN`), `POST /v1/events` needs
//!   `Authorization: Bearer <token>` (compared in constant time, never logged) and answers
//!   401 without producing anything; without one it is open, and says so loudly at start.
//!
//! The body: one event or a JSON array of them, plain or CloudEvents in structured mode
//! (`Content-Type: application/json`, `application/cloudevents+json` or
//! `application/cloudevents-batch+json`; none is read as JSON). One CloudEvent in binary
//! content mode is accepted too: its attributes in `ce-` headers (`ce-specversion`, `ce-id`,
//! `ce-source`, `ce-type`, `ce-subject`, `ce-time`, any other `ce-<name>` an extension,
//! values percent-decoded as the HTTP binding writes them), its data as the JSON body. It is
//! the same event as its structured form; an error names the header (`ce-time`) or the data
//! field (`data.input_tokens`). Bodies may be sent with `Content-Encoding: gzip`, `deflate`
//! or `br`; the body limit counts the decoded bytes. Every refusal is JSON `{"error",
//! "field"}` (with `index` for an event of an array), unknown routes and wrong methods
//! included ([`tally_common::http`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use serde::Serialize;
use serde_json::Value;
use tally_common::health::Clients;
use tally_common::http::{self, Refusal};
use tally_common::kafka::KafkaSettings;
use tally_common::metrics::{Counter, Registry, Timing};
use tally_common::producing::{Outgoing, RebuildingProducer};
use tally_domain::event::{cloudevent_from_binary, event_from_value, UsageEvent};

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
    let router = Router::new()
        .merge(events)
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state);
    with_edges(router, max_body_bytes)
}

/// What every route shares: JSON answers for unknown routes and wrong methods, the body
/// limit, and compressed bodies decoded before the limit counts them.
fn with_edges(router: Router, max_body_bytes: usize) -> Router {
    tally_common::http::decoding(tally_common::http::json_fallbacks(router).layer(DefaultBodyLimit::max(max_body_bytes)))
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
        return Err(error(
            StatusCode::BAD_REQUEST,
            "the batch is empty: send one event or an array of at least one".into(),
            Some("body".into()),
            None,
        ));
    }
    if items.len() > max_batch {
        return Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("{} events in one request; the limit is {max_batch} (TALLY_INGEST_MAX_BATCH)", items.len()),
            Some("body".into()),
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

/// A refusal of `tally_common::http` in ingest's error body.
fn refused(r: Refusal) -> Response {
    error(r.status, r.error, r.field, None)
}

/// The events of a request (module docs): a JSON body, or one CloudEvent in binary mode.
async fn read_events(req: Request, max_batch: usize) -> Result<Vec<UsageEvent>, Response> {
    let binary = binary_mode(req.headers());
    let content_type = http::media_type(req.headers());
    let attributes = match binary {
        true => Some(binary_attributes(req.headers())?),
        false => None,
    };
    if binary && content_type.as_deref().is_some_and(|m| !http::is_json(m)) {
        let m = content_type.unwrap_or_default();
        let message =
            format!("binary content mode: the body is the event's data and must be JSON (Content-Type: application/json), not {m}");
        return Err(error(StatusCode::UNSUPPORTED_MEDIA_TYPE, message, Some("content-type".into()), None));
    }
    if !binary {
        http::json_content_type(req.headers()).map_err(refused)?;
    }
    let bytes = http::read_body(req).await.map_err(refused)?;
    let Some(attributes) = attributes else {
        return validate(http::parse_json(&bytes).map_err(refused)?, max_batch);
    };
    if !bytes.trim_ascii().is_empty() {
        if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&bytes) {
            let message = format!("binary content mode: the body is the event's data, a JSON object; it is not JSON: {e}");
            return Err(error(StatusCode::BAD_REQUEST, message, Some("body".into()), None));
        }
    }
    let envelope = cloudevent_from_binary(attributes, content_type.as_deref(), &bytes);
    let event = event_from_value(envelope).map_err(|e| {
        // An attribute came from its `ce-` header, the data from the body.
        let field = match e.field.as_str() {
            "data" => "body".to_string(),
            f if f.contains('.') => e.field.clone(),
            f => format!("ce-{f}"),
        };
        let message = format!("binary content mode: `{field}`: {}", e.message);
        error(StatusCode::BAD_REQUEST, message, Some(field), None)
    })?;
    Ok(vec![event])
}

/// Whether a request carries one CloudEvent in binary content mode: it has `ce-specversion`
/// and its body is not a structured CloudEvent (`application/cloudevents...`).
fn binary_mode(headers: &HeaderMap) -> bool {
    headers.contains_key("ce-specversion") && !http::media_type(headers).is_some_and(|m| m.starts_with("application/cloudevents"))
}

/// The CloudEvents attributes of a binary mode request: each `ce-` header, named without the
/// prefix, its value percent-decoded (the HTTP binding encodes what is not printable ASCII).
fn binary_attributes(headers: &HeaderMap) -> Result<Vec<(String, String)>, Response> {
    let bad = |name: &str, message: String| {
        error(StatusCode::BAD_REQUEST, format!("binary content mode: {message}"), Some(name.to_string()), None)
    };
    let mut attributes = Vec::new();
    for name in headers.keys() {
        let Some(attribute) = name.as_str().strip_prefix("ce-") else { continue };
        let mut values = headers.get_all(name).iter();
        let (Some(value), None) = (values.next(), values.next()) else {
            return Err(bad(name.as_str(), format!("`{name}` is given more than once")));
        };
        let text = percent_encoding::percent_decode(value.as_bytes())
            .decode_utf8()
            .map_err(|_| bad(name.as_str(), format!("`{name}` is not UTF-8 once percent-decoded")))?;
        attributes.push((attribute.to_string(), text.into_owned()));
    }
    Ok(attributes)
}

async fn post_events(State(state): State<Arc<AppState>>, req: Request) -> Response {
    let events = match read_events(req, state.max_batch).await {
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
        Ok(Err(failed)) => {
            state.metrics.broker_failures.inc();
            tracing::warn!(error = %failed.error, index = failed.index, events = events.len(), "broker did not acknowledge a batch");
            failed.into_response()
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
/// Returns the first failure in the request's order.
async fn produce_all(state: &AppState, events: &[UsageEvent]) -> Result<(), FailedEvent> {
    let payloads: Vec<Vec<u8>> = events.iter().map(UsageEvent::to_canonical_json).collect();
    let deliveries = events
        .iter()
        .zip(&payloads)
        .map(|(event, payload)| state.producer.send(Outgoing::new(&state.topic, event.subject.as_bytes(), payload), state.ack_timeout));
    for (index, result) in futures::future::join_all(deliveries).await.into_iter().enumerate() {
        result.map_err(|error| FailedEvent { index, error })?;
    }
    Ok(())
}

/// An event of the request the producer failed to deliver, and how.
#[derive(Debug)]
struct FailedEvent {
    index: usize,
    error: KafkaError,
}

/// What a producer failure means for the sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProduceFailure {
    /// The same request may well succeed shortly: 503 with `Retry-After`.
    Transient,
    /// The event is larger than the broker accepts, however often it is sent: 413.
    TooLarge,
    /// Anything else, which a retry would meet again: 500.
    Other,
}

impl ProduceFailure {
    /// The failure's class by librdkafka's error code: the local queue full, a message or
    /// request timed out, the broker unreachable, out of in-sync replicas or electing a
    /// leader, a throttled or purged send, and a fatal producer error (the producer replaces
    /// itself, [`tally_common::producing`]) are transient; a message or batch past the
    /// broker's size limit is too large; the rest (an unknown topic, authorization,
    /// configuration) is another failure.
    fn of(error: &KafkaError) -> ProduceFailure {
        use RDKafkaErrorCode as C;
        if matches!(error, KafkaError::Canceled) {
            return ProduceFailure::Transient;
        }
        match error.rdkafka_error_code() {
            Some(C::MessageSizeTooLarge | C::MessageBatchTooLarge) => ProduceFailure::TooLarge,
            Some(
                C::QueueFull
                | C::MessageTimedOut
                | C::TimedOutQueue
                | C::OperationTimedOut
                | C::RequestTimedOut
                | C::BrokerTransportFailure
                | C::AllBrokersDown
                | C::Resolve
                | C::BrokerDestroy
                | C::NetworkException
                | C::BrokerNotAvailable
                | C::LeaderNotAvailable
                | C::NotLeaderForPartition
                | C::PreferredLeaderNotAvailable
                | C::ReplicaNotAvailable
                | C::NotEnoughReplicas
                | C::NotEnoughReplicasAfterAppend
                | C::ISRInsufficient
                | C::KafkaStorageError
                | C::ThrottlingQuotaExceeded
                | C::Retry
                | C::PurgeQueue
                | C::PurgeInflight
                | C::Fatal
                | C::ProducerFenced
                | C::InvalidProducerEpoch,
            ) => ProduceFailure::Transient,
            _ => ProduceFailure::Other,
        }
    }
}

impl IntoResponse for FailedEvent {
    fn into_response(self) -> Response {
        let FailedEvent { index, error: cause } = self;
        match ProduceFailure::of(&cause) {
            ProduceFailure::Transient => unavailable("the broker did not acknowledge the events; retry with the same ids".into()),
            ProduceFailure::TooLarge => {
                let message = format!("the event is larger than the broker accepts: {cause}");
                error(StatusCode::PAYLOAD_TOO_LARGE, message, None, Some(index))
            }
            ProduceFailure::Other => {
                let message = format!("the broker refused the event: {cause}; the same request would be refused again");
                error(StatusCode::INTERNAL_SERVER_ERROR, message, None, Some(index))
            }
        }
    }
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
    let listener =
        tokio::net::TcpListener::bind(settings.listen).await.with_context(|| format!("failed to listen on {}", settings.listen))?;
    tracing::info!(listen = %settings.listen, topic = %kafka.usage_topic, "ingest listening");
    axum::serve(listener, router(state, settings.max_body_bytes)).with_graceful_shutdown(shutdown).await.context("ingest server failed")
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

    /// A producer failure as librdkafka reports a message it could not deliver.
    fn failed(index: usize, code: RDKafkaErrorCode) -> FailedEvent {
        FailedEvent { index, error: KafkaError::MessageProduction(code) }
    }

    #[test]
    fn producer_failures_are_classed_by_librdkafka_s_code() {
        use RDKafkaErrorCode as C;
        let transient = [
            C::QueueFull,
            C::MessageTimedOut,
            C::RequestTimedOut,
            C::OperationTimedOut,
            C::TimedOutQueue,
            C::BrokerTransportFailure,
            C::AllBrokersDown,
            C::NetworkException,
            C::NotLeaderForPartition,
            C::LeaderNotAvailable,
            C::NotEnoughReplicas,
            C::PurgeQueue,
            C::PurgeInflight,
            C::Fatal,
            C::ProducerFenced,
        ];
        for code in transient {
            assert_eq!(ProduceFailure::of(&KafkaError::MessageProduction(code)), ProduceFailure::Transient, "{code:?}");
        }
        assert_eq!(ProduceFailure::of(&KafkaError::Canceled), ProduceFailure::Transient, "a send cut short by a replaced producer");
        for code in [C::MessageSizeTooLarge, C::MessageBatchTooLarge] {
            assert_eq!(ProduceFailure::of(&KafkaError::MessageProduction(code)), ProduceFailure::TooLarge, "{code:?}");
        }
        for code in [C::UnknownTopicOrPartition, C::UnknownTopic, C::TopicAuthorizationFailed, C::InvalidArgument, C::Fail] {
            assert_eq!(ProduceFailure::of(&KafkaError::MessageProduction(code)), ProduceFailure::Other, "{code:?}");
        }
    }

    #[test]
    fn a_transient_producer_failure_is_a_503_that_says_when_to_retry() {
        let r = failed(3, RDKafkaErrorCode::QueueFull).into_response();
        let retry_after = r.headers().get(axum::http::header::RETRY_AFTER).cloned();
        let (status, body) = status_and_body(r);
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(retry_after, Some(axum::http::HeaderValue::from(RETRY_AFTER_SECONDS)));
        assert!(body["error"].as_str().unwrap().contains("retry with the same ids"), "{body}");
    }

    #[test]
    fn an_event_too_large_for_the_broker_is_a_413_naming_its_index() {
        let r = failed(2, RDKafkaErrorCode::MessageSizeTooLarge).into_response();
        assert!(r.headers().get(axum::http::header::RETRY_AFTER).is_none(), "retrying cannot help");
        let (status, body) = status_and_body(r);
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(body["index"], 2);
        assert!(body["error"].as_str().unwrap().contains("larger than the broker accepts"), "{body}");
    }

    #[test]
    fn any_other_producer_failure_is_a_500_without_retry_after() {
        let r = failed(0, RDKafkaErrorCode::TopicAuthorizationFailed).into_response();
        assert!(r.headers().get(axum::http::header::RETRY_AFTER).is_none());
        let (status, body) = status_and_body(r);
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(body["index"], 0);
        assert!(body["error"].as_str().unwrap().contains("refused"), "{body}");
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
            let req = axum::http::Request::post("/v1/events")
                .header("content-type", "application/json")
                .body(axum::body::Body::from(body))
                .unwrap();
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

    /// `POST /v1/events` as the router reads it (body limit 4096 bytes), answering the ids of
    /// the events it would produce.
    fn reader() -> Router {
        let read = |req: Request| async move {
            match read_events(req, 10).await {
                Ok(events) => Json(events.into_iter().map(|e| e.id).collect::<Vec<_>>()).into_response(),
                Err(response) => response,
            }
        };
        with_edges(Router::new().route("/v1/events", post(read)).route("/healthz", get(|| async { "ok" })), 4096)
    }

    async fn send(req: axum::http::request::Builder, body: impl Into<axum::body::Body>) -> (StatusCode, axum::http::HeaderMap, Value) {
        use tower::ServiceExt;
        let r = reader().oneshot(req.body(body.into()).unwrap()).await.unwrap();
        let (status, headers) = (r.status(), r.headers().clone());
        let bytes = axum::body::to_bytes(r.into_body(), usize::MAX).await.unwrap();
        (status, headers, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    fn binary(headers: &[(&str, &str)]) -> axum::http::request::Builder {
        let mut req = axum::http::Request::post("/v1/events");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req
    }

    const CE: &[(&str, &str)] = &[
        ("ce-specversion", "1.0"),
        ("ce-id", "1"),
        ("ce-source", "gw"),
        ("ce-type", "usage"),
        ("ce-subject", "alice"),
        ("ce-time", "2026-11-22T10:00:00Z"),
        ("content-type", "application/json"),
    ];

    #[tokio::test]
    async fn a_binary_mode_cloudevent_is_its_structured_form() {
        let data = json!({"input_tokens": 7, "attributes": {"route": "chat"}});
        let mut headers = CE.to_vec();
        headers.extend([("ce-traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"), ("ce-note", "caf%C3%A9 %25")]);
        let req = binary(&headers).body(axum::body::Body::from(data.to_string())).unwrap();
        let events = read_events(req, 10).await.unwrap();
        let structured = json!({"specversion": "1.0", "id": "1", "source": "gw", "type": "usage", "subject": "alice",
                                "time": "2026-11-22T10:00:00Z", "datacontenttype": "application/json", "data": data,
                                "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "note": "café %"});
        assert_eq!(events, vec![event_from_value(structured).unwrap()]);
        assert_eq!(events[0].attributes["ce.note"], "café %");
        // A structured CloudEvent keeps its media type, whatever ce- headers come with it.
        let structured =
            json!({"specversion": "1.0", "id": "2", "source": "gw", "type": "usage", "subject": "alice", "time": "2026-11-22T10:00:00Z"});
        let (s, _, ids) =
            send(binary(&[("content-type", "application/cloudevents+json"), ("ce-specversion", "1.0")]), structured.to_string()).await;
        assert_eq!((s, ids), (StatusCode::OK, json!(["ce:2:gw:2"])));
        let batch = json!([structured]);
        let (s, _, ids) = send(binary(&[("content-type", "application/cloudevents-batch+json")]), batch.to_string()).await;
        assert_eq!((s, ids), (StatusCode::OK, json!(["ce:2:gw:2"])));
        // No body is an event without data.
        let (s, _, ids) = send(binary(CE), "").await;
        assert_eq!((s, ids), (StatusCode::OK, json!(["ce:2:gw:1"])));
    }

    #[tokio::test]
    async fn binary_mode_errors_name_the_header_or_the_body() {
        let without = |name: &str| CE.iter().copied().filter(|(k, _)| *k != name).collect::<Vec<_>>();
        let with = |extra: (&'static str, &'static str)| {
            let mut h = CE.to_vec();
            h.push(extra);
            h
        };
        /// A binary-mode request that is refused with 400, the field it names and a phrase
        /// of its message.
        struct Refused<'a> {
            headers: Vec<(&'a str, &'a str)>,
            body: &'a str,
            field: &'a str,
            says: &'a str,
        }
        let case = |headers, body, field, says| Refused { headers, body, field, says };
        let cases = [
            case(without("ce-time"), "{}", "ce-time", "Tally meters by event time"),
            case(without("ce-source"), "{}", "ce-source", "is required"),
            case(with(("ce-Bad_Name", "x")), "{}", "ce-bad_name", "extension"),
            case(with(("ce-x", "%FF")), "{}", "ce-x", "UTF-8"),
            case(CE.to_vec(), r#"{"input_tokens": -1}"#, "data.input_tokens", "non-negative"),
            case(CE.to_vec(), "[1]", "body", "JSON object"),
            case(CE.to_vec(), "input_tokens=7", "body", "not JSON"),
        ];
        for Refused { headers, body, field, says } in cases {
            let (s, _, err) = send(binary(&headers), body).await;
            assert_eq!((s, err["field"].as_str()), (StatusCode::BAD_REQUEST, Some(field)), "{headers:?} {body}: {err}");
            let message = err["error"].as_str().unwrap();
            assert!(message.contains("binary content mode") && message.contains(says), "{err}");
        }
        let text = CE.iter().copied().map(|(k, v)| if k == "content-type" { (k, "text/plain") } else { (k, v) }).collect::<Vec<_>>();
        let (s, _, err) = send(binary(&text), "{}").await;
        assert_eq!((s, err["field"].as_str()), (StatusCode::UNSUPPORTED_MEDIA_TYPE, Some("content-type")), "{err}");
        assert!(err["error"].as_str().unwrap().contains("binary content mode"), "{err}");
        let twice = binary(CE).header("ce-id", "2");
        let (s, _, err) = send(twice, "{}").await;
        assert_eq!((s, err["field"].as_str()), (StatusCode::BAD_REQUEST, Some("ce-id")), "{err}");
    }

    #[tokio::test]
    async fn bodies_are_json_decoded_and_limited_and_refusals_are_json() {
        use std::io::Write;
        let event = json!({"id": "a", "subject": "s", "time": "2026-11-22T10:00:00Z"});
        let gzip = |bytes: &[u8]| {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
            e.write_all(bytes).unwrap();
            e.finish().unwrap()
        };
        let post = || axum::http::Request::post("/v1/events");
        let (s, _, ids) = send(post().header("content-encoding", "gzip"), gzip(event.to_string().as_bytes())).await;
        assert_eq!((s, ids), (StatusCode::OK, json!(["a"])));
        let (s, _, ids) = send(post(), event.to_string()).await;
        assert_eq!((s, ids), (StatusCode::OK, json!(["a"])), "no Content-Type is read as JSON");
        // 4 kB of gzip inflating to 4 MB: refused at the limit (4096 bytes), never held whole.
        let bomb = gzip(format!("[{}]", " ".repeat(4_000_000)).as_bytes());
        assert!(bomb.len() < 4096);
        let cases = [
            (post().header("content-encoding", "gzip"), bomb, StatusCode::PAYLOAD_TOO_LARGE, "body"),
            (post().header("content-encoding", "zstd"), b"{}".to_vec(), StatusCode::UNSUPPORTED_MEDIA_TYPE, "content-encoding"),
            (post().header("content-type", "text/plain"), b"{}".to_vec(), StatusCode::UNSUPPORTED_MEDIA_TYPE, "content-type"),
            (post(), b"{\"id\": ".to_vec(), StatusCode::BAD_REQUEST, "id"),
            (post(), b"[{\"id\": 1} x".to_vec(), StatusCode::BAD_REQUEST, "body"),
            (
                post(),
                br#"{"id": "a", "subject": "s", "time": "2026-11-22T10:00:00Z", "colour": 1}"#.to_vec(),
                StatusCode::BAD_REQUEST,
                "colour",
            ),
            (
                post(),
                br#"{"id": "a", "subject": "s", "time": "2026-11-22T10:00:00Z", "input_tokens": "7"}"#.to_vec(),
                StatusCode::BAD_REQUEST,
                "input_tokens",
            ),
            (post(), br#"{"id": "a", "subject": "s"}"#.to_vec(), StatusCode::BAD_REQUEST, "time"),
            (axum::http::Request::get("/v1/nope"), vec![], StatusCode::NOT_FOUND, "path"),
            (axum::http::Request::get("/v1/events"), vec![], StatusCode::METHOD_NOT_ALLOWED, "method"),
        ];
        for (req, body, status, field) in cases {
            let (s, headers, err) = send(req, body).await;
            assert_eq!((s, err["field"].as_str()), (status, Some(field)), "{err}");
            assert!(err["error"].is_string(), "{err}");
            if s == StatusCode::METHOD_NOT_ALLOWED {
                assert_eq!(headers["allow"], "POST");
            }
        }
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
