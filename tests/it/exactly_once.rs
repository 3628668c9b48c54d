//! Exactly-once counting under failure: kill -9 at random points, a rebalance between two
//! instances, conflicting duplicates and a poison message. Totals are checked to the token
//! against the sum over distinct event ids.

use crate::support;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use serde_json::{json, Value};
use support::{wait_for, Tally};

const TIERS: &str = "
default_tier: metered
timezone: UTC
quotas:
  - name: monthly_tokens
    metric: total_tokens
    period: month
    limit: 1000000000000
  - name: monthly_requests
    metric: requests
    period: month
    limit: 1000000000000
tiers:
  - name: metered
    priority: 0
    rate_multiplier: 1
";

/// A small deterministic generator (xorshift64*), so a failing run can be replayed by seed.
struct Rng(u64);

impl Rng {
    fn seeded() -> Rng {
        let seed = std::env::var("TALLY_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1);
        eprintln!("seed: TALLY_TEST_SEED={seed}");
        Rng(seed)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The events a gateway sent, and what the ledgers must say.
#[derive(Default)]
struct Sent {
    messages: i64,
    ids: HashSet<String>,
    tokens: BTreeMap<String, i64>,
    requests: BTreeMap<String, i64>,
}

impl Sent {
    fn record(&mut self, batch: &[Value]) {
        self.messages += batch.len() as i64;
        for e in batch {
            if self.ids.insert(e["id"].as_str().unwrap().to_string()) {
                let subject = e["subject"].as_str().unwrap().to_string();
                let tokens = e["input_tokens"].as_i64().unwrap() + e["output_tokens"].as_i64().unwrap();
                *self.tokens.entry(subject.clone()).or_default() += tokens;
                *self.requests.entry(subject).or_default() += 1;
            }
        }
    }
}

fn random_batch(rng: &mut Rng, test: &str, first: usize, n: usize) -> Vec<Value> {
    (first..first + n)
        .map(|i| {
            json!({
                "id": format!("{test}-{i}"),
                "subject": format!("user-{}", rng.below(25)),
                "time": chrono::Utc::now().to_rfc3339(),
                "input_tokens": rng.below(5000),
                "output_tokens": rng.below(2000),
            })
        })
        .collect()
}

async fn post(t: &Tally, sent: &mut Sent, batch: Vec<Value>) {
    let (status, body) = t.post_events(&Value::Array(batch.clone())).await;
    assert_eq!(status, 202, "{body}");
    sent.record(&batch);
}

/// Whether the aggregators consume every message sent so far within `timeout`.
async fn all_consumed(t: &Tally, pool: &sqlx::PgPool, sent: &Sent, timeout: Duration) -> bool {
    wait_for(timeout, || async { t.consumed(pool).await >= sent.messages }).await
}

/// Posts `batch` and waits until the aggregators have consumed every message sent so far.
async fn post_and_wait(t: &Tally, pool: &sqlx::PgPool, sent: &mut Sent, batch: Vec<Value>) {
    post(t, sent, batch).await;
    let consumed = all_consumed(t, pool, sent, Duration::from_secs(30)).await;
    assert!(consumed, "not consumed within 30 s; logs in {}", t.log_dir().display());
}

/// Waits until the aggregators have consumed every message sent, then checks every ledger.
async fn assert_exact_totals(t: &Tally, sent: &Sent) {
    let pool = t.pg().await;
    let consumed = all_consumed(t, &pool, sent, Duration::from_secs(90)).await;
    assert!(consumed, "consumed {} of {} messages; logs in {}", t.consumed(&pool).await, sent.messages, t.log_dir().display());
    assert_eq!(t.consumed(&pool).await, sent.messages, "consumed more messages than were sent");

    let counted: i64 = sqlx::query_scalar("SELECT count(*) FROM processed_events").fetch_one(&pool).await.unwrap();
    assert_eq!(counted, sent.ids.len() as i64, "distinct events counted");
    for (metric, expected) in [("total_tokens", &sent.tokens), ("requests", &sent.requests)] {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT subject, sum(used)::bigint FROM ledgers WHERE metric = $1 AND scope = '*' GROUP BY subject ORDER BY subject",
        )
        .bind(metric)
        .fetch_all(&pool)
        .await
        .unwrap();
        let actual: BTreeMap<String, i64> = rows.into_iter().collect();
        assert_eq!(&actual, expected, "{metric} per subject");
    }
}

/// Posts `rounds` random batches of ids `{tag}-N` at random intervals, a part of some of them
/// again (gateways retry), and kills the aggregator with kill -9 after every fifth round,
/// starting a new one. Returns how many were killed, and aggregator counter `metric` summed
/// over every instance (each read just before it was killed, the last one at the end).
async fn post_with_kills(t: &mut Tally, rng: &mut Rng, sent: &mut Sent, tag: &str, rounds: usize, metric: &str) -> (usize, i64) {
    let (mut next_id, mut kills, mut total) = (0, 0, 0);
    for round in 0..rounds {
        let n = 20 + rng.below(150) as usize;
        let batch = random_batch(rng, tag, next_id, n);
        next_id += n;
        post(t, sent, batch.clone()).await;
        if rng.below(3) == 0 {
            let from = rng.below(n as u64) as usize;
            post(t, sent, batch[from..].to_vec()).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.below(250))).await;
        if round % 5 == 4 {
            total += t.metric(&t.aggregator_url, metric).await;
            t.kill("aggregator");
            kills += 1;
            t.spawn("aggregator");
        }
    }
    (kills, total)
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_at_random_points_counts_each_distinct_event_exactly_once() {
    let mut rng = Rng::seeded();
    let mut t = Tally::start(Some(TIERS)).await;
    let mut sent = Sent::default();
    let (kills, _) = post_with_kills(&mut t, &mut rng, &mut sent, "k", 40, "tally_aggregator_events_counted_total").await;
    assert!(kills >= 8);
    assert!(sent.messages > sent.ids.len() as i64, "the run must include duplicates");
    assert_exact_totals(&t, &sent).await;
}

/// Every subject's tokens climb through nine thresholds, so many events are urgent and are
/// committed ahead of their batches ([`tally_aggregator::headroom`]).
const THRESHOLD_TIERS: &str = "
default_tier: metered
timezone: UTC
quotas:
  - name: monthly_tokens
    metric: total_tokens
    period: month
    limit: 400000
    thresholds: [10, 20, 30, 40, 50, 60, 70, 80, 90]
  - name: monthly_requests
    metric: requests
    period: month
    limit: 1000000000000
tiers:
  - name: metered
    priority: 0
    rate_multiplier: 1
";

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_while_events_reach_thresholds_counts_each_once_and_fires_each_threshold_once() {
    let mut rng = Rng::seeded();
    let mut t = Tally::start(Some(THRESHOLD_TIERS)).await;
    let mut sent = Sent::default();
    let (kills, mut fast_commits) = post_with_kills(&mut t, &mut rng, &mut sent, "f", 30, "tally_aggregator_fast_commits_total").await;
    assert!(kills >= 6);
    assert_exact_totals(&t, &sent).await;
    fast_commits += t.metric(&t.aggregator_url, "tally_aggregator_fast_commits_total").await;
    assert!(fast_commits > 0, "no urgent event was committed ahead of its batch");
    // Each threshold the final usage reached fired once: no more (a replay), no fewer (an
    // event counted early and then skipped by its batch).
    let pool = t.pg().await;
    let fired: Vec<(String, i64)> =
        sqlx::query_as("SELECT subject, count(*) FROM thresholds_fired WHERE quota = 'monthly_tokens' GROUP BY subject ORDER BY subject")
            .fetch_all(&pool)
            .await
            .unwrap();
    let expected: Vec<(String, i64)> = sent
        .tokens
        .iter()
        .map(|(subject, tokens)| (subject.clone(), (1..=9).filter(|k| tokens * 100 >= 400_000 * k * 10).count() as i64))
        .filter(|(_, n)| *n > 0)
        .collect();
    assert_eq!(fired, expected, "thresholds fired per subject");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_instances_with_a_rebalance_midstream_count_exactly() {
    let mut rng = Rng::seeded();
    let mut t = Tally::start(Some(TIERS)).await;
    let first = t.pids("aggregator")[0];
    let mut sent = Sent::default();
    let mut next_id = 0;
    for round in 0..30 {
        let n = 50 + rng.below(100) as usize;
        let batch = random_batch(&mut rng, "r", next_id, n);
        next_id += n;
        post(&t, &mut sent, batch.clone()).await;
        if round % 4 == 0 {
            post(&t, &mut sent, batch).await;
        }
        tokio::time::sleep(Duration::from_millis(50 + rng.below(100))).await;
        if round == 8 {
            t.spawn_aggregator();
        }
        if round == 20 {
            // The first instance dies without a goodbye; the second takes everything over.
            t.kill_pid(first);
        }
    }
    assert_exact_totals(&t, &sent).await;
    let pool = t.pg().await;
    let reclaimed: i64 = sqlx::query_scalar("SELECT count(*) FROM consumer_offsets WHERE group_id = $1 AND epoch > 1")
        .bind(&t.group)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(reclaimed > 0, "no partition changed owner: there was no rebalance");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_id_with_another_payload_is_quarantined_as_a_conflict() {
    let t = Tally::start(Some(TIERS)).await;
    let pool = t.pg().await;
    let e = |id: &str, tokens: i64| json!({"id": id, "subject": "c", "time": chrono::Utc::now().to_rfc3339(), "input_tokens": tokens});
    // Across batches: the first is counted, the second is a conflict.
    assert_eq!(t.post_events(&e("e1", 10)).await.0, 202);
    assert!(wait_for(Duration::from_secs(30), || async { t.consumed(&pool).await >= 1 }).await);
    assert_eq!(t.post_events(&e("e1", 20)).await.0, 202);
    // Within one batch: the first wins.
    assert_eq!(t.post_events(&json!([e("e2", 5), e("e2", 6)])).await.0, 202);
    assert!(wait_for(Duration::from_secs(30), || async { t.consumed(&pool).await >= 4 }).await);

    assert_eq!(t.used("c", "total_tokens").await, 15);
    let quarantined = t.read_topic(&t.topic("quarantine")).await;
    let conflicts: Vec<&Value> =
        quarantined.iter().map(|(_, v)| v).filter(|v| v["reason"].as_str().unwrap_or("").starts_with("conflict")).collect();
    assert_eq!(conflicts.len(), 2, "{quarantined:?}");
    let ids: HashSet<&str> = conflicts.iter().map(|v| v["event_id"].as_str().unwrap()).collect();
    assert_eq!(ids, HashSet::from(["e1", "e2"]));
    assert!(conflicts.iter().any(|v| v["original"].as_str().unwrap().contains("\"input_tokens\":20")));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_poison_message_last_in_its_partition_advances_the_offset_and_is_quarantined() {
    let t = Tally::start(Some(TIERS)).await;
    let pool = t.pg().await;
    let valid = json!({"id": "ok-1", "subject": "p", "time": chrono::Utc::now().to_rfc3339(), "output_tokens": 3});
    let (p, first) = t.produce_raw(Some(0), "p", valid.to_string().as_bytes()).await;
    let (_, poison) = t.produce_raw(Some(p), "p", &[0xff, 0xfe, b'{']).await;
    assert_eq!(poison, first + 1);
    let advanced = wait_for(Duration::from_secs(30), || async {
        let next: Option<i64> = sqlx::query_scalar("SELECT next_offset FROM consumer_offsets WHERE group_id = $1 AND partition = $2")
            .bind(&t.group)
            .bind(p)
            .fetch_optional(&pool)
            .await
            .unwrap();
        next == Some(poison + 1)
    })
    .await;
    assert!(advanced, "the offset never moved past the poison message; logs in {}", t.log_dir().display());
    assert_eq!(t.used("p", "total_tokens").await, 3);
    let quarantined = t.read_topic(&t.topic("quarantine")).await;
    assert_eq!(quarantined.len(), 1, "{quarantined:?}");
    let q = &quarantined[0].1;
    assert!(q["reason"].as_str().unwrap().starts_with("invalid event"), "{q}");
    assert_eq!((q["partition"].as_i64(), q["offset"].as_i64()), (Some(p as i64), Some(poison)));
    assert_eq!((q["original"].as_str(), q["original_encoding"].as_str()), (Some("fffe7b"), Some("hex")));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_correction_reverts_its_event_once_however_often_it_is_delivered() {
    let mut t = Tally::start(Some(TIERS)).await;
    let pool = t.pg().await;
    let now = chrono::Utc::now().to_rfc3339();
    let e = |id: &str, tokens: i64| json!({"id": id, "subject": "fix", "time": now, "input_tokens": tokens});
    let fix = |id: &str, target: &str| json!({"id": id, "subject": "fix", "time": now, "corrects": target});
    assert_eq!(t.post_events(&json!([e("e1", 100), e("e2", 50)])).await.0, 202);
    assert_eq!(t.post_events(&fix("c1", "e1")).await.0, 202);
    assert!(wait_for(Duration::from_secs(30), || async { t.consumed(&pool).await >= 3 }).await);
    assert_eq!(t.used("fix", "total_tokens").await, 50);
    assert_eq!(t.used("fix", "requests").await, 1);

    // The same correction again, after a crash, and two that must be refused.
    t.kill("aggregator");
    t.spawn("aggregator");
    assert_eq!(t.post_events(&json!([fix("c1", "e1"), fix("c2", "e1"), fix("c3", "never-sent")])).await.0, 202);
    assert!(wait_for(Duration::from_secs(60), || async { t.consumed(&pool).await >= 6 }).await);
    assert_eq!(t.used("fix", "total_tokens").await, 50);
    assert_eq!(t.used("fix", "requests").await, 1);

    let counted: Vec<String> =
        sqlx::query_scalar("SELECT event_id FROM processed_events ORDER BY event_id").fetch_all(&pool).await.unwrap();
    assert_eq!(counted, ["c1", "e1", "e2"]);
    let quarantined = t.read_topic(&t.topic("quarantine")).await;
    let refused: HashSet<&str> = quarantined
        .iter()
        .filter(|(_, v)| v["reason"].as_str().unwrap_or("").starts_with("correction"))
        .map(|(_, v)| v["event_id"].as_str().unwrap())
        .collect();
    assert_eq!(refused, HashSet::from(["c2", "c3"]));
}

#[tokio::test(flavor = "multi_thread")]
async fn batches_mixing_counted_and_new_ids_count_only_the_new_ones_on_either_dedupe_insert() {
    // A batch records its ids with a plain insert while none is known, and falls back to an
    // insert that skips known ids when one is; after a fallback the next 16 batches skip
    // known ids from the start (aggregator/src/dedupe.rs). Each round here waits until the
    // aggregator consumed it, so it is a batch of its own (or one per commit lane).
    let mut rng = Rng::seeded();
    let t = Tally::start(Some(TIERS)).await;
    let pool = t.pg().await;
    let mut sent = Sent::default();
    let fallbacks = || t.metric(&t.aggregator_url, "tally_aggregator_dedupe_fallbacks_total");
    let mut next_id = 0;
    let mut fresh = |rng: &mut Rng, n: usize| {
        next_id += n;
        random_batch(rng, "m", next_id - n, n)
    };
    let first = fresh(&mut rng, 100);
    post_and_wait(&t, &pool, &mut sent, first.clone()).await;
    assert_eq!(fallbacks().await, 0, "only new ids: the plain insert must have recorded them");

    // Half of these were counted in the first round. The metric moves when the loop has
    // taken the lane's result, just after the offsets are committed: wait for it.
    post_and_wait(&t, &pool, &mut sent, [&first[50..], &fresh(&mut rng, 50)[..]].concat()).await;
    let fell_back = wait_for(Duration::from_secs(10), || async { fallbacks().await >= 1 }).await;
    assert!(fell_back, "a batch with known ids must fall back to skipping them");

    // Past the cautious stretch, batches try the plain insert again: a known id then makes
    // one fall back again. Fresh ids never fall back, so the count read after them is
    // settled (a second lane's fallback from the mixed round included).
    for _ in 0..18 {
        post_and_wait(&t, &pool, &mut sent, fresh(&mut rng, 10)).await;
    }
    let before_last = fallbacks().await;
    post_and_wait(&t, &pool, &mut sent, [&first[..1], &fresh(&mut rng, 10)[..]].concat()).await;
    let fell_back_again = wait_for(Duration::from_secs(10), || async { fallbacks().await > before_last }).await;
    assert!(fell_back_again, "no batch tried the plain insert after the cautious stretch");

    assert!(sent.messages > sent.ids.len() as i64, "the run must include duplicates");
    assert_exact_totals(&t, &sent).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_subject_on_two_commit_lanes_with_the_same_ids_on_both_counts_each_event_once() {
    // The aggregator commits partitions 0 and 1 in different lanes (partition % 2), in
    // concurrent transactions. A producer that does not key by subject puts one subject's
    // events, and here every event twice, on both: the lanes then race for the same dedupe
    // records, ledger rows and decision row.
    let mut rng = Rng::seeded();
    let t = Tally::start(Some(TIERS)).await;
    let producer = t.producer();
    let mut sent = Sent::default();
    let mut payloads = Vec::new();
    for batch in 0..10 {
        for e in random_batch(&mut rng, "lane", batch * 60, 60) {
            let subject = e["subject"].as_str().unwrap().to_string();
            payloads.push((subject, e.to_string()));
            sent.record(&[e.clone(), e]);
        }
    }
    let mut sends = Vec::new();
    for (subject, payload) in &payloads {
        for partition in [0, 1] {
            let record = rdkafka::producer::FutureRecord::to(&t.usage_topic).key(subject).payload(payload).partition(partition);
            sends.push(producer.send(record, Duration::from_secs(30)));
        }
    }
    for delivery in futures::future::join_all(sends).await {
        delivery.expect("produce");
    }
    assert_exact_totals(&t, &sent).await;

    // Every subject's snapshots carry distinct versions: no two transactions published the
    // same version.
    let snapshots = t.read_topic(&t.topic("decisions")).await;
    let mut versions: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for (subject, snapshot) in &snapshots {
        versions.entry(subject.clone()).or_default().push(snapshot["version"].as_i64().unwrap());
    }
    for (subject, mut seen) in versions {
        let published = seen.len();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), published, "{subject} has a version published twice");
    }
}

/// Events whose dedupe rows exercise every column's edge: a NULL and a present API key and
/// correction, an empty scope, times before Postgres' epoch (2000), one with microseconds and
/// one with a fraction of a microsecond, a name outside ASCII, amounts past 32 bits, a cost
/// given and one priced at 0. No two numeric columns share a value.
fn dedupe_row_samples() -> Vec<tally_domain::event::UsageEvent> {
    use chrono::TimeZone;
    let base = tally_domain::event::UsageEvent {
        id: String::new(),
        subject: "acct-1".into(),
        time: chrono::Utc.with_ymd_and_hms(2026, 12, 7, 10, 11, 12).unwrap() + chrono::Duration::microseconds(345_678),
        api_key_sha256: Some("ab".repeat(32)),
        scope: "chat".into(),
        model: Some("gpt-4o-mini".into()),
        group: None,
        requests: 1,
        input_tokens: 9_000_000_000_000,
        output_tokens: 100,
        cached_tokens: 70_000,
        cost_micros: Some(1_234),
        attributes: Default::default(),
        corrects: None,
    };
    let before_2000 = chrono::Utc.with_ymd_and_hms(1999, 12, 31, 23, 59, 59).unwrap();
    vec![
        base.clone(),
        tally_domain::event::UsageEvent {
            subject: "usuário-ß-東京".into(),
            time: before_2000 + chrono::Duration::microseconds(999_999),
            api_key_sha256: None,
            scope: String::new(),
            cost_micros: None,
            corrects: Some("an-earlier-event".into()),
            requests: -1,
            ..base.clone()
        },
        tally_domain::event::UsageEvent { time: before_2000 + chrono::Duration::nanoseconds(999_999_500), ..base },
    ]
}

/// `time` as Postgres keeps it from sqlx: whole microseconds, a fraction cut toward 2000.
fn as_stored(time: chrono::DateTime<chrono::Utc>) -> chrono::DateTime<chrono::Utc> {
    let epoch = chrono::DateTime::from_timestamp(946_684_800, 0).unwrap();
    epoch + chrono::Duration::microseconds((time - epoch).num_microseconds().unwrap())
}

/// Records `batch` in a transaction of its own; returns what was found and, per candidate,
/// whether this call recorded it.
async fn record_event_ids(
    pool: &sqlx::PgPool,
    recorder: &tally_aggregator::dedupe::Recorder,
    batch: &[tally_aggregator::plan::Candidate<'_>],
) -> (tally_aggregator::dedupe::Recorded, Vec<bool>) {
    let mut tx = pool.begin().await.expect("begin");
    let recorded = recorder.record_event_ids(&mut tx, batch, 7).await.expect("record_event_ids");
    tx.commit().await.expect("commit");
    let fresh = batch.iter().map(|c| recorded.is_fresh(c)).collect();
    (recorded, fresh)
}

#[tokio::test(flavor = "multi_thread")]
async fn both_ways_of_recording_event_ids_write_the_same_dedupe_rows() {
    // The plain way is a binary COPY encoded by hand, the skipping way an INSERT of arrays
    // (aggregator/src/dedupe.rs); the corrections, history and reconciliation read these rows.
    use tally_aggregator::dedupe::Recorder;
    use tally_aggregator::plan::{Candidate, Delivery};
    let t = Tally::start(Some(TIERS)).await;
    let pool = t.pg().await;
    let delivery = Delivery { partition: 0, offset: 0, payload: None, parsed: None, decided_early: false, isolated: None };
    let samples = dedupe_row_samples();
    let candidates = |prefix: &str| -> Vec<Candidate<'_>> {
        samples
            .iter()
            .enumerate()
            .map(|(i, e)| Candidate {
                event: tally_domain::event::UsageEvent { id: format!("{prefix}-{i}"), ..e.clone() },
                fingerprint: format!("fingerprint-{i}"),
                day: tally_domain::event::event_day(e.time),
                delivery: &delivery,
            })
            .collect()
    };
    let recorder = Recorder::default();
    let (copied, fresh) = record_event_ids(&pool, &recorder, &candidates("copied")).await;
    assert!(!copied.fell_back && fresh.iter().all(|f| *f), "new ids only: the plain way records them all");

    // The same ids again, and one more: the plain way meets known ids, changes nothing, and
    // the skipping way records only the new one and reports the others' fingerprints.
    let mut again = candidates("copied");
    again.push(candidates("mixed").remove(0));
    let (mixed, fresh) = record_event_ids(&pool, &recorder, &again).await;
    assert!(mixed.fell_back);
    assert_eq!(fresh, [vec![false; samples.len()], vec![true]].concat());
    let first_fingerprints: BTreeMap<String, String> = mixed.seen_before.into_iter().map(|(key, fp)| (key.id, fp)).collect();
    let recorded_first: BTreeMap<String, String> =
        (0..samples.len()).map(|i| (format!("copied-{i}"), format!("fingerprint-{i}"))).collect();
    assert_eq!(first_fingerprints, recorded_first);

    // Within the cautious stretch after a fallback, new ids go the skipping way.
    let (skipped, fresh) = record_event_ids(&pool, &recorder, &candidates("skipped")).await;
    assert!(!skipped.fell_back && fresh.iter().all(|f| *f));

    type Row = (
        String,
        String,
        chrono::DateTime<chrono::Utc>,
        Option<String>,
        Option<String>,
        Option<i64>,
        Option<i64>,
        Option<i64>,
        Option<i64>,
        Option<i64>,
        Option<String>,
        Option<i64>,
    );
    let rows = |prefix: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_as::<_, Row>(
                "SELECT fingerprint, subject, event_time, scope, api_key_sha256, requests, input_tokens, output_tokens,
                        cached_tokens, cost_micros, corrects, config_version
                 FROM processed_events WHERE event_id LIKE $1 || '-%' ORDER BY event_id",
            )
            .bind(prefix)
            .fetch_all(&pool)
            .await
            .expect("read processed_events")
        }
    };
    let expected: Vec<Row> = samples
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let a = e.amounts();
            (
                format!("fingerprint-{i}"),
                e.subject.clone(),
                as_stored(e.time),
                Some(e.scope.clone()),
                e.api_key_sha256.clone(),
                Some(a.requests),
                Some(a.input_tokens),
                Some(a.output_tokens),
                Some(a.cached_tokens),
                Some(a.cost_micros),
                e.corrects.clone(),
                Some(7),
            )
        })
        .collect();
    assert_eq!(rows("skipped").await, expected, "the skipping way's rows");
    assert_eq!(rows("copied").await, expected, "the plain way's rows");
    // Both ways key each row by the UTC day of its time as stored (the partition key).
    let days: Vec<(String, chrono::NaiveDate)> =
        sqlx::query_as("SELECT event_id, event_day FROM processed_events ORDER BY event_id").fetch_all(&pool).await.expect("read days");
    let expected_days: Vec<(String, chrono::NaiveDate)> = ["copied", "mixed", "skipped"]
        .iter()
        .flat_map(|prefix| samples.iter().enumerate().map(move |(i, e)| (format!("{prefix}-{i}"), as_stored(e.time).date_naive())))
        .filter(|(id, _)| !id.starts_with("mixed-") || id == "mixed-0")
        .collect();
    assert_eq!(days, expected_days);
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM processed_events").fetch_one(&pool).await.expect("count");
    assert_eq!(total, 2 * samples.len() as i64 + 1, "the failed plain attempt left no row behind");

    // A batch of several COPY chunks (each row is well over 100 bytes).
    let many: Vec<Candidate<'_>> = (0..2 * tally_aggregator::dedupe::COPY_CHUNK / 100)
        .map(|i| Candidate {
            event: tally_domain::event::UsageEvent { id: format!("many-{i}"), input_tokens: i as i64, ..samples[0].clone() },
            fingerprint: format!("fingerprint-many-{i}"),
            day: tally_domain::event::event_day(samples[0].time),
            delivery: &delivery,
        })
        .collect();
    let (recorded, fresh) = record_event_ids(&pool, &Recorder::default(), &many).await;
    assert!(!recorded.fell_back && fresh.iter().all(|f| *f));
    let (rows, tokens): (i64, i64) =
        sqlx::query_as("SELECT count(*), sum(input_tokens)::bigint FROM processed_events WHERE event_id LIKE 'many-%'")
            .fetch_one(&pool)
            .await
            .expect("read the large batch");
    let n = many.len() as i64;
    assert_eq!((rows, tokens), (n, n * (n - 1) / 2), "every row of every chunk, each once");
}
