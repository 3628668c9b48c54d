use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::{status_error, Error};

/// A check: a subject or an API key bound to one, and what the request is.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct CheckRequest {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Groups the request is made for, beside the subject's configured ones: their budgets
    /// apply too.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub estimated_tokens: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub estimated_cost_micros: Option<i64>,
}

impl CheckRequest {
    pub fn subject(subject: impl Into<String>) -> CheckRequest {
        CheckRequest { subject: Some(subject.into()), ..CheckRequest::default() }
    }
}

/// The owner of a budget: `kind` (`api_key`, `group`, `tier`) and `name`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct BudgetOwner {
    pub kind: String,
    pub name: String,
}

/// The quota an answer is about.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct CheckQuota {
    pub quota: String,
    pub limit: i64,
    pub remaining: i64,
    pub used: i64,
    pub resets_at: DateTime<Utc>,
    /// The budget the quota belongs to; `None` for the subject's own.
    #[serde(default)]
    pub budget: Option<BudgetOwner>,
}

/// The answer of `POST /v1/check` (see the API's documentation for every field).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct CheckAnswer {
    pub allowed: bool,
    pub subject: String,
    pub tier: String,
    /// `{"type": "block" | "degrade" | "queue" | "soft", ...}` when a quota is breached.
    pub action: Option<serde_json::Value>,
    /// The model to use (the fallback when degraded).
    pub model: Option<String>,
    pub reason: String,
    pub quota: Option<CheckQuota>,
    pub retry_at: Option<DateTime<Utc>>,
    pub retry_after_seconds: Option<i64>,
    pub version: i64,
    pub decision_age_ms: Option<i64>,
    pub source: String,
    pub stale: bool,
}

struct Cached {
    answer: CheckAnswer,
    until: DateTime<Utc>,
}

/// The local cache's rules, apart from I/O so they can be tested.
#[derive(Default)]
struct Cache {
    entries: HashMap<(String, String), Cached>,
}

impl Cache {
    fn get(&self, key: &(String, String), now: DateTime<Utc>) -> Option<CheckAnswer> {
        self.entries.get(key).filter(|c| now < c.until).map(|c| c.answer.clone())
    }

    /// Keeps `answer` unless a still valid entry has a newer decision version; returns the
    /// answer to use.
    fn put(&mut self, key: (String, String), answer: CheckAnswer, now: DateTime<Utc>, ttl: chrono::Duration, max: usize) -> CheckAnswer {
        if let Some(c) = self.entries.get(&key) {
            if now < c.until && c.answer.version > answer.version {
                return c.answer.clone();
            }
        }
        let mut until = now + ttl;
        if let Some(q) = &answer.quota {
            until = until.min(q.resets_at);
        }
        if let Some(r) = answer.retry_at {
            until = until.min(r);
        }
        if answer.stale {
            until = now;
        }
        if self.entries.len() >= max {
            self.entries.retain(|_, c| now < c.until);
            if self.entries.len() >= max {
                self.entries.clear();
            }
        }
        self.entries.insert(key, Cached { answer: answer.clone(), until });
        answer
    }
}

/// Checks subjects against Tally's API with a small local cache.
pub struct Checker {
    http: reqwest::Client,
    url: String,
    token: Option<String>,
    ttl: chrono::Duration,
    max_entries: usize,
    cache: Mutex<Cache>,
}

impl Checker {
    /// `base_url` like `http://127.0.0.1:8081`. Answers are cached for 1 s by default.
    pub fn new(base_url: &str) -> Checker {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap_or_default();
        Checker {
            http,
            url: format!("{}/v1/check", base_url.trim_end_matches('/')),
            token: None,
            ttl: chrono::Duration::seconds(1),
            max_entries: 100_000,
            cache: Mutex::new(Cache::default()),
        }
    }

    /// The read (or admin) bearer token.
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// How long an answer may be reused; zero disables the cache.
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::zero());
        self
    }

    fn key(req: &CheckRequest) -> Option<(String, String)> {
        if req.estimated_tokens.is_some() || req.estimated_cost_micros.is_some() {
            return None;
        }
        let who = match (&req.subject, &req.api_key) {
            (Some(s), None) => format!("s:{s}"),
            (None, Some(k)) => format!("k:{k}"),
            (Some(s), Some(k)) => format!("sk:{s}:{k}"),
            (None, None) => return None,
        };
        let (scope, model) = (req.scope.as_deref().unwrap_or(""), req.model.as_deref().unwrap_or(""));
        Some((who, format!("{scope}|{model}|{}", req.groups.join(","))))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        match self.cache.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// The answer for `req`, from the cache when a valid entry exists.
    pub async fn check(&self, req: &CheckRequest) -> Result<CheckAnswer, Error> {
        let key = Checker::key(req);
        if let Some(k) = &key {
            if let Some(a) = self.lock().get(k, Utc::now()) {
                return Ok(a);
            }
        }
        let mut r = self.http.post(&self.url).json(req);
        if let Some(t) = &self.token {
            r = r.bearer_auth(t);
        }
        let resp = r.send().await?;
        if !resp.status().is_success() {
            return Err(status_error(resp).await);
        }
        let answer: CheckAnswer = resp.json().await?;
        Ok(match key {
            Some(k) if self.ttl > chrono::Duration::zero() => self.lock().put(k, answer, Utc::now(), self.ttl, self.max_entries),
            _ => answer,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(version: i64, resets_at: DateTime<Utc>) -> CheckAnswer {
        CheckAnswer {
            allowed: true,
            subject: "a".into(),
            tier: "free".into(),
            action: None,
            model: None,
            reason: "ok".into(),
            quota: Some(CheckQuota { quota: "q".into(), limit: 10, remaining: 5, used: 5, resets_at, budget: None }),
            retry_at: None,
            retry_after_seconds: None,
            version,
            decision_age_ms: Some(1),
            source: "view".into(),
            stale: false,
        }
    }

    #[test]
    fn entries_expire_at_the_ttl_or_the_reset_whichever_is_first() {
        let now = Utc::now();
        let ttl = chrono::Duration::seconds(10);
        let k = ("s:a".to_string(), "|".to_string());
        let mut c = Cache::default();
        c.put(k.clone(), answer(1, now + chrono::Duration::seconds(2)), now, ttl, 10);
        assert!(c.get(&k, now + chrono::Duration::seconds(1)).is_some());
        assert!(c.get(&k, now + chrono::Duration::seconds(2)).is_none(), "never past resets_at");
        c.put(k.clone(), answer(2, now + chrono::Duration::days(1)), now, ttl, 10);
        assert!(c.get(&k, now + chrono::Duration::seconds(9)).is_some());
        assert!(c.get(&k, now + chrono::Duration::seconds(10)).is_none(), "never past the ttl");
    }

    #[test]
    fn an_older_version_never_replaces_a_valid_newer_one() {
        let now = Utc::now();
        let ttl = chrono::Duration::seconds(10);
        let k = ("s:a".to_string(), "|".to_string());
        let mut c = Cache::default();
        let later = now + chrono::Duration::days(1);
        c.put(k.clone(), answer(5, later), now, ttl, 10);
        let kept = c.put(k.clone(), answer(4, later), now, ttl, 10);
        assert_eq!(kept.version, 5);
        assert_eq!(c.get(&k, now).unwrap().version, 5);
        assert_eq!(c.put(k.clone(), answer(6, later), now, ttl, 10).version, 6);
    }

    #[test]
    fn answers_for_other_models_or_groups_are_kept_apart() {
        let mut r = CheckRequest::subject("a");
        r.model = Some("gpt-4o".into());
        let for_model = Checker::key(&r);
        r.model = Some("gpt-4o-mini".into());
        assert_ne!(Checker::key(&r), for_model);
        let alone = Checker::key(&r);
        r.groups = vec!["eng".into()];
        assert_ne!(Checker::key(&r), alone, "a group's budget may decide");
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["groups"], serde_json::json!(["eng"]));
        assert!(serde_json::to_value(CheckRequest::subject("a")).unwrap().get("groups").is_none());
    }

    #[test]
    fn estimates_and_stale_answers_are_not_cached() {
        let mut r = CheckRequest::subject("a");
        assert!(Checker::key(&r).is_some());
        r.estimated_tokens = Some(10);
        assert!(Checker::key(&r).is_none());
        let now = Utc::now();
        let k = ("s:a".to_string(), "|".to_string());
        let mut c = Cache::default();
        let mut a = answer(1, now + chrono::Duration::days(1));
        a.stale = true;
        c.put(k.clone(), a, now, chrono::Duration::seconds(10), 10);
        assert!(c.get(&k, now).is_none());
    }
}
