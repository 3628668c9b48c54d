//! Usage history in ClickHouse, black box: the history writer converges to exactly the
//! events the ledger counted after replays, crashes and a ClickHouse outage; reconciliation
//! finds injected drift; the billing export matches the ledger.

use crate::support;

use std::time::Duration;

use chrono::{DateTime, Datelike, Duration as Span, TimeZone, Utc};
use futures::FutureExt;
use serde_json::{json, Value};
use support::{free_port, wait_for, Tally, TcpSwitch};
use tally_domain::event::hash_api_key;

const TIERS: &str = "
default_tier: basic
timezone: UTC
quotas:
  - name: monthly_tokens
    metric: total_tokens
    period: month
    limit: 100000000
  - name: monthly_requests
    metric: requests
    period: month
    limit: 100000000
tiers:
  - name: basic
    priority: 0
    rate_multiplier: 1
prices:
  small: {input: 150000, output: 600000}
  big: {input: 2500000, output: 10000000, cached: 1250000}
";

fn event(id: &str, subject: &str, time: DateTime<Utc>, input: i64, output: i64, model: &str) -> Value {
    json!({"id": id, "subject": subject, "time": time.to_rfc3339(), "scope": "chat",
           "input_tokens": input, "output_tokens": output, "model": model})
}

/// `n` events for `subjects`, spread over the last hours (so they fall in several hourly buckets).
fn batch(t: &Tally, prefix: &str, n: usize, now: DateTime<Utc>) -> Vec<Value> {
    (0..n)
        .map(|i| {
            let subject = format!("s{}-{}", i % 3, t.id);
            let time = now - Span::minutes((i % 5) as i64 * 37 + 1);
            let model = if i % 2 == 0 { "small" } else { "big" };
            event(&format!("{prefix}-{i}-{}", t.id), &subject, time, 10 + i as i64, 1 + (i % 7) as i64, model)
        })
        .collect()
}

async fn post_all(t: &Tally, events: &[Value]) {
    for chunk in events.chunks(100) {
        let (status, body) = t.post_events(&Value::Array(chunk.to_vec())).await;
        assert_eq!(status, 202, "ingest refused: {body}");
    }
}

async fn offsets_sum(pool: &sqlx::PgPool, table: &str, group: &str) -> i64 {
    sqlx::query_scalar::<_, Option<i64>>(&format!("SELECT sum(next_offset)::bigint FROM {table} WHERE group_id = $1"))
        .bind(group)
        .fetch_one(pool)
        .await
        .expect("read offsets")
        .unwrap_or(0)
}

/// Waits until the ledger consumed `messages` messages and history caught up with it.
async fn wait_converged(t: &Tally, pool: &sqlx::PgPool, messages: i64) {
    let ok = wait_for(Duration::from_secs(120), || async {
        let ledger = offsets_sum(pool, "consumer_offsets", &t.group).await;
        let history = offsets_sum(pool, "history_offsets", &t.history_group()).await;
        ledger == messages && history == messages
    })
    .await;
    assert!(ok, "ledger and history did not both reach {messages} messages; logs in {}", t.log_dir().display());
}

async fn accepted_events(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM processed_events").fetch_one(pool).await.expect("count processed_events")
}

/// The integrity properties of history: no duplicate raw row (physically, and under FINAL),
/// exactly `expected` events, and rollups equal to the raw sums bucket by bucket.
async fn assert_history_exact(t: &Tally, expected: i64) {
    let db = t.clickhouse_database();
    let final_rows = t.clickhouse_i64(&format!("SELECT count() FROM `{db}`.usage_events FINAL")).await;
    // An event is its id and UTC day, as the ledger's dedupe record keys it.
    let distinct = t.clickhouse_i64(&format!("SELECT uniqExact(event_id, event_day) FROM `{db}`.usage_events")).await;
    let physical = t.clickhouse_i64(&format!("SELECT count() FROM `{db}`.usage_events")).await;
    assert_eq!((final_rows, distinct, physical), (expected, expected, expected), "raw rows (FINAL, distinct ids, physical)");
    let sums = "sum(requests), sum(input_tokens), sum(output_tokens), sum(cached_tokens), sum(cost_micros)";
    let raw_hourly = t
        .clickhouse(&format!(
            "SELECT subject, toStartOfHour(time) AS h, scope, model, count(), {sums} FROM `{db}`.usage_events FINAL \
             GROUP BY subject, h, scope, model ORDER BY subject, h, scope, model"
        ))
        .await;
    let hourly = t
        .clickhouse(&format!(
            "SELECT subject, hour, scope, model, sum(events), {sums} FROM `{db}`.usage_hourly FINAL \
             GROUP BY subject, hour, scope, model ORDER BY subject, hour, scope, model"
        ))
        .await;
    assert!(!raw_hourly.trim().is_empty(), "no history at all");
    assert_eq!(hourly, raw_hourly, "hourly rollup differs from the raw rows");
    let raw_daily = t
        .clickhouse(&format!(
            "SELECT subject, toStartOfDay(time) AS d, scope, model, count(), {sums} FROM `{db}`.usage_events FINAL \
             GROUP BY subject, d, scope, model ORDER BY subject, d, scope, model"
        ))
        .await;
    let daily = t
        .clickhouse(&format!(
            "SELECT subject, day, scope, model, sum(events), {sums} FROM `{db}`.usage_daily FINAL \
             GROUP BY subject, day, scope, model ORDER BY subject, day, scope, model"
        ))
        .await;
    assert_eq!(daily, raw_daily, "daily rollup differs from the raw rows");
    let raw_totals = t
        .clickhouse(&format!(
            "SELECT subject, toStartOfDay(time) AS d, count(), {sums} FROM `{db}`.usage_events FINAL \
             GROUP BY subject, d ORDER BY subject, d"
        ))
        .await;
    let totals = t
        .clickhouse(&format!(
            "SELECT subject, day, sum(events), {sums} FROM `{db}`.usage_subject_daily FINAL \
             GROUP BY subject, day ORDER BY subject, day"
        ))
        .await;
    assert_eq!(totals, raw_totals, "daily totals per subject differ from the raw rows");
    // A rollup key holds exactly one row under FINAL.
    let dup_keys = t
        .clickhouse_i64(&format!(
            "SELECT count() FROM (SELECT subject, hour, scope, model, count() AS n FROM `{db}`.usage_hourly FINAL \
             GROUP BY subject, hour, scope, model HAVING n > 1)"
        ))
        .await;
    assert_eq!(dup_keys, 0);
}

/// The ledger's total tokens per subject (all scopes, every period); never empty.
async fn ledger_tokens_per_subject(pool: &sqlx::PgPool) -> Vec<(String, i64)> {
    let ledger: Vec<(String, i64)> = sqlx::query_as(
        "SELECT subject, sum(used)::bigint FROM ledgers WHERE metric = 'total_tokens' AND scope = '*' GROUP BY subject ORDER BY subject",
    )
    .fetch_all(pool)
    .await
    .expect("read ledgers");
    assert!(!ledger.is_empty());
    ledger
}

/// Ledger total of `metric` per subject (all scopes) vs the sum of the same metric in history.
async fn assert_history_matches_ledger(t: &Tally, pool: &sqlx::PgPool) {
    let ledger = ledger_tokens_per_subject(pool).await;
    for (subject, used) in ledger {
        let history = t
            .clickhouse_i64(&format!(
                "SELECT sum(input_tokens + output_tokens) FROM `{}`.usage_events FINAL WHERE subject = '{subject}'",
                t.clickhouse_database()
            ))
            .await;
        assert_eq!(history, used, "history vs ledger for {subject}");
    }
}

/// `GET /v1/history/top` over whole UTC days around now (so it reads the daily tables), without
/// and with a scope filter (all test events are `chat`): each subject's total tokens equal the
/// ledger's, to the token, and no other subject appears.
async fn assert_top_matches_ledger(t: &Tally, pool: &sqlx::PgPool) {
    let ledger = ledger_tokens_per_subject(pool).await;
    let today = Utc::now().date_naive();
    let (from, to) = (today - Span::days(2), today + Span::days(1));
    for filter in ["", "&scope=chat"] {
        let url = format!("{}/v1/history/top?metric=total_tokens&from={from}&to={to}&limit=1000{filter}", t.api_url);
        let (status, body) = t.get(&url).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["source"], "daily", "{body}");
        let mut top: Vec<(String, i64)> = body["subjects"]
            .as_array()
            .expect("subjects")
            .iter()
            .map(|s| (s["subject"].as_str().unwrap().to_string(), s["value"].as_i64().unwrap()))
            .collect();
        top.sort();
        assert_eq!(top, ledger, "top subjects{filter} vs ledger");
    }
}

/// Adds, beside every current row of the daily rollup and the daily totals, a stale row of an
/// older version with other amounts: what a bucket's earlier write leaves until a background
/// merge removes it. Readers must not count it.
async fn inject_stale_bucket_versions(t: &Tally) {
    let db = t.clickhouse_database();
    let older = "toUInt64(greatest(version, 2) - 1)";
    t.clickhouse(&format!(
        "INSERT INTO `{db}`.usage_daily SELECT day, subject, scope, model, events + 1, requests + 1, input_tokens + 1000000, \
         output_tokens + 7, cached_tokens, cost_micros, {older} FROM `{db}`.usage_daily FINAL"
    ))
    .await;
    t.clickhouse(&format!(
        "INSERT INTO `{db}`.usage_subject_daily SELECT day, subject, events + 1, requests + 1, input_tokens + 1000000, \
         output_tokens + 7, cached_tokens, cost_micros, {older} FROM `{db}`.usage_subject_daily FINAL"
    ))
    .await;
    let stale = t.clickhouse_i64(&format!("SELECT count() FROM `{db}`.usage_subject_daily WHERE input_tokens >= 1000000")).await;
    assert!(stale > 0, "no stale row was injected");
}

fn month_name(t: DateTime<Utc>) -> String {
    format!("{:04}-{:02}", t.year(), t.month())
}

fn reconcile(t: &Tally, period: &str) -> (i32, String) {
    let out = t.command(&["reconcile", "--period", period]).output().expect("run tally reconcile");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_replayed_twice_leaves_no_duplicates_in_raw_rows_or_rollups() {
    let mut t = Tally::start(Some(TIERS)).await;
    let pool = t.pg().await;
    t.spawn_history_writer(&[]);
    let events = batch(&t, "r", 120, Utc::now());
    post_all(&t, &events).await;
    // The same batch again (a gateway retry), and one id again with another payload: the
    // ledger counts the first, quarantines the conflict, and history must do the same.
    post_all(&t, &events).await;
    let mut conflict = events[0].clone();
    conflict["input_tokens"] = json!(999_999);
    post_all(&t, &[conflict]).await;
    wait_converged(&t, &pool, 241).await;
    assert_eq!(accepted_events(&pool).await, 120);
    assert_history_exact(&t, 120).await;
    assert_history_matches_ledger(&t, &pool).await;
    let first = t
        .clickhouse_i64(&format!(
            "SELECT input_tokens FROM `{}`.usage_events FINAL WHERE event_id = 'r-0-{}'",
            t.clickhouse_database(),
            t.id
        ))
        .await;
    assert_eq!(first, 10, "the conflicting payload reached history");

    // Replay the whole topic into history: forget the writer's progress and start it again.
    t.kill("history-writer");
    sqlx::query("DELETE FROM history_offsets").execute(&pool).await.expect("reset history offsets");
    let url = t.spawn_history_writer(&[]);
    wait_converged(&t, &pool, 241).await;
    let replayed = t.metric(&url, "tally_history_events_replayed_total").await;
    assert!(replayed >= 120, "the writer did not replay the batch (replayed {replayed})");
    assert_eq!(t.metric(&url, "tally_history_events_written_total").await, 0);
    assert_history_exact(&t, 120).await;
    assert_history_matches_ledger(&t, &pool).await;
    assert_top_matches_ledger(&t, &pool).await;
    let (code, out) = reconcile(&t, &month_name(Utc::now()));
    assert_eq!(code, 0, "reconcile found drift:\n{out}");
    // The replay rewrote every bucket with a higher version; whether or not ClickHouse has
    // merged the older rows away yet, top-N counts each bucket once.
    inject_stale_bucket_versions(&t).await;
    assert_top_matches_ledger(&t, &pool).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_writer_killed_mid_batch_and_restarted_converges_exactly() {
    let mut t = Tally::start(Some(TIERS)).await;
    let pool = t.pg().await;
    let first = batch(&t, "k1", 150, Utc::now());
    post_all(&t, &first).await;

    // Crash right after the raw insert, before rollups and progress.
    t.spawn_history_writer(&[("TALLY_HISTORY_FAILPOINT", "after-raw-insert".to_string())]);
    let crashed = wait_for(Duration::from_secs(90), || async {
        t.clickhouse_i64(&format!("SELECT count() FROM `{}`.usage_events", t.clickhouse_database())).await > 0
    })
    .await;
    assert!(crashed, "the writer never inserted; logs in {}", t.log_dir().display());
    assert!(
        wait_for(Duration::from_secs(30), || std::future::ready(t.running("history-writer") == 0)).await,
        "failpoint did not abort the writer"
    );
    assert_eq!(offsets_sum(&pool, "history_offsets", &t.history_group()).await, 0, "progress advanced before the rollups");
    t.kill("history-writer");

    // Crash after the rollups, before progress: the restarted writer replays the batch.
    t.spawn_history_writer(&[("TALLY_HISTORY_FAILPOINT", "after-rollups".to_string())]);
    assert!(
        wait_for(Duration::from_secs(90), || std::future::ready(t.running("history-writer") == 0)).await,
        "failpoint did not abort the writer"
    );
    t.kill("history-writer");

    // A plain SIGKILL while events keep flowing, then a final restart.
    t.spawn_history_writer(&[]);
    let second = batch(&t, "k2", 300, Utc::now());
    for chunk in second.chunks(50) {
        post_all(&t, chunk).await;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    t.kill("history-writer");
    // The killed writer still heartbeats in nobody's name: once its lease ends, the restarted
    // writer owns every partition (the default 4), without any Kafka group rebalance.
    let url = t.spawn_history_writer(&[]);
    let listening =
        wait_for(Duration::from_secs(30), || tokio::net::TcpStream::connect(url.trim_start_matches("http://")).map(|c| c.is_ok())).await;
    assert!(listening, "the restarted writer never served /metrics; logs in {}", t.log_dir().display());
    let owns_all = wait_for(Duration::from_secs(60), || async { t.metric(&url, "tally_history_owned_partitions").await == 4 }).await;
    assert!(owns_all, "the restarted writer never owned every partition; logs in {}", t.log_dir().display());
    wait_converged(&t, &pool, 450).await;
    assert_eq!(accepted_events(&pool).await, 450);
    assert_history_exact(&t, 450).await;
    assert_history_matches_ledger(&t, &pool).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn clickhouse_outage_never_stalls_the_ledger_and_history_catches_up() {
    let mut t = Tally::start(Some(TIERS)).await;
    let pool = t.pg().await;
    let upstream = t.servers.clickhouse.trim_start_matches("http://").trim_end_matches('/').to_string();
    let switch = TcpSwitch::start(upstream).await;
    let url = t.spawn_history_writer(&[("TALLY_CLICKHOUSE_URL", format!("http://127.0.0.1:{}", switch.port))]);
    let first = batch(&t, "o1", 60, Utc::now());
    post_all(&t, &first).await;
    wait_converged(&t, &pool, 60).await;

    // ClickHouse goes away while events keep flowing: the ledger keeps counting.
    switch.set(false);
    let second = batch(&t, "o2", 200, Utc::now());
    for chunk in second.chunks(40) {
        post_all(&t, chunk).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ledger_done = wait_for(Duration::from_secs(60), || async { offsets_sum(&pool, "consumer_offsets", &t.group).await == 260 }).await;
    assert!(ledger_done, "the ledger stalled while ClickHouse was down");
    assert_eq!(accepted_events(&pool).await, 260);
    let failing = wait_for(Duration::from_secs(30), || async { t.metric(&url, "tally_history_batch_failures_total").await > 0 }).await;
    assert!(failing, "the writer never noticed the outage");
    assert!(offsets_sum(&pool, "history_offsets", &t.history_group()).await < 260, "history advanced without ClickHouse");
    let written_during = t.clickhouse_i64(&format!("SELECT count() FROM `{}`.usage_events FINAL", t.clickhouse_database())).await;
    assert!(written_during < 260);

    // ClickHouse is back: the same writer process catches up with nothing lost.
    switch.set(true);
    wait_converged(&t, &pool, 260).await;
    assert_history_exact(&t, 260).await;
    assert_history_matches_ledger(&t, &pool).await;
    assert_eq!(t.running("history-writer"), 1, "the writer died during the outage");

    // A writer started while ClickHouse is unreachable (a dead port) also recovers once
    // pointed at a live server.
    t.kill("history-writer");
    let dead = free_port();
    t.spawn_history_writer(&[("TALLY_CLICKHOUSE_URL", format!("http://127.0.0.1:{dead}"))]);
    let third = batch(&t, "o3", 30, Utc::now());
    post_all(&t, &third).await;
    assert!(wait_for(Duration::from_secs(60), || async { offsets_sum(&pool, "consumer_offsets", &t.group).await == 290 }).await);
    t.kill("history-writer");
    t.spawn_history_writer(&[]);
    wait_converged(&t, &pool, 290).await;
    assert_history_exact(&t, 290).await;
}

/// Sum of `expr` over a subject's raw history rows (FINAL).
async fn history_sum(t: &Tally, subject: &str, expr: &str) -> i64 {
    t.clickhouse_i64(&format!("SELECT sum({expr}) FROM `{}`.usage_events FINAL WHERE subject = '{subject}'", t.clickhouse_database())).await
}

/// A subject's ledger total of `metric` (all scopes, every period row).
async fn ledger_sum(pool: &sqlx::PgPool, subject: &str, metric: &str) -> i64 {
    sqlx::query_scalar::<_, Option<i64>>("SELECT sum(used)::bigint FROM ledgers WHERE subject = $1 AND metric = $2 AND scope = '*'")
        .bind(subject)
        .bind(metric)
        .fetch_one(pool)
        .await
        .expect("read ledgers")
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_counted_correction_nets_out_its_event_in_history_and_rollups() {
    let mut t = Tally::start(Some(TIERS)).await;
    let pool = t.pg().await;
    t.spawn_history_writer(&[]);
    let now = Utc::now();
    let events = batch(&t, "c", 30, now);
    post_all(&t, &events).await;
    // Event 0 (subject s0, model "small", 10 input + 1 output tokens) is reverted. The
    // correction names another model and time: history must use the target's.
    let target = events[0].clone();
    let subject = target["subject"].as_str().unwrap().to_string();
    let fix_id = format!("fix-{}", t.id);
    let fix = json!({"id": fix_id, "subject": subject, "time": now.to_rfc3339(), "corrects": target["id"], "model": "big"});
    post_all(&t, std::slice::from_ref(&fix)).await;
    // Redelivered (a duplicate), a second correction of the same event and a correction of
    // an unknown event (both refused by the ledger and quarantined).
    post_all(&t, std::slice::from_ref(&fix)).await;
    let again = json!({"id": format!("fix-again-{}", t.id), "subject": subject, "time": now.to_rfc3339(), "corrects": target["id"]});
    let unknown = json!({"id": format!("fix-unknown-{}", t.id), "subject": subject, "time": now.to_rfc3339(), "corrects": "never-sent"});
    post_all(&t, &[again, unknown]).await;
    wait_converged(&t, &pool, 34).await;
    assert_eq!(accepted_events(&pool).await, 31, "the ledger did not count exactly the events and one correction");
    assert_history_exact(&t, 31).await;

    // The correction's row: the target's amounts negated, in the target's bucket and model.
    let db = t.clickhouse_database();
    let row = t
        .clickhouse(&format!(
            "SELECT scope, model, requests, input_tokens, output_tokens, toUnixTimestamp(time) =              (SELECT toUnixTimestamp(time) FROM `{db}`.usage_events FINAL WHERE event_id = '{}')              FROM `{db}`.usage_events FINAL WHERE event_id = '{fix_id}'",
            target["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(row.trim(), "chat\tsmall\t-1\t-10\t-1\t1", "the correction's history row");

    // History sums equal the ledger, and both equal what was sent minus the reverted event.
    let sent = |s: &str, f: &dyn Fn(&Value) -> i64| -> i64 { events.iter().filter(|e| e["subject"] == s).map(f).sum() };
    for s in (0..3).map(|i| format!("s{i}-{}", t.id)) {
        let reverted = |f: &dyn Fn(&Value) -> i64| if s == subject { f(&target) } else { 0 };
        let tokens = |e: &Value| e["input_tokens"].as_i64().unwrap() + e["output_tokens"].as_i64().unwrap();
        let expected_tokens = sent(&s, &tokens) - reverted(&tokens);
        let expected_requests = sent(&s, &|_| 1) - reverted(&|_| 1);
        assert_eq!(ledger_sum(&pool, &s, "total_tokens").await, expected_tokens, "ledger tokens of {s}");
        assert_eq!(history_sum(&t, &s, "input_tokens + output_tokens").await, expected_tokens, "history tokens of {s}");
        assert_eq!(ledger_sum(&pool, &s, "requests").await, expected_requests, "ledger requests of {s}");
        assert_eq!(history_sum(&t, &s, "requests").await, expected_requests, "history requests of {s}");
    }
    // The rollups net out too: the target's hourly bucket for its model lost exactly its tokens.
    let hourly = t
        .clickhouse_i64(&format!(
            "SELECT sum(input_tokens + output_tokens) FROM `{db}`.usage_hourly FINAL WHERE subject = '{subject}' AND model = 'small'"
        ))
        .await;
    let small: i64 = events
        .iter()
        .filter(|e| e["subject"] == subject.as_str() && e["model"] == "small")
        .map(|e| e["input_tokens"].as_i64().unwrap() + e["output_tokens"].as_i64().unwrap())
        .sum();
    assert_eq!(hourly, small - 11);
    assert_top_matches_ledger(&t, &pool).await;
    for p in [now - Span::hours(3), now].iter().map(|t| month_name(*t)) {
        let (code, out) = reconcile(&t, &p);
        assert_eq!(code, 0, "reconcile found drift in {p}:\n{out}");
    }

    // A full replay finds the correction's row where it wrote it and adds nothing.
    t.kill("history-writer");
    sqlx::query("DELETE FROM history_offsets").execute(&pool).await.expect("reset history offsets");
    let url = t.spawn_history_writer(&[]);
    wait_converged(&t, &pool, 34).await;
    assert_eq!(t.metric(&url, "tally_history_events_written_total").await, 0, "the replay inserted rows again");
    assert!(t.metric(&url, "tally_history_corrections_total").await >= 1, "the replay did not see the correction");
    assert_history_exact(&t, 31).await;
    assert_eq!(history_sum(&t, &subject, "input_tokens + output_tokens").await, ledger_sum(&pool, &subject, "total_tokens").await);
    assert_top_matches_ledger(&t, &pool).await;
    inject_stale_bucket_versions(&t).await;
    assert_top_matches_ledger(&t, &pool).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn reconciliation_finds_injected_drift() {
    let mut t = Tally::start(Some(TIERS)).await;
    let pool = t.pg().await;
    t.spawn_history_writer(&[]);
    let now = Utc::now();
    let events = batch(&t, "d", 90, now);
    post_all(&t, &events).await;
    wait_converged(&t, &pool, 90).await;
    let period = month_name(now - Span::minutes(1));
    // Events up to 3 hours old may fall in the previous month right after a month starts.
    let periods: Vec<String> = [now - Span::hours(3), now].iter().map(|t| month_name(*t)).collect();
    for p in &periods {
        let (code, out) = reconcile(&t, p);
        assert_eq!(code, 0, "drift before any injection in {p}:\n{out}");
    }
    let (status, body) = t.get(&format!("{}/v1/reconcile?period={period}", t.api_url)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["ok"], true);

    // Drift 1: a row in history that the ledger never counted.
    let subject = format!("s0-{}", t.id);
    t.clickhouse(&format!(
        "INSERT INTO `{}`.usage_events (event_id, subject, time, scope, model, requests, input_tokens, output_tokens) \
         VALUES ('intruder-{}', '{subject}', toDateTime({}, 'UTC'), 'chat', 'small', 1, 40, 2)",
        t.clickhouse_database(),
        t.id,
        (now - Span::seconds(30)).timestamp()
    ))
    .await;
    let (code, out) = reconcile(&t, &month_name(now - Span::seconds(30)));
    assert_eq!(code, 2, "reconcile missed the extra history row:\n{out}");
    assert!(out.contains(&format!("DRIFT ledger  subject={subject} quota=monthly_tokens metric=total_tokens")), "{out}");
    assert!(out.contains("drift=+42"), "the drift size is wrong:\n{out}");
    assert!(out.contains(&format!("DRIFT events  subject={subject}")) && out.contains("drift=+1"), "{out}");
    let (status, body) = t.get(&format!("{}/v1/reconcile?period={}", t.api_url, month_name(now - Span::seconds(30)))).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["ok"], false);

    // Drift 2: a ledger row changed behind history's back.
    let other = format!("s1-{}", t.id);
    sqlx::query("UPDATE ledgers SET used = used + 7 WHERE subject = $1 AND metric = 'requests'")
        .bind(&other)
        .execute(&pool)
        .await
        .expect("tamper with the ledger");
    let mut found = false;
    for p in &periods {
        let (code, out) = reconcile(&t, p);
        assert_ne!(code, 0);
        found |= out.contains(&format!("subject={other} quota=monthly_requests metric=requests")) && out.contains("drift=-7");
    }
    assert!(found, "reconcile missed the ledger change");

    let (status, body) = t.get(&format!("{}/v1/reconcile?period=2026-13", t.api_url)).await;
    assert_eq!((status, body["field"].as_str()), (400, Some("period")));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_closed_period_exports_totals_equal_to_the_ledger_and_late_usage_as_adjustments() {
    // Events two months back: a lateness window of 400 days lets the ledger count them.
    let mut t = Tally::prepare(Some(TIERS));
    let late = [("TALLY_LATENESS_DAYS", "400".to_string())];
    t.spawn("ingest");
    t.spawn_env("aggregator", &late);
    t.spawn("api");
    t.wait_healthy().await;
    let pool = t.pg().await;
    t.spawn_history_writer(&[]);
    let now = Utc::now();
    let this_month = Utc.with_ymd_and_hms(now.year(), now.month(), 1, 0, 0, 0).unwrap();
    let two_back = this_month - Span::days(40);
    let month = Utc.with_ymd_and_hms(two_back.year(), two_back.month(), 1, 0, 0, 0).unwrap();
    let period = month_name(month);
    let (alice, bob) = (format!("alice-{}", t.id), format!("bob-{}", t.id));
    let mut events = Vec::new();
    for i in 0..40i64 {
        let who = if i % 4 == 0 { &bob } else { &alice };
        let time = month + Span::hours(1 + i * 7);
        events.push(event(&format!("b-{i}-{}", t.id), who, time, 1000 + i, 200 + i, if i % 3 == 0 { "big" } else { "small" }));
    }
    // One in the month before (must not be billed in this period).
    events.push(event(&format!("b-prev-{}", t.id), &alice, month - Span::minutes(5), 5, 5, "small"));
    post_all(&t, &events).await;
    wait_converged(&t, &pool, 41).await;

    // History API: a day series grouped by model over the month, and top subjects.
    let from = month.to_rfc3339();
    let to = (month + Span::days(28)).to_rfc3339();
    let (status, body) = t
        .get(&format!(
            "{}/v1/history/series?metric=total_tokens&granularity=day&group_by=model&from={}&to={}",
            t.api_url,
            enc(&from),
            enc(&to)
        ))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["source"], "daily");
    let series_total: i64 = body["series"].as_array().unwrap().iter().map(|s| s["total"].as_i64().unwrap()).sum();
    let sent_total: i64 = (0..40i64).filter(|i| month + Span::hours(1 + i * 7) < month + Span::days(28)).map(|i| 1200 + 2 * i).sum();
    assert_eq!(series_total, sent_total);
    assert_eq!(body["series"][0]["points"].as_array().unwrap().len(), 28);
    let (status, body) = t.get(&format!("{}/v1/history/top?metric=requests&from={}&to={}&limit=1", t.api_url, enc(&from), enc(&to))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["subjects"].as_array().unwrap().len(), 1);
    assert_eq!(body["subjects"][0]["subject"], alice.as_str());
    let (status, body) = t.get(&format!("{}/v1/subjects/{alice}/history?from={}&to={}", t.api_url, enc(&to), enc(&from))).await;
    assert_eq!((status, body["field"].as_str()), (400, Some("to")), "{body}");
    let (status, body) = t.get(&format!("{}/v1/history/series?from=2026-01-01&to=2026-03-01&granularity=hour", t.api_url)).await;
    assert_eq!((status, body["field"].as_str()), (400, Some("to")), "{body}");

    // Export before closing is refused; closing works (grace 0), twice is refused.
    let out = t.command(&["export", "--period", &period]).output().unwrap();
    assert!(!out.status.success(), "exported an open period");
    let out = t.command(&["close-period", "--period", &period, "--grace-hours", "0"]).output().unwrap();
    assert!(out.status.success(), "close-period failed: {}", String::from_utf8_lossy(&out.stderr));
    let again = t.command(&["close-period", "--period", &period, "--grace-hours", "0"]).output().unwrap();
    assert!(!again.status.success());

    let ledger = |subject: String| {
        let pool = pool.clone();
        async move {
            sqlx::query_as::<_, (String, i64)>(
                "SELECT metric, used FROM ledgers WHERE subject = $1 AND scope = '*' AND period = 'month' AND period_start = $2 ORDER BY metric",
            )
            .bind(subject)
            .bind(month)
            .fetch_all(&pool)
            .await
            .expect("read ledger")
        }
    };
    let export = export_json(&t, &period);
    assert_eq!(export["status"], "closed");
    assert_eq!(export["ledger_mismatches"], json!([]));
    for who in [&alice, &bob] {
        let rows = ledger(who.clone()).await;
        assert_eq!(rows.len(), 2, "ledger rows of {who}");
        for (metric, used) in rows {
            assert_eq!(export["totals"][who.as_str()][metric.as_str()].as_i64(), Some(used), "{who} {metric}");
        }
    }
    // Prices: each priced line costs quantity × price / 1e6 (rounded).
    for line in export["lines"].as_array().unwrap() {
        if let Some(price) = line["unit_price_per_million"].as_i64() {
            let q = line["quantity"].as_i64().unwrap() as i128 * price as i128;
            let cost = line["cost_micros"].as_i64().unwrap() as i128;
            assert!((cost * 1_000_000 - q).abs() <= 500_000, "mispriced line {line}");
        }
    }
    let csv = String::from_utf8(t.command(&["export", "--period", &period, "--format", "csv"]).output().unwrap().stdout).unwrap();
    let csv_input: i64 = csv
        .lines()
        .skip(1)
        .filter(|l| l.split(',').nth(2) == Some(alice.as_str()) && matches!(l.split(',').nth(4), Some("input_tokens" | "output_tokens")))
        .map(|l| l.split(',').nth(7).unwrap().parse::<i64>().unwrap())
        .sum();
    assert_eq!(Some(csv_input), export["totals"][alice.as_str()]["total_tokens"].as_i64());

    // A late event for the closed month: the ledger counts it, the export shows it as an
    // adjustment and its totals still equal the ledger.
    post_all(&t, &[event(&format!("b-late-{}", t.id), &alice, month + Span::days(3), 70, 30, "small")]).await;
    wait_converged(&t, &pool, 42).await;
    let export = export_json(&t, &period);
    assert_eq!(export["ledger_mismatches"], json!([]));
    let adjustments: Vec<&Value> = export["lines"].as_array().unwrap().iter().filter(|l| l["kind"] == "adjustment").collect();
    let adj_tokens: i64 = adjustments
        .iter()
        .filter(|l| l["metric"] == "input_tokens" || l["metric"] == "output_tokens")
        .map(|l| l["quantity"].as_i64().unwrap())
        .sum();
    assert_eq!(adj_tokens, 100);
    let rows = ledger(alice.clone()).await;
    let used = rows.iter().find(|(m, _)| m == "total_tokens").map(|(_, u)| *u);
    assert_eq!(export["totals"][alice.as_str()]["total_tokens"].as_i64(), used);
    // Frozen lines cannot change.
    let err = sqlx::query("UPDATE billing_lines SET quantity = 0").execute(&pool).await;
    assert!(err.is_err(), "a closed period's lines were modified");
}

fn export_json(t: &Tally, period: &str) -> Value {
    let out = t.command(&["export", "--period", period, "--format", "json"]).output().expect("run tally export");
    assert!(out.status.success(), "export failed ({:?}): {}", out.status.code(), String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("export is JSON")
}

fn enc(s: &str) -> String {
    s.replace('+', "%2B").replace(':', "%3A")
}

#[tokio::test(flavor = "multi_thread")]
async fn an_event_clickhouse_refuses_on_its_own_is_isolated_and_history_goes_on() {
    let mut t = Tally::start(Some(TIERS)).await;
    let pool = t.pg().await;
    let events = batch(&t, "iso", 80, Utc::now());
    let refused = events[17]["id"].as_str().unwrap().to_string();
    let url = t.spawn_history_writer(&[("TALLY_HISTORY_REFUSE_EVENT", refused.clone())]);
    post_all(&t, &events).await;
    wait_converged(&t, &pool, 80).await;

    // Every other event is in history, raw rows and rollups alike; the refused one is not,
    // and it is recorded with ClickHouse's words.
    assert_history_exact(&t, 79).await;
    let present =
        t.clickhouse_i64(&format!("SELECT count() FROM `{}`.usage_events WHERE event_id = '{refused}'", t.clickhouse_database())).await;
    assert_eq!(present, 0);
    let rows: Vec<(String, String)> = sqlx::query_as("SELECT event_id, reason FROM history_isolated WHERE group_id = $1")
        .bind(t.history_group())
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].0, refused);
    assert!(rows[0].1.contains("TALLY_HISTORY_REFUSE_EVENT"), "{rows:?}");
    assert_eq!(t.metric(&url, "tally_history_events_isolated_total").await, 1);
    assert_eq!(accepted_events(&pool).await, 80, "the ledger counted it all the same");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_binary_mode_cloudevent_from_kafka_reaches_history_as_the_ledger_counted_it() {
    use rdkafka::message::{Header, OwnedHeaders};
    let mut t = Tally::start(Some(TIERS)).await;
    let pool = t.pg().await;
    t.spawn_history_writer(&[]);
    let subject = format!("bin-{}", t.id);
    let time = Utc::now().to_rfc3339();
    let headers = [
        ("ce_specversion", "1.0"),
        ("ce_id", "7"),
        ("ce_source", "gw"),
        ("ce_type", "usage"),
        ("ce_subject", subject.as_str()),
        ("ce_time", time.as_str()),
        ("content-type", "application/json"),
    ]
    .iter()
    .fold(OwnedHeaders::new(), |h, (key, value)| h.insert(Header { key, value: Some(value.as_bytes()) }));
    let record = rdkafka::producer::FutureRecord::to(&t.usage_topic)
        .key(&subject)
        .payload(r#"{"input_tokens": 41, "output_tokens": 1}"#)
        .headers(headers);
    t.producer().send(record, Duration::from_secs(30)).await.expect("produce a binary mode CloudEvent");
    wait_converged(&t, &pool, 1).await;
    assert_eq!(ledger_sum(&pool, &subject, "total_tokens").await, 42, "the ledger counted it");
    assert_eq!(history_sum(&t, &subject, "input_tokens + output_tokens").await, 42, "history holds it too");
}

/// TIERS with a monthly cost quota too, so reconciliation compares cost ledger rows, to the
/// micro-dollar, beside the token and request rows.
const TIERS_WITH_COST: &str = "
default_tier: basic
timezone: UTC
quotas:
  - name: monthly_tokens
    metric: total_tokens
    period: month
    limit: 100000000
  - name: monthly_requests
    metric: requests
    period: month
    limit: 100000000
  - name: monthly_cost
    metric: cost_micros
    period: month
    limit: 100000000000
tiers:
  - name: basic
    priority: 0
    rate_multiplier: 1
";

/// `n` events with explicit costs over the last hours, for subjects `c0..c2`.
fn costed_batch(t: &Tally, prefix: &str, n: usize, now: DateTime<Utc>) -> Vec<Value> {
    (0..n)
        .map(|i| {
            let mut e = event(
                &format!("{prefix}-{i}-{}", t.id),
                &format!("c{}-{}", i % 3, t.id),
                now - Span::minutes((i % 7) as i64 * 23 + 1),
                100 + i as i64,
                3 + (i % 5) as i64,
                if i % 2 == 0 { "small" } else { "big" },
            );
            e["cost_micros"] = json!(1_000 + 17 * i as i64);
            e
        })
        .collect()
}

/// Per subject: (events, total tokens, cost in micro-dollars) of `events`.
fn sent_totals(events: &[Value]) -> std::collections::BTreeMap<String, (i64, i64, i64)> {
    let mut totals = std::collections::BTreeMap::new();
    for e in events {
        let entry = totals.entry(e["subject"].as_str().unwrap().to_string()).or_insert((0, 0, 0));
        entry.0 += 1;
        entry.1 += e["input_tokens"].as_i64().unwrap() + e["output_tokens"].as_i64().unwrap();
        entry.2 += e["cost_micros"].as_i64().unwrap_or(0);
    }
    totals
}

/// Per subject: (events, total tokens, cost) in `table` of history, under FINAL (`events`
/// is the expression counting events in that table).
async fn history_totals(t: &Tally, table: &str, events: &str) -> std::collections::BTreeMap<String, (i64, i64, i64)> {
    let db = t.clickhouse_database();
    let body = t
        .clickhouse(&format!(
            "SELECT subject, toInt64({events}), sum(input_tokens + output_tokens), sum(cost_micros) FROM `{db}`.{table} FINAL \
             GROUP BY subject ORDER BY subject"
        ))
        .await;
    body.lines()
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            (f[0].to_string(), (f[1].parse().unwrap(), f[2].parse().unwrap(), f[3].parse().unwrap()))
        })
        .collect()
}

/// Raw rows, the hourly and daily rollups and the daily totals each hold `expected` per
/// subject, to the event, the token and the micro-dollar.
async fn assert_totals_everywhere(t: &Tally, expected: &std::collections::BTreeMap<String, (i64, i64, i64)>) {
    assert_eq!(&history_totals(t, "usage_events", "count()").await, expected, "raw rows");
    for table in ["usage_hourly", "usage_daily", "usage_subject_daily"] {
        assert_eq!(&history_totals(t, table, "sum(events)").await, expected, "{table}");
    }
}

/// The cost the ledger counted per subject (its dedupe records), in micro-dollars.
async fn ledger_cost(pool: &sqlx::PgPool, subject: &str) -> i64 {
    sqlx::query_scalar::<_, Option<i64>>("SELECT sum(cost_micros)::bigint FROM processed_events WHERE subject = $1")
        .bind(subject)
        .fetch_one(pool)
        .await
        .expect("read processed_events")
        .unwrap_or(0)
}

fn assert_reconciled(t: &Tally, times: &[DateTime<Utc>]) {
    for p in times.iter().map(|t| month_name(*t)) {
        let (code, out) = reconcile(t, &p);
        assert_eq!(code, 0, "reconcile found drift in {p}:\n{out}");
        assert!(out.contains("ok: zero drift"), "{out}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_inserted_again_after_a_kill_between_insert_and_progress_leaves_no_duplicate() {
    let mut t = Tally::start(Some(TIERS_WITH_COST)).await;
    let pool = t.pg().await;
    let now = Utc::now();
    let events = costed_batch(&t, "kb", 90, now);
    post_all(&t, &events).await;
    // The writer dies (abort, as kill -9) right after its ClickHouse writes, raw rows and
    // rollups, and before its progress commit: the restarted writer writes the batch again.
    t.spawn_history_writer(&[("TALLY_HISTORY_FAILPOINT", "after-rollups".to_string())]);
    assert!(
        wait_for(Duration::from_secs(90), || std::future::ready(t.running("history-writer") == 0)).await,
        "failpoint did not abort the writer; logs in {}",
        t.log_dir().display()
    );
    assert_eq!(offsets_sum(&pool, "history_offsets", &t.history_group()).await, 0, "progress advanced past the kill");
    let before = t.clickhouse_i64(&format!("SELECT count() FROM `{}`.usage_events", t.clickhouse_database())).await;
    assert!(before > 0, "the killed writer inserted nothing");
    t.kill("history-writer");
    let url = t.spawn_history_writer(&[]);
    wait_converged(&t, &pool, 90).await;
    assert!(t.metric(&url, "tally_history_events_replayed_total").await >= before, "the batch was not written again");
    assert_history_exact(&t, 90).await;
    let expected = sent_totals(&events);
    assert_totals_everywhere(&t, &expected).await;
    for (subject, (_, tokens, cost)) in &expected {
        assert_eq!(ledger_sum(&pool, subject, "total_tokens").await, *tokens, "ledger tokens of {subject}");
        assert_eq!(ledger_cost(&pool, subject).await, *cost, "ledger cost of {subject}");
    }
    assert_reconciled(&t, &[now - Span::hours(3), now]);
}

#[tokio::test(flavor = "multi_thread")]
async fn reconcile_after_a_whole_partition_is_replayed_reports_zero_drift() {
    let mut t = Tally::start(Some(TIERS_WITH_COST)).await;
    let pool = t.pg().await;
    t.spawn_history_writer(&[]);
    let now = Utc::now();
    let events = costed_batch(&t, "rp", 120, now);
    post_all(&t, &events).await;
    wait_converged(&t, &pool, 120).await;
    assert_reconciled(&t, &[now - Span::hours(3), now]);

    // Forget the writer's progress on the busiest partition: it replays all of it.
    t.kill("history-writer");
    let (partition, messages): (i32, i64) = sqlx::query_as(
        "SELECT partition, next_offset FROM history_offsets WHERE group_id = $1 ORDER BY next_offset DESC, partition LIMIT 1",
    )
    .bind(t.history_group())
    .fetch_one(&pool)
    .await
    .expect("read history offsets");
    assert!(messages > 0);
    sqlx::query("UPDATE history_offsets SET next_offset = 0 WHERE group_id = $1 AND partition = $2")
        .bind(t.history_group())
        .bind(partition)
        .execute(&pool)
        .await
        .expect("rewind the partition");
    let url = t.spawn_history_writer(&[]);
    wait_converged(&t, &pool, 120).await;
    assert_eq!(t.metric(&url, "tally_history_events_replayed_total").await, messages, "the whole partition was replayed");
    assert_eq!(t.metric(&url, "tally_history_events_written_total").await, 0, "the replay inserted rows again");
    assert_history_exact(&t, 120).await;
    assert_totals_everywhere(&t, &sent_totals(&events)).await;
    assert_reconciled(&t, &[now - Span::hours(3), now]);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_event_id_on_two_utc_days_is_two_events_in_history() {
    let mut t = Tally::start(Some(TIERS_WITH_COST)).await;
    let pool = t.pg().await;
    t.spawn_history_writer(&[]);
    let midnight = Utc::now().date_naive().and_hms_opt(0, 0, 0).unwrap().and_utc();
    let (before, after) = (midnight - Span::milliseconds(500), midnight + Span::milliseconds(500));
    let id = format!("twice-{}", t.id);
    let subject = format!("two-days-{}", t.id);
    let mut first = event(&id, &subject, before, 40, 2, "small");
    first["cost_micros"] = json!(700);
    let mut second = event(&id, &subject, after, 50, 3, "big");
    second["cost_micros"] = json!(900);
    // Each delivered twice: the ledger counts each day's event once.
    post_all(&t, &[first.clone(), second.clone(), first.clone(), second.clone()]).await;
    wait_converged(&t, &pool, 4).await;
    assert_eq!(accepted_events(&pool).await, 2, "the ledger counts two events");
    assert_history_exact(&t, 2).await;
    let db = t.clickhouse_database();
    let rows = t
        .clickhouse(&format!("SELECT event_day, input_tokens FROM `{db}`.usage_events FINAL WHERE event_id = '{id}' ORDER BY event_day"))
        .await;
    let expected = format!("{}\t40\n{}\t50\n", before.date_naive(), after.date_naive());
    assert_eq!(rows, expected, "both days' events in history");
    assert_totals_everywhere(&t, &sent_totals(&[first, second])).await;
    assert_eq!(ledger_sum(&pool, &subject, "total_tokens").await, 95);
    assert_reconciled(&t, &[before, after]);
}

/// A configuration with a budget of each kind, a model-narrowed quota and a budget in another
/// timezone: `eng` pools alice and bob (members) and any event naming it; `research` is
/// reached only by events naming it and counts chat requests per hour; the key `sk-capped`
/// has a daily cap in Asia/Kolkata; the tier pool `pro` pools bob (group `staff`) and every
/// subject on the key `sk-pro` that no group puts elsewhere.
fn budget_tiers() -> String {
    let (capped, pro) = (hash_api_key("sk-capped"), hash_api_key("sk-pro"));
    format!(
        "
default_tier: basic
timezone: UTC
quotas:
  - {{name: monthly_tokens, metric: total_tokens, period: month, limit: 100000000}}
tiers:
  - {{name: basic, priority: 0}}
  - {{name: pro, priority: 10}}
groups: {{staff: pro}}
members: {{alice: [eng], bob: [eng, staff]}}
api_keys:
  - {{key_sha256: \"{pro}\", tier: pro}}
prices:
  small: {{input: 150000, output: 600000}}
  big: {{input: 2500000, output: 10000000}}
budgets:
  - group: eng
    quotas:
      - {{name: team_month, metric: total_tokens, period: month, limit: 1000000000}}
      - {{name: team_big, metric: total_tokens, period: day, limit: 1000000000, models: [big]}}
  - group: research
    quotas:
      - {{name: research_chat, metric: requests, period: hour, limit: 1000000, scope: chat}}
  - api_key: \"{capped}\"
    timezone: Asia/Kolkata
    quotas:
      - {{name: key_day, metric: total_tokens, period: day, limit: 1000000000}}
  - tier: pro
    quotas:
      - {{name: pool_month, metric: total_tokens, period: month, limit: 1000000000}}
      - {{name: pool_big_output, metric: output_tokens, period: month, limit: 1000000000, models: [big]}}
"
    )
}

/// `n` events over the last `n` minutes, varying subject, API key, named group, model and
/// scope, so that each budget is met by some and passed over by others.
fn budget_batch(n: usize, now: DateTime<Utc>) -> Vec<Value> {
    let subjects = ["alice", "bob", "carol", "dave"];
    let keys = [None, Some("sk-capped"), Some("sk-pro")];
    let groups = [None, Some("research"), Some("eng")];
    let models = [Some("small"), Some("big"), None];
    (0..n)
        .map(|i| {
            let scope = ["chat", "batch"][(i / 2) % 2];
            let mut e = json!({"id": format!("bud-{i}"), "subject": subjects[i % 4],
                               "time": (now - Span::minutes(1 + i as i64)).to_rfc3339(),
                               "scope": scope, "input_tokens": 100 + i, "output_tokens": 7 + i % 5});
            if let Some(key) = keys[(i / 4) % 3] {
                e["api_key_sha256"] = json!(hash_api_key(key));
            }
            if let Some(group) = groups[(i / 12) % 3] {
                e["group"] = json!(group);
            }
            if let Some(model) = models[(i / 3) % 3] {
                e["model"] = json!(model);
            }
            e
        })
        .collect()
}

fn tokens(e: &Value) -> i64 {
    e["input_tokens"].as_i64().unwrap() + e["output_tokens"].as_i64().unwrap()
}

/// Which budgets an event of [`budget_batch`] meets under [`budget_tiers`], by owner.
fn budget_owners(e: &Value) -> Vec<String> {
    let (subject, key) = (e["subject"].as_str().unwrap(), e["api_key_sha256"].as_str());
    let mut owners = Vec::new();
    if key == Some(hash_api_key("sk-capped").as_str()) {
        owners.push(format!("api_key:{}", hash_api_key("sk-capped")));
    }
    if matches!(subject, "alice" | "bob") || e["group"] == "eng" {
        owners.push("group:eng".to_string());
    }
    if e["group"] == "research" {
        owners.push("group:research".to_string());
    }
    // bob's group gives pro; without a group tier, the key sk-pro does.
    if subject == "bob" || key == Some(hash_api_key("sk-pro").as_str()) {
        owners.push("tier:pro".to_string());
    }
    owners
}

/// The months a reconciliation or export of events of the last hour must cover.
fn periods_of_last_hour(now: DateTime<Utc>) -> Vec<String> {
    let mut periods = vec![month_name(now - Span::minutes(61)), month_name(now)];
    periods.dedup();
    periods
}

/// The sum of `used` of the ledger rows of `subject`, `metric` and `scope` over every period.
async fn ledger_total(pool: &sqlx::PgPool, subject: &str, metric: &str, scope: &str) -> i64 {
    sqlx::query_scalar::<_, Option<i64>>("SELECT sum(used)::bigint FROM ledgers WHERE subject = $1 AND metric = $2 AND scope = $3")
        .bind(subject)
        .bind(metric)
        .bind(scope)
        .fetch_one(pool)
        .await
        .expect("read ledgers")
        .unwrap_or(0)
}

fn reconcile_json(t: &Tally, args: &[&str]) -> (i32, Value) {
    let out = t.command(&[&["reconcile", "--format", "json"], args].concat()).output().expect("run tally reconcile");
    let report =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("not a JSON report ({e}): {}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code().unwrap_or(-1), report)
}

#[tokio::test(flavor = "multi_thread")]
async fn budget_ledgers_reconcile_with_history_to_the_token_and_export_per_team() {
    let config = budget_tiers();
    let mut t = Tally::start(Some(&config)).await;
    let pool = t.pg().await;
    t.spawn_history_writer(&[]);
    let now = Utc::now();
    let events = budget_batch(48, now);
    post_all(&t, &events).await;
    // Redelivered (duplicates), and one event reverted: bob's, on the capped key, for `big`,
    // so its correction must leave the team's, the key's, the pool's and both model-narrowed
    // ledgers.
    post_all(&t, &events[..10]).await;
    let target = events[5].clone();
    assert_eq!((target["subject"].as_str(), target["model"].as_str()), (Some("bob"), Some("big")));
    let fix = json!({"id": "bud-fix", "subject": "bob", "time": now.to_rfc3339(), "corrects": "bud-5", "model": "small"});
    post_all(&t, std::slice::from_ref(&fix)).await;
    wait_converged(&t, &pool, 59).await;
    assert_eq!(accepted_events(&pool).await, 49, "48 events and one correction");

    let counted: Vec<&Value> = events.iter().filter(|e| e["id"] != "bud-5").collect();
    let sum = |owner: &str, f: &dyn Fn(&Value) -> i64| -> i64 {
        counted.iter().filter(|e| budget_owners(e).iter().any(|o| o == owner)).map(|e| f(e)).sum()
    };
    let big = |f: fn(&Value) -> i64| move |e: &Value| if e["model"] == "big" { f(e) } else { 0 };
    let capped = format!("api_key:{}", hash_api_key("sk-capped"));
    let expected: Vec<(&str, i64)> = vec![
        ("group:eng", sum("group:eng", &tokens)),
        ("group:research", sum("group:research", &tokens)),
        (capped.as_str(), sum(&capped, &tokens)),
        ("tier:pro", sum("tier:pro", &tokens)),
    ];
    assert!(expected.iter().all(|(_, n)| *n > 0), "every budget is met: {expected:?}");

    // The ledger counted exactly that, quota by quota (the aggregator's side).
    let subject = |owner: &str| {
        let (kind, name) = owner.split_once(':').unwrap();
        format!("__tally_budget__/{kind}/{name}")
    };
    let chat_requests = |e: &Value| i64::from(e["scope"] == "chat");
    let output = |e: &Value| e["output_tokens"].as_i64().unwrap();
    let ledgers = [
        ("group:eng", "total_tokens", "*", sum("group:eng", &tokens)),
        ("group:eng", "total_tokens", "*|models=big", sum("group:eng", &big(tokens))),
        ("group:research", "requests", "chat", sum("group:research", &chat_requests)),
        (capped.as_str(), "total_tokens", "*", sum(&capped, &tokens)),
        ("tier:pro", "total_tokens", "*", sum("tier:pro", &tokens)),
        ("tier:pro", "output_tokens", "*|models=big", sum("tier:pro", &big(output))),
    ];
    for (owner, metric, scope, want) in ledgers {
        assert_eq!(ledger_total(&pool, &subject(owner), metric, scope).await, want, "ledger of {owner} {metric} {scope}");
    }

    // Reconciliation proves every budget ledger row equals the raw rows that counted in it.
    let periods = periods_of_last_hour(now);
    let mut compared = 0;
    for p in &periods {
        let (code, report) = reconcile_json(&t, &["--period", p]);
        assert_eq!(code, 0, "drift in {p}: {report:#}");
        assert_eq!(report["budget_drifts"], json!([]));
        compared += report["budget_ledger_rows"].as_u64().unwrap();
        let (code, one) = reconcile_json(&t, &["--period", p, "--budget", "group:eng"]);
        assert_eq!((code, &one["budget"]), (0, &json!("group:eng")), "{one:#}");
    }
    // eng: a month row, a big-model row per day; research: a row per hour; the key: a row per
    // Kolkata day; pro: two month rows.
    assert!(compared >= 6, "budget ledger rows compared: {compared}");

    // The correction's row carries its target's budgets.
    let db = t.clickhouse_database();
    let budgets_of = |id: &str| format!("SELECT arraySort(budgets) FROM `{db}`.usage_events FINAL WHERE event_id = '{id}'");
    let target_budgets = t.clickhouse(&budgets_of("bud-5")).await;
    assert!(target_budgets.contains("__tally_budget__/group/eng") && target_budgets.contains("__tally_budget__/tier/pro"));
    assert_eq!(t.clickhouse(&budgets_of("bud-fix")).await, target_budgets);

    // Export: lines per budget, totals per owner equal to what its members sent.
    let mut exported: std::collections::BTreeMap<String, i64> = Default::default();
    for p in &periods {
        let out = t.command(&["export", "--period", p, "--preview", "--format", "json"]).output().unwrap();
        assert!(out.status.success(), "export of {p}: {}", String::from_utf8_lossy(&out.stderr));
        let export: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(export["ledger_mismatches"], json!([]), "{p}");
        for (owner, totals) in export["budget_totals"].as_object().unwrap() {
            *exported.entry(owner.clone()).or_default() += totals["total_tokens"].as_i64().unwrap();
        }
        let subject_cost: i64 = export["lines"].as_array().unwrap().iter().map(|l| l["cost_micros"].as_i64().unwrap()).sum();
        assert_eq!(export["total_cost_micros"].as_i64(), Some(subject_cost), "the subjects' cost, budgets apart");
        let csv =
            String::from_utf8(t.command(&["export", "--period", p, "--preview", "--lines", "budgets"]).output().unwrap().stdout).unwrap();
        assert!(csv.starts_with("period,kind,budget,model,metric,"), "{csv}");
        let eng_csv: i64 = csv
            .lines()
            .filter(|l| l.split(',').nth(2) == Some("group:eng") && matches!(l.split(',').nth(4), Some("input_tokens" | "output_tokens")))
            .map(|l| l.split(',').nth(7).unwrap().parse::<i64>().unwrap())
            .sum();
        assert_eq!(Some(eng_csv), export["budget_totals"]["group:eng"]["total_tokens"].as_i64().or(Some(0)));
    }
    let want: std::collections::BTreeMap<String, i64> = expected.iter().map(|(o, n)| (o.to_string(), *n)).collect();
    assert_eq!(exported, want, "export per budget");

    // History API: usage by budget, by key, by model.
    let today = now.date_naive();
    let range = format!("from={}&to={}", today - Span::days(1), today + Span::days(1));
    let api = &t;
    let series = |query: String| {
        let url = format!("{}/v1/history/series?metric=total_tokens&granularity=day&{range}&{query}", api.api_url);
        async move {
            let (status, body) = api.get(&url).await;
            assert_eq!(status, 200, "{body}");
            body
        }
    };
    let body = series("group_by=budget".into()).await;
    assert_eq!(body["source"], "raw");
    let by_budget: std::collections::BTreeMap<String, i64> =
        body["series"].as_array().unwrap().iter().map(|s| (s["key"].as_str().unwrap().to_string(), s["total"].as_i64().unwrap())).collect();
    assert_eq!(by_budget, want, "series per budget");
    for (owner, n) in &expected {
        let body = series(format!("budget={owner}")).await;
        assert_eq!(body["series"][0]["total"].as_i64(), Some(*n), "{owner}: {body}");
    }
    let eng_by_model = series("budget=group:eng&group_by=model".into()).await;
    let eng_big = eng_by_model["series"].as_array().unwrap().iter().find(|s| s["key"] == "big").map(|s| s["total"].as_i64().unwrap());
    assert_eq!(eng_big, Some(sum("group:eng", &big(tokens))), "{eng_by_model}");
    let key = hash_api_key("sk-capped");
    let by_key = series(format!("api_key_sha256={key}")).await;
    assert_eq!(by_key["series"][0]["total"].as_i64(), Some(sum(&capped, &tokens)));
    let keys = series("group_by=api_key".into()).await;
    let capped_series = keys["series"].as_array().unwrap().iter().find(|s| s["key"] == key.as_str()).map(|s| s["total"].as_i64());
    assert_eq!(capped_series, Some(Some(sum(&capped, &tokens))));
    let (status, top) = t.get(&format!("{}/v1/history/top?metric=total_tokens&{range}&budget=group:eng&limit=10", t.api_url)).await;
    assert_eq!(status, 200, "{top}");
    let top_total: i64 = top["subjects"].as_array().unwrap().iter().map(|s| s["value"].as_i64().unwrap()).sum();
    assert_eq!(top_total, sum("group:eng", &tokens));
    let (status, refused) = t.get(&format!("{}/v1/history/series?{range}&budget=team:eng", t.api_url)).await;
    assert_eq!((status, refused["field"].as_str()), (400, Some("budget")));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_raw_row_lost_from_history_shows_as_drift_of_each_budget_it_counted_in() {
    let config = budget_tiers();
    let mut t = Tally::start(Some(&config)).await;
    let pool = t.pg().await;
    t.spawn_history_writer(&[]);
    let now = Utc::now();
    let events = budget_batch(24, now);
    post_all(&t, &events).await;
    wait_converged(&t, &pool, 24).await;
    let periods = periods_of_last_hour(now);
    for p in &periods {
        let (code, report) = reconcile_json(&t, &["--period", p]);
        assert_eq!(code, 0, "drift before the loss in {p}: {report:#}");
    }
    // alice's event on the capped key: in eng and in the key's budget, not in the pool.
    let lost = &events[4];
    assert_eq!((lost["subject"].as_str(), lost["api_key_sha256"].as_str()), (Some("alice"), Some(hash_api_key("sk-capped").as_str())));
    t.clickhouse(&format!(
        "ALTER TABLE `{}`.usage_events DELETE WHERE event_id = 'bud-4' SETTINGS mutations_sync = 2",
        t.clickhouse_database()
    ))
    .await;
    let period = month_name(now - Span::minutes(5));
    let (code, out) = reconcile(&t, &period);
    assert_eq!(code, 2, "the lost row went unnoticed:\n{out}");
    let drift = format!("drift={:+}", -tokens(lost));
    let line = |owner: &str| out.lines().find(|l| l.starts_with(&format!("DRIFT budget  owner={owner} "))).map(str::to_string);
    let eng = line("group:eng").unwrap_or_else(|| panic!("no drift for group:eng:\n{out}"));
    assert!(eng.contains("quota=team_month metric=total_tokens scope=* period=month") && eng.ends_with(&drift), "{eng}");
    let key = line(&format!("api_key:{}", hash_api_key("sk-capped"))).unwrap_or_else(|| panic!("no drift for the key:\n{out}"));
    assert!(key.contains("quota=key_day") && key.ends_with(&drift), "{key}");
    assert_eq!(line("tier:pro"), None, "the pool never counted it:\n{out}");
    assert!(out.contains("DRIFT ledger  subject=alice "), "{out}");
    // One budget alone: eng drifts, the pool does not; the API says the same.
    let (code, eng) = reconcile_json(&t, &["--period", &period, "--budget", "group:eng"]);
    assert_eq!((code, &eng["ok"]), (2, &json!(false)), "{eng:#}");
    assert_eq!(eng["budget_drifts"][0]["drift"].as_i64(), Some(-tokens(lost)));
    assert_eq!(eng["ledger_drifts"], json!([]), "a budget's reconciliation compares its own rows only");
    let (code, pool_report) = reconcile_json(&t, &["--period", &period, "--budget", "tier:pro"]);
    assert_eq!(code, 0, "{pool_report:#}");
    let (status, body) = t.get(&format!("{}/v1/reconcile?period={period}&budget=group:eng", t.api_url)).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["budget_drifts"][0]["budget"], "group:eng");
    let (status, body) = t.get(&format!("{}/v1/reconcile?period={period}&budget=group", t.api_url)).await;
    assert_eq!((status, body["field"].as_str()), (400, Some("budget")));
}
