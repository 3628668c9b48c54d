//! The consume loop: batches from the usage topic, partition ownership, fencing, retries.
//!
//! Partitions are split among the group's live instances through Postgres
//! ([`tally_common::membership`]), heartbeated from this loop between batches. On gaining a
//! partition the loop claims it in `consumer_offsets` (fencing the previous owner) and
//! assigns it to the consumer at the stored offset. A message is counted only if it is
//! exactly the next offset of a partition this instance owns: lower offsets were counted
//! already, a gap makes the loop seek back.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::producer::FutureProducer;
use rdkafka::{Message, Offset, TopicPartitionList};
use tally_common::kafka::KafkaSettings;
use tally_common::consuming::{self, KafkaLog};
use tally_common::membership::{Heartbeats, Membership, ShareChange};
use tally_common::metrics::{Counter, Gauge, Registry, Timing};
use tally_common::postgres::PostgresSettings;
use tokio::sync::Notify;

use crate::plan::{parse_batch, Delivery};
use crate::policy::{Policy, PolicyHandle};
use crate::store::{Deferred, Range, Store, StoreError, Subjects};
use crate::{relay, AggregatorSettings};


/// Most subjects one scheduler transaction decides. Small, because a batch touching one of
/// them waits for the scheduler's row locks.
const SCHEDULER_CHUNK: i64 = 500;

/// Most deferred usage refreshes folded into one batch.
const MAX_REFRESHES_PER_BATCH: usize = 2000;

/// How long the loop waits for a first message before it looks after ownership again.
const IDLE_WAKE: Duration = Duration::from_secs(1);

/// A partition this instance owns.
#[derive(Debug, Clone, Copy)]
struct Owned {
    epoch: i64,
    /// The next offset to count.
    next: i64,
    /// When the loop last asked the consumer to seek to `next`.
    sought_at: Option<Instant>,
}

struct Metrics {
    registry: Registry,
    counted: Counter,
    duplicates: Counter,
    quarantined: Counter,
    snapshots: Counter,
    batches: Timing,
    fenced: Counter,
    db_retries: Counter,
    scheduled_checks: Counter,
    owned_partitions: Gauge,
}

impl Metrics {
    fn new() -> Self {
        let r = Registry::default();
        Metrics {
            counted: r.counter("tally_aggregator_events_counted_total", "events counted in the ledgers", &[]),
            duplicates: r.counter("tally_aggregator_events_duplicate_total", "redelivered events skipped by dedupe", &[]),
            quarantined: r.counter("tally_aggregator_events_quarantined_total", "events sent to quarantine", &[]),
            snapshots: r.counter("tally_aggregator_snapshots_total", "decision snapshots written to the outbox", &[]),
            batches: Timing::new(
                &r,
                "tally_aggregator_batch_micros_total",
                "tally_aggregator_batches_total",
                "time spent committing batches",
            ),
            fenced: r.counter("tally_aggregator_batches_fenced_total", "batches refused by fencing", &[]),
            db_retries: r.counter("tally_aggregator_database_retries_total", "batch commits retried after a database error", &[]),
            scheduled_checks: r.counter(
                "tally_aggregator_scheduled_checks_total",
                "decisions looked at again by time (rollover, expiry) or a configuration change",
                &[],
            ),
            owned_partitions: r.gauge("tally_aggregator_owned_partitions", "partitions this instance owns", &[]),
            registry: r,
        }
    }
}

struct Loop {
    settings: AggregatorSettings,
    consumer: StreamConsumer<KafkaLog>,
    heartbeats: Heartbeats,
    store: Store,
    policy: PolicyHandle,
    owned: HashMap<i32, Owned>,
    relay_wake: Arc<Notify>,
    metrics: Arc<Metrics>,
    /// Subjects whose usage changed without a snapshot yet, with when their refresh is due.
    deferred: Deferred,
}

/// Runs the aggregator (see the crate docs).
pub async fn run(
    settings: AggregatorSettings,
    kafka: KafkaSettings,
    postgres: PostgresSettings,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let pool = postgres.connect().await?;
    if let Some(path) = &settings.config {
        match crate::policy::seed_from_file(&pool, path).await? {
            Some(applied) => tracing::info!(version = applied.version, file = %path.display(), "tier configuration seeded"),
            None => tracing::info!(file = %path.display(), "a tier configuration is already stored; --config only seeds an empty database (change it with `tally config apply`)"),
        }
    }
    let policy = PolicyHandle::new(Policy::builtin());
    policy.sync(&mut *pool.acquire().await?).await?;
    let consumer: StreamConsumer<KafkaLog> = kafka
        .consumer_config(&settings.group)
        .create_with_context(KafkaLog)
        .context("failed to create the usage consumer")?;
    let producer: FutureProducer = kafka.producer_config().create().context("failed to create the outbox producer")?;
    let store = Store {
        pool: pool.clone(),
        group: settings.group.clone(),
        topic: kafka.usage_topic.clone(),
        owner: format!("aggregator-{}", uuid::Uuid::new_v4()),
        decisions_topic: kafka.decisions_topic.clone(),
        quarantine_topic: kafka.quarantine_topic.clone(),
        policies: Default::default(),
    };
    let metrics = Arc::new(Metrics::new());
    let (relay_wake, relay_stop) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let relay_task = tokio::spawn(relay::run(pool.clone(), producer.clone(), relay_wake.clone(), relay_stop.clone()));
    let health = spawn_health_server(&settings, metrics.clone()).await?;
    let scheduler = tokio::spawn(run_scheduler(store.clone(), policy.clone(), relay_wake.clone(), metrics.clone(), control_wake(&kafka)));
    tracing::info!(group = %settings.group, topic = %kafka.usage_topic, owner = %store.owner, "aggregator consuming");
    let timeout = Duration::from_secs(settings.shutdown_timeout_seconds);
    let membership = Membership {
        group: settings.group.clone(),
        topic: kafka.usage_topic.clone(),
        member_id: store.owner.clone(),
        lease: Duration::from_millis(settings.member_lease_ms),
    };
    let mut state = Loop {
        settings,
        consumer,
        heartbeats: Heartbeats::new(membership.clone()),
        store,
        policy,
        owned: HashMap::new(),
        relay_wake,
        metrics,
        deferred: Deferred::new(),
    };
    state.consume_until(shutdown).await;
    if let Err(e) = membership.leave(&pool).await {
        tracing::warn!(error = %e, "could not leave the group; the others take over when the lease ends");
    }
    // Drain: the loop has committed its last batch; publish what the outbox holds.
    relay_stop.notify_one();
    let _ = tokio::time::timeout(timeout, relay_task).await;
    let _ = tokio::time::timeout(timeout, relay::drain(&pool, &producer)).await;
    health.abort();
    scheduler.abort();
    tracing::info!("aggregator stopped");
    Ok(())
}

/// A notifier woken by every message on the control topic (configuration changes), so the
/// scheduler reacts at once rather than at its next tick. Reads from the end: past changes
/// are already in Postgres.
fn control_wake(kafka: &KafkaSettings) -> Arc<Notify> {
    let wake = Arc::new(Notify::new());
    let consumer: Result<StreamConsumer<KafkaLog>, _> = kafka.consumer_config("tally-control-reader").create_with_context(KafkaLog);
    let mut tpl = TopicPartitionList::new();
    let _ = tpl.add_partition_offset(&kafka.control_topic, 0, Offset::End);
    match consumer.and_then(|c| c.assign(&tpl).map(|_| c)) {
        Ok(consumer) => {
            let notify = wake.clone();
            tokio::spawn(async move {
                loop {
                    match consumer.recv().await {
                        Ok(_) => notify.notify_one(),
                        Err(e) => {
                            tracing::debug!(error = %e, "control topic read failed");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                }
            });
        }
        Err(e) => tracing::warn!(error = %e, "not reading the control topic; configuration changes apply at the next scheduler tick"),
    }
    wake
}

/// Runs the time-driven scheduler: every 200 ms, or at once on a control message, decides
/// again the subjects that are due (see [`Store::run_due_checks`]).
async fn run_scheduler(store: Store, policy: PolicyHandle, relay_wake: Arc<Notify>, metrics: Arc<Metrics>, wake: Arc<Notify>) {
    loop {
        loop {
            match store.run_due_checks(&policy, Utc::now(), SCHEDULER_CHUNK).await {
                Ok((0, _)) => break,
                Ok((n, published)) => {
                    metrics.scheduled_checks.add(n as u64);
                    metrics.snapshots.add(published as u64);
                    relay_wake.notify_one();
                    if n < SCHEDULER_CHUNK as usize {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "scheduled decisions failed; retrying");
                    break;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = wake.notified() => {}
        }
    }
}

async fn spawn_health_server(settings: &AggregatorSettings, metrics: Arc<Metrics>) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use axum::routing::get;
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("failed to listen on {}", settings.listen))?;
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(move || async move { metrics.registry.render() }));
    Ok(tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    }))
}

impl Loop {
    async fn consume_until(&mut self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        self.maintain_ownership().await;
        loop {
            let batch = tokio::select! {
                biased;
                _ = &mut shutdown => return,
                batch = self.next_batch() => batch,
            };
            self.maintain_ownership().await;
            let deliveries = self.accept_in_order(batch);
            let refreshes = self.due_refreshes(Utc::now());
            if !deliveries.is_empty() || !refreshes.is_empty() {
                self.commit_with_retry(deliveries, refreshes).await;
            }
        }
    }

    /// Takes the deferred subjects whose refresh is due (at most [`MAX_REFRESHES_PER_BATCH`],
    /// the longest overdue first) out of `deferred`, for the next commit.
    fn due_refreshes(&mut self, now: chrono::DateTime<Utc>) -> Subjects {
        let mut due: Vec<(chrono::DateTime<Utc>, &String)> =
            self.deferred.iter().filter(|(_, (_, at))| *at <= now).map(|(s, (_, at))| (*at, s)).collect();
        due.sort_unstable();
        let taken: Vec<String> = due.into_iter().take(MAX_REFRESHES_PER_BATCH).map(|(_, s)| s.clone()).collect();
        taken.into_iter().filter_map(|s| self.deferred.remove(&s).map(|(key, _)| (s, key))).collect()
    }

    /// Waits for a first message, then takes more until the batch is full or `max_wait` passed.
    /// Returns an empty batch after a second without messages, so ownership stays current.
    async fn next_batch(&mut self) -> Vec<Delivery> {
        consuming::collect_batch(&self.consumer, IDLE_WAKE, self.settings.max_wait(), self.settings.max_batch, to_delivery).await
    }

    /// Heartbeats the membership (at most once a second) and brings the owned partitions in
    /// line with this member's share: drops the ones it lost, claims the ones it gained, and
    /// assigns the consumer to exactly the owned ones at their stored offsets.
    async fn maintain_ownership(&mut self) {
        let partition_count = || consuming::partition_count(&self.consumer, &self.store.topic);
        let owned = self.owned.keys().copied();
        let Some(ShareChange { gained, lost }) = self.heartbeats.due_change(&self.store.pool, owned, partition_count).await else { return };
        for p in &lost {
            self.owned.remove(p);
            tracing::info!(partition = p, "released partition");
        }
        for p in gained {
            self.claim(p).await;
        }
        self.assign_owned();
    }

    /// Points the consumer at exactly the owned partitions, each at its next offset.
    fn assign_owned(&mut self) {
        consuming::assign_at(&self.consumer, &self.store.topic, self.owned.iter().map(|(p, o)| (*p, o.next)));
        for o in self.owned.values_mut() {
            o.sought_at = Some(Instant::now());
        }
        self.metrics.owned_partitions.set(self.owned.len() as i64);
    }

    async fn claim(&mut self, partition: i32) {
        let mut backoff = Duration::from_millis(200);
        loop {
            match self.store.claim(partition).await {
                Ok(claim) => {
                    tracing::info!(partition, next_offset = claim.next_offset, epoch = claim.epoch, "claimed partition");
                    let owned = Owned { epoch: claim.epoch, next: claim.next_offset, sought_at: None };
                    self.owned.insert(partition, owned);
                    return;
                }
                Err(e) => {
                    tracing::warn!(partition, error = %e, "failed to claim partition; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    fn seek(&self, partition: i32, owned: &mut Owned) {
        owned.sought_at = Some(Instant::now());
        if let Err(e) = self.consumer.seek(&self.store.topic, partition, Offset::Offset(owned.next), Duration::from_secs(1)) {
            tracing::debug!(partition, offset = owned.next, error = %e, "seek not possible yet");
        }
    }

    /// Keeps, per owned partition, only the run of messages that continues exactly from the
    /// next offset to count. Lower offsets were counted already; a gap triggers a seek back.
    fn accept_in_order(&mut self, batch: Vec<Delivery>) -> Vec<Delivery> {
        let mut cursor: HashMap<i32, i64> = self.owned.iter().map(|(p, o)| (*p, o.next)).collect();
        let mut accepted = Vec::with_capacity(batch.len());
        for d in batch {
            let Some(next) = cursor.get_mut(&d.partition) else { continue };
            if d.offset == *next {
                *next += 1;
                accepted.push(d);
            } else if d.offset > *next {
                self.seek_if_due(d.partition);
            }
        }
        accepted
    }

    fn seek_if_due(&mut self, partition: i32) {
        let Some(mut owned) = self.owned.get(&partition).copied() else { return };
        if owned.sought_at.is_none_or(|t| t.elapsed() > Duration::from_secs(1)) {
            tracing::info!(partition, offset = owned.next, "gap before the stored offset; seeking");
            self.seek(partition, &mut owned);
            self.owned.insert(partition, owned);
        }
    }

    fn ranges(&self, deliveries: &[Delivery]) -> Vec<Range> {
        let mut ranges: HashMap<i32, Range> = HashMap::new();
        for d in deliveries {
            let epoch = self.owned.get(&d.partition).map_or(0, |o| o.epoch);
            ranges
                .entry(d.partition)
                .and_modify(|r| r.next = d.offset + 1)
                .or_insert(Range { partition: d.partition, epoch, start: d.offset, next: d.offset + 1 });
        }
        let mut ranges: Vec<Range> = ranges.into_values().collect();
        ranges.sort_by_key(|r| r.partition);
        ranges
    }

    /// Commits the batch (with the due `refreshes`), retrying database errors until it
    /// succeeds or is fenced.
    async fn commit_with_retry(&mut self, deliveries: Vec<Delivery>, refreshes: Subjects) {
        let ranges = self.ranges(&deliveries);
        let lateness = chrono::Duration::days(self.settings.lateness_days);
        let refresh = chrono::Duration::milliseconds(self.settings.snapshot_refresh_ms as i64);
        let mut backoff = Duration::from_millis(200);
        loop {
            let now = Utc::now();
            let parsed = parse_batch(&deliveries, now, lateness);
            let started = Instant::now();
            match self.store.commit_batch(&ranges, parsed, &refreshes, &self.policy, now, refresh).await {
                Ok(outcome) => {
                    self.metrics.batches.record(started.elapsed());
                    self.metrics.counted.add(outcome.counted as u64);
                    self.metrics.duplicates.add(outcome.duplicates as u64);
                    self.metrics.quarantined.add(outcome.quarantined as u64);
                    self.metrics.snapshots.add(outcome.snapshots as u64);
                    self.advance(&ranges);
                    self.deferred.extend(outcome.deferred);
                    self.relay_wake.notify_one();
                    return;
                }
                Err(StoreError::Fenced { partition, .. }) => {
                    self.metrics.fenced.inc();
                    tracing::warn!(partition, "batch refused by fencing; another member owns the partition now");
                    self.owned.remove(&partition);
                    let now = Utc::now();
                    self.deferred.extend(refreshes.into_iter().map(|(s, key)| (s, (key, now))));
                    self.heartbeats.fenced(partition, Duration::from_millis(self.settings.member_lease_ms));
                    self.rewind(&ranges);
                    self.assign_owned();
                    return;
                }
                Err(e) => {
                    self.metrics.db_retries.inc();
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "batch commit failed; consumption paused");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// After a commit: the next offsets move on, and Kafka gets them as a resume hint.
    fn advance(&mut self, ranges: &[Range]) {
        let mut hint = TopicPartitionList::new();
        for r in ranges {
            if let Some(o) = self.owned.get_mut(&r.partition) {
                o.next = r.next;
                let _ = hint.add_partition_offset(&self.store.topic, r.partition, Offset::Offset(r.next));
            }
        }
        if hint.count() > 0 {
            if let Err(e) = self.consumer.commit(&hint, CommitMode::Async) {
                tracing::debug!(error = %e, "offset hint not committed to Kafka");
            }
        }
    }

    /// After a refused batch: the other partitions re-read from where they were.
    fn rewind(&mut self, ranges: &[Range]) {
        for r in ranges {
            if let Some(mut owned) = self.owned.get(&r.partition).copied() {
                owned.next = r.start;
                self.seek(r.partition, &mut owned);
                self.owned.insert(r.partition, owned);
            }
        }
    }
}

fn to_delivery(m: &rdkafka::message::BorrowedMessage<'_>) -> Delivery {
    Delivery { partition: m.partition(), offset: m.offset(), payload: m.payload().map(<[u8]>::to_vec) }
}
