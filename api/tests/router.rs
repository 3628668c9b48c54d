//! Router tests: every route and every error, through the real router, on a real Postgres
//! database created (and migrated) per test. The decision view is fed directly; nothing here
//! needs the broker.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use chrono::{DateTime, Duration, Utc};
use serde_json::{json, Value};
use tally_api::auth::{AuthSettings, Role};
use tally_api::configs::{ConfigCache, Loaded};
use tally_api::routes;
use tally_api::state::{AppState, CheckSettings, Parts, StalePolicy};
use tally_api::view::DecisionView;
use tally_common::auth::Token;
use tally_domain::decision::{Action, DecisionSnapshot, QuotaDecision, QuotaState};
use tally_domain::metric::Metric;
use tally_testkit::TestDatabase;
use tower::ServiceExt;

const ADMIN: &str = "admin-token-for-router-tests";
const READ: &str = "read-token-for-router-tests";

const TIERS: &str = "
default_tier: free
timezone: UTC
quotas:
  - name: monthly_tokens
    metric: total_tokens
    period: month
    limit: 1000
tiers:
  - name: free
  - name: pro
    priority: 10
    rate_multiplier: 10
";

struct Env {
    app: Router,
    state: Arc<AppState>,
    db: TestDatabase,
}

async fn env_with(auth: AuthSettings, stale_policy: StalePolicy, tiers: Option<&str>) -> Env {
    let db = TestDatabase::create("tally_api_test").await.expect("create the test database");
    let pool = db.pool.clone();
    if let Some(doc) = tiers {
        sqlx::query("INSERT INTO config_versions (document, sha256, source) VALUES ($1, 'x', 'test')")
            .bind(doc)
            .execute(&pool)
            .await
            .unwrap();
    }
    let configs = Arc::new(ConfigCache::new(Loaded::builtin().unwrap()));
    configs.refresh(&pool).await.expect("load the configuration");
    let view = Arc::new(DecisionView::default());
    view.mark_caught_up(Utc::now());
    let state = AppState::new(Parts {
        view,
        pool,
        configs,
        announcer: None,
        check: CheckSettings { max_staleness: Duration::seconds(10), stale_policy },
        auth,
        max_page: 50,
        broker: None,
    });
    let ch = tally_history::client::Ch::new(&tally_common::clickhouse::ClickHouseSettings {
        clickhouse_url: "http://127.0.0.1:1".into(),
        clickhouse_database: "none".into(),
    });
    let history = Arc::new(tally_api::history::HistoryState { ch, pool: state.pool.clone() });
    let app = tally_api::app(state.clone(), Some(history), 4096);
    Env { app, state, db }
}

async fn env() -> Env {
    env_with(AuthSettings { admin: Some(Token::new(ADMIN)), read: None, no_auth: false }, StalePolicy::Open, Some(TIERS)).await
}

impl Env {
    async fn send(&self, method: &str, path: &str, token: Option<&str>, body: Option<Value>) -> (StatusCode, axum::http::HeaderMap, Value) {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let req = match body {
            Some(b) => req.header("content-type", "application/json").body(Body::from(b.to_string())),
            None => req.body(Body::empty()),
        }
        .unwrap();
        let r = self.app.clone().oneshot(req).await.unwrap();
        let (status, headers) = (r.status(), r.headers().clone());
        let bytes = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
        let v = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
            if bytes.is_empty() {
                Value::Null
            } else {
                Value::String(String::from_utf8_lossy(&bytes).into())
            }
        });
        (status, headers, v)
    }

    async fn admin(&self, method: &str, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let (s, _, v) = self.send(method, path, Some(ADMIN), body).await;
        (s, v)
    }

    async fn check(&self, body: Value) -> (StatusCode, axum::http::HeaderMap, Value) {
        self.send("POST", "/v1/check", None, Some(body)).await
    }

    async fn versions(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM config_versions").fetch_one(&self.state.pool).await.unwrap()
    }

    async fn document(&self) -> String {
        sqlx::query_scalar("SELECT document FROM config_versions ORDER BY version DESC LIMIT 1").fetch_one(&self.state.pool).await.unwrap()
    }

    async fn done(self) {
        self.db.remove().await.ok();
    }
}

fn quota(used: i64, limit: i64, action: Action, resets_at: DateTime<Utc>) -> QuotaDecision {
    QuotaDecision {
        quota: "monthly_tokens".into(),
        metric: Metric::TotalTokens,
        period: "month".into(),
        scope: None,
        models: None,
        state: tally_domain::decision::quota_state(used, limit, 0, &[80]),
        action,
        used,
        limit,
        remaining: (limit - used).max(0),
        resets_at,
        fired: vec![],
    }
}

fn snapshot(subject: &str, version: i64, quotas: Vec<QuotaDecision>) -> DecisionSnapshot {
    DecisionSnapshot {
        subject: subject.into(),
        allowed: DecisionSnapshot::allowed_for(&quotas),
        version,
        calculated_at: Utc::now() - Duration::milliseconds(250),
        tier: "free".into(),
        budget: None,
        quotas,
    }
}

// ---- OpenAPI and access ----

fn concrete(path: &str) -> String {
    path.replace("{subject}", "alice").replace("{name}", "free").replace("{group}", "g").replace("{id}", "x").replace("{kind}", "group")
}

#[tokio::test]
async fn openapi_lists_exactly_the_routes_and_every_path_routes() {
    let e = env().await;
    let (status, _, doc) = e.send("GET", "/openapi.json", None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(doc["openapi"], "3.0.3");
    let mut documented = std::collections::BTreeSet::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            documented.insert((method.to_uppercase(), path.clone()));
        }
    }
    let mut routed: std::collections::BTreeSet<(String, String)> =
        routes::routes().iter().map(|r| (r.method.to_string(), r.path.to_string())).collect();
    routed.extend(tally_api::openapi::HISTORY_ROUTES.iter().map(|(m, p)| (m.to_string(), p.to_string())));
    assert_eq!(documented, routed, "the OpenAPI document and the router disagree");
    // Every documented path reaches a handler (the router's own 404 names `path`).
    for (method, path) in &documented {
        let (status, _, body) = e.send(method, &concrete(path), Some(ADMIN), None).await;
        assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        assert!(!(status == StatusCode::NOT_FOUND && body["field"] == "path"), "{method} {path} is not routed");
    }
    // Every operation lists the statuses it can answer.
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            let responses = op["responses"].as_object().unwrap();
            let mut needed = vec![];
            if op.get("requestBody").is_some() {
                needed.extend(["400", "413", "415"]);
            }
            if op.get("security").is_some() {
                needed.push("401");
            }
            if path.starts_with("/v1/") {
                needed.push("503");
            }
            for code in needed {
                assert!(responses.contains_key(code), "{method} {path} does not list {code}");
            }
            for (code, answer) in responses {
                let schema = &answer["content"]["application/json"]["schema"]["$ref"];
                assert!(code == "304" || schema.is_string(), "{method} {path} {code} has no JSON body");
            }
        }
    }
    e.done().await;
}

#[tokio::test]
async fn tokens_are_enforced_on_every_route_that_needs_one() {
    let auth = AuthSettings { admin: Some(Token::new(ADMIN)), read: Some(Token::new(READ)), no_auth: false };
    let e = env_with(auth, StalePolicy::Open, Some(TIERS)).await;
    let versions = e.versions().await;
    let mut all: Vec<(String, String, Role)> =
        routes::routes().iter().map(|r| (r.method.to_string(), r.path.to_string(), r.role)).collect();
    all.extend(tally_api::openapi::HISTORY_ROUTES.iter().map(|(m, p)| (m.to_string(), p.to_string(), Role::Read)));
    for (method, path, role) in &all {
        let path = concrete(path);
        let body = (method == "POST" || method == "PUT").then(|| json!({"subject": "alice", "tier": "pro", "name": "x"}));
        let (none, headers, err) = e.send(method, &path, None, body.clone()).await;
        let (wrong, _, _) = e.send(method, &path, Some("not-the-token-at-all"), body.clone()).await;
        let (read, _, _) = e.send(method, &path, Some(READ), body.clone()).await;
        match role {
            Role::Public => assert!(none != StatusCode::UNAUTHORIZED, "{method} {path} is public"),
            Role::Read => {
                assert_eq!((none, wrong), (StatusCode::UNAUTHORIZED, StatusCode::UNAUTHORIZED), "{method} {path}");
                assert_eq!(err["field"], "authorization");
                assert_eq!(headers["www-authenticate"], "Bearer");
                assert_ne!(read, StatusCode::UNAUTHORIZED, "{method} {path} takes the read token");
            }
            Role::Admin => {
                assert_eq!(
                    (none, wrong, read),
                    (StatusCode::UNAUTHORIZED, StatusCode::UNAUTHORIZED, StatusCode::UNAUTHORIZED),
                    "{method} {path}"
                );
            }
        }
    }
    assert_eq!(e.versions().await, versions, "refused requests changed nothing");
    // The admin token is accepted on read routes too.
    let (s, _, _) = e.send("GET", "/v1/subjects/alice/usage", Some(ADMIN), None).await;
    assert_eq!(s, StatusCode::OK);
    e.done().await;
}

#[tokio::test]
async fn without_an_admin_token_the_admin_api_is_closed_and_no_auth_opens_it() {
    let e = env_with(AuthSettings::default(), StalePolicy::Open, Some(TIERS)).await;
    let (s, _, _) = e.send("GET", "/v1/admin/tiers", None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _, _) = e.send("GET", "/v1/subjects/alice/usage", None, None).await;
    assert_eq!(s, StatusCode::OK, "read routes are open without a read token");
    e.done().await;
    let e = env_with(AuthSettings { no_auth: true, ..AuthSettings::default() }, StalePolicy::Open, Some(TIERS)).await;
    let (s, _, _) = e.send("GET", "/v1/admin/tiers", None, None).await;
    assert_eq!(s, StatusCode::OK);
    e.done().await;
}

// ---- health, readiness, metrics ----

#[tokio::test]
async fn health_readiness_and_metrics() {
    let e = env_with(AuthSettings::default(), StalePolicy::Open, None).await;
    let (s, _, _) = e.send("GET", "/healthz", None, None).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, r) = e.send("GET", "/readyz", None, None).await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert_eq!(r["postgres"], "ok");
    assert_eq!(r["decision_view"], "caught_up");
    let (s, _, m) = e.send("GET", "/metrics", None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(m.as_str().unwrap().contains("tally_api_config_version 0"), "{m}");
    e.done().await;

    let e = env().await;
    let fresh = Arc::new(DecisionView::default());
    let state = AppState::new(Parts {
        view: fresh,
        pool: e.state.pool.clone(),
        configs: e.state.configs.clone(),
        announcer: None,
        check: e.state.check.clone(),
        auth: AuthSettings::default(),
        max_page: 10,
        broker: None,
    });
    let app = tally_api::app(state, None, 1024);
    let r = app.oneshot(Request::get("/readyz").body(Body::empty()).unwrap()).await.unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE, "not ready before the view caught up");
    e.done().await;
}

// ---- decisions and usage ----

#[tokio::test]
async fn decision_etag_if_none_match_and_database_fallback() {
    let e = env().await;
    let (s, _, err) = e.send("GET", "/v1/subjects/nobody/decision", None, None).await;
    assert_eq!((s, err["field"].as_str()), (StatusCode::NOT_FOUND, Some("subject")));
    e.state.view.offer(snapshot("alice", 7, vec![quota(10, 1000, Action::Block, Utc::now() + Duration::days(3))]));
    let (s, h, d) = e.send("GET", "/v1/subjects/alice/decision", None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(h["etag"], "W/\"7\"");
    assert_eq!((d["version"].as_i64(), d["source"].as_str()), (Some(7), Some("view")));
    let req = |inm: &str| Request::get("/v1/subjects/alice/decision").header("if-none-match", inm).body(Body::empty()).unwrap();
    let r = e.app.clone().oneshot(req("W/\"7\"")).await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(r.headers()["etag"], "W/\"7\"");
    let r = e.app.clone().oneshot(req("W/\"6\"")).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // A subject the view has not seen comes from Postgres.
    let stored = snapshot("bob", 3, vec![]);
    sqlx::query("INSERT INTO decisions (subject, version, snapshot) VALUES ($1, $2, $3)")
        .bind("bob")
        .bind(3_i64)
        .bind(sqlx::types::Json(&stored))
        .execute(&e.state.pool)
        .await
        .unwrap();
    let (s, _, d) = e.send("GET", "/v1/subjects/bob/decision", None, None).await;
    assert_eq!((s, d["source"].as_str()), (StatusCode::OK, Some("database")));
    e.done().await;
}

#[tokio::test]
async fn usage_rows_and_bad_limits() {
    let e = env().await;
    let (s, _, u) = e.send("GET", "/v1/subjects/alice/usage", None, None).await;
    assert_eq!((s, u["ledgers"].as_array().map(Vec::len)), (StatusCode::OK, Some(0)));
    for bad in ["limit=0", "limit=x", "limit=100000", "nope=1"] {
        let (s, _, err) = e.send("GET", &format!("/v1/subjects/alice/usage?{bad}"), None, None).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}: {err}");
        assert!(err["field"].is_string());
    }
    e.done().await;
}

// ---- check ----

#[tokio::test]
async fn check_answers_from_the_view_with_rate_limit_headers() {
    let e = env().await;
    // No decision yet: allowed with the default tier's limits.
    let (s, h, a) = e.check(json!({"subject": "new"})).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!((a["allowed"].as_bool(), a["source"].as_str(), a["tier"].as_str()), (Some(true), Some("policy"), Some("free")));
    assert_eq!(h["x-ratelimit-limit"], "1000");
    assert_eq!(h["x-ratelimit-remaining"], "1000");
    assert!(h.get("retry-after").is_none());

    let resets = Utc::now() + Duration::seconds(3600);
    e.state.view.offer(snapshot("alice", 4, vec![quota(1000, 1000, Action::Block, resets)]));
    let (s, h, a) = e.check(json!({"subject": "alice", "model": "big"})).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!((a["allowed"].as_bool(), a["reason"].as_str(), a["source"].as_str()), (Some(false), Some("quota_breached"), Some("view")));
    assert_eq!(a["action"]["type"], "block");
    assert_eq!(a["version"], 4);
    assert!(a["decision_age_ms"].as_i64().unwrap() >= 250);
    assert_eq!(h["x-ratelimit-remaining"], "0");
    let retry: i64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((3590..=3600).contains(&retry), "{retry}");
    assert!(h.contains_key("x-tally-decision-age-ms"));

    // A quota whose reset has passed counts as reset.
    e.state.view.offer(snapshot("alice", 5, vec![quota(1000, 1000, Action::Block, Utc::now() - Duration::seconds(1))]));
    let (_, h, a) = e.check(json!({"subject": "alice"})).await;
    assert_eq!(a["allowed"], true, "{a}");
    assert_eq!(h["x-ratelimit-remaining"], "1000");

    // Degrade answers with the fallback model; an estimate can deny.
    let degrade = Action::Degrade { fallback_model: "small".into() };
    e.state.view.offer(snapshot("dora", 1, vec![quota(1000, 1000, degrade, resets)]));
    let (_, _, a) = e.check(json!({"subject": "dora", "model": "big"})).await;
    assert_eq!((a["allowed"].as_bool(), a["model"].as_str(), a["reason"].as_str()), (Some(true), Some("small"), Some("degraded")));
    e.state.view.offer(snapshot("eve", 1, vec![quota(900, 1000, Action::Block, resets)]));
    let (_, _, a) = e.check(json!({"subject": "eve", "estimated_tokens": 101})).await;
    assert_eq!((a["allowed"].as_bool(), a["reason"].as_str()), (Some(false), Some("estimate_exceeds_remaining")));
    let (_, _, a) = e.check(json!({"subject": "eve", "estimated_tokens": 100})).await;
    assert_eq!(a["allowed"], true);
    e.done().await;
}

#[tokio::test]
async fn check_input_errors_name_the_field() {
    let e = env().await;
    let cases = [
        (json!({}), StatusCode::BAD_REQUEST, "subject"),
        (json!({"subject": ""}), StatusCode::BAD_REQUEST, "subject"),
        (json!({"subject": "__tally_budget__/group/eng"}), StatusCode::BAD_REQUEST, "subject"),
        (json!({"subject": "a", "groups": "eng"}), StatusCode::BAD_REQUEST, "groups"),
        (json!({"subject": "a", "groups": ["nobody"]}), StatusCode::BAD_REQUEST, "groups[0]"),
        (json!({"subject": "a", "estimated_tokens": -1}), StatusCode::BAD_REQUEST, "estimated_tokens"),
        (json!({"subject": "a", "estimated_cost_micros": -1}), StatusCode::BAD_REQUEST, "estimated_cost_micros"),
        (json!({"subject": "a", "scope": "x".repeat(300)}), StatusCode::BAD_REQUEST, "scope"),
        (json!({"subject": "a", "colour": "red"}), StatusCode::BAD_REQUEST, "colour"),
        (json!({"subject": 5}), StatusCode::BAD_REQUEST, "subject"),
        (json!({"subject": "a", "estimated_tokens": "many"}), StatusCode::BAD_REQUEST, "estimated_tokens"),
        (json!(["a"]), StatusCode::BAD_REQUEST, "body"),
        (json!({"api_key": "tally_sk_unknown"}), StatusCode::FORBIDDEN, "api_key"),
    ];
    for (body, status, field) in cases {
        let (s, _, err) = e.check(body.clone()).await;
        assert_eq!(s, status, "{body}: {err}");
        assert_eq!(err["field"], field, "{body}: {err}");
        assert!(err["error"].is_string());
    }
    let raw = |body: &str, ct: &str| Request::post("/v1/check").header("content-type", ct).body(Body::from(body.to_string())).unwrap();
    let big = format!("{{\"subject\": \"{}\"}}", "x".repeat(5000));
    let raws = [
        ("{not json", "application/json", StatusCode::BAD_REQUEST, "body"),
        (r#"{"subject": "a"} {}"#, "application/json", StatusCode::BAD_REQUEST, "body"),
        ("{}", "text/plain", StatusCode::UNSUPPORTED_MEDIA_TYPE, "content-type"),
        (&big, "application/json", StatusCode::PAYLOAD_TOO_LARGE, "body"),
    ];
    for (body, ct, status, field) in raws {
        let r = e.app.clone().oneshot(raw(body, ct)).await.unwrap();
        assert_eq!(r.status(), status, "{ct}: {body:.40}");
        let err: Value = serde_json::from_slice(&axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap()).unwrap();
        assert_eq!(err["field"], field, "{err}");
        assert!(err["error"].is_string(), "{err}");
    }
    // A body without a Content-Type is read as JSON.
    let r = e.app.clone().oneshot(Request::post("/v1/check").body(Body::from(r#"{"subject":"a"}"#)).unwrap()).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    e.done().await;
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn deflate(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn brotli(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut out = Vec::new();
    brotli::CompressorWriter::new(&mut out, 4096, 5, 22).write_all(bytes).unwrap();
    out
}

impl Env {
    /// Sends raw bytes with a Content-Encoding (and an optional token).
    async fn send_encoded(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        coding: &str,
        body: Vec<u8>,
    ) -> (StatusCode, axum::http::HeaderMap, Value) {
        let mut req =
            Request::builder().method(method).uri(path).header("content-type", "application/json").header("content-encoding", coding);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let r = self.app.clone().oneshot(req.body(Body::from(body)).unwrap()).await.unwrap();
        let (status, headers) = (r.status(), r.headers().clone());
        let bytes = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
        (status, headers, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }
}

#[tokio::test]
async fn compressed_bodies_are_decoded_and_the_limit_counts_decoded_bytes() {
    let e = env().await;
    let check = br#"{"subject": "alice", "estimated_tokens": 10}"#;
    for (coding, body) in [("gzip", gzip(check)), ("deflate", deflate(check)), ("br", brotli(check)), ("identity", check.to_vec())] {
        let (s, _, a) = e.send_encoded("POST", "/v1/check", None, coding, body).await;
        assert_eq!((s, a["subject"].as_str(), a["allowed"].as_bool()), (StatusCode::OK, Some("alice"), Some(true)), "{coding}: {a}");
    }
    let (s, _, g) = e.send_encoded("PUT", "/v1/admin/groups/eng", Some(ADMIN), "gzip", gzip(br#"{"tier": "pro"}"#)).await;
    assert_eq!((s, g["tier"].as_str()), (StatusCode::OK, Some("pro")), "{g}");
    // A bad field inside a compressed body is named like in a plain one.
    let (s, _, err) = e.send_encoded("POST", "/v1/check", None, "br", brotli(br#"{"subject": "a", "colour": 1}"#)).await;
    assert_eq!((s, err["field"].as_str()), (StatusCode::BAD_REQUEST, Some("colour")));
    // The limit is 4096 bytes: 4 kB of gzip inflating to 4 MB is refused, not buffered.
    let bomb = gzip(format!(r#"{{"subject": "{}"}}"#, "a".repeat(4_000_000)).as_bytes());
    assert!(bomb.len() < 4096, "{}", bomb.len());
    let (s, _, err) = e.send_encoded("POST", "/v1/check", None, "gzip", bomb).await;
    assert_eq!((s, err["field"].as_str()), (StatusCode::PAYLOAD_TOO_LARGE, Some("body")), "{err}");
    assert!(err["error"].as_str().unwrap().contains("after decoding"), "{err}");
    // An unknown coding, or bytes that are not what the coding says.
    let (s, h, err) = e.send_encoded("POST", "/v1/check", None, "zstd", check.to_vec()).await;
    assert_eq!((s, err["field"].as_str()), (StatusCode::UNSUPPORTED_MEDIA_TYPE, Some("content-encoding")), "{err}");
    assert!(err["error"].as_str().unwrap().contains("Content-Encoding"), "{err}");
    assert_eq!(h["accept-encoding"], "gzip, deflate, br");
    let (s, _, err) = e.send_encoded("POST", "/v1/check", None, "gzip", check.to_vec()).await;
    assert_eq!((s, err["field"].as_str()), (StatusCode::BAD_REQUEST, Some("body")), "{err}");
    e.done().await;
}

#[tokio::test]
async fn unknown_routes_and_wrong_methods_answer_json() {
    let e = env().await;
    let (s, _, err) = e.send("GET", "/v1/nope", None, None).await;
    assert_eq!((s, err["field"].as_str(), err["error"].as_str()), (StatusCode::NOT_FOUND, Some("path"), Some("no route for GET /v1/nope")));
    let (s, _, err) = e.send("POST", "/v1/subjects/alice/nope", Some(ADMIN), Some(json!({}))).await;
    assert_eq!((s, err["field"].as_str()), (StatusCode::NOT_FOUND, Some("path")));
    for (method, path, allow) in [
        ("GET", "/v1/check", "POST"),
        ("DELETE", "/v1/subjects/alice/decision", "GET,HEAD"),
        ("PATCH", "/v1/admin/tiers", "GET,HEAD,POST"),
        ("POST", "/v1/admin/api-keys/key_1", "GET,HEAD,DELETE"),
        ("PUT", "/v1/history/series", "GET,HEAD"),
        ("POST", "/healthz", "GET,HEAD"),
    ] {
        let (s, h, err) = e.send(method, path, Some(ADMIN), None).await;
        assert_eq!((s, err["field"].as_str()), (StatusCode::METHOD_NOT_ALLOWED, Some("method")), "{method} {path}: {err}");
        assert!(err["error"].as_str().unwrap().starts_with(&format!("{method} is not allowed on {path}")), "{err}");
        assert_eq!(h["allow"], allow, "{method} {path}");
    }
    // A query string that does not parse is a JSON 400 too.
    for path in [
        "/v1/history/series?metric=a&metric=b",
        "/v1/history/top?limit=1&limit=2",
        "/v1/reconcile?period=a&period=b",
        "/v1/subjects/a/usage?limit=1&limit=2",
    ] {
        let (s, _, err) = e.send("GET", path, Some(ADMIN), None).await;
        assert_eq!((s, err["field"].as_str()), (StatusCode::BAD_REQUEST, Some("query")), "{path}: {err}");
        assert!(err["error"].as_str().unwrap().contains("duplicate field"), "{err}");
    }
    e.done().await;
}

#[tokio::test]
async fn a_stale_view_applies_the_configured_policy_and_says_so() {
    for (policy, allowed) in [(StalePolicy::Open, true), (StalePolicy::Closed, false)] {
        let e = env_with(AuthSettings::default(), policy, Some(TIERS)).await;
        let view = &e.state.view;
        // A view that last caught up a minute ago (the bound is 10 s).
        let stale = Arc::new(DecisionView::default());
        stale.mark_caught_up(Utc::now() - Duration::seconds(60));
        stale.offer(snapshot("alice", 1, vec![quota(0, 1000, Action::Block, Utc::now() + Duration::days(1))]));
        let _ = view;
        let state = AppState::new(Parts {
            view: stale,
            pool: e.state.pool.clone(),
            configs: e.state.configs.clone(),
            announcer: None,
            check: e.state.check.clone(),
            auth: AuthSettings::default(),
            max_page: 10,
            broker: None,
        });
        let app = tally_api::app(state, None, 4096);
        let r = app
            .oneshot(
                Request::post("/v1/check").header("content-type", "application/json").body(Body::from(r#"{"subject":"alice"}"#)).unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let has_retry = r.headers().contains_key("retry-after");
        let a: Value = serde_json::from_slice(&axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap()).unwrap();
        assert_eq!(a["allowed"], allowed, "{a}");
        assert_eq!(a["stale"], true);
        assert!(a["staleness_ms"].as_i64().unwrap() >= 60_000);
        assert_eq!(a["reason"], if allowed { "stale_fail_open" } else { "stale_fail_closed" });
        assert_eq!(has_retry, !allowed);
        e.done().await;
    }
}

// ---- admin: tiers ----

#[tokio::test]
async fn tiers_crud_validation_and_paging() {
    let e = env().await;
    let before = e.versions().await;
    let (s, err) = e.admin("POST", "/v1/admin/tiers", Some(json!({"name": "gold", "rate_multiplier": -1}))).await;
    assert_eq!((s, err["field"].as_str()), (StatusCode::BAD_REQUEST, Some("rate_multiplier")), "{err}");
    let bad_rate = json!({"name": "gold", "quotas": [{"name": "rpm", "metric": "requests", "rate": "ten per minute"}]});
    let (s, err) = e.admin("POST", "/v1/admin/tiers", Some(bad_rate)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{err}");
    assert!(err["field"].as_str().unwrap().contains("rate"), "{err}");
    let (s, err) = e.admin("POST", "/v1/admin/tiers", Some(json!({"priority": 1}))).await;
    assert_eq!((s, err["field"].as_str()), (StatusCode::BAD_REQUEST, Some("name")));
    // A field the format does not have, or of the wrong type, is the request's error.
    for (tier, field) in [
        (json!({"name": "gold", "colour": "red"}), "colour"),
        (json!({"name": "gold", "priority": "high"}), "priority"),
        (json!({"name": "gold", "quotas": [{"name": "rpm", "metric": "requests", "rate": "1/m", "extra": 1}]}), "quotas[0].extra"),
    ] {
        let (s, err) = e.admin("POST", "/v1/admin/tiers", Some(tier)).await;
        assert_eq!((s, err["field"].as_str()), (StatusCode::BAD_REQUEST, Some(field)), "{err}");
    }
    assert_eq!(e.versions().await, before, "invalid input wrote nothing");

    let gold =
        json!({"name": "gold", "priority": 20, "rate_multiplier": 5, "quotas": [{"name": "rpm", "metric": "requests", "rate": "100/m"}]});
    let (s, created) = e.admin("POST", "/v1/admin/tiers", Some(gold.clone())).await;
    assert_eq!(s, StatusCode::CREATED, "{created}");
    assert!(created["version"].as_i64().unwrap() > 0);
    assert_eq!(e.state.configs.current().version, created["version"].as_i64().unwrap(), "the cache has the new version at once");
    let (s, _) = e.admin("POST", "/v1/admin/tiers", Some(gold)).await;
    assert_eq!(s, StatusCode::CONFLICT);
    let (s, t) = e.admin("GET", "/v1/admin/tiers/gold", None).await;
    assert_eq!((s, t["priority"].as_i64()), (StatusCode::OK, Some(20)));
    let (s, _) = e.admin("GET", "/v1/admin/tiers/tin", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = e.admin("PUT", "/v1/admin/tiers/gold", Some(json!({"priority": 30}))).await;
    assert_eq!(s, StatusCode::OK);
    let (s, err) = e.admin("PUT", "/v1/admin/tiers/gold", Some(json!({"name": "silver"}))).await;
    assert_eq!((s, err["field"].as_str()), (StatusCode::BAD_REQUEST, Some("name")));
    assert!(e.document().await.contains("priority: 30"));

    // Paging: free, gold, pro by name.
    let (s, p1) = e.admin("GET", "/v1/admin/tiers?limit=2", None).await;
    assert_eq!(s, StatusCode::OK);
    let names: Vec<&str> = p1["items"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["free", "gold"]);
    assert_eq!(p1["next_cursor"], "gold");
    let (_, p2) = e.admin("GET", "/v1/admin/tiers?limit=2&cursor=gold", None).await;
    assert_eq!(p2["items"][0]["name"], "pro");
    assert!(p2["next_cursor"].is_null());
    for bad in ["limit=0", "limit=51", "limit=two"] {
        let (s, err) = e.admin("GET", &format!("/v1/admin/tiers?{bad}"), None).await;
        assert_eq!((s, err["field"].as_str()), (StatusCode::BAD_REQUEST, Some("limit")), "{bad}");
    }

    // A tier still referenced cannot go; an unreferenced one can.
    let (s, _) = e.admin("PUT", "/v1/admin/groups/vip", Some(json!({"tier": "gold"}))).await;
    assert_eq!(s, StatusCode::OK);
    let (s, err) = e.admin("DELETE", "/v1/admin/tiers/gold", None).await;
    assert_eq!(s, StatusCode::CONFLICT, "{err}");
    assert!(err["field"].as_str().unwrap().starts_with("groups"), "{err}");
    let (s, _) = e.admin("DELETE", "/v1/admin/groups/vip", None).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = e.admin("DELETE", "/v1/admin/tiers/gold", None).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = e.admin("DELETE", "/v1/admin/tiers/gold", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, cfg) = e.admin("GET", "/v1/admin/config", None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(!cfg["document"].as_str().unwrap().contains("gold"));
    e.done().await;
}

#[tokio::test]
async fn an_edit_builds_on_a_version_applied_meanwhile() {
    let e = env().await;
    // Someone runs `tally config apply` with a new tier; the next admin edit keeps it.
    let applied = format!("{TIERS}  - name: bronze\n");
    sqlx::query("INSERT INTO config_versions (document, sha256, source) VALUES ($1, 'y', 'file')")
        .bind(&applied)
        .execute(&e.state.pool)
        .await
        .unwrap();
    let (s, _) = e.admin("PUT", "/v1/admin/groups/g", Some(json!({"tier": "bronze"}))).await;
    assert_eq!(s, StatusCode::OK);
    let doc = e.document().await;
    assert!(doc.contains("bronze") && doc.contains("g: bronze"), "{doc}");
    e.done().await;
}

// ---- admin: groups, members, assignments ----

#[tokio::test]
async fn groups_members_and_assignments() {
    let e = env().await;
    let (s, err) = e.admin("PUT", "/v1/admin/groups/eng", Some(json!({"tier": "platinum"}))).await;
    assert_eq!((s, err["field"].as_str()), (StatusCode::BAD_REQUEST, Some("tier")));
    let (s, err) = e.admin("PUT", "/v1/admin/groups/eng", Some(json!({"tier": "pro", "extra": 1}))).await;
    assert_eq!((s, err["field"].as_str()), (StatusCode::BAD_REQUEST, Some("extra")));
    let (s, err) = e.admin("PUT", "/v1/admin/groups/eng", Some(json!({"tier": 5}))).await;
    assert_eq!((s, err["field"].as_str()), (StatusCode::BAD_REQUEST, Some("tier")), "{err}");
    let (s, _) = e.admin("PUT", "/v1/admin/groups/eng", Some(json!({"tier": "pro"}))).await;
    assert_eq!(s, StatusCode::OK);
    let (s, g) = e.admin("GET", "/v1/admin/groups/eng", None).await;
    assert_eq!((s, g["tier"].as_str()), (StatusCode::OK, Some("pro")));
    let (s, _) = e.admin("GET", "/v1/admin/groups/ops", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = e.admin("PUT", "/v1/admin/groups/ops/members/alice", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    for subject in ["carol", "alice", "bob"] {
        let (s, _) = e.admin("PUT", &format!("/v1/admin/groups/eng/members/{subject}"), None).await;
        assert_eq!(s, StatusCode::OK);
    }
    let (_, m) = e.admin("GET", "/v1/admin/groups/eng/members?limit=2", None).await;
    assert_eq!(m["items"], json!([{"subject": "alice"}, {"subject": "bob"}]));
    let (_, gl) = e.admin("GET", "/v1/admin/groups", None).await;
    assert_eq!(gl["items"][0]["members"], 3);
    let (s, _) = e.admin("GET", "/v1/admin/groups/ops/members", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = e.admin("DELETE", "/v1/admin/groups/eng/members/bob", None).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = e.admin("DELETE", "/v1/admin/groups/eng/members/bob", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // The configuration the aggregator reads resolves alice to pro through the group.
    let config = e.state.configs.current();
    assert_eq!(config.config.members["alice"], ["eng"]);
    let (s, d) = e.admin("DELETE", "/v1/admin/groups/eng", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(d["members_removed"], json!(["alice", "carol"]));
    let (s, _) = e.admin("DELETE", "/v1/admin/groups/eng", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    let soon = (Utc::now() + Duration::days(30)).to_rfc3339();
    let (s, err) = e.admin("PUT", "/v1/admin/assignments/dan", Some(json!({"tier": "nope"}))).await;
    assert_eq!((s, err["field"].as_str()), (StatusCode::BAD_REQUEST, Some("tier")));
    let (s, err) = e.admin("PUT", "/v1/admin/assignments/dan", Some(json!({"tier": "pro", "expires_at": "2001-01-01T00:00:00Z"}))).await;
    assert_eq!((s, err["field"].as_str()), (StatusCode::BAD_REQUEST, Some("expires_at")));
    let (s, err) = e.admin("PUT", "/v1/admin/assignments/dan", Some(json!({"tier": "pro", "expires_at": "tomorrow"}))).await;
    assert_eq!((s, err["field"].as_str()), (StatusCode::BAD_REQUEST, Some("expires_at")), "{err}");
    let (s, _) = e.admin("PUT", "/v1/admin/assignments/dan", Some(json!({"tier": "pro", "expires_at": soon, "reason": "trial"}))).await;
    assert_eq!(s, StatusCode::OK);
    let (s, a) = e.admin("GET", "/v1/admin/assignments/dan", None).await;
    assert_eq!((s, a["tier"].as_str(), a["active"].as_bool()), (StatusCode::OK, Some("pro"), Some(true)));
    let (_, l) = e.admin("GET", "/v1/admin/assignments", None).await;
    assert_eq!(l["items"].as_array().unwrap().len(), 1);
    let (s, _) = e.admin("DELETE", "/v1/admin/assignments/dan", None).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = e.admin("GET", "/v1/admin/assignments/dan", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = e.admin("DELETE", "/v1/admin/assignments/dan", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    e.done().await;
}

// ---- admin: overrides ----

#[tokio::test]
async fn overrides_are_validated_before_anything_is_written() {
    let e = env().await;
    let before = e.versions().await;
    let base = json!({"subject": "carol", "rate": "1000/h", "reason": "launch", "created_by": "ops@example.com"});
    let with = |patch: Value| {
        let mut b = base.clone();
        for (k, v) in patch.as_object().unwrap() {
            if v.is_null() {
                b.as_object_mut().unwrap().remove(k);
            } else {
                b[k] = v.clone();
            }
        }
        b
    };
    let cases = [
        (with(json!({"rate": "lots"})), "rate"),
        (with(json!({"rate": "5/30x"})), "rate"),
        (with(json!({"limit": 5})), "rate"),
        (with(json!({"rate": null})), "rate"),
        (with(json!({"rate": null, "limit": 0})), "limit"),
        (with(json!({"duration": "1h", "expires_at": "2030-01-01T00:00:00Z"})), "expires_at"),
        (with(json!({"duration": "forever"})), "duration"),
        (with(json!({"expires_at": "2001-01-01T00:00:00Z"})), "expires_at"),
        (with(json!({"reason": null})), "reason"),
        (with(json!({"created_by": ""})), "created_by"),
        (with(json!({"subject": null})), "subject"),
        (with(json!({"quota": "no_such_quota"})), "quota"),
    ];
    for (body, field) in cases {
        let (s, err) = e.admin("POST", "/v1/admin/overrides", Some(body.clone())).await;
        assert_eq!((s, err["field"].as_str()), (StatusCode::BAD_REQUEST, Some(field)), "{body}: {err}");
    }
    assert_eq!(e.versions().await, before, "no invalid override was written");

    let (s, created) = e.admin("POST", "/v1/admin/overrides", Some(base.clone())).await;
    assert_eq!(s, StatusCode::CREATED, "{created}");
    let o = &created["override"];
    let expires: DateTime<Utc> = o["expires_at"].as_str().unwrap().parse().unwrap();
    let hour = expires - Utc::now();
    assert!(hour > Duration::minutes(59) && hour <= Duration::hours(1), "default duration is one hour: {hour}");
    let id = o["id"].as_str().unwrap().to_string();
    let (s, again) = e.admin("POST", "/v1/admin/overrides", Some(with(json!({"duration": "2h"})))).await;
    assert_eq!((s, again["field"].as_str()), (StatusCode::CONFLICT, Some("subject")), "overlapping: {again}");
    let (s, got) = e.admin("GET", &format!("/v1/admin/overrides/{id}"), None).await;
    assert_eq!((s, got["active"].as_bool(), got["rate"].as_str()), (StatusCode::OK, Some(true), Some("1000/h")));
    let (_, l) = e.admin("GET", "/v1/admin/overrides?subject=carol", None).await;
    assert_eq!(l["items"].as_array().unwrap().len(), 1);
    let (_, l) = e.admin("GET", "/v1/admin/overrides?subject=dave", None).await;
    assert_eq!(l["items"].as_array().unwrap().len(), 0);
    let (s, _) = e.admin("DELETE", &format!("/v1/admin/overrides/{id}"), None).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = e.admin("GET", &format!("/v1/admin/overrides/{id}"), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = e.admin("DELETE", &format!("/v1/admin/overrides/{id}"), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    e.done().await;
}

// ---- admin: API keys ----

#[tokio::test]
async fn api_keys_shown_once_stored_hashed_used_and_revoked() {
    let e = env().await;
    let (s, err) = e.admin("POST", "/v1/admin/api-keys", Some(json!({"tier": "nope"}))).await;
    assert_eq!((s, err["field"].as_str()), (StatusCode::BAD_REQUEST, Some("tier")));
    let (s, err) = e.admin("POST", "/v1/admin/api-keys", Some(json!({}))).await;
    assert_eq!((s, err["field"].as_str()), (StatusCode::BAD_REQUEST, Some("tier")));
    let (s, created) = e.admin("POST", "/v1/admin/api-keys", Some(json!({"tier": "pro", "subject": "acme", "label": "prod"}))).await;
    assert_eq!(s, StatusCode::CREATED, "{created}");
    let key = created["key"].as_str().unwrap().to_string();
    let id = created["id"].as_str().unwrap().to_string();
    assert!(key.starts_with("tally_sk_"));
    let doc = e.document().await;
    assert!(!doc.contains(&key), "the key itself is never stored");
    assert!(doc.contains(&tally_domain::event::hash_api_key(&key)));
    let (_, listed) = e.admin("GET", "/v1/admin/api-keys", None).await;
    assert!(!listed.to_string().contains(&key), "lists never show the key");
    assert_eq!(listed["items"][0]["id"], id.as_str());
    assert!(listed["items"][0]["created_at"].is_string());

    // The key alone checks its subject, and its use is recorded off the hot path.
    let (s, _, a) = e.check(json!({"api_key": key})).await;
    assert_eq!((s, a["subject"].as_str(), a["allowed"].as_bool()), (StatusCode::OK, Some("acme"), Some(true)), "{a}");
    let (s, _, err) = e.check(json!({"api_key": key, "subject": "someone-else"})).await;
    assert_eq!((s, err["field"].as_str()), (StatusCode::FORBIDDEN, Some("api_key")));
    assert_eq!(e.state.last_use.flush(&e.state.pool).await.unwrap(), 1);
    let (_, k) = e.admin("GET", &format!("/v1/admin/api-keys/{id}"), None).await;
    assert!(k["last_used_at"].is_string(), "{k}");
    assert_eq!(k["active"], true);

    // An unbound key needs a subject.
    let (_, unbound) = e.admin("POST", "/v1/admin/api-keys", Some(json!({"tier": "free"}))).await;
    let (s, _, err) = e.check(json!({"api_key": unbound["key"]})).await;
    assert_eq!((s, err["field"].as_str()), (StatusCode::BAD_REQUEST, Some("subject")));
    let (s, _, a) = e.check(json!({"api_key": unbound["key"], "subject": "zed"})).await;
    assert_eq!((s, a["tier"].as_str()), (StatusCode::OK, Some("free")));

    let (s, r) = e.admin("DELETE", &format!("/v1/admin/api-keys/{id}"), None).await;
    assert_eq!(s, StatusCode::OK, "{r}");
    let (s, _, err) = e.check(json!({"api_key": key})).await;
    assert_eq!((s, err["field"].as_str()), (StatusCode::FORBIDDEN, Some("api_key")), "a revoked key is refused");
    let (s, k) = e.admin("GET", &format!("/v1/admin/api-keys/{id}"), None).await;
    assert_eq!((s, k["active"].as_bool()), (StatusCode::OK, Some(false)));
    assert!(k["revoked_at"].is_string());
    let (s, _) = e.admin("DELETE", &format!("/v1/admin/api-keys/{id}"), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = e.admin("GET", "/v1/admin/api-keys/key_0000", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    e.done().await;
}

#[tokio::test]
async fn the_check_follows_an_admin_change_of_tier_for_subjects_without_a_decision() {
    let e = env().await;
    let (_, _, a) = e.check(json!({"subject": "newbie"})).await;
    assert_eq!(a["tier"], "free");
    let (s, _) = e.admin("PUT", "/v1/admin/assignments/newbie", Some(json!({"tier": "pro"}))).await;
    assert_eq!(s, StatusCode::OK);
    let (_, h, a) = e.check(json!({"subject": "newbie"})).await;
    assert_eq!(a["tier"], "pro");
    assert_eq!(h["x-ratelimit-limit"], "10000");
    let _ = QuotaState::Ok;
    e.done().await;
}

#[tokio::test]
async fn before_the_view_caught_up_the_newer_of_view_and_database_answers() {
    let e = env().await;
    let resets = Utc::now() + Duration::days(1);
    let stored = snapshot("alice", 3, vec![quota(1000, 1000, Action::Block, resets)]);
    sqlx::query("INSERT INTO decisions (subject, version, snapshot) VALUES ('alice', 3, $1)")
        .bind(sqlx::types::Json(&stored))
        .execute(&e.state.pool)
        .await
        .unwrap();
    let view = Arc::new(DecisionView::default());
    view.offer(snapshot("alice", 2, vec![quota(10, 1000, Action::Block, resets)]));
    let state = AppState::new(Parts {
        view,
        pool: e.state.pool.clone(),
        configs: e.state.configs.clone(),
        announcer: None,
        check: CheckSettings { max_staleness: Duration::seconds(10), stale_policy: StalePolicy::Open },
        auth: AuthSettings::default(),
        max_page: 10,
        broker: None,
    });
    let app = tally_api::app(state, None, 4096);
    let r = app
        .oneshot(Request::post("/v1/check").header("content-type", "application/json").body(Body::from(r#"{"subject":"alice"}"#)).unwrap())
        .await
        .unwrap();
    let a: Value = serde_json::from_slice(&axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap()).unwrap();
    assert_eq!((a["allowed"].as_bool(), a["version"].as_i64(), a["source"].as_str()), (Some(false), Some(3), Some("database")), "{a}");
    assert_eq!(a["stale"], false);
    e.done().await;
}

// ---- budgets ----

/// Alice and bob are on team eng (a budget-only group); every free subject shares the free
/// pool, whose gpt-4o quota degrades; alice's two keys are bound to her, one with a cap.
fn budgets_config() -> String {
    let (capped, free_key) = (tally_domain::event::hash_api_key("sk-alice-capped"), tally_domain::event::hash_api_key("sk-alice-free"));
    format!(
        "{TIERS}members: {{alice: [eng], bob: [eng]}}
api_keys:
  - {{key_sha256: {capped}, tier: free, subject: alice}}
  - {{key_sha256: {free_key}, tier: free, subject: alice}}
budgets:
  - group: eng
    quotas: [{{name: team_month, metric: cost_micros, period: month, limit: 1000000}}]
  - api_key: {capped}
    quotas: [{{name: key_day, metric: total_tokens, period: day, limit: 500}}]
  - tier: free
    timezone: Europe/Paris
    quotas:
      - {{name: free_gpt4o, metric: total_tokens, period: day, limit: 2000, models: [gpt-4o], action: degrade, fallback_model: gpt-4o-mini}}
"
    )
}

fn budget_snapshot(owner: &tally_domain::budget::BudgetOwner, version: i64, quotas: Vec<QuotaDecision>) -> DecisionSnapshot {
    let mut s = snapshot(&owner.ledger_subject(), version, quotas);
    s.budget = Some(owner.clone());
    s.tier = if owner.kind == tally_domain::budget::OwnerKind::Tier { owner.name.clone() } else { String::new() };
    s
}

fn named(mut q: QuotaDecision, name: &str, metric: Metric, models: Option<&[&str]>) -> QuotaDecision {
    q.quota = name.into();
    q.metric = metric;
    q.models = models.map(|m| m.iter().map(|s| s.to_string()).collect());
    q
}

#[tokio::test]
async fn check_meets_every_budget_and_the_strictest_decides() {
    use tally_domain::budget::{BudgetOwner, OwnerKind};
    let e =
        env_with(AuthSettings { admin: Some(Token::new(ADMIN)), read: None, no_auth: false }, StalePolicy::Open, Some(&budgets_config()))
            .await;
    let month_end = Utc::now() + Duration::days(3);
    let eng = BudgetOwner::new(OwnerKind::Group, "eng");
    let capped = BudgetOwner::new(OwnerKind::ApiKey, tally_domain::event::hash_api_key("sk-alice-capped"));
    let pool = BudgetOwner::new(OwnerKind::Tier, "free");

    // No budget has a decision yet: each counts as unused, with its configured limits.
    let (s, h, a) = e.check(json!({"subject": "alice", "api_key": "sk-alice-capped", "model": "gpt-4o"})).await;
    assert_eq!((s, a["allowed"].as_bool()), (StatusCode::OK, Some(true)), "{a}");
    let met: Vec<(&str, &str, &str)> = a["budgets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (b["kind"].as_str().unwrap(), b["name"].as_str().unwrap(), b["source"].as_str().unwrap()))
        .collect();
    assert_eq!(met, [("api_key", capped.name.as_str(), "policy"), ("group", "eng", "policy"), ("tier", "free", "policy")]);
    assert_eq!(a["budgets"][1]["quota"]["limit"], 1_000_000);
    assert_eq!(a["quota"]["quota"], "monthly_tokens", "the subject's own 1000 tokens are the smallest share left: {a}");
    assert!(a["quota"]["budget"].is_null());
    assert!(h.get("x-tally-budget").is_none(), "absent for the subject's own");

    // The team's month is spent: every member is blocked, the team named as the reason.
    let spent = named(quota(1_000_000, 1_000_000, Action::Block, month_end), "team_month", Metric::CostMicros, None);
    e.state.view.offer(budget_snapshot(&eng, 4, vec![spent]));
    for subject in ["alice", "bob"] {
        let (_, h, a) = e.check(json!({"subject": subject})).await;
        assert_eq!((a["allowed"].as_bool(), a["reason"].as_str()), (Some(false), Some("quota_breached")), "{subject}: {a}");
        assert_eq!(a["quota"]["budget"], json!({"kind": "group", "name": "eng"}), "{a}");
        assert_eq!(a["quota"]["quota"], "team_month");
        assert_eq!(h["x-tally-budget"], "group eng");
        assert_eq!(h["x-ratelimit-limit"], "1000000");
        assert!(h.contains_key("retry-after"));
        let team = a["budgets"].as_array().unwrap().iter().find(|b| b["kind"] == "group").unwrap();
        assert_eq!((team["allowed"].as_bool(), team["version"].as_i64(), team["source"].as_str()), (Some(false), Some(4), Some("view")));
    }
    // Carol is no member, unless her request is made for the team.
    let (_, _, a) = e.check(json!({"subject": "carol"})).await;
    assert_eq!(a["allowed"], true, "{a}");
    let (_, _, a) = e.check(json!({"subject": "carol", "groups": ["eng"]})).await;
    assert_eq!((a["allowed"].as_bool(), a["quota"]["budget"]["name"].as_str()), (Some(false), Some("eng")), "{a}");
    let (s, _, err) = e.check(json!({"subject": "carol", "groups": ["eng", "ops"]})).await;
    assert_eq!((s, err["field"].as_str()), (StatusCode::BAD_REQUEST, Some("groups[1]")), "{err}");
    e.state.view.offer(budget_snapshot(&eng, 5, vec![]));

    // A key over its cap blocks that key only.
    let key_spent = named(quota(500, 500, Action::Block, month_end), "key_day", Metric::TotalTokens, None);
    e.state.view.offer(budget_snapshot(&capped, 1, vec![key_spent]));
    let (_, h, a) = e.check(json!({"api_key": "sk-alice-capped"})).await;
    assert_eq!((a["subject"].as_str(), a["allowed"].as_bool()), (Some("alice"), Some(false)), "{a}");
    assert_eq!(a["quota"]["budget"]["kind"], "api_key");
    assert_eq!(h["x-tally-budget"], format!("api_key {}", capped.name).as_str());
    let (_, _, a) = e.check(json!({"api_key": "sk-alice-free"})).await;
    assert_eq!(a["allowed"], true, "alice's other key still passes: {a}");

    // A model over its budget degrades that model only, naming the fallback.
    let degrade = Action::Degrade { fallback_model: "gpt-4o-mini".into() };
    let model_spent = named(quota(2000, 2000, degrade, month_end), "free_gpt4o", Metric::TotalTokens, Some(&["gpt-4o"]));
    e.state.view.offer(budget_snapshot(&pool, 1, vec![model_spent]));
    let (_, h, a) = e.check(json!({"subject": "dora", "model": "gpt-4o"})).await;
    assert_eq!(
        (a["allowed"].as_bool(), a["reason"].as_str(), a["model"].as_str()),
        (Some(true), Some("degraded"), Some("gpt-4o-mini")),
        "{a}"
    );
    assert_eq!(a["action"]["fallback_model"], "gpt-4o-mini");
    assert_eq!(a["quota"]["models"], json!(["gpt-4o"]));
    assert_eq!(h["x-tally-budget"], "tier free");
    let (_, h, a) = e.check(json!({"subject": "dora", "model": "gpt-4o-mini"})).await;
    assert_eq!((a["allowed"].as_bool(), a["reason"].as_str(), a["model"].as_str()), (Some(true), Some("ok"), Some("gpt-4o-mini")), "{a}");
    assert!(h.get("x-tally-budget").is_none(), "{a}");
    assert!(a["budgets"][0]["quota"].is_null(), "the pool's only quota is for another model: {a}");
    // A pro subject is not in the free pool.
    e.state.view.offer(DecisionSnapshot { tier: "pro".into(), ..snapshot("paul", 1, vec![]) });
    let (_, _, a) = e.check(json!({"subject": "paul", "model": "gpt-4o"})).await;
    assert_eq!((a["allowed"].as_bool(), a["budgets"].as_array().map(Vec::len)), (Some(true), Some(0)), "{a}");
    e.done().await;
}

#[tokio::test]
async fn before_the_view_caught_up_a_budgets_decision_comes_from_postgres_too() {
    use tally_domain::budget::{BudgetOwner, OwnerKind};
    let e = env_with(AuthSettings::default(), StalePolicy::Closed, Some(&budgets_config())).await;
    let eng = BudgetOwner::new(OwnerKind::Group, "eng");
    let spent = named(quota(1_000_000, 1_000_000, Action::Block, Utc::now() + Duration::days(3)), "team_month", Metric::CostMicros, None);
    let stored = budget_snapshot(&eng, 6, vec![spent]);
    sqlx::query("INSERT INTO decisions (subject, version, snapshot) VALUES ($1, 6, $2)")
        .bind(eng.ledger_subject())
        .bind(sqlx::types::Json(&stored))
        .execute(&e.state.pool)
        .await
        .unwrap();
    let view = Arc::new(DecisionView::default());
    view.offer(budget_snapshot(&eng, 5, vec![]));
    let state = AppState::new(Parts {
        view,
        pool: e.state.pool.clone(),
        configs: e.state.configs.clone(),
        announcer: None,
        check: CheckSettings { max_staleness: Duration::seconds(10), stale_policy: StalePolicy::Closed },
        auth: AuthSettings::default(),
        max_page: 10,
        broker: None,
    });
    let app = tally_api::app(state, None, 4096);
    let r = app
        .oneshot(Request::post("/v1/check").header("content-type", "application/json").body(Body::from(r#"{"subject":"bob"}"#)).unwrap())
        .await
        .unwrap();
    let a: Value = serde_json::from_slice(&axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap()).unwrap();
    assert_eq!(
        (a["allowed"].as_bool(), a["reason"].as_str(), a["stale"].as_bool()),
        (Some(false), Some("quota_breached"), Some(false)),
        "{a}"
    );
    let team = &a["budgets"][0];
    assert_eq!((team["version"].as_i64(), team["source"].as_str()), (Some(6), Some("database")), "the newer, stored decision: {a}");
    assert_eq!(a["quota"]["budget"]["name"], "eng");
    e.done().await;
}

#[tokio::test]
async fn budget_decisions_and_the_budgets_a_subject_meets() {
    use tally_domain::budget::{BudgetOwner, OwnerKind};
    let e =
        env_with(AuthSettings { admin: Some(Token::new(ADMIN)), read: None, no_auth: false }, StalePolicy::Open, Some(&budgets_config()))
            .await;
    let eng = BudgetOwner::new(OwnerKind::Group, "eng");
    let (s, _, err) = e.send("GET", "/v1/budgets/group/eng/decision", None, None).await;
    assert_eq!((s, err["field"].as_str()), (StatusCode::NOT_FOUND, Some("name")), "{err}");
    assert!(err["error"].as_str().unwrap().contains("group eng"), "{err}");
    let (s, _, err) = e.send("GET", "/v1/budgets/team/eng/decision", None, None).await;
    assert_eq!((s, err["field"].as_str()), (StatusCode::BAD_REQUEST, Some("kind")), "{err}");
    let resets = Utc::now() + Duration::days(3);
    e.state.view.offer(budget_snapshot(
        &eng,
        9,
        vec![named(quota(10, 100, Action::Block, resets), "team_month", Metric::CostMicros, None)],
    ));
    let (s, h, d) = e.send("GET", "/v1/budgets/group/eng/decision", None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(h["etag"], "W/\"9\"");
    assert_eq!(
        (d["subject"].as_str(), d["budget"]["name"].as_str(), d["source"].as_str()),
        (Some(eng.ledger_subject().as_str()), Some("eng"), Some("view"))
    );
    // An API key's budget by the key's id, as the admin API names keys.
    let capped = tally_domain::event::hash_api_key("sk-alice-capped");
    let key = BudgetOwner::new(OwnerKind::ApiKey, capped.clone());
    e.state.view.offer(budget_snapshot(&key, 2, vec![]));
    let (s, _, d) = e.send("GET", &format!("/v1/budgets/api_key/{}/decision", tally_api::keys::key_id(&capped)), None, None).await;
    assert_eq!((s, d["version"].as_i64()), (StatusCode::OK, Some(2)), "{d}");

    let (s, _, b) = e.send("GET", "/v1/subjects/alice/budgets", None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b["tier"], "free");
    let listed: Vec<(&str, Option<i64>)> =
        b["budgets"].as_array().unwrap().iter().map(|x| (x["kind"].as_str().unwrap(), x["decision"]["version"].as_i64())).collect();
    assert_eq!(listed, [("api_key", Some(2)), ("group", Some(9)), ("tier", None)], "{b}");
    assert_eq!(b["budgets"][0]["name"], capped.as_str());
    let (_, _, b) = e.send("GET", "/v1/subjects/carol/budgets", None, None).await;
    assert_eq!(b["budgets"].as_array().unwrap().len(), 1, "only the free pool: {b}");
    e.done().await;
}

#[tokio::test]
async fn admin_budgets_are_edited_through_the_configuration() {
    let e = env().await;
    let before = e.versions().await;
    let month = json!({"name": "team_month", "metric": "cost_micros", "period": "month", "limit": 1_000_000});
    let cases = [
        ("/v1/admin/budgets/team/eng", json!({"quotas": [month]}), "kind"),
        ("/v1/admin/budgets/group/eng", json!({"quotas": []}), "quotas"),
        ("/v1/admin/budgets/group/eng", json!({}), "quotas"),
        ("/v1/admin/budgets/group/eng", json!({"quotas": [month], "colour": 1}), "colour"),
        (
            "/v1/admin/budgets/group/eng",
            json!({"quotas": [{"name": "q", "metric": "requests", "period": "month", "limit": -1}]}),
            "quotas[0].limit",
        ),
        (
            "/v1/admin/budgets/group/eng",
            json!({"quotas": [{"name": "q", "metric": "requests", "rate": "1/m", "models": []}]}),
            "quotas[0].models",
        ),
        ("/v1/admin/budgets/group/eng", json!({"timezone": "Mars/Base", "quotas": [month]}), "timezone"),
        ("/v1/admin/budgets/tier/gold", json!({"quotas": [month]}), "name"),
        ("/v1/admin/budgets/api_key/sk-plaintext", json!({"quotas": [month]}), "name"),
    ];
    for (path, body, field) in cases {
        let (s, err) = e.admin("PUT", path, Some(body.clone())).await;
        assert_eq!((s, err["field"].as_str()), (StatusCode::BAD_REQUEST, Some(field)), "{path} {body}: {err}");
    }
    assert_eq!(e.versions().await, before, "nothing invalid was written");

    let (s, put) = e.admin("PUT", "/v1/admin/budgets/group/eng", Some(json!({"timezone": "Europe/Berlin", "quotas": [month]}))).await;
    assert_eq!(s, StatusCode::OK, "{put}");
    assert_eq!((put["budget"]["kind"].as_str(), put["budget"]["name"].as_str()), (Some("group"), Some("eng")));
    let doc = e.document().await;
    assert!(doc.contains("budgets:\n- group: eng\n  timezone: Europe/Berlin\n"), "{doc}");
    let config = e.state.configs.current();
    assert!(config.config.knows_group("eng"), "the check sees the new budget at once");
    // A team without a tier takes members.
    let (s, _) = e.admin("PUT", "/v1/admin/groups/eng/members/alice", None).await;
    assert_eq!(s, StatusCode::OK);
    let (s, m) = e.admin("GET", "/v1/admin/groups/eng/members", None).await;
    assert_eq!((s, &m["items"]), (StatusCode::OK, &json!([{"subject": "alice"}])));

    // An API key's budget, by the key's id; a tier pool.
    let (_, created) = e.admin("POST", "/v1/admin/api-keys", Some(json!({"tier": "pro", "subject": "acme"}))).await;
    let id = created["id"].as_str().unwrap().to_string();
    let sha = tally_domain::event::hash_api_key(created["key"].as_str().unwrap());
    let cap = json!({"quotas": [{"name": "key_day", "metric": "total_tokens", "period": "day", "limit": 500}]});
    let (s, put) = e.admin("PUT", &format!("/v1/admin/budgets/api_key/{id}"), Some(cap)).await;
    assert_eq!(
        (s, put["budget"]["name"].as_str(), put["budget"]["key_id"].as_str()),
        (StatusCode::OK, Some(sha.as_str()), Some(id.as_str())),
        "{put}"
    );
    let pool = json!({"quotas": [{"name": "pool", "metric": "total_tokens", "period": "day", "limit": 10000, "models": ["gpt-4o"], "action": "degrade", "fallback_model": "gpt-4o-mini"}]});
    let (s, _) = e.admin("PUT", "/v1/admin/budgets/tier/pro", Some(pool)).await;
    assert_eq!(s, StatusCode::OK);
    let (s, l) = e.admin("GET", "/v1/admin/budgets", None).await;
    assert_eq!(s, StatusCode::OK);
    let keys: Vec<String> =
        l["items"].as_array().unwrap().iter().map(|b| format!("{}/{}", b["kind"].as_str().unwrap(), b["name"].as_str().unwrap())).collect();
    assert_eq!(keys, [format!("api_key/{sha}"), "group/eng".into(), "tier/pro".into()]);
    let (_, p1) = e.admin("GET", "/v1/admin/budgets?limit=1", None).await;
    assert_eq!(p1["next_cursor"], format!("api_key/{sha}").as_str());
    let (s, g) = e.admin("GET", &format!("/v1/admin/budgets/api_key/{}", sha.to_ascii_uppercase()), None).await;
    assert_eq!((s, g["quotas"][0]["limit"].as_i64()), (StatusCode::OK, Some(500)), "{g}");
    let (s, g) = e.admin("GET", "/v1/admin/budgets/tier/pro", None).await;
    assert_eq!((s, g["quotas"][0]["models"].clone()), (StatusCode::OK, json!(["gpt-4o"])));

    // Replacing keeps one budget per owner.
    let (s, _) = e.admin("PUT", "/v1/admin/budgets/tier/pro", Some(json!({"quotas": [month]}))).await;
    assert_eq!(s, StatusCode::OK);
    let (_, g) = e.admin("GET", "/v1/admin/budgets/tier/pro", None).await;
    assert_eq!(g["quotas"][0]["name"], "team_month");
    assert_eq!(e.state.configs.current().config.budgets.len(), 3);

    // The team's budget cannot go while it has members and no tier; then it can.
    let (s, err) = e.admin("DELETE", "/v1/admin/budgets/group/eng", None).await;
    assert_eq!(s, StatusCode::CONFLICT, "{err}");
    assert!(err["field"].as_str().unwrap().starts_with("members.alice"), "{err}");
    let (s, _) = e.admin("DELETE", "/v1/admin/groups/eng/members/alice", None).await;
    assert_eq!(s, StatusCode::OK);
    let (s, d) = e.admin("DELETE", "/v1/admin/budgets/group/eng", None).await;
    assert_eq!((s, d["deleted"].as_str()), (StatusCode::OK, Some("group eng")), "{d}");
    for (method, path) in [
        ("GET", "/v1/admin/budgets/group/eng"),
        ("DELETE", "/v1/admin/budgets/group/eng"),
        ("GET", "/v1/admin/budgets/api_key/key_0000000000000000"),
    ] {
        let (s, err) = e.admin(method, path, None).await;
        assert_eq!((s, err["field"].as_str()), (StatusCode::NOT_FOUND, Some("name")), "{method} {path}: {err}");
    }
    let (s, err) = e.admin("GET", "/v1/admin/budgets/org/eng", None).await;
    assert_eq!((s, err["field"].as_str()), (StatusCode::BAD_REQUEST, Some("kind")));
    e.done().await;
}

#[tokio::test]
async fn deleting_a_groups_tier_keeps_the_members_of_a_team_with_a_budget() {
    let e = env().await;
    let (s, _) = e.admin("PUT", "/v1/admin/groups/eng", Some(json!({"tier": "pro"}))).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = e.admin("PUT", "/v1/admin/groups/eng/members/alice", None).await;
    assert_eq!(s, StatusCode::OK);
    let quotas = json!({"quotas": [{"name": "team_month", "metric": "cost_micros", "period": "month", "limit": 5}]});
    let (s, _) = e.admin("PUT", "/v1/admin/budgets/group/eng", Some(quotas)).await;
    assert_eq!(s, StatusCode::OK);
    let (s, d) = e.admin("DELETE", "/v1/admin/groups/eng", None).await;
    assert_eq!((s, &d["members_removed"]), (StatusCode::OK, &json!([])), "{d}");
    let config = e.state.configs.current();
    assert_eq!(config.config.members["alice"], ["eng"], "alice is still on the team");
    assert!(config.config.groups.is_empty());
    e.done().await;
}
