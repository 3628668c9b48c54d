//! Budgets beside each subject's own quotas, on real services: a team's pooled budget that
//! blocks all its members and unblocks them at its rollover with no traffic, an API key's
//! cap that leaves the subject's other key alone, a model's budget that degrades that model
//! only, a tier pool shared by a thousand subjects across two aggregators and a `kill -9`,
//! and the shared-bucket example (everyone on one tier shares one budget).

use crate::support;

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use support::{wait_for, Tally};
use tally_domain::budget::{BudgetOwner, OwnerKind};
use tally_domain::event::hash_api_key;

fn budget_subject(kind: OwnerKind, name: &str) -> String {
    BudgetOwner::new(kind, name).ledger_subject()
}

fn time(v: &Value) -> DateTime<Utc> {
    v.as_str().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("not a time: {v}"))
}

/// Every snapshot on the decisions topic, newest version per key.
async fn latest_snapshots(t: &Tally) -> BTreeMap<String, Value> {
    let mut latest: BTreeMap<String, Value> = BTreeMap::new();
    for (key, value) in t.read_topic(&t.topic("decisions")).await {
        let newer = latest.get(&key).is_none_or(|seen| seen["version"].as_i64() < value["version"].as_i64());
        if newer && value.get("version").is_some() {
            latest.insert(key, value);
        }
    }
    latest
}

/// The newest snapshot of `subject` on the decisions topic once it matches `pred`.
async fn snapshot_where(t: &Tally, subject: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + timeout;
    let mut last = Value::Null;
    while std::time::Instant::now() < deadline {
        if let Some(s) = latest_snapshots(t).await.remove(subject) {
            if pred(&s) {
                return s;
            }
            last = s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no snapshot of {subject} matched; last: {last}; logs in {}", t.log_dir().display());
}

/// Sleeps until `window` seconds of a fixed UTC window have at least `room` seconds left.
async fn at_start_of_window(window: i64, room: i64) {
    loop {
        let into = Utc::now().timestamp() % window;
        if window - into >= room {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `POST /v1/check` with `body`: the answer and the header naming the deciding budget.
async fn check(t: &Tally, body: Value) -> (Value, Option<String>) {
    let response = reqwest::Client::new().post(format!("{}/v1/check", t.api_url)).json(&body).send().await.unwrap();
    assert_eq!(response.status(), 200, "{body}");
    let budget = response.headers().get("x-tally-budget").and_then(|v| v.to_str().ok()).map(str::to_string);
    (response.json().await.unwrap(), budget)
}

/// Polls the check until `pred` holds; returns that answer.
async fn check_until(t: &Tally, body: Value, timeout: Duration, pred: impl Fn(&Value) -> bool) -> (Value, Option<String>) {
    let deadline = std::time::Instant::now() + timeout;
    let mut last = Value::Null;
    while std::time::Instant::now() < deadline {
        let (answer, budget) = check(t, body.clone()).await;
        if pred(&answer) {
            return (answer, budget);
        }
        last = answer;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no check answer for {body} matched; last: {last}; logs in {}", t.log_dir().display());
}

async fn ledger_used(pool: &sqlx::PgPool, subject: &str, scope: &str) -> i64 {
    sqlx::query_scalar("SELECT coalesce(sum(used), 0)::bigint FROM ledgers WHERE subject = $1 AND scope = $2")
        .bind(subject)
        .bind(scope)
        .fetch_one(pool)
        .await
        .unwrap()
}

const TEAM: &str = "
default_tier: free
timezone: UTC
quotas:
  - name: monthly_tokens
    metric: total_tokens
    period: month
    limit: 1000000
tiers:
  - name: free
members:
  alice: [eng]
  bob: [eng]
  carol: [eng]
budgets:
  - group: eng
    quotas:
      - name: team_window
        metric: total_tokens
        rate: 1000/20s
        thresholds: [50]
";

#[tokio::test(flavor = "multi_thread")]
async fn a_team_over_its_budget_is_blocked_as_one_and_unblocked_by_its_rollover() {
    let t = Tally::start(Some(TEAM)).await;
    let team = budget_subject(OwnerKind::Group, "eng");
    at_start_of_window(20, 12).await;
    let now = Utc::now().to_rfc3339();
    let e = |id: &str, subject: &str, tokens: i64| json!({"id": id, "subject": subject, "time": now, "input_tokens": tokens});
    assert_eq!(t.post_events(&json!([e("a1", "alice", 400), e("b1", "bob", 400)])).await.0, 202);
    let warned = snapshot_where(&t, &team, Duration::from_secs(10), |s| s["quotas"][0]["used"] == 800).await;
    assert_eq!(warned["allowed"], true, "{warned}");
    assert_eq!(warned["budget"], json!({"kind": "group", "name": "eng"}));
    // carol's event crosses the team's budget: the team's decision blocks, naming the budget.
    let sent = Utc::now();
    assert_eq!(t.post_events(&e("c1", "carol", 300)).await.0, 202);
    let blocked = snapshot_where(&t, &team, Duration::from_secs(10), |s| s["allowed"] == false).await;
    let decided = time(&blocked["calculated_at"]) - sent;
    assert!(decided <= chrono::Duration::seconds(1), "the team was blocked {decided} after the event was sent");
    assert_eq!(blocked["quotas"][0]["used"], 1100);
    assert_eq!(blocked["quotas"][0]["state"], "breached");
    // Each member's own quota is far from its limit: only the team blocks them, and the
    // check says so for each of them.
    for member in ["alice", "bob", "carol"] {
        let own = snapshot_where(&t, member, Duration::from_secs(10), |_| true).await;
        assert_eq!(own["allowed"], true, "{member}: {own}");
        let (answer, header) = check_until(&t, json!({"subject": member}), Duration::from_secs(5), |a| a["allowed"] == false).await;
        assert_eq!(answer["quota"]["budget"], json!({"kind": "group", "name": "eng"}), "{member}: {answer}");
        assert_eq!(header.as_deref(), Some("group eng"));
    }
    let (outsider, _) = check(&t, json!({"subject": "dan"})).await;
    assert_eq!(outsider["allowed"], true, "a subject outside the team: {outsider}");
    // The team's window rolls over: unblocked with no traffic, within a second.
    let resets_at = time(&blocked["quotas"][0]["resets_at"]);
    let unblocked = snapshot_where(&t, &team, Duration::from_secs(40), |s| s["allowed"] == true && s["quotas"][0]["used"] == 0).await;
    let at = time(&unblocked["calculated_at"]);
    assert!(at >= resets_at && at - resets_at <= chrono::Duration::seconds(1), "unblocked at {at}; the window ended at {resets_at}");
    for member in ["alice", "bob", "carol"] {
        let (answer, _) = check_until(&t, json!({"subject": member}), Duration::from_secs(5), |a| a["allowed"] == true).await;
        assert_eq!(answer["reason"], "ok", "{member}: {answer}");
    }
    // Counted once each, in the members' rows and in the team's.
    let pool = t.pg().await;
    assert_eq!(ledger_used(&pool, &team, "*").await, 1100);
    assert_eq!(t.used("carol", "total_tokens").await, 300);
    // The 50% threshold fired once for the team and period.
    let fired: i64 =
        sqlx::query_scalar("SELECT count(*) FROM thresholds_fired WHERE subject = $1").bind(&team).fetch_one(&pool).await.unwrap();
    assert_eq!(fired, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_over_its_cap_is_blocked_while_the_subjects_other_key_is_not_counted_in_it() {
    let (capped, other) = (hash_api_key("sk-capped"), hash_api_key("sk-other"));
    let tiers = format!(
        "
default_tier: free
timezone: UTC
quotas:
  - {{name: monthly_tokens, metric: total_tokens, period: month, limit: 1000000}}
tiers:
  - name: free
api_keys:
  - {{key_sha256: {capped}, tier: free, subject: dave}}
  - {{key_sha256: {other}, tier: free, subject: dave}}
budgets:
  - api_key: {capped}
    quotas:
      - {{name: key_day, metric: total_tokens, period: day, limit: 100}}
"
    );
    let t = Tally::start(Some(&tiers)).await;
    let now = Utc::now().to_rfc3339();
    let e = |id: &str, key: &str, tokens: i64| json!({"id": id, "subject": "dave", "time": now, "input_tokens": tokens, "api_key": key});
    assert_eq!(t.post_events(&json!([e("k1", "sk-capped", 60), e("k2", "sk-other", 500), e("k3", "sk-capped", 50)])).await.0, 202);
    let key_budget = budget_subject(OwnerKind::ApiKey, &capped);
    let blocked = snapshot_where(&t, &key_budget, Duration::from_secs(20), |s| s["allowed"] == false).await;
    assert_eq!(blocked["quotas"][0]["used"], 110, "only the capped key's events count in its budget");
    let own = snapshot_where(&t, "dave", Duration::from_secs(10), |s| s["quotas"][0]["used"] == 610).await;
    assert_eq!(own["allowed"], true);
    let snapshots = latest_snapshots(&t).await;
    assert!(!snapshots.contains_key(&budget_subject(OwnerKind::ApiKey, &other)), "the other key has no budget");
    let (denied, header) = check_until(&t, json!({"api_key": "sk-capped"}), Duration::from_secs(5), |a| a["allowed"] == false).await;
    assert_eq!(denied["quota"]["budget"]["kind"], "api_key", "{denied}");
    assert_eq!(header, Some(format!("api_key {capped}")));
    let (allowed, _) = check(&t, json!({"api_key": "sk-other"})).await;
    assert_eq!((allowed["allowed"].clone(), allowed["subject"].clone()), (json!(true), json!("dave")), "{allowed}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_models_budget_breaches_for_that_model_only_and_names_the_fallback() {
    let tiers = "
default_tier: free
timezone: UTC
quotas:
  - {name: daily_tokens, metric: total_tokens, period: day, limit: 1000000}
  - name: gpt4o_daily
    metric: total_tokens
    period: day
    limit: 500
    models: [gpt-4o]
    action: degrade
    fallback_model: gpt-4o-mini
tiers:
  - name: free
";
    let t = Tally::start(Some(tiers)).await;
    let now = Utc::now().to_rfc3339();
    let e = |id: &str, model: &str, tokens: i64| json!({"id": id, "subject": "erin", "time": now, "input_tokens": tokens, "model": model});
    assert_eq!(t.post_events(&json!([e("m1", "gpt-4o", 450), e("m2", "gpt-4o-mini", 5000), e("m3", "gpt-4o", 100)])).await.0, 202);
    let d = snapshot_where(&t, "erin", Duration::from_secs(20), |s| s["quotas"][1]["state"] == "breached").await;
    assert_eq!(d["quotas"][1]["models"], json!(["gpt-4o"]));
    assert_eq!(d["quotas"][1]["used"], 550, "only gpt-4o counts in its budget");
    assert_eq!(d["quotas"][1]["action"], json!({"type": "degrade", "fallback_model": "gpt-4o-mini"}));
    assert_eq!(d["quotas"][0]["used"], 5550, "every model counts in the unnarrowed quota");
    assert_eq!(d["allowed"], true, "a degrade breach refuses nothing");
    let (degraded, _) =
        check_until(&t, json!({"subject": "erin", "model": "gpt-4o"}), Duration::from_secs(5), |a| a["reason"] == "degraded").await;
    assert_eq!((degraded["allowed"].clone(), degraded["model"].clone()), (json!(true), json!("gpt-4o-mini")), "{degraded}");
    let (other_model, _) = check(&t, json!({"subject": "erin", "model": "gpt-4o-mini"})).await;
    assert_eq!((other_model["reason"].clone(), other_model["model"].clone()), (json!("ok"), json!("gpt-4o-mini")), "{other_model}");
    let pool = t.pg().await;
    assert_eq!(ledger_used(&pool, "erin", "*|models=gpt-4o").await, 550);
    assert_eq!(ledger_used(&pool, "erin", "*").await, 5550);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_event_naming_a_group_counts_in_its_budget_and_an_unknown_group_is_quarantined() {
    let tiers = "
default_tier: free
timezone: UTC
quotas:
  - {name: monthly_tokens, metric: total_tokens, period: month, limit: 1000000}
tiers:
  - name: free
budgets:
  - group: acme
    quotas: [{name: org_month, metric: total_tokens, period: month, limit: 1000000}]
";
    let t = Tally::start(Some(tiers)).await;
    let now = Utc::now().to_rfc3339();
    let events = json!([
        {"id": "g1", "subject": "u1", "time": now, "input_tokens": 7, "group": "acme"},
        {"id": "g2", "subject": "u2", "time": now, "input_tokens": 11, "org": "acme"},
        {"id": "g3", "subject": "u3", "time": now, "input_tokens": 13, "group": "nobody"},
        {"id": "g4", "subject": "u4", "time": now, "input_tokens": 17},
    ]);
    assert_eq!(t.post_events(&events).await.0, 202);
    let pool = t.pg().await;
    assert!(wait_for(Duration::from_secs(30), || async { t.consumed(&pool).await >= 4 }).await);
    assert_eq!(ledger_used(&pool, &budget_subject(OwnerKind::Group, "acme"), "*").await, 18);
    assert_eq!(ledger_used(&pool, "u3", "*").await, 0, "the unknown group's event is not counted at all");
    assert_eq!(ledger_used(&pool, "u4", "*").await, 17);
    let quarantined = t.read_topic(&t.topic("quarantine")).await;
    let reasons: Vec<&str> = quarantined.iter().filter_map(|(_, v)| v["reason"].as_str()).collect();
    assert_eq!(reasons.len(), 1, "{quarantined:?}");
    assert!(reasons[0].starts_with("unknown group: group \"nobody\""), "{reasons:?}");
    // A correction reverts the group's row too: the group came with the event, and its
    // dedupe record kept it. Sent twice, it reverts once.
    let correction = json!({"id": "fix-g1", "subject": "u1", "time": Utc::now().to_rfc3339(), "corrects": "g1"});
    assert_eq!(t.post_events(&json!([correction, correction])).await.0, 202);
    assert!(wait_for(Duration::from_secs(30), || async { t.consumed(&pool).await >= 6 }).await);
    assert_eq!(ledger_used(&pool, &budget_subject(OwnerKind::Group, "acme"), "*").await, 11);
    assert_eq!(ledger_used(&pool, "u1", "*").await, 0);
}

/// Sends `events` through ingest in requests of 200, each request twice when `twice`.
async fn post_all(t: &Tally, events: &[Value], twice: bool) {
    for chunk in events.chunks(200) {
        let body = Value::Array(chunk.to_vec());
        assert_eq!(t.post_events(&body).await.0, 202);
        if twice {
            assert_eq!(t.post_events(&body).await.0, 202);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tier_pool_shared_by_a_thousand_subjects_is_exact_across_two_aggregators_and_a_kill() {
    let tiers = "
default_tier: free
timezone: UTC
quotas:
  - {name: monthly_tokens, metric: total_tokens, period: month, limit: 1000000000}
tiers:
  - name: free
budgets:
  - tier: free
    quotas:
      - {name: pool_month, metric: total_tokens, period: month, limit: 1000000000000}
      - {name: pool_requests, metric: requests, period: day, limit: 1000000000}
";
    let mut t = Tally::start(Some(tiers)).await;
    let first = t.pids("aggregator")[0];
    t.spawn_aggregator();
    let now = Utc::now();
    let mut expected_tokens = 0i64;
    let events: Vec<Value> = (0..6000)
        .map(|i| {
            let tokens = 1 + (i * 7919) % 997;
            expected_tokens += tokens;
            let time = (now - chrono::Duration::milliseconds(i)).to_rfc3339();
            json!({"id": format!("p{i}"), "subject": format!("s{}", i % 1000), "time": time, "input_tokens": tokens})
        })
        .collect();
    let (head, tail) = events.split_at(3000);
    post_all(&t, head, true).await;
    // One instance dies without a goodbye while the pool is being counted by both.
    t.kill_pid(first);
    post_all(&t, tail, false).await;
    post_all(&t, &events[2500..3500], false).await;
    let pool = t.pg().await;
    let all_in = wait_for(Duration::from_secs(120), || async {
        let counted: i64 = sqlx::query_scalar("SELECT count(*) FROM processed_events").fetch_one(&pool).await.unwrap();
        counted >= 6000
    })
    .await;
    assert!(all_in, "not all counted; logs in {}", t.log_dir().display());
    let pool_subject = budget_subject(OwnerKind::Tier, "free");
    let settled = wait_for(Duration::from_secs(30), || async {
        let consumed: i64 = sqlx::query_scalar("SELECT count(*) FROM processed_events").fetch_one(&pool).await.unwrap();
        consumed == 6000 && ledger_used(&pool, &pool_subject, "*").await >= expected_tokens
    })
    .await;
    assert!(settled, "logs in {}", t.log_dir().display());
    let metric_used = |metric: &'static str| {
        let pool = pool.clone();
        let subject = pool_subject.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT coalesce(sum(used), 0)::bigint FROM ledgers WHERE subject = $1 AND metric = $2")
                .bind(subject)
                .bind(metric)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    assert_eq!(metric_used("total_tokens").await, expected_tokens, "the pool equals the sum over distinct events to the token");
    assert_eq!(metric_used("requests").await, 6000);
    let members: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(used), 0)::bigint FROM ledgers WHERE subject NOT LIKE '\\_\\_tally\\_budget\\_\\_/%' AND metric = 'total_tokens'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(members, expected_tokens, "and so does the sum of the subjects' own ledgers");
    let partitions: i64 =
        sqlx::query_scalar("SELECT count(DISTINCT partition) FROM consumer_offsets WHERE group_id = $1 AND next_offset > 0")
            .bind(&t.group)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(partitions > 1, "the pool's events came through {partitions} partition(s)");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_shared_bucket_example_lets_everyone_on_a_tier_share_one_budget() {
    let example = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/shared-bucket.yaml")).unwrap();
    let t = Tally::start(Some(&example)).await;
    let pool_subject = budget_subject(OwnerKind::Tier, "free");
    at_start_of_window(60, 20).await;
    let now = Utc::now().to_rfc3339();
    // Ten requests a minute for the whole free tier: three users make four, three and three.
    let users = ["ann", "ben", "cat"];
    let events: Vec<Value> = (0..10).map(|i| json!({"id": format!("r{i}"), "subject": users[i % 3], "time": now})).collect();
    assert_eq!(t.post_events(&Value::Array(events[..9].to_vec())).await.0, 202);
    let nine = snapshot_where(&t, &pool_subject, Duration::from_secs(20), |s| s["quotas"][0]["used"] == 9).await;
    assert_eq!(nine["allowed"], true);
    assert_eq!(t.post_events(&events[9]).await.0, 202);
    let blocked = snapshot_where(&t, &pool_subject, Duration::from_secs(20), |s| s["allowed"] == false).await;
    assert_eq!(blocked["quotas"][0]["used"], 10);
    assert_eq!(blocked["tier"], "free");
    for user in ["ann", "ben", "cat", "dora"] {
        let (answer, header) = check_until(&t, json!({"subject": user}), Duration::from_secs(5), |a| a["allowed"] == false).await;
        assert_eq!(header.as_deref(), Some("tier free"), "{user}: {answer}");
    }
    let (pro, _) = check(&t, json!({"subject": "paula"})).await;
    assert_eq!(pro["allowed"], true, "paula is on pro, outside the free pool: {pro}");
}
