//! Component tests of the bounded dedupe record, on a fresh migrated Postgres database per
//! test and no broker: `processed_events` is partitioned by the UTC day of the event time,
//! an id is counted once among the events of its day, at the day's edges too; a correction
//! reverts an event counted on an earlier day exactly; partition upkeep drops the days past
//! the window, keeps the others, is idempotent and moves rows the DEFAULT partition caught.

use chrono::{DateTime, Duration, NaiveDate, NaiveTime, Utc};
use serde_json::{json, Value};
use tally_aggregator::partitions::{self, partition_name, Retention};
use tally_aggregator::plan::{parse_batch, Delivery};
use tally_aggregator::policy::{Policy, PolicyHandle};
use tally_aggregator::store::{Finish, Outcome, Range, Store};
use tally_testkit::TestDatabase;

const PARTITION: i32 = 0;
const LATENESS_DAYS: i64 = 35;

struct Fixture {
    db: TestDatabase,
    policy: PolicyHandle,
    store: Store,
    epoch: i64,
    /// The offset the next batch starts at.
    next: i64,
}

impl Fixture {
    async fn new() -> Fixture {
        let db = TestDatabase::create("tally_dedupe_test").await.expect("create the test database");
        let store = Store {
            pool: db.pool.clone(),
            group: "tally-ledger".to_string(),
            topic: "tally.usage.v1".to_string(),
            owner: "aggregator-a".to_string(),
            decisions_topic: "tally.decisions.v1".to_string(),
            quarantine_topic: "tally.quarantine.v1".to_string(),
            policies: Default::default(),
            recorder: Default::default(),
        };
        let epoch = store.claim(PARTITION).await.expect("claim").epoch;
        partitions::maintain(&db.pool, Retention::for_day(today(), LATENESS_DAYS)).await.expect("maintain the partitions");
        Fixture { db, policy: PolicyHandle::new(Policy::builtin()), store, epoch, next: 0 }
    }

    /// Commits `events` as one batch at the next offsets, at `now`.
    async fn commit_at(&mut self, events: &[Value], now: DateTime<Utc>) -> Outcome {
        let mut deliveries: Vec<Delivery> = events
            .iter()
            .zip(self.next..)
            .map(|(e, offset)| Delivery::received(PARTITION, offset, Some(e.to_string().into_bytes())))
            .collect();
        let range = Range { partition: PARTITION, epoch: self.epoch, start: self.next, next: self.next + events.len() as i64 };
        self.next = range.next;
        let parsed = parse_batch(&mut deliveries, now, Duration::days(LATENESS_DAYS));
        self.store
            .commit_batch(&[range], parsed, &Default::default(), &self.policy, now, Duration::seconds(1), Finish::Commit)
            .await
            .expect("the batch commits")
    }

    async fn commit(&mut self, events: &[Value]) -> Outcome {
        self.commit_at(events, Utc::now()).await
    }

    /// The tokens the ledgers hold, over every row.
    async fn ledger_tokens(&self) -> i64 {
        sqlx::query_scalar("SELECT coalesce(sum(used), 0)::bigint FROM ledgers WHERE metric = 'total_tokens'")
            .fetch_one(&self.db.pool)
            .await
            .unwrap()
    }

    /// The partition each record of `id` is in, with its day, by day.
    async fn records_of(&self, id: &str) -> Vec<(String, NaiveDate)> {
        sqlx::query_as("SELECT tableoid::regclass::text, event_day FROM processed_events WHERE event_id = $1 ORDER BY event_day")
            .bind(id)
            .fetch_all(&self.db.pool)
            .await
            .unwrap()
    }

    /// Rows whose `event_day` is not the UTC date of their stored time (must be none).
    async fn misdated_rows(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM processed_events WHERE event_day <> (event_time AT TIME ZONE 'UTC')::date")
            .fetch_one(&self.db.pool)
            .await
            .unwrap()
    }

    async fn partition_days(&self) -> Vec<String> {
        sqlx::query_scalar(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = 'processed_events'::regclass ORDER BY 1",
        )
        .fetch_all(&self.db.pool)
        .await
        .unwrap()
    }

    async fn done(self) {
        self.db.remove().await.expect("drop the test database");
    }
}

fn today() -> NaiveDate {
    Utc::now().date_naive()
}

fn midnight(day: NaiveDate) -> DateTime<Utc> {
    day.and_time(NaiveTime::MIN).and_utc()
}

fn event(id: &str, time: DateTime<Utc>, tokens: i64) -> Value {
    json!({"id": id, "subject": "alice", "time": time.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true), "input_tokens": tokens})
}

fn correction(id: &str, target: &str, time: DateTime<Utc>) -> Value {
    json!({"id": id, "subject": "alice", "time": time.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true), "corrects": target})
}

#[tokio::test]
async fn the_last_microsecond_of_a_day_and_its_redelivery_are_one_count_in_that_days_partition() {
    let mut f = Fixture::new().await;
    let yesterday = today() - Duration::days(1);
    let last_micro = midnight(today()) - Duration::microseconds(1);
    let first = f.commit(&[event("edge", last_micro, 11)]).await;
    assert_eq!((first.counted, first.duplicates), (1, 0));
    // Redelivered in a later batch (the cautious and the plain paths both), and within a batch.
    let again = f.commit(&[event("edge", last_micro, 11), event("edge", last_micro, 11)]).await;
    assert_eq!((again.counted, again.duplicates, again.quarantined), (0, 2, 0));
    assert_eq!(f.ledger_tokens().await, 11);
    assert_eq!(f.records_of("edge").await, vec![(partition_name(yesterday), yesterday)]);
    assert_eq!(f.misdated_rows().await, 0);
    f.done().await;
}

#[tokio::test]
async fn an_event_at_midnight_lands_in_the_new_days_partition() {
    let mut f = Fixture::new().await;
    let at_midnight = midnight(today());
    let just_before = at_midnight - Duration::microseconds(1);
    let outcome = f.commit(&[event("midnight", at_midnight, 3), event("before", just_before, 5)]).await;
    assert_eq!(outcome.counted, 2);
    assert_eq!(f.records_of("midnight").await, vec![(partition_name(today()), today())]);
    let yesterday = today() - Duration::days(1);
    assert_eq!(f.records_of("before").await, vec![(partition_name(yesterday), yesterday)]);
    assert_eq!(f.misdated_rows().await, 0);
    let default_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM processed_events_default").fetch_one(&f.db.pool).await.unwrap();
    assert_eq!(default_rows, 0);
    f.done().await;
}

#[tokio::test]
async fn the_same_id_with_other_content_is_a_conflict_on_the_same_day_and_another_event_on_another() {
    let mut f = Fixture::new().await;
    let morning = midnight(today()) + Duration::minutes(1);
    let day_before = morning - Duration::days(1);
    assert_eq!(f.commit(&[event("e", morning, 2)]).await.counted, 1);
    // Same day, other content: quarantined, in a later batch and within a batch alike.
    let later = f.commit(&[event("e", morning + Duration::seconds(1), 9)]).await;
    assert_eq!((later.counted, later.quarantined), (0, 1));
    let within = f.commit(&[event("w", morning, 1), event("w", morning, 4)]).await;
    assert_eq!((within.counted, within.quarantined), (1, 1));
    // Another day: another event, counted.
    let other_day = f.commit(&[event("e", day_before, 20)]).await;
    assert_eq!((other_day.counted, other_day.quarantined), (1, 0));
    assert_eq!(f.ledger_tokens().await, 2 + 1 + 20);
    assert_eq!(f.records_of("e").await.len(), 2);
    f.done().await;
}

#[tokio::test]
async fn a_correction_reverts_exactly_an_event_counted_days_earlier() {
    let mut f = Fixture::new().await;
    let counted_at = Utc::now() - Duration::days(3);
    f.commit(&[event("old", counted_at, 1234), event("kept", counted_at, 6)]).await;
    assert_eq!(f.ledger_tokens().await, 1240);
    let fixed = f.commit(&[correction("fix-old", "old", Utc::now())]).await;
    assert_eq!((fixed.counted, fixed.quarantined), (1, 0));
    assert_eq!(f.ledger_tokens().await, 6);
    let corrected_by: Option<String> =
        sqlx::query_scalar("SELECT corrected_by FROM processed_events WHERE event_id = 'old'").fetch_one(&f.db.pool).await.unwrap();
    assert_eq!(corrected_by.as_deref(), Some("fix-old"));
    // A second correction of the same event is refused, and leaves no record behind.
    let twice = f.commit(&[correction("fix-old-again", "old", Utc::now())]).await;
    assert_eq!((twice.counted, twice.quarantined), (0, 1));
    assert!(f.records_of("fix-old-again").await.is_empty());
    assert_eq!(f.ledger_tokens().await, 6);
    f.done().await;
}

/// A pool on `url` whose sessions plan joins with hashes only.
async fn hash_joins_only(url: &str) -> sqlx::PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .after_connect(|conn, _| {
            Box::pin(async move {
                sqlx::Executor::execute(&mut *conn, "SET enable_nestloop = off; SET enable_mergejoin = off").await.map(|_| ())
            })
        })
        .connect(url)
        .await
        .expect("connect with hash joins only")
}

#[tokio::test]
async fn of_two_corrections_of_one_event_in_a_batch_the_first_delivered_reverts_it() {
    let mut f = Fixture::new().await;
    for round in 0..8 {
        // Half the rounds with the planner held to hash joins, where the later of two
        // corrections matching one target comes first and would win an UPDATE ... FROM.
        if round == 4 {
            f.store.pool = hash_joins_only(&f.db.settings.database_url).await;
        }
        let (target, first, second) = (format!("t{round}"), format!("first-{round}"), format!("second-{round}"));
        f.commit(&[event(&target, Utc::now(), 100)]).await;
        let outcome = f.commit(&[correction(&first, &target, Utc::now()), correction(&second, &target, Utc::now())]).await;
        assert_eq!((outcome.counted, outcome.quarantined), (1, 1), "round {round}");
        let corrected_by: Option<String> = sqlx::query_scalar("SELECT corrected_by FROM processed_events WHERE event_id = $1")
            .bind(&target)
            .fetch_one(&f.db.pool)
            .await
            .unwrap();
        assert_eq!(corrected_by.as_deref(), Some(first.as_str()), "round {round}: the first delivered correction reverts");
        assert!(f.records_of(&second).await.is_empty(), "round {round}: the refused correction leaves no record");
        assert_eq!(f.ledger_tokens().await, 0, "round {round}: reverted once, to the token");
    }
    f.store.pool.close().await;
    f.done().await;
}

#[tokio::test]
async fn a_correction_of_an_event_whose_record_aged_out_is_quarantined() {
    let mut f = Fixture::new().await;
    let long_ago = Utc::now() - Duration::days(LATENESS_DAYS - 1);
    f.commit(&[event("aging", long_ago, 5)]).await;
    // Days later the event's day left the window and its partition was dropped.
    let later = Utc::now() + Duration::days(5);
    partitions::maintain(&f.db.pool, Retention::for_day(later.date_naive(), LATENESS_DAYS)).await.unwrap();
    assert!(f.records_of("aging").await.is_empty());
    let refused = f.commit_at(&[correction("fix-aging", "aging", later)], later).await;
    assert_eq!((refused.counted, refused.quarantined), (0, 1));
    assert_eq!(f.ledger_tokens().await, 5);
    f.done().await;
}

#[tokio::test]
async fn a_replayed_batch_counts_nothing_twice() {
    let mut f = Fixture::new().await;
    let now = Utc::now();
    let batch: Vec<Value> = (0..50).map(|i| event(&format!("r{i}"), now - Duration::hours(i), i + 1)).collect();
    let total: i64 = (1..=50).sum();
    assert_eq!(f.commit(&batch).await.counted, 50);
    // The same events redelivered at later offsets, twice (plain insert failing, then skipping).
    for _ in 0..2 {
        let replay = f.commit(&batch).await;
        assert_eq!((replay.counted, replay.duplicates), (0, 50));
    }
    // Mixed with new ones: only the new count.
    let mut mixed = batch.clone();
    mixed.push(event("r-new", now, 1000));
    let outcome = f.commit(&mixed).await;
    assert_eq!((outcome.counted, outcome.duplicates), (1, 50));
    assert_eq!(f.ledger_tokens().await, total + 1000);
    let records: i64 = sqlx::query_scalar("SELECT count(*) FROM processed_events").fetch_one(&f.db.pool).await.unwrap();
    assert_eq!(records, 51);
    f.done().await;
}

#[tokio::test]
async fn maintenance_drops_only_days_past_the_window_and_is_idempotent() {
    let f = Fixture::new().await;
    let pool = &f.db.pool;
    // Partitions as an instance made them ten days ago, each with a record.
    let earlier = today() - Duration::days(10);
    partitions::maintain(pool, Retention::for_day(earlier, LATENESS_DAYS)).await.unwrap();
    let now = Retention::for_day(today(), LATENESS_DAYS);
    for day in [now.first_kept - Duration::days(1), now.first_kept, now.first_made] {
        sqlx::query("INSERT INTO processed_events (event_id, fingerprint, subject, event_time, event_day) VALUES ($1, 'f', 's', $2, $3)")
            .bind(format!("at-{day}"))
            .bind(midnight(day))
            .bind(day)
            .execute(pool)
            .await
            .unwrap();
    }
    let done = partitions::maintain(pool, now).await.unwrap();
    assert!(done.locked);
    assert!(done.created.is_empty(), "{done:?}");
    assert_eq!(done.dropped, (0..9).map(|i| earlier - Duration::days(LATENESS_DAYS + 1) + Duration::days(i)).collect::<Vec<_>>());
    assert!(done.dropped.iter().all(|d| *d < now.first_kept));
    let kept: Vec<String> = sqlx::query_scalar("SELECT event_id FROM processed_events ORDER BY 1").fetch_all(pool).await.unwrap();
    assert_eq!(kept, vec![format!("at-{}", now.first_kept), format!("at-{}", now.first_made)]);
    let partitions_after = f.partition_days().await;
    // The days from first_kept to today + 2, and DEFAULT.
    assert_eq!(partitions_after.len() as i64, (now.last_made - now.first_kept).num_days() + 2);
    assert!(partitions_after.contains(&"processed_events_default".to_string()));

    let again = partitions::maintain(pool, now).await.unwrap();
    assert_eq!((again.created.len(), again.dropped.len(), again.moved_from_default), (0, 0, 0));
    assert_eq!(f.partition_days().await, partitions_after);
    f.done().await;
}

#[tokio::test]
async fn creating_a_days_partition_moves_the_rows_default_caught() {
    let mut f = Fixture::new().await;
    let pool = f.db.pool.clone();
    // A day with no partition yet (beyond today + 2): counted rows go to DEFAULT.
    let ahead = today() + Duration::days(5);
    let at = midnight(ahead) + Duration::hours(1);
    let outcome = f.commit_at(&[event("early", at, 4), event("early-2", at, 5)], at).await;
    assert_eq!(outcome.counted, 2);
    assert_eq!(f.records_of("early").await, vec![("processed_events_default".to_string(), ahead)]);

    let done = partitions::maintain(&pool, Retention::for_day(ahead - Duration::days(2), LATENESS_DAYS)).await.unwrap();
    assert_eq!(done.moved_from_default, 2);
    assert!(done.created.contains(&ahead));
    assert_eq!(f.records_of("early").await, vec![(partition_name(ahead), ahead)]);
    let default_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM processed_events_default").fetch_one(&pool).await.unwrap();
    assert_eq!(default_rows, 0);
    // The moved records still deduplicate.
    let replay = f.commit_at(&[event("early", at, 4)], at).await;
    assert_eq!((replay.counted, replay.duplicates), (0, 1));
    assert_eq!(f.ledger_tokens().await, 9);
    f.done().await;
}

#[tokio::test]
async fn a_second_instance_leaves_maintenance_to_the_one_holding_the_lock() {
    let f = Fixture::new().await;
    let mut holder = f.db.pool.acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock(x'646564757065'::bigint)").execute(&mut *holder).await.unwrap();
    let skipped = partitions::maintain(&f.db.pool, Retention::for_day(today() + Duration::days(30), LATENESS_DAYS)).await.unwrap();
    assert_eq!(skipped, partitions::Maintained::default());
    sqlx::query("SELECT pg_advisory_unlock(x'646564757065'::bigint)").execute(&mut *holder).await.unwrap();
    drop(holder);
    f.done().await;
}
