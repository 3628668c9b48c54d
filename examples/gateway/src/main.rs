//! An example gateway metered by Tally, using `tally-client`.
//!
//! `POST /v1/chat` with `x-user: <subject>` (or `authorization: Bearer <tally api key>` for a
//! key bound to a subject) and `{"model": "...", "prompt": "..."}`:
//! 1. checks the subject with Tally (cached locally for a second): a denial becomes a 429
//!    with `Retry-After` and the `X-RateLimit-*` headers; a degrade swaps in the fallback model;
//! 2. forwards the request to the upstream (a dummy LLM started in-process unless
//!    `GATEWAY_UPSTREAM` names one), which answers with its token counts;
//! 3. reports the usage to Tally in the background, with an id made once per request so
//!    retries never double-count (ingest HTTP, or Kafka when `GATEWAY_KAFKA_BROKERS` is set).
//!
//! Environment: `GATEWAY_LISTEN` (127.0.0.1:8090), `TALLY_API_URL` (http://127.0.0.1:8081),
//! `TALLY_INGEST_URL` (http://127.0.0.1:8080), `TALLY_READ_TOKEN`, `TALLY_INGEST_TOKEN`,
//! `GATEWAY_KAFKA_BROKERS` + `TALLY_USAGE_TOPIC` (tally.usage.v1).

use std::sync::Arc;

use anyhow::Context;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};
use tally_client::{CheckRequest, Checker, IngestClient, KafkaSender, Usage};

enum Sink {
    Http(IngestClient),
    Kafka(KafkaSender),
}

struct Gateway {
    checker: Checker,
    sink: Sink,
    upstream: String,
    http: reqwest::Client,
}

fn env(name: &str, default: &str) -> String {
    std::env::var(name).ok().filter(|v| !v.is_empty()).unwrap_or_else(|| default.to_string())
}

/// The dummy upstream: pretends to run a model and reports token counts.
async fn dummy_upstream() -> anyhow::Result<String> {
    let app = Router::new().route(
        "/v1/chat",
        post(|Json(body): Json<Value>| async move {
            let prompt = body["prompt"].as_str().unwrap_or_default();
            let input_tokens = prompt.split_whitespace().count().max(1) as i64;
            Json(json!({"model": body["model"], "output": format!("echo: {prompt}"), "input_tokens": input_tokens, "output_tokens": input_tokens + 2}))
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.context("failed to bind the dummy upstream")?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "dummy upstream failed");
        }
    });
    Ok(url)
}

fn deny(answer: &tally_client::CheckAnswer) -> Response {
    let mut headers = HeaderMap::new();
    if let Some(s) = answer.retry_after_seconds.and_then(|s| HeaderValue::from_str(&s.to_string()).ok()) {
        headers.insert("retry-after", s);
    }
    if let Some(q) = &answer.quota {
        for (name, v) in [("x-ratelimit-limit", q.limit), ("x-ratelimit-remaining", q.remaining)] {
            if let Ok(v) = HeaderValue::from_str(&v.to_string()) {
                headers.insert(name, v);
            }
        }
    }
    (StatusCode::TOO_MANY_REQUESTS, headers, Json(json!({"error": "quota exceeded", "reason": answer.reason, "retry_at": answer.retry_at})))
        .into_response()
}

async fn chat(State(g): State<Arc<Gateway>>, headers: HeaderMap, Json(mut body): Json<Value>) -> Response {
    let subject = headers.get("x-user").and_then(|v| v.to_str().ok()).map(str::to_string);
    let api_key = headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).map(str::to_string);
    if subject.is_none() && api_key.is_none() {
        return (StatusCode::UNAUTHORIZED, Json(json!({"error": "send x-user or a bearer API key"}))).into_response();
    }
    let req = CheckRequest {
        subject,
        api_key: api_key.clone(),
        scope: Some("chat".into()),
        model: body["model"].as_str().map(str::to_string),
        ..CheckRequest::default()
    };
    let answer = match g.checker.check(&req).await {
        Ok(a) => a,
        Err(e) => {
            // Tally unreachable: this example fails open, and says so in its log.
            tracing::warn!(error = %e, "tally check failed; allowing");
            return forward(&g, body, req.subject.unwrap_or_default(), api_key).await;
        }
    };
    if !answer.allowed {
        return deny(&answer);
    }
    if let Some(model) = &answer.model {
        body["model"] = Value::String(model.clone());
    }
    forward(&g, body, answer.subject, api_key).await
}

async fn forward(g: &Arc<Gateway>, body: Value, subject: String, api_key: Option<String>) -> Response {
    let id = uuid::Uuid::new_v4().to_string();
    let upstream = match g.http.post(format!("{}/v1/chat", g.upstream)).json(&body).send().await {
        Ok(r) => r.json::<Value>().await.unwrap_or_default(),
        Err(e) => return (StatusCode::BAD_GATEWAY, Json(json!({"error": format!("upstream failed: {e}")}))).into_response(),
    };
    let mut usage = Usage::new(id, subject, chrono::Utc::now());
    usage.api_key = api_key;
    usage.scope = Some("chat".into());
    usage.model = body["model"].as_str().map(str::to_string);
    usage.input_tokens = upstream["input_tokens"].as_i64();
    usage.output_tokens = upstream["output_tokens"].as_i64();
    let g = g.clone();
    tokio::spawn(async move {
        let sent = match &g.sink {
            Sink::Http(c) => c.send(std::slice::from_ref(&usage)).await,
            Sink::Kafka(k) => k.send(std::slice::from_ref(&usage)).await,
        };
        if let Err(e) = sent {
            tracing::error!(error = %e, id = %usage.id, "usage not reported");
        }
    });
    Json(upstream).into_response()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    let mut checker = Checker::new(&env("TALLY_API_URL", "http://127.0.0.1:8081"));
    if let Ok(t) = std::env::var("TALLY_READ_TOKEN") {
        checker = checker.with_token(t);
    }
    let sink = match std::env::var("GATEWAY_KAFKA_BROKERS") {
        Ok(brokers) if !brokers.is_empty() => Sink::Kafka(KafkaSender::new(&brokers, &env("TALLY_USAGE_TOPIC", "tally.usage.v1"))?),
        _ => {
            let mut c = IngestClient::new(&env("TALLY_INGEST_URL", "http://127.0.0.1:8080"));
            if let Ok(t) = std::env::var("TALLY_INGEST_TOKEN") {
                c = c.with_token(t);
            }
            Sink::Http(c)
        }
    };
    let upstream = match std::env::var("GATEWAY_UPSTREAM") {
        Ok(u) if !u.is_empty() => u,
        _ => dummy_upstream().await?,
    };
    let gateway = Arc::new(Gateway { checker, sink, upstream, http: reqwest::Client::new() });
    let listen = env("GATEWAY_LISTEN", "127.0.0.1:8090");
    let listener = tokio::net::TcpListener::bind(&listen).await.with_context(|| format!("failed to listen on {listen}"))?;
    tracing::info!(%listen, "example gateway listening");
    axum::serve(listener, Router::new().route("/v1/chat", post(chat)).with_state(gateway))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .context("gateway failed")
}
