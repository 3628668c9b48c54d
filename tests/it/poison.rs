//! Hostile events: amounts past the bound, sums that would overflow a stored ledger row, and
//! one event that fails its batch's transaction among thousands. Each is refused or
//! quarantined with its reason, no ledger is wrapped or half-applied, and every other
//! event is counted exactly, its partition moving on.

use crate::support;

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::producer::Producer;
use serde_json::{json, Value};
use support::{authority, via_port, wait_for, Tally, TcpSwitch};

/// The largest amount Tally counts (`tally_domain::metric::MAX_AMOUNT`).
const MAX_AMOUNT: i64 = 1_000_000_000_000_000;

const TIERS: &str = support::fixtures::METERED;

fn event(id: &str, subject: &str, input_tokens: i64) -> Value {
    json!({"id": id, "subject": subject, "time": chrono::Utc::now().to_rfc3339(), "input_tokens": input_tokens, "output_tokens": 0})
}

/// The usage topic's partition count.
fn partitions(t: &Tally) -> i32 {
    let metadata = t.producer().client().fetch_metadata(Some(&t.usage_topic), Duration::from_secs(10)).expect("topic metadata");
    metadata.topics()[0].partitions().len() as i32
}

/// Produces `n` events of subjects `<prefix>-<i>` straight to the usage topic, spread over
/// every partition; returns the tokens each subject was sent.
async fn produce_others(t: &Tally, prefix: &str, n: usize) -> BTreeMap<String, i64> {
    let count = partitions(t);
    let mut sent = BTreeMap::new();
    for i in 0..n {
        let subject = format!("{prefix}-{i}");
        let tokens = 100 + i as i64;
        let e = event(&format!("{prefix}-e{i}"), &subject, tokens);
        t.produce_raw(Some(i as i32 % count), &subject, e.to_string().as_bytes()).await;
        sent.insert(subject, tokens);
    }
    sent
}

/// The ledgers' `used` per subject for `total_tokens` over all scopes.
async fn used_by_subject(pool: &sqlx::PgPool) -> BTreeMap<String, i64> {
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT subject, sum(used)::bigint FROM ledgers WHERE metric = 'total_tokens' AND scope = '*' GROUP BY subject")
            .fetch_all(pool)
            .await
            .unwrap();
    rows.into_iter().collect()
}

/// Waits until the stored offsets reach the end of the usage topic (`produced` messages).
async fn wait_consumed(t: &Tally, pool: &sqlx::PgPool, produced: i64, timeout: Duration) -> bool {
    wait_for(timeout, || async { t.consumed(pool).await >= produced }).await
}

async fn quarantined(t: &Tally) -> Vec<Value> {
    t.read_topic(&t.topic("quarantine")).await.into_iter().map(|(_, v)| v).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn amounts_near_i64_max_are_refused_at_ingest_and_quarantined_as_overflow_from_kafka() {
    let t = Tally::start(Some(TIERS)).await;
    let pool = t.pg().await;
    let near_max = [event("huge-1", "victim", i64::MAX - 10), event("huge-2", "victim", i64::MAX - 20)];

    // Through ingest: refused, naming the field and the index; nothing produced.
    let (status, body) = t.post_events(&json!([event("fine", "victim", 5), near_max[1].clone()])).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!((body["field"].as_str(), body["index"].as_i64()), (Some("input_tokens"), Some(1)), "{body}");
    assert!(body["error"].as_str().unwrap_or_default().contains("10^15"), "the error states the bound: {body}");

    // Straight to Kafka: each valid JSON, each quarantined as overflow, the ledger untouched.
    assert_eq!(t.post_events(&event("before", "victim", 7)).await.0, 202);
    for e in &near_max {
        t.produce_raw(None, "victim", e.to_string().as_bytes()).await;
    }
    let others = produce_others(&t, "after", 20).await;
    assert!(
        wait_consumed(&t, &pool, 23, Duration::from_secs(60)).await,
        "offsets never reached the end; logs in {}",
        t.log_dir().display()
    );
    let used = used_by_subject(&pool).await;
    assert_eq!(used.get("victim"), Some(&7), "the victim's ledger holds only its valid event: {used:?}");
    for (subject, tokens) in &others {
        assert_eq!(used.get(subject), Some(tokens), "{subject} counted exactly");
    }
    let q = quarantined(&t).await;
    let overflow: Vec<&Value> = q.iter().filter(|v| v["reason"] == "overflow").collect();
    assert_eq!(overflow.len(), 2, "{q:?}");
    for v in overflow {
        assert!(["huge-1", "huge-2"].iter().any(|id| v["original"].as_str().unwrap().contains(id)), "original bytes kept: {v}");
        assert!(v["detail"].as_str().unwrap().contains("input_tokens"), "the detail names the field: {v}");
    }
    assert_eq!(q.len(), 2, "nothing else is quarantined: {q:?}");
    let decision = t.decision("victim").await.expect("the victim has a decision");
    assert_eq!(decision["allowed"], true, "{decision}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_event_that_would_overflow_a_stored_ledger_row_is_isolated_and_its_partition_moves_on() {
    let t = Tally::start(Some(TIERS)).await;
    let pool = t.pg().await;
    // Each amount is within the bound; the second takes the stored row past it.
    assert_eq!(t.post_events(&event("fill", "whale", MAX_AMOUNT - 10)).await.0, 202);
    assert!(wait_consumed(&t, &pool, 1, Duration::from_secs(60)).await);
    let (status, body) = t.post_events(&event("tip", "whale", 11)).await;
    assert_eq!(status, 202, "valid on its own: {body}");
    // Valid JSON that Postgres could not store (text holds no NUL), straight to Kafka: refused
    // as it is parsed.
    let nul = event("nul", "nul\u{0}subject", 5).to_string();
    t.produce_raw(None, "nul", nul.as_bytes()).await;
    let others = produce_others(&t, "next", 20).await;

    let isolated = wait_for(Duration::from_secs(60), || async { t.consumed(&pool).await >= 23 }).await;
    assert!(isolated, "the partition stopped behind the overflowing event; logs in {}", t.log_dir().display());
    let used = used_by_subject(&pool).await;
    assert_eq!(used.get("whale"), Some(&(MAX_AMOUNT - 10)), "neither wrapped, clamped nor half-applied");
    for (subject, tokens) in &others {
        assert_eq!(used.get(subject), Some(tokens), "{subject} counted exactly");
    }
    let counted: Vec<String> =
        sqlx::query_scalar("SELECT event_id FROM processed_events WHERE subject = 'whale'").fetch_all(&pool).await.unwrap();
    assert_eq!(counted, ["fill"], "the refused event has no dedupe record");
    let q = quarantined(&t).await;
    assert_eq!(q.len(), 2, "{q:?}");
    let of = |id: &str| {
        q.iter()
            .find(|v| v["original"].as_str().unwrap_or_default().contains(&format!("\"{id}\"")))
            .unwrap_or_else(|| panic!("{id} not quarantined: {q:?}"))
    };
    let tip = of("tip");
    assert_eq!((tip["reason"].as_str(), tip["event_id"].as_str()), (Some("overflow"), Some("tip")), "{tip}");
    assert!(tip["detail"].as_str().unwrap().contains("ledgers_used_within_bound"), "{tip}");
    assert!(!of("nul")["reason"].as_str().unwrap().is_empty());
    assert!(t.metric(&t.aggregator_url, "tally_aggregator_events_isolated_total").await >= 1);
}

/// Produces `good` events of 50 subjects around one event that overflows `whale`'s full
/// ledger row, while no aggregator runs, so that they meet in one batch; returns the
/// tokens each subject was sent.
async fn produce_batch_with_poison(t: &Tally, good: usize) -> BTreeMap<String, i64> {
    let producer = t.producer();
    let mut sent: BTreeMap<String, i64> = BTreeMap::new();
    let mut pending = Vec::new();
    for i in 0..good {
        if i == good / 2 {
            let poison = event("poison", "whale", 10).to_string();
            let record = rdkafka::producer::FutureRecord::to(&t.usage_topic).key("whale").payload(&poison).partition(0);
            pending.push(producer.send_result(record).map_err(|(e, _)| e).expect("queue the poison"));
        }
        let subject = format!("s{}", i % 50);
        let tokens = 1 + (i % 13) as i64;
        *sent.entry(subject.clone()).or_default() += tokens;
        let payload = event(&format!("good-{i}"), &subject, tokens).to_string();
        // Most of them on the poison's partition, so the poison sits inside a large batch.
        let partition = if i % 4 == 0 { 1 } else { 0 };
        let record = rdkafka::producer::FutureRecord::to(&t.usage_topic).key(&subject).payload(&payload).partition(partition);
        pending.push(producer.send_result(record).map_err(|(e, _)| e).expect("queue an event"));
    }
    for p in pending {
        p.await.expect("delivery").expect("acknowledged");
    }
    sent
}

#[tokio::test(flavor = "multi_thread")]
async fn one_event_that_fails_its_batch_among_ten_thousand_is_quarantined_and_the_rest_counted_exactly() {
    let mut t = Tally::start(Some(TIERS)).await;
    let pool = t.pg().await;
    assert_eq!(t.post_events(&event("fill", "whale", MAX_AMOUNT - 5)).await.0, 202);
    assert!(wait_consumed(&t, &pool, 1, Duration::from_secs(60)).await);
    t.kill("aggregator");

    let sent = produce_batch_with_poison(&t, 10_000).await;
    t.spawn("aggregator");
    let done = wait_consumed(&t, &pool, 10_002, Duration::from_secs(120)).await;
    assert!(done, "offsets did not reach the end: {}; logs in {}", t.consumed(&pool).await, t.log_dir().display());
    let used = used_by_subject(&pool).await;
    assert_eq!(used.get("whale"), Some(&(MAX_AMOUNT - 5)));
    for (subject, tokens) in &sent {
        assert_eq!(used.get(subject), Some(tokens), "{subject} counted to the token");
    }
    let counted: i64 = sqlx::query_scalar("SELECT count(*) FROM processed_events").fetch_one(&pool).await.unwrap();
    assert_eq!(counted, 10_001, "every good event once, the poison never");
    let q = quarantined(&t).await;
    assert_eq!(q.len(), 1, "{q:?}");
    assert_eq!((q[0]["reason"].as_str(), q[0]["event_id"].as_str()), (Some("overflow"), Some("poison")));
    assert_eq!(t.metric(&t.aggregator_url, "tally_aggregator_events_isolated_total").await, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_postgres_outage_during_a_poisoned_batch_is_retried_and_quarantines_nothing_else() {
    let mut t = Tally::prepare(Some(TIERS));
    let switch = TcpSwitch::start(authority(&t.database_url)).await;
    t.spawn("ingest");
    t.spawn("api");
    t.spawn_env("aggregator", &[("TALLY_DATABASE_URL", via_port(&t.database_url, switch.port))]);
    t.wait_healthy().await;
    let pool = t.pg().await;
    assert_eq!(t.post_events(&event("fill", "whale", MAX_AMOUNT - 5)).await.0, 202);
    assert!(wait_consumed(&t, &pool, 1, Duration::from_secs(60)).await);

    // The batch holding the poison first meets an unreachable database: a transient failure,
    // retried with backoff, which must not send anything to quarantine.
    switch.set(false);
    let sent = produce_batch_with_poison(&t, 3_000).await;
    let retried =
        wait_for(Duration::from_secs(30), || async { t.metric(&t.aggregator_url, "tally_aggregator_database_retries_total").await > 0 })
            .await;
    assert!(retried, "the aggregator never met the outage; logs in {}", t.log_dir().display());
    assert_eq!(t.metric(&t.aggregator_url, "tally_aggregator_events_quarantined_total").await, 0, "an outage quarantines nothing");
    switch.set(true);

    assert!(wait_consumed(&t, &pool, 3_002, Duration::from_secs(120)).await, "logs in {}", t.log_dir().display());
    let used = used_by_subject(&pool).await;
    for (subject, tokens) in &sent {
        assert_eq!(used.get(subject), Some(tokens), "{subject} counted to the token");
    }
    assert_eq!(used.get("whale"), Some(&(MAX_AMOUNT - 5)));
    let q = quarantined(&t).await;
    assert_eq!(q.len(), 1, "only the poison: {q:?}");
    assert_eq!(q[0]["event_id"], "poison");
}
