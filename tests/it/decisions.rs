//! Decisions driven by usage, time and configuration: thresholds that fire once, an unblock
//! at the next minute with no traffic, an override expiring on time, and a tier upgrade
//! through `tally config apply` taking effect within a second.

use crate::support;

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use support::Tally;

fn event(id: &str, subject: &str, tokens: i64) -> Value {
    json!({"id": id, "subject": subject, "time": Utc::now().to_rfc3339(), "input_tokens": tokens})
}

fn time(v: &Value) -> DateTime<Utc> {
    v.as_str().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("not a time: {v}"))
}

async fn decision_where(t: &Tally, subject: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + timeout;
    let mut last = Value::Null;
    while std::time::Instant::now() < deadline {
        if let Some(d) = t.decision(subject).await {
            if pred(&d) {
                return d;
            }
            last = d;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no decision for {subject} matched; last: {last}; logs in {}", t.log_dir().display());
}

#[tokio::test(flavor = "multi_thread")]
async fn thresholds_of_80_and_100_percent_fire_exactly_once_across_redeliveries() {
    let tiers = support::fixtures::BASIC_1000_TOKENS;
    let mut t = Tally::start(Some(tiers)).await;
    let s = "th";
    let first = vec![event("a", s, 500), event("b", s, 350)];
    assert_eq!(t.post_events(&Value::Array(first.clone())).await.0, 202);
    decision_where(&t, s, Duration::from_secs(30), |d| d["quotas"][0]["used"] == 850).await;
    // Redeliveries of what crossed 80%, then a restart, then the same again.
    assert_eq!(t.post_events(&Value::Array(first.clone())).await.0, 202);
    t.kill("aggregator");
    t.spawn("aggregator");
    assert_eq!(t.post_events(&Value::Array(first.clone())).await.0, 202);
    assert_eq!(t.post_events(&event("c", s, 200)).await.0, 202);
    decision_where(&t, s, Duration::from_secs(60), |d| d["quotas"][0]["used"] == 1050).await;
    assert_eq!(t.post_events(&event("c", s, 200)).await.0, 202);
    assert_eq!(t.post_events(&event("d", s, 1)).await.0, 202);
    decision_where(&t, s, Duration::from_secs(30), |d| d["quotas"][0]["used"] == 1051).await;

    let snapshots = t.read_topic(&t.topic("decisions")).await;
    // The relay may publish a snapshot more than once; consumers keep one per version.
    let by_version: BTreeMap<i64, &Value> =
        snapshots.iter().filter(|(k, _)| k == s).map(|(_, v)| (v["version"].as_i64().unwrap(), v)).collect();
    let fired = |threshold: u64| {
        by_version
            .values()
            .filter(|v| v["quotas"][0]["fired"].as_array().is_some_and(|f| f.iter().any(|x| x.as_u64() == Some(threshold))))
            .count()
    };
    assert_eq!(fired(80), 1, "80% fired {} times: {by_version:?}", fired(80));
    assert_eq!(fired(100), 1, "100% fired {} times: {by_version:?}", fired(100));
    let pool = t.pg().await;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM thresholds_fired").fetch_one(&pool).await.unwrap();
    assert_eq!(rows, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_event_that_breaches_is_committed_ahead_of_its_batch_and_counted_once() {
    let tiers = "
default_tier: basic
timezone: UTC
quotas:
  - name: monthly_tokens
    metric: total_tokens
    period: month
    limit: 1000
    thresholds: [80]
tiers:
  - name: basic
    priority: 0
    rate_multiplier: 1
";
    let t = Tally::start(Some(tiers)).await;
    let s = "fast";
    let fast_commits = || t.metric(&t.aggregator_url, "tally_aggregator_fast_commits_total");
    assert_eq!(t.post_events(&event("a", s, 100)).await.0, 202);
    decision_where(&t, s, Duration::from_secs(30), |d| d["quotas"][0]["used"] == 100).await;
    assert_eq!(fast_commits().await, 0, "100 of 1000 changes no state");
    // The aggregator now knows 700 tokens may come before 80%: 2000 blow through it and the limit.
    assert_eq!(t.post_events(&event("b", s, 2000)).await.0, 202);
    let blocked = decision_where(&t, s, Duration::from_secs(30), |d| d["allowed"] == false).await;
    assert_eq!(blocked["quotas"][0]["used"], 2100);
    // The loop counts a fast commit when its task ends, which may be just after the relay
    // published it.
    let counted = support::wait_for(Duration::from_secs(10), || async { fast_commits().await >= 1 }).await;
    assert!(counted && fast_commits().await == 1, "fast commits: {}", fast_commits().await);
    // Redelivered, and followed by one more event: each is counted once.
    assert_eq!(t.post_events(&Value::Array(vec![event("b", s, 2000), event("c", s, 1)])).await.0, 202);
    let pool = t.pg().await;
    let consumed = support::wait_for(Duration::from_secs(30), || async { t.consumed(&pool).await >= 4 }).await;
    assert!(consumed, "not consumed; logs in {}", t.log_dir().display());
    assert_eq!(t.used(s, "total_tokens").await, 2101);
    let counted: i64 = sqlx::query_scalar("SELECT count(*) FROM processed_events").fetch_one(&pool).await.unwrap();
    assert_eq!(counted, 3);
    assert_eq!(t.metric(&t.aggregator_url, "tally_aggregator_events_counted_total").await, 3);
    let fired: i64 = sqlx::query_scalar("SELECT count(*) FROM thresholds_fired").fetch_one(&pool).await.unwrap();
    assert_eq!(fired, 1, "80% fired once");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_minute_window_unblocks_at_the_next_minute_with_no_traffic() {
    let tiers = "
default_tier: basic
timezone: UTC
quotas:
  - name: rpm
    metric: requests
    rate: 3/m
tiers:
  - name: basic
    priority: 0
    rate_multiplier: 1
";
    let t = Tally::start(Some(tiers)).await;
    let s = "minute";
    let batch: Vec<Value> = (0..3).map(|i| event(&format!("m{i}"), s, 1)).collect();
    assert_eq!(t.post_events(&Value::Array(batch)).await.0, 202);
    let blocked = decision_where(&t, s, Duration::from_secs(30), |d| d["allowed"] == false).await;
    let resets_at = time(&blocked["quotas"][0]["resets_at"]);
    assert_eq!(resets_at.timestamp() % 60, 0, "a minute window ends on a minute: {resets_at}");
    let unblocked = decision_where(&t, s, Duration::from_secs(75), |d| d["allowed"] == true).await;
    let at = time(&unblocked["calculated_at"]);
    assert!(at >= resets_at, "unblocked at {at}, before the window ended at {resets_at}");
    assert!(at - resets_at <= chrono::Duration::seconds(1), "unblocked at {at}, more than a second after {resets_at}");
    assert_eq!(unblocked["quotas"][0]["used"], 0);
    assert!(unblocked["version"].as_i64() > blocked["version"].as_i64());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_override_expiring_blocks_again_on_time() {
    let expires_at = (Utc::now() + chrono::Duration::seconds(8)).format("%Y-%m-%dT%H:%M:%SZ").to_string();
    let tiers = format!(
        "
default_tier: basic
timezone: UTC
quotas:
  - name: monthly_tokens
    metric: total_tokens
    period: month
    limit: 100
tiers:
  - name: basic
    priority: 0
    rate_multiplier: 1
overrides:
  - subject: lucky
    quota: monthly_tokens
    limit: 1000
    expires_at: {expires_at}
    reason: launch week
    created_by: ops@example.com
"
    );
    let t = Tally::start(Some(&tiers)).await;
    assert_eq!(t.post_events(&event("o1", "lucky", 300)).await.0, 202);
    let allowed = decision_where(&t, "lucky", Duration::from_secs(30), |d| d["quotas"][0]["used"] == 300).await;
    assert_eq!(allowed["allowed"], true, "{allowed}");
    assert_eq!(allowed["quotas"][0]["limit"], 1000);
    let blocked = decision_where(&t, "lucky", Duration::from_secs(30), |d| d["allowed"] == false).await;
    let at = time(&blocked["calculated_at"]);
    let expiry: DateTime<Utc> = expires_at.parse().unwrap();
    assert!(at >= expiry && at - expiry <= chrono::Duration::seconds(1), "blocked at {at}; the override expired at {expiry}");
    assert_eq!(blocked["quotas"][0]["limit"], 100);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tier_upgrade_through_config_apply_unblocks_within_a_second() {
    let base = support::fixtures::FREE_AND_PRO;
    let t = Tally::start(Some(base)).await;
    assert_eq!(t.post_events(&event("u1", "upgrader", 150)).await.0, 202);
    decision_where(&t, "upgrader", Duration::from_secs(30), |d| d["allowed"] == false).await;

    let upgraded = t.log_dir().join("upgraded.yaml");
    std::fs::write(&upgraded, format!("{base}\nassignments:\n  - subject: upgrader\n    tier: pro\n")).unwrap();
    let out = t.command(&["config", "apply", upgraded.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "config apply failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("is in force"));

    let d = decision_where(&t, "upgrader", Duration::from_secs(10), |d| d["allowed"] == true).await;
    assert_eq!(d["tier"], "pro");
    assert_eq!(d["quotas"][0]["limit"], 10000);
    let pool = t.pg().await;
    let applied_at: DateTime<Utc> =
        sqlx::query_scalar("SELECT applied_at FROM config_versions ORDER BY version DESC LIMIT 1").fetch_one(&pool).await.unwrap();
    let at = time(&d["calculated_at"]);
    assert!(at - applied_at <= chrono::Duration::seconds(1), "applied at {applied_at}, unblocked at {at}");

    // An invalid file changes nothing and names the problem.
    let bad = t.log_dir().join("bad.yaml");
    std::fs::write(&bad, base.replace("rate_multiplier: 100", "rate_multiplier: -1")).unwrap();
    let out = t.command(&["config", "apply", bad.to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("rate_multiplier"), "{}", String::from_utf8_lossy(&out.stderr));
    let versions: i64 = sqlx::query_scalar("SELECT count(*) FROM config_versions").fetch_one(&pool).await.unwrap();
    assert_eq!(versions, 2, "the invalid file must not be stored");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rolling_window_unblocks_when_the_breaching_usage_leaves_it() {
    let tiers = "
default_tier: basic
timezone: UTC
quotas:
  - name: daily_output
    metric: output_tokens
    period: rolling 1d
    limit: 100
tiers:
  - name: basic
    priority: 0
    rate_multiplier: 1
";
    let t = Tally::start(Some(tiers)).await;
    // A window of one day keeps its usage in one-minute buckets, which leave it a day after
    // they end. The old event is the last second of the first bucket to leave more than 7
    // seconds from now (so at most 67 seconds from now).
    let bucket_end = tally_domain::period::rolling_bucket(Utc::now() - chrono::Duration::days(1) + chrono::Duration::seconds(7), 1).end;
    let old = bucket_end - chrono::Duration::seconds(1);
    let events = json!([
        {"id": "r-old", "subject": "roller", "time": old.to_rfc3339(), "output_tokens": 80},
        {"id": "r-new", "subject": "roller", "time": Utc::now().to_rfc3339(), "output_tokens": 30},
    ]);
    assert_eq!(t.post_events(&events).await.0, 202);
    let blocked = decision_where(&t, "roller", Duration::from_secs(30), |d| d["allowed"] == false).await;
    assert_eq!(blocked["quotas"][0]["used"], 110);
    assert_eq!(blocked["quotas"][0]["period"], "rolling 1d");
    let resets_at = time(&blocked["quotas"][0]["resets_at"]);
    assert_eq!(resets_at, bucket_end + chrono::Duration::days(1), "unblock when the old usage's bucket leaves the window");

    let unblocked = decision_where(&t, "roller", Duration::from_secs(90), |d| d["allowed"] == true).await;
    let at = time(&unblocked["calculated_at"]);
    assert!(at >= resets_at && at - resets_at <= chrono::Duration::seconds(1), "unblocked at {at}, due at {resets_at}");
    assert_eq!(unblocked["quotas"][0]["used"], 30);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rolling_window_keeps_a_bounded_number_of_rows_exact_to_the_token() {
    let tiers = "
default_tier: basic
timezone: UTC
quotas:
  - name: daily_output
    metric: output_tokens
    period: rolling 1d
    limit: 1000000000
tiers:
  - name: basic
    priority: 0
    rate_multiplier: 1
";
    let t = Tally::start(Some(tiers)).await;
    // 4 000 events at distinct seconds over the last two days (well inside the lateness
    // window): those of the last day would be some 2 000 rows with one-second buckets. The
    // minute around the window start is left out, so which side of it a bucket is on does
    // not depend on when the batch is counted.
    let now = Utc::now();
    let events: Vec<(DateTime<Utc>, i64)> = (0..4_000)
        .map(|i| (now - chrono::Duration::days(2) + chrono::Duration::seconds(43 * i + 1), i % 9 + 1))
        .filter(|(at, _)| (*at - (now - chrono::Duration::days(1))).num_seconds().abs() > 120)
        .collect();
    let body: Vec<Value> = events
        .iter()
        .enumerate()
        .map(|(i, (at, tokens))| json!({"id": format!("b{i}"), "subject": "bounded", "time": at.to_rfc3339(), "output_tokens": tokens}))
        .collect();
    assert_eq!(t.post_events(&Value::Array(body)).await.0, 202);
    let in_window: i64 = events.iter().filter(|(at, _)| *at > now - chrono::Duration::days(1)).map(|(_, tokens)| tokens).sum();
    let decided = decision_where(&t, "bounded", Duration::from_secs(60), |d| d["quotas"][0]["used"] == in_window).await;
    assert_eq!(decided["quotas"][0]["period"], "rolling 1d");

    let pool = t.pg().await;
    let (rows, used, oldest_end): (i64, Option<i64>, Option<DateTime<Utc>>) = sqlx::query_as(
        "SELECT count(*), sum(used)::bigint, min(period_end) FROM ledgers WHERE subject = 'bounded' AND period = 'rolling 1d'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(rows as u64 <= tally_domain::period::ROLLING_BUCKETS_PER_WINDOW + 1, "{rows} rows for one rolling key");
    assert_eq!(used, Some(in_window), "the rows left hold exactly the usage of the window");
    assert!(oldest_end.unwrap() > now - chrono::Duration::days(1), "a row that left the window is still there: ends {oldest_end:?}");
}
