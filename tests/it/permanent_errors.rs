//! A permanent failure that no event causes stops the aggregator: the process logs why and
//! exits non-zero, for a supervisor to restart and an operator to see, rather than retrying
//! the same batch for ever while its partitions stand still. A stored configuration that
//! cannot load is met by the next batch and by the scheduler alike; whichever meets it first
//! stops the process.

use std::time::Duration;

use serde_json::json;

use crate::support::{wait_for, Tally};

const TIERS: &str = crate::support::fixtures::METERED;

fn event(id: &str, subject: &str) -> Vec<u8> {
    let e = json!({"id": id, "subject": subject, "time": chrono::Utc::now().to_rfc3339(), "input_tokens": 10, "output_tokens": 0});
    e.to_string().into_bytes()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stored_configuration_that_cannot_load_stops_the_aggregator_with_a_non_zero_exit() {
    let mut t = Tally::prepare(Some(TIERS));
    t.spawn("aggregator");
    let pid = t.pids("aggregator")[0];
    let log_path = t.log_of(pid);
    let pool = t.pg().await;
    let log_text = || std::fs::read_to_string(&log_path).unwrap_or_default();

    t.produce_raw(None, "before", &event("before", "before")).await;
    let counting = wait_for(Duration::from_secs(60), || async { t.consumed(&pool).await >= 1 }).await;
    assert!(counting, "the aggregator never counted the first event:\n{}", log_text());

    // A version no aggregator can load, stored as a broken writer (or a hand edit) would.
    sqlx::query("INSERT INTO config_versions (document, sha256, source) VALUES ('tiers: [never closed', 'broken', 'test')")
        .execute(&pool)
        .await
        .expect("store a broken configuration");
    t.produce_raw(None, "after", &event("after", "after")).await;

    let status = t.exited_within(pid, Duration::from_secs(60)).await;
    let log = log_text();
    let status = status.unwrap_or_else(|| panic!("the aggregator is still retrying after a minute:\n{log}"));
    assert!(!status.success(), "a permanent failure exits non-zero, not {status}:\n{log}");
    assert!(log.contains("aggregator stopped by a permanent failure"), "the log says it stopped and why:\n{log}");
    assert!(log.contains("invalid tier configuration"), "the log names the cause:\n{log}");
    assert_eq!(t.consumed(&pool).await, 1, "the batch that could not commit is left for a fixed configuration");
    let quarantined = t.read_topic(&t.topic("quarantine")).await;
    assert!(quarantined.is_empty(), "no event is blamed for the configuration: {quarantined:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_history_table_that_is_gone_stops_the_history_writer_with_a_non_zero_exit() {
    let mut t = Tally::start(Some(TIERS)).await;
    let pool = t.pg().await;
    t.spawn_history_writer(&[]);
    let pid = t.pids("history-writer")[0];
    let log_path = t.log_of(pid);
    let log_text = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let raw_rows = format!("SELECT count() FROM `{}`.usage_events", t.clickhouse_database());

    t.produce_raw(None, "before", &event("before", "before")).await;
    let written = wait_for(Duration::from_secs(60), || async { t.clickhouse_i64(&raw_rows).await >= 1 }).await;
    assert!(written, "the history writer never wrote the first event:\n{}", log_text());

    // The raw table gone, as after a botched migration: every write is refused, whatever it
    // holds. Several events, so that a batch of more than one shows no event is to blame.
    t.clickhouse(&format!("DROP TABLE `{}`.usage_events", t.clickhouse_database())).await;
    for i in 0..10 {
        t.produce_raw(None, "after", &event(&format!("after-{i}"), "after")).await;
    }

    let status = t.exited_within(pid, Duration::from_secs(60)).await;
    let log = log_text();
    let status = status.unwrap_or_else(|| panic!("the history writer is still retrying after a minute:\n{log}"));
    assert!(!status.success(), "a permanent failure exits non-zero, not {status}:\n{log}");
    assert!(log.contains("history writer stopped by a permanent failure"), "the log says it stopped and why:\n{log}");
    let isolated: i64 = sqlx::query_scalar("SELECT count(*) FROM history_isolated").fetch_one(&pool).await.expect("read history_isolated");
    assert_eq!(isolated, 0, "no event is blamed for the missing table");
}
