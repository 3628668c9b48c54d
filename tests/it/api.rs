//! The gateway and admin API, black-box: the real `tally` binaries with tokens configured.
//! An admin upgrades a blocked user and the next check is allowed within a second; an
//! override is created, used and expires; a revoked key is refused; every route that needs
//! a token refuses requests without one.

use crate::support;

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use support::Tally;

const ADMIN: &str = "admin-token-black-box-0001";
const READ: &str = "read-token-black-box-0001";
const INGEST: &str = "ingest-token-black-box-0001";

const TIERS: &str = crate::support::fixtures::FREE_AND_PRO;

/// Ingest, aggregator and an API, all with tokens.
async fn start() -> Tally {
    let mut t = Tally::prepare(Some(TIERS));
    t.spawn_env("ingest", &[("TALLY_INGEST_TOKEN", INGEST.to_string())]);
    t.spawn("aggregator");
    t.spawn_env("api", &[("TALLY_ADMIN_TOKEN", ADMIN.to_string()), ("TALLY_READ_TOKEN", READ.to_string())]);
    t.wait_healthy().await;
    t
}

fn http() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap()
}

async fn call(method: &str, url: &str, token: Option<&str>, body: Option<&Value>) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut req = http().request(method.parse().unwrap(), url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(b);
    }
    let r = req.send().await.expect("request");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, headers, r.json().await.unwrap_or(Value::Null))
}

async fn send_usage(t: &Tally, id: &str, subject: &str, tokens: i64) {
    let event = json!({"id": id, "subject": subject, "time": Utc::now().to_rfc3339(), "input_tokens": tokens});
    let (s, _, body) = call("POST", &format!("{}/v1/events", t.ingest_url), Some(INGEST), Some(&event)).await;
    assert_eq!(s, 202, "{body}");
}

async fn check(t: &Tally, body: Value) -> (u16, reqwest::header::HeaderMap, Value) {
    call("POST", &format!("{}/v1/check", t.api_url), Some(READ), Some(&body)).await
}

/// Polls the check until `pred` holds on a 200 answer; returns that answer.
async fn check_until(t: &Tally, body: Value, timeout: Duration, pred: impl Fn(&Value) -> bool) -> (reqwest::header::HeaderMap, Value) {
    let deadline = std::time::Instant::now() + timeout;
    let mut last = Value::Null;
    while std::time::Instant::now() < deadline {
        let (s, h, a) = check(t, body.clone()).await;
        if s == 200 && pred(&a) {
            return (h, a);
        }
        last = a;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no check answer for {body} matched; last: {last}; logs in {}", t.log_dir().display());
}

async fn decision(t: &Tally, subject: &str) -> Value {
    let (s, _, d) = call("GET", &format!("{}/v1/subjects/{subject}/decision", t.api_url), Some(READ), None).await;
    assert_eq!(s, 200, "{d}");
    d
}

fn time(v: &Value) -> DateTime<Utc> {
    v.as_str().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("not a time: {v}"))
}

async fn applied_at(t: &Tally, version: i64) -> DateTime<Utc> {
    let pool = t.pg().await;
    sqlx::query_scalar("SELECT applied_at FROM config_versions WHERE version = $1").bind(version).fetch_one(&pool).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_admin_upgrade_unblocks_a_blocked_user_within_a_second() {
    let t = start().await;
    let s = "upgrader";
    send_usage(&t, "u1", s, 150).await;
    let (headers, blocked) = check_until(&t, json!({"subject": s}), Duration::from_secs(30), |a| a["allowed"] == false).await;
    assert_eq!(blocked["reason"], "quota_breached");
    assert_eq!(headers["x-ratelimit-limit"], "100");
    assert_eq!(headers["x-ratelimit-remaining"], "0");
    assert!(headers.contains_key("retry-after"));

    let url = format!("{}/v1/admin/assignments/{s}", t.api_url);
    let (status, _, put) = call("PUT", &url, Some(ADMIN), Some(&json!({"tier": "pro", "reason": "upgrade"}))).await;
    assert_eq!(status, 200, "{put}");
    let version = put["version"].as_i64().unwrap();
    let (headers, allowed) = check_until(&t, json!({"subject": s}), Duration::from_secs(10), |a| a["allowed"] == true).await;
    assert_eq!(allowed["tier"], "pro");
    assert_eq!(headers["x-ratelimit-limit"], "10000");
    assert!(allowed["version"].as_i64() > blocked["version"].as_i64());
    // Server-side timestamps: the allowing decision was calculated within a second of the
    // admin change being stored.
    let d = decision(&t, s).await;
    assert_eq!(d["version"], allowed["version"]);
    let stored = applied_at(&t, version).await;
    let at = time(&d["calculated_at"]);
    assert!(at >= stored && at - stored <= chrono::Duration::seconds(1), "stored at {stored}, allowed at {at}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_override_is_created_used_and_expires() {
    let t = start().await;
    let s = "lucky";
    send_usage(&t, "o1", s, 150).await;
    check_until(&t, json!({"subject": s}), Duration::from_secs(30), |a| a["allowed"] == false).await;

    let body = json!({"subject": s, "limit": 1000, "duration": "8s", "reason": "launch week", "created_by": "ops@example.com"});
    let (status, _, created) = call("POST", &format!("{}/v1/admin/overrides", t.api_url), Some(ADMIN), Some(&body)).await;
    assert_eq!(status, 201, "{created}");
    let expires_at = time(&created["override"]["expires_at"]);
    let stored = applied_at(&t, created["version"].as_i64().unwrap()).await;
    let (h, allowed) = check_until(&t, json!({"subject": s}), Duration::from_secs(10), |a| a["allowed"] == true).await;
    assert_eq!(h["x-ratelimit-limit"], "1000");
    let at = time(&decision(&t, s).await["calculated_at"]);
    assert!(at - stored <= chrono::Duration::seconds(1), "override stored at {stored}, allowed at {at}");
    // Used: more traffic counts against the override's limit.
    send_usage(&t, "o2", s, 100).await;
    let (_, used) = check_until(&t, json!({"subject": s}), Duration::from_secs(30), |a| a["quota"]["used"] == 250).await;
    assert_eq!(used["allowed"], true);
    assert!(allowed["version"].as_i64() < used["version"].as_i64());
    let (_, _, listed) = call("GET", &format!("{}/v1/admin/overrides?subject={s}", t.api_url), Some(ADMIN), None).await;
    assert_eq!(listed["items"][0]["active"], true);
    // Expired: blocked again on time, with no new traffic.
    let (_, blocked) = check_until(&t, json!({"subject": s}), Duration::from_secs(30), |a| a["allowed"] == false).await;
    assert_eq!(blocked["quota"]["limit"], 100);
    let at = time(&decision(&t, s).await["calculated_at"]);
    assert!(at >= expires_at && at - expires_at <= chrono::Duration::seconds(1), "blocked at {at}; the override expired at {expires_at}");
    let (_, _, listed) = call("GET", &format!("{}/v1/admin/overrides?subject={s}", t.api_url), Some(ADMIN), None).await;
    assert_eq!(listed["items"][0]["active"], false);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_key_is_refused() {
    let t = start().await;
    let url = format!("{}/v1/admin/api-keys", t.api_url);
    let (status, _, created) =
        call("POST", &url, Some(ADMIN), Some(&json!({"tier": "pro", "subject": "acme", "label": "acme-prod"}))).await;
    assert_eq!(status, 201, "{created}");
    let key = created["key"].as_str().unwrap().to_string();
    let id = created["id"].as_str().unwrap().to_string();
    let (s, _, a) = check(&t, json!({"api_key": key})).await;
    assert_eq!((s, a["subject"].as_str(), a["allowed"].as_bool()), (200, Some("acme"), Some(true)), "{a}");
    // Last use is written within about a second.
    let mut last_used = Value::Null;
    for _ in 0..50 {
        let (_, _, k) = call("GET", &format!("{url}/{id}"), Some(ADMIN), None).await;
        last_used = k["last_used_at"].clone();
        if last_used.is_string() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(last_used.is_string(), "last use was not recorded");
    let (s, _, listed) = call("GET", &url, Some(ADMIN), None).await;
    assert_eq!(s, 200);
    assert!(!listed.to_string().contains(&key), "the key is shown once, at creation");

    let (s, _, revoked) = call("DELETE", &format!("{url}/{id}"), Some(ADMIN), None).await;
    assert_eq!(s, 200, "{revoked}");
    let (s, _, err) = check(&t, json!({"api_key": key})).await;
    assert_eq!((s, err["field"].as_str()), (403, Some("api_key")), "{err}");
    // A second API instance, which did not make the change, refuses it too.
    let mut t = t;
    let other = format!("http://127.0.0.1:{}", support::free_port());
    t.spawn_env("api", &[("TALLY_API_LISTEN", other.trim_start_matches("http://").to_string()), ("TALLY_READ_TOKEN", READ.to_string())]);
    let ok = support::wait_for(Duration::from_secs(30), || async {
        http().get(format!("{other}/healthz")).send().await.map(|r| r.status().is_success()).unwrap_or(false)
    })
    .await;
    assert!(ok, "second api did not start");
    let (s, _, _) = call("POST", &format!("{other}/v1/check"), Some(READ), Some(&json!({"api_key": key}))).await;
    assert_eq!(s, 403);
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_are_enforced_on_every_route_that_needs_one() {
    let t = start().await;
    let pool = t.pg().await;
    let versions = || async { sqlx::query_scalar::<_, i64>("SELECT count(*) FROM config_versions").fetch_one(&pool).await.unwrap() };
    let before = versions().await;
    let (s, _, doc) = call("GET", &format!("{}/openapi.json", t.api_url), None, None).await;
    assert_eq!(s, 200);
    let public = ["/healthz", "/readyz", "/metrics", "/openapi.json"];
    let mut checked = 0;
    for (path, ops) in doc["paths"].as_object().unwrap() {
        let concrete = path.replace("{subject}", "alice").replace("{name}", "free").replace("{group}", "g").replace("{id}", "x");
        for (method, op) in ops.as_object().unwrap() {
            let body = json!({"subject": "alice", "tier": "pro", "name": "gold", "rate": "1/h", "reason": "r", "created_by": "c"});
            let url = format!("{}{concrete}", t.api_url);
            let method = method.to_uppercase();
            let (none, _, err) = call(&method, &url, None, Some(&body)).await;
            if public.contains(&path.as_str()) {
                assert_ne!(none, 401, "{method} {path} is public");
                continue;
            }
            let (wrong, _, _) = call(&method, &url, Some("wrong-token-wrong-token"), Some(&body)).await;
            let (read, _, _) = call(&method, &url, Some(READ), Some(&body)).await;
            assert_eq!((none, wrong), (401, 401), "{method} {path}");
            assert_eq!(err["field"], "authorization");
            let admin_only = op["security"][0].get("admin").is_some();
            assert_eq!(read == 401, admin_only, "{method} {path}: read token");
            checked += 1;
        }
    }
    assert!(checked >= 30, "only {checked} routes checked");
    assert_eq!(versions().await, before, "refused requests changed nothing");
    // Ingest: no token, no usage.
    let event = json!({"id": "tok-1", "subject": "alice", "time": Utc::now().to_rfc3339(), "input_tokens": 1});
    let (s, _, _) = call("POST", &format!("{}/v1/events", t.ingest_url), None, Some(&event)).await;
    assert_eq!(s, 401);
    let (s, _, _) = call("POST", &format!("{}/v1/events", t.ingest_url), Some(READ), Some(&event)).await;
    assert_eq!(s, 401);
    let (s, _, _) = call("POST", &format!("{}/v1/events", t.ingest_url), Some(INGEST), Some(&event)).await;
    assert_eq!(s, 202);
    // Ready once the decision view caught up with its topic.
    let ready =
        support::wait_for(Duration::from_secs(30), || async { call("GET", &format!("{}/readyz", t.api_url), None, None).await.0 == 200 })
            .await;
    let (_, _, body) = call("GET", &format!("{}/readyz", t.api_url), None, None).await;
    assert!(ready, "{body}");
    assert_eq!((body["broker"].as_str(), body["postgres"].as_str()), (Some("ok"), Some("ok")));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_client_crate_sends_usage_by_http_and_kafka_and_checks_with_its_cache() {
    use tally_client::{CheckRequest, Checker, IngestClient, KafkaSender, Usage};
    let t = start().await;
    let ingest = IngestClient::new(&t.ingest_url).with_token(INGEST);
    let mut e = Usage::new("c1", "client-user", Utc::now());
    e.input_tokens = Some(60);
    assert_eq!(ingest.send(std::slice::from_ref(&e)).await.unwrap(), 1);
    // The same id again (a retry) is counted once.
    assert_eq!(ingest.send(std::slice::from_ref(&e)).await.unwrap(), 1);
    let kafka = KafkaSender::new(&t.servers.kafka, &t.usage_topic).unwrap();
    let mut k = Usage::new("c2", "client-user", Utc::now());
    k.output_tokens = Some(50);
    assert_eq!(kafka.send(&[k]).await.unwrap(), 1);

    let uncached = Checker::new(&t.api_url).with_token(READ).with_ttl(Duration::ZERO);
    let req = CheckRequest::subject("client-user");
    let mut denied = None;
    for _ in 0..300 {
        let a = uncached.check(&req).await.unwrap();
        if !a.allowed {
            denied = Some(a);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let denied = denied.expect("the subject was never denied");
    assert_eq!(denied.quota.as_ref().map(|q| q.used), Some(110), "60 (once) + 50");
    // A cached checker answers the same without asking again within its ttl.
    let cached = Checker::new(&t.api_url).with_token(READ).with_ttl(Duration::from_secs(30));
    let first = cached.check(&req).await.unwrap();
    let second = cached.check(&req).await.unwrap();
    assert_eq!((first.version, second.version), (denied.version, denied.version));
    let without_token = Checker::new(&t.api_url);
    let err = without_token.check(&req).await.unwrap_err();
    assert!(matches!(err, tally_client::Error::Status { status: 401, .. }), "{err}");
}
