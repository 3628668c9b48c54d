use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::{status_error, Error};

/// One usage event. `id` is the dedupe key: keep it when retrying.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Usage {
    pub id: String,
    pub subject: String,
    pub time: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// A group (team, organisation) the request was made for: its budget counts the event.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input_tokens: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_tokens: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cached_tokens: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost_micros: Option<i64>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
}

impl Usage {
    pub fn new(id: impl Into<String>, subject: impl Into<String>, time: DateTime<Utc>) -> Usage {
        Usage {
            id: id.into(),
            subject: subject.into(),
            time,
            api_key: None,
            scope: None,
            model: None,
            group: None,
            requests: None,
            input_tokens: None,
            output_tokens: None,
            cached_tokens: None,
            cost_micros: None,
            attributes: BTreeMap::new(),
        }
    }

    /// Validates with Tally's own rules; the canonical event on success.
    pub fn validate(&self) -> Result<tally_domain::event::UsageEvent, Error> {
        let value = serde_json::to_value(self).map_err(|e| Error::Invalid { field: "$".into(), message: e.to_string() })?;
        tally_domain::event::event_from_value(value).map_err(|e| Error::Invalid { field: e.field.to_string(), message: e.to_string() })
    }
}

/// Retry policy: `attempts` in all, the wait doubling from `first_backoff` up to `max_backoff`.
#[derive(Debug, Clone)]
pub struct Retry {
    pub attempts: u32,
    pub first_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Retry { attempts: 6, first_backoff: Duration::from_millis(100), max_backoff: Duration::from_secs(5) }
    }
}

/// Sends usage to ingest's `POST /v1/events`.
#[derive(Clone)]
pub struct IngestClient {
    http: reqwest::Client,
    url: String,
    token: Option<String>,
    retry: Retry,
}

impl IngestClient {
    /// `base_url` like `http://127.0.0.1:8080`.
    pub fn new(base_url: &str) -> IngestClient {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap_or_default();
        IngestClient { http, url: format!("{}/v1/events", base_url.trim_end_matches('/')), token: None, retry: Retry::default() }
    }

    /// The ingest bearer token.
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    pub fn with_retry(mut self, retry: Retry) -> Self {
        self.retry = retry;
        self
    }

    /// Sends `events` in one request and returns how many were accepted, which happens only
    /// after the broker acknowledged all of them. Retries keep the same body (same ids).
    pub async fn send(&self, events: &[Usage]) -> Result<usize, Error> {
        if events.is_empty() {
            return Ok(0);
        }
        for e in events {
            e.validate()?;
        }
        let body = serde_json::to_vec(events).map_err(|e| Error::Invalid { field: "$".into(), message: e.to_string() })?;
        let mut backoff = self.retry.first_backoff;
        let mut attempt = 1;
        loop {
            match self.send_once(&body).await {
                Ok(n) => return Ok(n),
                Err(e) if e.retryable() && attempt < self.retry.attempts.max(1) => {
                    tracing::debug!(error = %e, attempt, "usage send failed; retrying with the same ids");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.retry.max_backoff);
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn send_once(&self, body: &[u8]) -> Result<usize, Error> {
        let mut req = self.http.post(&self.url).header("content-type", "application/json").body(body.to_vec());
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let r = req.send().await?;
        if !r.status().is_success() {
            return Err(status_error(r).await);
        }
        let v: serde_json::Value = r.json().await?;
        Ok(v["accepted"].as_u64().unwrap_or(0) as usize)
    }
}
