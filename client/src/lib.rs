//! A Rust client for gateways in front of Tally.
//!
//! - [`Usage`] is one usage event (the wire format ingest and the aggregator accept).
//! - [`IngestClient`] sends events to ingest's `POST /v1/events`. It validates them first
//!   with the same rules as Tally (an invalid event is an error, nothing is sent), and retries
//!   5xx, 429 and connection failures with exponential backoff, re-sending the **same** events
//!   with the same ids: Tally counts each id once, so a retry never double-counts.
//! - `KafkaSender` (feature `kafka`) produces the events' canonical form (API keys replaced by
//!   their SHA-256, as ingest does) straight to the usage topic, keyed by subject, and returns
//!   once the broker acknowledged every event (idempotent producer, acks=all).
//! - [`Checker`] asks `POST /v1/check` and keeps answers in a small local cache: an answer is
//!   reused for at most `ttl` and never past its quota's `resets_at` or its `retry_at`, and
//!   a cached answer is never replaced by one with an older decision `version`. Checks that
//!   carry an estimate are never answered from the cache.
//!
//! Plain HTTP only (the workspace builds reqwest without TLS); put Tally behind a local
//! proxy or enable a TLS feature of reqwest in your own build for HTTPS.

mod check;
mod ingest;
#[cfg(feature = "kafka")]
mod kafka;

pub use check::{BudgetOwner, CheckAnswer, CheckQuota, CheckRequest, Checker};
pub use ingest::{IngestClient, Retry, Usage};
#[cfg(feature = "kafka")]
pub use kafka::KafkaSender;

/// What went wrong talking to Tally.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An event or request is invalid; nothing was sent.
    #[error("invalid {field}: {message}")]
    Invalid { field: String, message: String },
    /// Tally answered with an error status.
    #[error("tally answered {status}: {error}")]
    Status { status: u16, error: String, field: Option<String> },
    /// The request did not get an answer (connection, timeout).
    #[error("request failed: {0}")]
    Http(#[from] reqwest::Error),
    /// The broker did not acknowledge.
    #[error("kafka: {0}")]
    Kafka(String),
}

impl Error {
    /// Whether trying again (with the same events) may succeed.
    pub fn retryable(&self) -> bool {
        match self {
            Error::Invalid { .. } => false,
            Error::Status { status, .. } => *status >= 500 || *status == 429,
            Error::Http(_) | Error::Kafka(_) => true,
        }
    }
}

/// Turns an error answer into [`Error::Status`].
async fn status_error(r: reqwest::Response) -> Error {
    let status = r.status().as_u16();
    let body: serde_json::Value = r.json().await.unwrap_or_default();
    Error::Status {
        status,
        error: body["error"].as_str().unwrap_or("no error message").to_string(),
        field: body["field"].as_str().map(str::to_string),
    }
}
