//! The end-to-end slice, every hop real: events in over HTTP, through the broker and the
//! aggregator into the Postgres ledger, and decisions out of the API.

use crate::support;

use std::time::Duration;

use serde_json::{json, Value};
use support::{wait_for, Tally};

const TIERS: &str = support::fixtures::BASIC_1000_TOKENS;

fn event(id: &str, subject: &str, input: i64, output: i64) -> Value {
    json!({"id": id, "subject": subject, "time": chrono::Utc::now().to_rfc3339(),
           "input_tokens": input, "output_tokens": output, "model": "m"})
}

/// Waits until the aggregator has looked at `messages` messages (counted or skipped as
/// duplicates or quarantined), so that totals checked afterwards are final.
async fn wait_processed(t: &Tally, messages: i64) {
    let done = wait_for(Duration::from_secs(60), || async {
        let counted = t.metric(&t.aggregator_url, "tally_aggregator_events_counted_total").await;
        let dup = t.metric(&t.aggregator_url, "tally_aggregator_events_duplicate_total").await;
        let quarantined = t.metric(&t.aggregator_url, "tally_aggregator_events_quarantined_total").await;
        counted + dup + quarantined >= messages
    })
    .await;
    assert!(done, "the aggregator did not process {messages} messages; logs in {}", t.log_dir().display());
}

#[tokio::test(flavor = "multi_thread")]
async fn events_over_http_give_exact_ledgers_and_a_block_decision() {
    let t = Tally::start(Some(TIERS)).await;
    let (heavy, light) = (format!("heavy-{}", t.id), format!("light-{}", t.id));

    // heavy: 4 events of 300 tokens = 1200 > 1000; light: 3 events of 50 tokens.
    let first: Vec<Value> = (0..4)
        .map(|i| event(&format!("{heavy}-{i}"), &heavy, 200, 100))
        .chain((0..3).map(|i| event(&format!("{light}-{i}"), &light, 30, 20)))
        .collect();
    let (status, body) = t.post_events(&Value::Array(first.clone())).await;
    assert_eq!((status, &body), (202, &json!({"accepted": 7})));
    // A gateway retry: the same events again, one at a time and as a batch.
    assert_eq!(t.post_events(&first[0]).await.0, 202);
    assert_eq!(t.post_events(&Value::Array(first[4..].to_vec())).await.0, 202);
    wait_processed(&t, 7 + 1 + 3).await;

    assert_eq!(t.used(&heavy, "total_tokens").await, 1200);
    assert_eq!(t.used(&light, "total_tokens").await, 150);
    assert_eq!(t.metric(&t.aggregator_url, "tally_aggregator_events_counted_total").await, 7);
    assert_eq!(t.metric(&t.aggregator_url, "tally_aggregator_events_duplicate_total").await, 4);

    let blocked = wait_for(Duration::from_secs(20), || async { t.decision(&heavy).await.is_some_and(|d| d["allowed"] == false) }).await;
    assert!(blocked, "heavy was never blocked; logs in {}", t.log_dir().display());
    let d = t.decision(&heavy).await.expect("decision");
    assert_eq!(d["subject"], heavy.as_str());
    assert!(d["version"].as_i64().unwrap() >= 1);
    assert!(d["calculated_at"].is_string());
    let q = &d["quotas"][0];
    assert_eq!(q["quota"], "monthly_tokens");
    assert_eq!(q["metric"], "total_tokens");
    assert_eq!(q["period"], "month");
    assert_eq!(q["scope"], Value::Null);
    assert_eq!(q["state"], "breached");
    assert_eq!(q["action"]["type"], "block");
    assert_eq!((q["used"].as_i64(), q["limit"].as_i64(), q["remaining"].as_i64()), (Some(1200), Some(1000), Some(0)));
    assert!(q["resets_at"].as_str().unwrap().contains("-01T00:00:00"), "{q}");

    let light_ok = wait_for(Duration::from_secs(20), || async {
        t.decision(&light).await.is_some_and(|d| d["allowed"] == true && d["quotas"][0]["used"] == 150)
    })
    .await;
    assert!(light_ok, "light's decision never showed 150 tokens allowed");

    let usage = t.usage(&heavy).await;
    let row = &usage["ledgers"][0];
    assert_eq!((row["used"].as_i64(), row["limit"].as_i64()), (Some(1200), Some(1000)));
    assert!(row["period_start"].is_string() && row["period_end"].is_string());

    // The database the services created compares text byte for byte, whatever the server's
    // locale (common/src/postgres.rs, BYTE_ORDER_COLLATION).
    let collation: String =
        sqlx::query_scalar("SELECT datcollate FROM pg_database WHERE datname = current_database()").fetch_one(&t.pg().await).await.unwrap();
    assert_eq!(collation, "C");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invalid_event_refuses_the_whole_batch_naming_index_and_field() {
    let t = Tally::start(Some(TIERS)).await;
    let subject = format!("s-{}", t.id);
    let mut batch = vec![event("a", &subject, 10, 0), event("b", &subject, 10, 0)];
    batch.push(json!({"id": "c", "subject": subject, "time": "not a time"}));
    let (status, body) = t.post_events(&Value::Array(batch)).await;
    assert_eq!(status, 400);
    assert_eq!(body["index"], 2);
    assert_eq!(body["field"], "time");
    assert!(body["error"].as_str().unwrap().contains("RFC 3339"), "{body}");

    let (status, body) = t.post_events(&json!({"id": "x", "subject": subject, "time": "2026-11-22T10:00:00Z", "output_tokens": -5})).await;
    assert_eq!(status, 400);
    assert_eq!(body["field"], "output_tokens");

    let (status, _) = t.post_events(&json!([])).await;
    assert_eq!(status, 400);

    // Nothing of the refused batches was produced: only this event is ever counted.
    assert_eq!(t.post_events(&event("d", &subject, 7, 0)).await.0, 202);
    wait_processed(&t, 1).await;
    assert_eq!(t.used(&subject, "total_tokens").await, 7);
    assert_eq!(t.metric(&t.ingest_url, "tally_ingest_events_total").await, 1);
    assert_eq!(t.metric(&t.ingest_url, "tally_ingest_rejected_requests_total").await, 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn services_expose_health_and_metrics() {
    let t = Tally::start(None).await;
    for (url, metric) in [
        (&t.ingest_url, "tally_ingest_events_total"),
        (&t.api_url, "tally_api_decisions_served_total"),
        (&t.aggregator_url, "tally_aggregator_events_counted_total"),
    ] {
        let r = reqwest::get(format!("{url}/healthz")).await.unwrap();
        assert_eq!(r.status(), 200);
        let text = reqwest::get(format!("{url}/metrics")).await.unwrap().text().await.unwrap();
        assert!(text.contains(&format!("# TYPE {metric}")), "{url}/metrics lacks {metric}:\n{text}");
    }
    let (status, body) = t.get(&format!("{}/v1/subjects/nobody/decision", t.api_url)).await;
    assert_eq!(status, 404);
    assert_eq!(body["field"], "subject");
}
