//! Component tests of the batch commit's guards, on a fresh migrated Postgres database per
//! test and no broker: `Store::commit_batch` refuses a batch whose range does not continue
//! the stored offset, or that comes from an owner fenced out by a later claim, and such a
//! refused batch writes nothing (no dedupe record, ledger row, decision, outbox message, and
//! the stored offset stays); and a rolling quota keeps a bounded number of ledger rows per
//! key, exact to the token, removing the buckets that left its window as time moves on.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};
use serde_json::json;
use tally_aggregator::plan::{parse_batch, Delivery};
use tally_aggregator::policy::{Policy, PolicyHandle};
use tally_aggregator::store::{Claim, Finish, Outcome, Range, Store, StoreError};
use tally_domain::period::{rolling_bucket, ROLLING_BUCKETS_PER_WINDOW};
use tally_testkit::TestDatabase;

/// The partition every test commits on.
const PARTITION: i32 = 0;

struct Fixture {
    db: TestDatabase,
    policy: PolicyHandle,
}

impl Fixture {
    async fn new() -> Fixture {
        // The built-in default: a monthly token quota, so a counted event writes a ledger row.
        Fixture::with_policy(Policy::builtin()).await
    }

    async fn with_policy(policy: Policy) -> Fixture {
        let db = TestDatabase::create("tally_store_test").await.expect("create the test database");
        Fixture { db, policy: PolicyHandle::new(policy) }
    }

    /// A store as one aggregator instance, `owner`, holds it.
    fn store(&self, owner: &str) -> Store {
        Store {
            pool: self.db.pool.clone(),
            group: "tally-ledger".to_string(),
            topic: "tally.usage.v1".to_string(),
            owner: owner.to_string(),
            decisions_topic: "tally.decisions.v1".to_string(),
            quarantine_topic: "tally.quarantine.v1".to_string(),
            policies: Default::default(),
            recorder: Default::default(),
        }
    }

    /// Commits one batch of `events` (event ids, one delivery each at offsets `start..`) as
    /// `store`, claiming the range `start..start + events.len()` at `epoch`.
    async fn commit(&self, store: &Store, epoch: i64, start: i64, events: &[&str]) -> Result<Outcome, StoreError> {
        let now = Utc::now();
        let mut deliveries: Vec<Delivery> =
            events.iter().zip(start..).map(|(id, offset)| Delivery::received(PARTITION, offset, Some(usage_event(id, now)))).collect();
        let range = Range { partition: PARTITION, epoch, start, next: start + events.len() as i64 };
        let parsed = parse_batch(&mut deliveries, now, Duration::days(3));
        store.commit_batch(&[range], parsed, &Default::default(), &self.policy, now, Duration::seconds(1), Finish::Commit).await
    }

    /// Commits one batch of `payloads` (one delivery each at offsets `start..`) as `store` at
    /// the instant `now`, with the default lateness window of 35 days.
    async fn commit_at(&self, store: &Store, epoch: i64, start: i64, payloads: Vec<Vec<u8>>, now: DateTime<Utc>) -> Outcome {
        let range = Range { partition: PARTITION, epoch, start, next: start + payloads.len() as i64 };
        let mut deliveries: Vec<Delivery> =
            payloads.into_iter().zip(start..).map(|(payload, offset)| Delivery::received(PARTITION, offset, Some(payload))).collect();
        let parsed = parse_batch(&mut deliveries, now, Duration::days(35));
        store
            .commit_batch(&[range], parsed, &Default::default(), &self.policy, now, Duration::seconds(1), Finish::Commit)
            .await
            .expect("the batch commits")
    }

    /// The ledger rows of `period`: start -> used.
    async fn rows_of(&self, period: &str) -> BTreeMap<DateTime<Utc>, i64> {
        let rows: Vec<(DateTime<Utc>, i64)> =
            sqlx::query_as("SELECT period_start, used FROM ledgers WHERE period = $1").bind(period).fetch_all(&self.db.pool).await.unwrap();
        rows.into_iter().collect()
    }

    /// Every ledger row, by period and start.
    async fn stored_rows(&self) -> Vec<StoredRow> {
        sqlx::query_as("SELECT period, period_start, period_end, used, quota FROM ledgers ORDER BY period, period_start")
            .fetch_all(&self.db.pool)
            .await
            .unwrap()
    }

    /// The `used` of `subject`'s first quota in its latest decision snapshot.
    async fn decided_used(&self, subject: &str) -> i64 {
        let snapshot: serde_json::Value = sqlx::query_scalar("SELECT snapshot::jsonb FROM decisions WHERE subject = $1")
            .bind(subject)
            .fetch_one(&self.db.pool)
            .await
            .unwrap();
        snapshot["quotas"][0]["used"].as_i64().expect("a used figure")
    }

    /// What the tables hold that a batch commit writes.
    async fn written(&self) -> Written {
        let pool = &self.db.pool;
        let count = |table: &str| format!("SELECT count(*) FROM {table}");
        let offset: (i64, String, i64) = sqlx::query_as("SELECT next_offset, owner, epoch FROM consumer_offsets WHERE partition = $1")
            .bind(PARTITION)
            .fetch_one(pool)
            .await
            .unwrap();
        Written {
            dedupe_records: sqlx::query_scalar(&count("processed_events")).fetch_one(pool).await.unwrap(),
            ledger_used: sqlx::query_scalar("SELECT coalesce(sum(used), 0)::bigint FROM ledgers").fetch_one(pool).await.unwrap(),
            decisions: sqlx::query_scalar(&count("decisions")).fetch_one(pool).await.unwrap(),
            outbox: sqlx::query_scalar(&count("outbox")).fetch_one(pool).await.unwrap(),
            offset: StoredOffset { next_offset: offset.0, owner: offset.1, epoch: offset.2 },
        }
    }

    async fn done(self) {
        self.db.remove().await.expect("drop the test database");
    }
}

/// The stored offset of [`PARTITION`] and who owns it.
#[derive(Debug, PartialEq, Eq)]
struct StoredOffset {
    next_offset: i64,
    owner: String,
    epoch: i64,
}

#[derive(Debug, PartialEq, Eq)]
struct Written {
    dedupe_records: i64,
    ledger_used: i64,
    decisions: i64,
    outbox: i64,
    offset: StoredOffset,
}

/// A ledger row as the rolling-window tests compare it.
#[derive(Debug, PartialEq, Eq, sqlx::FromRow)]
struct StoredRow {
    period: String,
    period_start: DateTime<Utc>,
    period_end: DateTime<Utc>,
    used: i64,
    quota: String,
}

impl StoredRow {
    fn new(period: &str, period_start: DateTime<Utc>, period_end: DateTime<Utc>, used: i64, quota: &str) -> StoredRow {
        StoredRow { period: period.to_string(), period_start, period_end, used, quota: quota.to_string() }
    }
}

/// Tokens each test event counts.
const TOKENS: i64 = 7;

fn usage_event(id: &str, now: chrono::DateTime<Utc>) -> Vec<u8> {
    json!({"id": id, "subject": "alice", "time": now.to_rfc3339(), "input_tokens": TOKENS}).to_string().into_bytes()
}

fn assert_fenced(result: Result<Outcome, StoreError>, start: i64, epoch: i64) {
    match result {
        Err(StoreError::Fenced { partition, start: s, epoch: e }) => assert_eq!((partition, s, e), (PARTITION, start, epoch)),
        other => panic!("expected the batch at {start}, epoch {epoch} to be fenced, got {other:?}"),
    }
}

/// One tier with one quota: `limit` output tokens in a rolling day.
fn rolling_daily_policy(limit: i64) -> Policy {
    let yaml = format!(
        "default_tier: t\ntimezone: UTC\nquotas:\n  - {{name: daily, metric: output_tokens, period: rolling 1d, limit: {limit}}}\n\
         tiers:\n  - {{name: t, priority: 0, rate_multiplier: 1}}\n"
    );
    Policy::from_yaml(&yaml, "test").expect("a valid rolling policy")
}

#[tokio::test]
async fn a_range_that_does_not_continue_the_stored_offset_is_refused_and_writes_nothing() {
    let f = Fixture::new().await;
    let store = f.store("aggregator-a");
    let Claim { next_offset, epoch, .. } = store.claim(PARTITION).await.unwrap();
    assert_eq!((next_offset, epoch), (0, 1));
    let first = f.commit(&store, epoch, 0, &["e1", "e2"]).await.expect("the first batch continues offset 0");
    assert_eq!(first.counted, 2);
    let before = f.written().await;
    assert_eq!((before.dedupe_records, before.ledger_used, before.offset.next_offset), (2, 2 * TOKENS, 2));

    // A gap (offsets 2..5 never committed), a replay of the committed range, and an overlap.
    for start in [5, 0, 1] {
        assert_fenced(f.commit(&store, epoch, start, &["e3", "e4"]).await, start, epoch);
        assert_eq!(f.written().await, before, "the refused batch at {start} wrote something");
    }

    // The batch that does continue the chain commits.
    let next = f.commit(&store, epoch, 2, &["e3", "e4"]).await.expect("the batch at the stored offset commits");
    assert_eq!(next.counted, 2);
    assert_eq!(f.written().await.offset.next_offset, 4);
    f.done().await;
}

#[tokio::test]
async fn a_range_from_a_fenced_owner_is_refused_and_writes_nothing() {
    let f = Fixture::new().await;
    let (old, new) = (f.store("aggregator-a"), f.store("aggregator-b"));
    let old_claim = old.claim(PARTITION).await.unwrap();
    let new_claim = new.claim(PARTITION).await.unwrap();
    assert_eq!((old_claim.epoch, new_claim.epoch), (1, 2), "the second claim fences the first");
    let before = f.written().await;
    assert_eq!(before.offset, StoredOffset { next_offset: 0, owner: "aggregator-b".to_string(), epoch: 2 });

    // The fenced owner's batch, at its old epoch; and at the new epoch, which is not its own.
    assert_fenced(f.commit(&old, old_claim.epoch, 0, &["e1"]).await, 0, old_claim.epoch);
    assert_fenced(f.commit(&old, new_claim.epoch, 0, &["e1"]).await, 0, new_claim.epoch);
    assert_eq!(f.written().await, before, "a fenced batch wrote something");

    // An owner that claimed again is fenced out of its own older epoch too.
    let again = new.claim(PARTITION).await.unwrap();
    assert_fenced(f.commit(&new, new_claim.epoch, 0, &["e1"]).await, 0, new_claim.epoch);

    // The current owner at its current epoch commits the same events.
    let outcome = f.commit(&new, again.epoch, 0, &["e1"]).await.expect("the current owner commits");
    assert_eq!(outcome.counted, 1);
    let after = f.written().await;
    assert_eq!((after.dedupe_records, after.ledger_used, after.offset.next_offset), (1, TOKENS, 1));
    f.done().await;
}

/// One usage event of subject `roller` at `at`.
fn rolling_event(id: &str, at: DateTime<Utc>, tokens: i64) -> Vec<u8> {
    json!({"id": id, "subject": "roller", "time": at.to_rfc3339(), "output_tokens": tokens}).to_string().into_bytes()
}

#[tokio::test]
async fn a_rolling_quota_keeps_bounded_exact_buckets_and_removes_those_that_left() {
    let f = Fixture::with_policy(rolling_daily_policy(1000000000)).await;
    let store = f.store("aggregator-a");
    let Claim { epoch, .. } = store.claim(PARTITION).await.unwrap();

    // 6 000 events at distinct seconds over the two days before `now`: the 3 000 or so of the
    // last day would each be a row with one-second buckets.
    let now: DateTime<Utc> = "2026-11-22T12:00:30Z".parse().unwrap();
    let events: Vec<(DateTime<Utc>, i64)> =
        (0..6_000).map(|i| (now - Duration::days(2) + Duration::seconds(28 * i + 1), i % 7 + 1)).collect();
    let payloads = events.iter().enumerate().map(|(i, (at, tokens))| rolling_event(&format!("r{i}"), *at, *tokens)).collect();
    let outcome = f.commit_at(&store, epoch, 0, payloads, now).await;
    assert_eq!(outcome.counted, 6_000);

    // What must remain: the one-minute buckets that end after the window start, to the token.
    let window_start = now - Duration::days(1);
    let mut expected: BTreeMap<DateTime<Utc>, i64> = BTreeMap::new();
    for (at, tokens) in &events {
        let bucket = rolling_bucket(*at, 1);
        if bucket.end > window_start {
            *expected.entry(bucket.start).or_default() += tokens;
        }
    }
    let rows = f.rows_of("rolling 1d").await;
    assert!(rows.len() as u64 <= ROLLING_BUCKETS_PER_WINDOW + 1, "{} rows for one rolling key", rows.len());
    assert_eq!(rows, expected, "the rows that have not left the window, exact to the token; none that left");
    let in_window: i64 = expected.values().sum();
    assert_eq!(f.decided_used("roller").await, in_window);

    // A day and a half later one more event: every earlier bucket has left and is removed.
    let later = now + Duration::hours(36);
    f.commit_at(&store, epoch, 6_000, vec![rolling_event("late-one", later - Duration::seconds(1), 5)], later).await;
    let rows = f.rows_of("rolling 1d").await;
    assert_eq!(rows, BTreeMap::from([(rolling_bucket(later - Duration::seconds(1), 1).start, 5)]));
    assert_eq!(f.decided_used("roller").await, 5);
    f.done().await;
}

#[tokio::test]
async fn one_second_rows_of_older_versions_count_beside_buckets() {
    let f = Fixture::with_policy(rolling_daily_policy(1000)).await;
    let store = f.store("aggregator-a");
    let Claim { epoch, .. } = store.claim(PARTITION).await.unwrap();
    // Rows an older version wrote: one second each, one on a minute boundary.
    let minute: DateTime<Utc> = "2026-11-22T11:00:00Z".parse().unwrap();
    for (start, used) in [(minute, 10), (minute + Duration::seconds(7), 20)] {
        sqlx::query(
            "INSERT INTO ledgers (subject, metric, scope, period, period_start, period_end, used, quota, limit_value)
             VALUES ('roller', 'output_tokens', '*', 'rolling 1d', $1, $2, $3, 'daily', 1000)",
        )
        .bind(start)
        .bind(start + Duration::seconds(1))
        .bind(used)
        .execute(&f.db.pool)
        .await
        .unwrap();
    }
    let now = minute + Duration::hours(1);
    f.commit_at(&store, epoch, 0, vec![rolling_event("e", minute + Duration::seconds(40), 5)], now).await;

    // The bucket on the minute continues the old row and ends with the minute.
    assert_eq!(
        f.stored_rows().await,
        [
            StoredRow::new("rolling 1d", minute, minute + Duration::minutes(1), 15, "daily"),
            StoredRow::new("rolling 1d", minute + Duration::seconds(7), minute + Duration::seconds(8), 20, "daily"),
        ]
    );
    assert_eq!(f.decided_used("roller").await, 35);
    f.done().await;
}

#[tokio::test]
async fn the_migration_merges_one_second_rows_into_buckets_and_drops_those_that_left() {
    let f = Fixture::new().await;
    let now = Utc::now();
    let minute = DateTime::from_timestamp(now.timestamp() / 60 * 60, 0).unwrap() - Duration::hours(1);
    // Rows an older version wrote for `rolling 1d` and `rolling 30d`: three seconds of one
    // minute, one of a 30-minute bucket, one that left its window, and a month row.
    let rows = [
        ("rolling 1d", minute, 10, "old"),
        ("rolling 1d", minute + Duration::seconds(7), 20, "old"),
        ("rolling 1d", minute + Duration::seconds(59), 30, "new"),
        ("rolling 1d", minute - Duration::days(2), 40, "old"),
        ("rolling 30d", minute + Duration::seconds(61), 50, "old"),
        ("month", minute - Duration::days(2), 60, "old"),
    ];
    for (i, (period, start, used, quota)) in rows.into_iter().enumerate() {
        let end = if period == "month" { start + Duration::days(30) } else { start + Duration::seconds(1) };
        sqlx::query(
            "INSERT INTO ledgers (subject, metric, scope, period, period_start, period_end, used, quota, limit_value, updated_at)
             VALUES ('roller', 'output_tokens', '*', $1, $2, $3, $4, $5, 1000, now() + make_interval(secs => $6))",
        )
        .bind(period)
        .bind(start)
        .bind(end)
        .bind(used)
        .bind(quota)
        .bind(i as f64)
        .execute(&f.db.pool)
        .await
        .unwrap();
    }
    sqlx::raw_sql(include_str!("../../migrations/postgres/0017_rolling_buckets.sql"))
        .execute(&f.db.pool)
        .await
        .expect("the migration runs");

    let thirty = rolling_bucket(minute + Duration::seconds(61), 30);
    assert_eq!(
        f.stored_rows().await,
        [
            StoredRow::new("month", minute - Duration::days(2), minute + Duration::days(28), 60, "old"),
            StoredRow::new("rolling 1d", minute, minute + Duration::minutes(1), 60, "new"),
            StoredRow::new("rolling 30d", thirty.start, thirty.end, 50, "old"),
        ]
    );
    f.done().await;
}

#[tokio::test]
async fn an_idle_subjects_buckets_are_removed_when_the_last_one_leaves() {
    let f = Fixture::with_policy(rolling_daily_policy(1000)).await;
    let store = f.store("aggregator-a");
    let Claim { epoch, .. } = store.claim(PARTITION).await.unwrap();
    let now: DateTime<Utc> = "2026-11-22T12:00:30Z".parse().unwrap();
    let times = [now - Duration::hours(3), now - Duration::minutes(2), now - Duration::seconds(1)];
    let payloads = times.iter().enumerate().map(|(i, at)| rolling_event(&format!("i{i}"), *at, 10)).collect();
    f.commit_at(&store, epoch, 0, payloads, now).await;
    assert_eq!(f.rows_of("rolling 1d").await.len(), 3);

    // Not over the limit, yet due again when the last bucket leaves: a day after it ends.
    let drained = rolling_bucket(now - Duration::seconds(1), 1).end + Duration::days(1);
    let next_check: Option<DateTime<Utc>> =
        sqlx::query_scalar("SELECT next_check_at FROM decisions WHERE subject = 'roller'").fetch_one(&f.db.pool).await.unwrap();
    assert_eq!(next_check, Some(drained));

    // The scheduler leaves it alone until then, and then removes every bucket.
    assert_eq!(store.run_due_checks(&f.policy, drained - Duration::seconds(1), 100).await.unwrap().looked_at, 0);
    assert_eq!(f.rows_of("rolling 1d").await.len(), 3);
    assert_eq!(store.run_due_checks(&f.policy, drained, 100).await.unwrap().looked_at, 1);
    assert!(f.rows_of("rolling 1d").await.is_empty());
    assert_eq!(f.decided_used("roller").await, 0);
    let next_check: Option<DateTime<Utc>> =
        sqlx::query_scalar("SELECT next_check_at FROM decisions WHERE subject = 'roller'").fetch_one(&f.db.pool).await.unwrap();
    assert_eq!(next_check, None, "nothing left to wait for");
    f.done().await;
}

/// One tier with one quota: one request per 60 s fixed window.
fn one_request_a_minute_policy() -> Policy {
    let yaml = "default_tier: t\ntimezone: UTC\nquotas:\n  - {name: minute, metric: requests, period: 60s, limit: 1}\n\
                tiers:\n  - {name: t, priority: 0, rate_multiplier: 1}\n";
    Policy::from_yaml(yaml, "test").expect("a valid fixed-window policy")
}

#[tokio::test]
async fn concurrent_scheduler_chunks_unblock_every_subject_of_a_rollover_once() {
    const SUBJECTS: usize = 60;
    let f = Fixture::with_policy(one_request_a_minute_policy()).await;
    let store = f.store("a");
    let Claim { epoch, .. } = store.claim(PARTITION).await.unwrap();
    let now: DateTime<Utc> = "2026-11-22T12:00:30Z".parse().unwrap();
    let payloads = (0..SUBJECTS)
        .map(|i| {
            json!({"id": format!("e{i}"), "subject": format!("s{i}"), "time": now.to_rfc3339(), "requests": 1}).to_string().into_bytes()
        })
        .collect();
    f.commit_at(&store, epoch, 0, payloads, now).await;
    let blocked: i64 = sqlx::query_scalar("SELECT count(*) FROM decisions WHERE snapshot::jsonb->>'allowed' = 'false'")
        .fetch_one(&f.db.pool)
        .await
        .unwrap();
    assert_eq!(blocked, SUBJECTS as i64, "one request blocks each subject for the rest of its minute");
    let outbox_before: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox").fetch_one(&f.db.pool).await.unwrap();

    // The boundary: three chunks at once, with room for more subjects than are due.
    let boundary: DateTime<Utc> = "2026-11-22T12:01:00Z".parse().unwrap();
    let chunks = futures::future::join_all((0..3).map(|_| store.decide_due(&f.policy, boundary, 25))).await;
    let looked_at: Vec<usize> = chunks.into_iter().map(|c| c.expect("a chunk commits").looked_at).collect();
    assert_eq!(looked_at.iter().sum::<usize>(), SUBJECTS, "every due subject in exactly one chunk: {looked_at:?}");
    assert!(looked_at.iter().all(|&n| n <= 25), "{looked_at:?}");

    let allowed: i64 = sqlx::query_scalar("SELECT count(*) FROM decisions WHERE snapshot::jsonb->>'allowed' = 'true'")
        .fetch_one(&f.db.pool)
        .await
        .unwrap();
    assert_eq!(allowed, SUBJECTS as i64, "every subject unblocked at the boundary");
    let versions: Vec<i64> = sqlx::query_scalar("SELECT DISTINCT version FROM decisions").fetch_all(&f.db.pool).await.unwrap();
    assert_eq!(versions, vec![2], "each subject decided again exactly once");
    let outbox_after: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox").fetch_one(&f.db.pool).await.unwrap();
    assert_eq!(outbox_after - outbox_before, SUBJECTS as i64, "one unblock published per subject");
    assert_eq!(store.decide_due(&f.policy, boundary, 25).await.unwrap().looked_at, 0, "nothing is due any more");
    f.done().await;
}

/// Batches of eight partitions (as eight lanes or instances would commit them) all count in
/// one team at once, starting with no decision for it: every batch commits (no deadlock, no
/// lost update), the team's ledgers equal the sums of the events to the token, and every
/// snapshot of the team carries a version of its own, so the view, which keeps the highest
/// version, holds the decision of the last commit. The team's two quotas count different
/// models, and each partition sends one model: two batches then share the team's decision
/// without sharing a ledger row that would order them.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_batches_count_a_shared_budget_exactly_and_version_its_decisions_once_each() {
    let policy = Policy::from_yaml(
        "default_tier: free\ntimezone: UTC\nquotas:\n  - {name: monthly, metric: total_tokens, period: month, limit: 1000000000}\n\
         tiers:\n  - {name: free}\n\
         budgets:\n\
         \x20 - group: team\n    quotas:\n\
         \x20     - {name: team_a, metric: requests, period: day, limit: 1000000000, models: [a]}\n\
         \x20     - {name: team_b, metric: requests, period: day, limit: 1000000000, models: [b]}\n",
        "test",
    )
    .unwrap();
    let f = Fixture::with_policy(policy).await;
    const PARTITIONS: i32 = 8;
    let model_of = |p: usize| if p.is_multiple_of(2) { "a" } else { "b" };
    const BATCHES: i64 = 6;
    const EVENTS: i64 = 25;
    let stores: Vec<Store> = (0..PARTITIONS).map(|p| f.store(&format!("instance-{p}"))).collect();
    let mut epochs = Vec::new();
    for (p, store) in stores.iter().enumerate() {
        epochs.push(store.claim(p as i32).await.expect("claim").epoch);
    }
    let now = Utc::now();
    let commits = stores.iter().zip(epochs).enumerate().map(|(p, (store, epoch))| {
        let policy = f.policy.clone();
        async move {
            for b in 0..BATCHES {
                let start = b * EVENTS;
                let mut deliveries: Vec<Delivery> = (start..start + EVENTS)
                    .map(|offset| {
                        let event = json!({"id": format!("p{p}-{offset}"), "subject": format!("s{p}-{}", offset % 5), "time": now.to_rfc3339(),
                                           "input_tokens": 1 + offset, "group": "team", "model": model_of(p)});
                        Delivery::received(p as i32, offset, Some(event.to_string().into_bytes()))
                    })
                    .collect();
                let range = Range { partition: p as i32, epoch, start, next: start + EVENTS };
                let parsed = parse_batch(&mut deliveries, now, Duration::days(3));
                store
                    .commit_batch(&[range], parsed, &Default::default(), &policy, Utc::now(), Duration::seconds(1), Finish::Commit)
                    .await
                    .expect("a batch sharing budgets with others commits");
            }
        }
    });
    futures::future::join_all(commits).await;
    let pool = &f.db.pool;
    let used = |scope: &'static str| async move {
        sqlx::query_scalar::<_, i64>("SELECT coalesce(sum(used), 0)::bigint FROM ledgers WHERE subject = $1 AND scope = $2")
            .bind("__tally_budget__/group/team")
            .bind(scope)
            .fetch_one(pool)
            .await
            .unwrap()
    };
    let per_model = BATCHES * EVENTS * (PARTITIONS as i64 / 2);
    assert_eq!((used("*|models=a").await, used("*|models=b").await), (per_model, per_model));
    let tokens: i64 =
        sqlx::query_scalar("SELECT coalesce(sum(used), 0)::bigint FROM ledgers WHERE subject LIKE 's%'").fetch_one(pool).await.unwrap();
    assert_eq!(tokens, (0..BATCHES * EVENTS).map(|offset| 1 + offset).sum::<i64>() * PARTITIONS as i64);
    for budget in ["__tally_budget__/group/team"] {
        let versions: Vec<i64> =
            sqlx::query_scalar("SELECT (convert_from(payload, 'UTF8')::jsonb->>'version')::bigint FROM outbox WHERE key = $1 ORDER BY 1")
                .bind(budget)
                .fetch_all(pool)
                .await
                .unwrap();
        let distinct: std::collections::BTreeSet<i64> = versions.iter().copied().collect();
        assert_eq!(distinct.len(), versions.len(), "{budget}: a version published twice: {versions:?}");
        assert_eq!(versions.first(), Some(&1), "{budget}: {versions:?}");
    }
    f.done().await;
}
