//! The aggregator under faults: an orderly SIGTERM drains and commits in bounded time, and a
//! Postgres outage pauses consumption without skipping or double counting anything.

use crate::support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{authority, via_port, wait_for, Tally, TcpSwitch};

const TIERS: &str = support::fixtures::METERED;

fn batch(prefix: &str, n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            json!({"id": format!("{prefix}-{i}"), "subject": format!("s{}", i % 7), "time": chrono::Utc::now().to_rfc3339(),
                        "input_tokens": 10 + i as i64, "output_tokens": 1})
        })
        .collect()
}

fn tokens(events: &[Value]) -> i64 {
    events.iter().map(|e| e["input_tokens"].as_i64().unwrap() + e["output_tokens"].as_i64().unwrap()).sum()
}

async fn ledger_total(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar::<_, Option<i64>>("SELECT sum(used)::bigint FROM ledgers WHERE metric = 'total_tokens' AND scope = '*'")
        .fetch_one(pool)
        .await
        .unwrap()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_commits_and_exits_within_the_shutdown_timeout() {
    let mut t = Tally::start(Some(TIERS)).await;
    let pool = t.pg().await;
    let events = batch("term", 600);
    for chunk in events.chunks(100) {
        assert_eq!(t.post_events(&Value::Array(chunk.to_vec())).await.0, 202);
    }
    let pid = t.pids("aggregator")[0];
    let started = Instant::now();
    // The shutdown timeout is 10 s by default; drain and final commit must fit in it.
    let status = t.terminate(pid, Duration::from_secs(15)).await;
    let status = status.unwrap_or_else(|| panic!("the aggregator did not exit within 15 s of SIGTERM"));
    assert!(status.success(), "the aggregator exited with {status}");
    eprintln!("aggregator exited {:?} after SIGTERM", started.elapsed());
    let members: i64 =
        sqlx::query_scalar("SELECT count(*) FROM consumer_members WHERE group_id = $1").bind(&t.group).fetch_one(&pool).await.unwrap();
    assert_eq!(members, 0, "an orderly shutdown leaves the group");

    // Whatever it committed before exiting is final; a successor finishes the rest exactly.
    t.spawn("aggregator");
    assert!(wait_for(Duration::from_secs(60), || async { t.consumed(&pool).await >= 600 }).await);
    assert_eq!(t.consumed(&pool).await, 600);
    assert_eq!(ledger_total(&pool).await, tokens(&events));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_postgres_outage_pauses_consumption_and_it_resumes_with_nothing_lost() {
    let mut t = Tally::prepare(Some(TIERS));
    let switch = TcpSwitch::start(authority(&t.database_url)).await;
    t.spawn("ingest");
    t.spawn("api");
    let aggregator_db = via_port(&t.database_url, switch.port);
    t.spawn_env("aggregator", &[("TALLY_DATABASE_URL", aggregator_db)]);
    t.wait_healthy().await;
    let pool = t.pg().await;

    let first = batch("before", 100);
    assert_eq!(t.post_events(&Value::Array(first.clone())).await.0, 202);
    assert!(wait_for(Duration::from_secs(60), || async { t.consumed(&pool).await >= 100 }).await);

    switch.set(false);
    let second = batch("during", 300);
    for chunk in second.chunks(50) {
        assert_eq!(t.post_events(&Value::Array(chunk.to_vec())).await.0, 202);
    }
    let noticed =
        wait_for(Duration::from_secs(30), || async { t.metric(&t.aggregator_url, "tally_aggregator_database_retries_total").await > 0 })
            .await;
    assert!(noticed, "the aggregator never retried against the unavailable database");
    assert_eq!(t.consumed(&pool).await, 100, "nothing may commit while Postgres is unreachable");
    assert_eq!(t.running("aggregator"), 1, "the aggregator must pause, not die");

    switch.set(true);
    let resumed = wait_for(Duration::from_secs(60), || async { t.consumed(&pool).await >= 400 }).await;
    assert!(resumed, "consumption did not resume; logs in {}", t.log_dir().display());
    assert_eq!(t.consumed(&pool).await, 400);
    assert_eq!(ledger_total(&pool).await, tokens(&first) + tokens(&second));
    let counted: i64 = sqlx::query_scalar("SELECT count(*) FROM processed_events").fetch_one(&pool).await.unwrap();
    assert_eq!(counted, 400);
}

/// A broker may answer a fetch that starts inside a record batch with nothing (tansu 0.6
/// does), so an aggregator that resumes a partition whose stored offset is inside one must
/// seek further back, or the partition stands still for good once nothing more arrives.
#[tokio::test(flavor = "multi_thread")]
async fn a_partition_resumed_inside_a_record_batch_is_read_to_its_end() {
    let mut t = Tally::prepare(Some(TIERS));
    t.spawn("ingest");
    t.spawn_env("aggregator", &[("TALLY_AGGREGATOR_MAX_BATCH", "1000".to_string())]);
    t.spawn("api");
    t.wait_healthy().await;
    // One subject, one request: 200 messages of one partition, in one record batch.
    let events: Vec<Value> = (0..200)
        .map(|i| json!({"id": format!("mid{i}"), "subject": "one", "time": chrono::Utc::now().to_rfc3339(), "input_tokens": 1}))
        .collect();
    assert_eq!(t.post_events(&Value::Array(events)).await.0, 202);
    let pool = t.pg().await;
    assert!(wait_for(Duration::from_secs(30), || async { t.consumed(&pool).await == 200 }).await);
    t.kill("aggregator");
    // The next owner resumes at offset 130, inside the batch: 70 redeliveries to pass over.
    let moved = sqlx::query("UPDATE consumer_offsets SET next_offset = 130 WHERE group_id = $1 AND next_offset = 200")
        .bind(&t.group)
        .execute(&pool)
        .await
        .unwrap()
        .rows_affected();
    assert_eq!(moved, 1);
    let url = t.spawn_aggregator();
    let resumed = wait_for(Duration::from_secs(30), || async { t.consumed(&pool).await == 200 }).await;
    assert!(resumed, "the partition stood still at {}; logs in {}", t.consumed(&pool).await, t.log_dir().display());
    assert!(wait_for(Duration::from_secs(10), || async { t.metric(&url, "tally_aggregator_events_duplicate_total").await == 70 }).await);
    assert_eq!(ledger_total(&pool).await, 200, "nothing counted twice");
}
