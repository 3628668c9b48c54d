//! The consume loop: batches from the usage topic, partition ownership, fencing, retries.
//!
//! Partitions are split among the group's live instances through Postgres
//! ([`tally_common::membership`]), heartbeated from this loop between batches. On gaining a
//! partition the loop claims it in `consumer_offsets` (fencing the previous owner) and
//! assigns it to its lane's consumer at the stored offset. A message is taken only if it is
//! exactly the next pending offset of a partition this instance owns: lower offsets are
//! buffered, in flight or counted already; a gap makes the loop seek back.
//!
//! Batches are committed in lanes ([`crate::lanes`]): partition `p` belongs to lane
//! `p % lanes`, each lane has at most one batch commit in flight, and the loop goes on
//! receiving into the lanes' buffers meanwhile. A message is accepted when it continues a
//! partition's *pending* cursor (past what is buffered or in flight); the stored cursor
//! moves only when a commit succeeds. A refused (fenced) batch drops the lane's buffered
//! messages and rewinds its partitions to the stored offsets. A subject's events all come
//! from one partition (the usage topic is keyed by subject), so lanes touch disjoint ledger
//! and decision rows, and a subject's deferred refresh stays in the lane it came from (also
//! after the partition is lost: the refresh only republishes the stored usage).
//! Should a producer key otherwise, row locks still serialize the lanes' transactions (a
//! deadlock is a database error, and the batch is retried).
//!
//! A failed batch commit is acted on by its class, decided where failures are classified
//! ([`crate::store::ErrorClass`]): a batch refused by fencing gives up or rewinds its
//! partitions; a transient failure is retried with backoff, the lane paused meanwhile; a
//! permanent one has the event that causes it found ([`crate::isolate`]) and quarantined,
//! and the batch is committed again without it. A permanent failure that no event of the
//! batch causes (a stored configuration that cannot load, a schema that does not match)
//! stops the aggregator: the loop takes no more messages and starts no more commits, lets
//! those in flight finish (within the shutdown timeout), leaves the group, and [`run`]
//! returns the failure, so the process logs it and exits non-zero rather than retrying for
//! ever. A permanent failure of the time-driven scheduler, which handles no events, stops
//! the aggregator the same way.
//!
//! Urgent events ([`crate::headroom`]) are copied, as they are accepted, into a queue that a
//! fast commit takes at once (one in flight at a time, one attempt). It writes no offsets;
//! once it committed, the deliveries it decided are marked when their batch is cut, and
//! the batch skips them. A delivery whose batch was cut while its fast commit was still in
//! flight is not marked: the batch's dedupe insert waits for the fast commit's and then
//! skips the event as a duplicate.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;
use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tally_common::consuming;
use tally_common::health::{watched, ClientHealth, Clients, Watched};
use tally_common::kafka::KafkaSettings;
use tally_common::membership::{Heartbeats, Membership, ShareChange};
use tally_common::metrics::{Counter, Gauge, Registry, Timing};
use tally_common::postgres::PostgresSettings;
use tally_common::producing::RebuildingProducer;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::isolate::{self, Isolation};
use crate::keys::{key_hash, Subjects};
use crate::lanes::{BatchLimits, Lane};
use crate::plan::{parse_batch, Delivery, Refusal};
use crate::policy::{Policy, PolicyHandle};
use crate::store::{Finish, Outcome, Range, Store, StoreError};
use crate::{relay, AggregatorSettings};

/// Most subjects one scheduler transaction decides. Small, because a batch touching one of
/// them waits for the scheduler's row locks.
const SCHEDULER_CHUNK: i64 = 1000;

/// The scheduler's longest sleep between ticks.
const SCHEDULER_TICK: Duration = Duration::from_millis(200);

/// Scheduler transactions that run at once, each on a connection of its own. A rollover
/// makes every subject that was blocked or warned due at the same instant; one transaction
/// at a time leaves a core idle while the other waits on Postgres.
const SCHEDULER_WORKERS: usize = 2;

/// Most deferred usage refreshes folded into one batch.
const MAX_REFRESHES_PER_BATCH: usize = 2000;

/// Postgres connections the aggregator needs besides one per lane: heartbeats and claims,
/// the scheduler's workers, the outbox relay, and fast commits.
const CONNECTIONS_BESIDES_LANES: u32 = 3 + SCHEDULER_WORKERS as u32;

/// How many full batches a lane's buffer may hold. More than one: while a long commit is in
/// flight and the next batch is already full, the loop goes on receiving that lane's
/// messages, so an urgent event among them is seen (and committed) at once rather than
/// after the commit (DESIGN.md beside this file).
const BUFFERED_BATCHES: usize = 2;

/// Most messages taken in one go once the loop woke up for one.
const RECEIVE_BURST: usize = 1000;

/// What each lane's consumer prefetches at most, in KiB.
const PREFETCH_KBYTES: usize = 8 * 1024;

/// Largest fetch response a lane's consumer asks for, in bytes.
const FETCH_MAX_BYTES: usize = 4 * 1024 * 1024;

/// How long, in milliseconds, a lane's consumer waits before fetching again once its
/// prefetch ([`PREFETCH_KBYTES`]) was full. librdkafka waits 1 000 ms by default (its
/// `fetch.queue.backoff.ms`), and the loop drains a full prefetch much sooner than that: the
/// consumer then sat idle, and an event produced meanwhile reached the loop up to a second
/// late (DESIGN.md beside this file).
const FETCH_QUEUE_BACKOFF_MS: u32 = 10;

/// How long the loop sleeps without messages or commits before it looks after ownership
/// again.
const IDLE_WAKE: Duration = Duration::from_secs(1);

/// A partition this instance owns.
#[derive(Debug, Clone, Copy)]
struct Owned {
    epoch: i64,
    /// The next offset to count: the stored offset, as of this instance's last commit.
    next: i64,
    /// The next offset to accept: past the messages buffered or in flight.
    pending: i64,
    /// When the loop last asked the consumer to seek to `pending`, or last saw a message
    /// of the seek being served.
    sought_at: Option<Instant>,
    /// Sought (assigned, or sought to `pending`) and no message at `pending` seen since.
    awaiting: bool,
    /// How far before `pending` the last seek of a stalled partition went (0: none yet).
    stepped_back: i64,
}

impl Owned {
    fn claimed(epoch: i64, next: i64) -> Owned {
        Owned { epoch, next, pending: next, sought_at: None, awaiting: true, stepped_back: 0 }
    }

    /// The message at `offset` arrived. A message below `pending` comes from a seek back
    /// being served: once the one just before `pending` arrived, the consumer stands at
    /// `pending`.
    fn arrived(&mut self, offset: i64) {
        if offset == self.pending || (self.awaiting && offset + 1 == self.pending) {
            self.awaiting = false;
            self.stepped_back = 0;
        } else if self.awaiting && offset < self.pending {
            self.sought_at = Some(Instant::now());
        }
    }

    /// Whether the partition was sought and brought nothing within [`STALL_AFTER`].
    fn stalled(&self) -> bool {
        self.awaiting && self.sought_at.is_none_or(|t| t.elapsed() > STALL_AFTER)
    }
}

/// How long a sought partition may bring no message before it is sought further back (see
/// [`Loop::seek_back_if_stalled`]).
const STALL_AFTER: Duration = Duration::from_millis(250);

/// The first step back of a stalled partition, in messages: librdkafka's producers put at
/// most 10000 messages in a record batch (`batch.num.messages`), so one step usually reaches
/// the start of the batch holding `pending`.
const FIRST_STEP_BACK: i64 = 10_000;

struct Metrics {
    registry: Registry,
    counted: Counter,
    duplicates: Counter,
    quarantined: Counter,
    isolated: Counter,
    snapshots: Counter,
    batches: Timing,
    fenced: Counter,
    dedupe_fallbacks: Counter,
    db_retries: Counter,
    fast_commits: Counter,
    fast_commit_failures: Counter,
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
            isolated: r.counter(
                "tally_aggregator_events_isolated_total",
                "events quarantined because their batch's transaction failed with them (also counted as quarantined)",
                &[],
            ),
            snapshots: r.counter("tally_aggregator_snapshots_total", "decision snapshots written to the outbox", &[]),
            batches: Timing::new(
                &r,
                "tally_aggregator_batch_micros_total",
                "tally_aggregator_batches_total",
                "time spent committing batches",
            ),
            fenced: r.counter("tally_aggregator_batches_fenced_total", "batches refused by fencing", &[]),
            dedupe_fallbacks: r.counter(
                "tally_aggregator_dedupe_fallbacks_total",
                "batches whose plain dedupe insert met event ids recorded before, so they skipped known ids instead",
                &[],
            ),
            db_retries: r.counter("tally_aggregator_database_retries_total", "batch commits retried after a database error", &[]),
            fast_commits: r.counter(
                "tally_aggregator_fast_commits_total",
                "transactions that counted urgent events (which may change a decision) ahead of their batch",
                &[],
            ),
            fast_commit_failures: r.counter(
                "tally_aggregator_fast_commit_failures_total",
                "fast commits that failed; their events were counted with their batches",
                &[],
            ),
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
    /// One consumer per lane, assigned that lane's owned partitions, so a lane whose buffer
    /// is full does not hold up the others.
    consumers: Vec<StreamConsumer<Watched>>,
    heartbeats: Heartbeats,
    committer: Committer,
    owned: HashMap<i32, Owned>,
    lanes: Vec<Lane>,
    /// Which lane's consumer is asked first for the next message (see `lanes_with_room`).
    turn: usize,
    fast: FastCommits,
    relay_wake: Arc<Notify>,
    metrics: Arc<Metrics>,
    /// The permanent failure that stopped the loop, once one did.
    stopped_by: Option<StoreError>,
}

/// What one lane commits: its deliveries' offset ranges, and its due refreshes.
struct LaneWork {
    lane: usize,
    deliveries: Vec<Delivery>,
    ranges: Vec<Range>,
    refreshes: Subjects,
}

/// A commit as it ended: a lane's batch with its outcome or why it was not committed, or a
/// fast commit of urgent deliveries with its outcome (`None`: it failed, and the events are
/// counted with their batches).
enum Settled {
    Batch(LaneWork, Result<Outcome, NotCommitted>),
    Fast(FastWork, Option<Outcome>),
}

/// What one fast commit commits: urgent deliveries, and the lane of each of their subjects
/// (a subject whose snapshot the commit defers joins that lane's deferred refreshes).
struct FastWork {
    deliveries: Vec<Delivery>,
    lanes: HashMap<String, usize>,
}

/// Most urgent deliveries in one fast commit; the rest wait for the next.
const FAST_COMMIT_MAX: usize = 1000;

/// The loop's state for fast commits ([`crate::headroom`]).
#[derive(Default)]
struct FastCommits {
    /// Urgent deliveries waiting for the next fast commit, and when the first of them was
    /// accepted.
    queue: Vec<Delivery>,
    queued_since: Option<Instant>,
    /// Whether a fast commit is in flight (one at a time).
    busy: bool,
    /// Deliveries (partition, offset) a fast commit decided, at or past their partition's
    /// stored offset; their batch skips them. An entry goes when a commit moves the stored
    /// offset past it or the partition is lost or claimed again.
    decided: HashSet<(i32, i64)>,
}

impl FastCommits {
    fn queue(&mut self, urgent: Delivery, now: Instant) {
        self.queued_since.get_or_insert(now);
        self.queue.push(urgent);
    }

    /// The next fast commit's deliveries (at most [`FAST_COMMIT_MAX`]) and how long the
    /// first of them waited, unless one is in flight or none is queued.
    fn start(&mut self) -> Option<(Vec<Delivery>, Duration)> {
        if self.busy || self.queue.is_empty() {
            return None;
        }
        self.busy = true;
        let n = self.queue.len().min(FAST_COMMIT_MAX);
        let deliveries: Vec<Delivery> = self.queue.drain(..n).collect();
        let waited = self.queued_since.take().map(|t| t.elapsed()).unwrap_or_default();
        if !self.queue.is_empty() {
            self.queued_since = Some(Instant::now());
        }
        Some((deliveries, waited))
    }

    /// Marks the deliveries a fast commit decided already, so their batch only moves the
    /// cursor past them. One still in a fast commit when its batch was cut is not marked:
    /// the batch meets its dedupe record and skips it as a duplicate.
    fn mark(&mut self, deliveries: &mut [Delivery]) {
        if self.decided.is_empty() {
            return;
        }
        for d in deliveries.iter_mut() {
            d.decided_early = self.decided.remove(&(d.partition, d.offset));
        }
    }

    /// Forgets the deliveries decided early of `partition` below offset `below` (all of
    /// them with `None`: the partition was lost or claimed again).
    fn forget(&mut self, partition: i32, below: Option<i64>) {
        if !self.decided.is_empty() {
            self.decided.retain(|(p, o)| *p != partition || below.is_some_and(|b| *o >= b));
        }
    }
}

/// Why a lane's batch was not committed.
#[derive(Debug)]
enum NotCommitted {
    /// Refused by fencing: the lane gives the partition up or rewinds.
    Fenced(Refused),
    /// A permanent failure that no event of the batch causes
    /// ([`crate::store::ErrorClass::Permanent`]): the aggregator stops.
    Permanent(StoreError),
}

/// A batch refused by fencing: the partition, and the epoch the batch claimed it at.
#[derive(Debug, Clone, Copy)]
struct Refused {
    partition: i32,
    epoch: i64,
}

/// Everything a batch commit needs, owned, so commits run as tasks of their own.
#[derive(Clone)]
struct Committer {
    store: Store,
    policy: PolicyHandle,
    metrics: Arc<Metrics>,
    lateness: chrono::Duration,
    refresh: chrono::Duration,
}

/// Runs the aggregator (see the crate docs).
pub async fn run(
    settings: AggregatorSettings,
    kafka: KafkaSettings,
    postgres: PostgresSettings,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let needed = settings.lanes() as u32 + CONNECTIONS_BESIDES_LANES;
    if postgres.pool_size < needed {
        anyhow::bail!(
            "TALLY_AGGREGATOR_LANES={} needs a pool of at least {needed} Postgres connections (one per lane, plus membership, scheduler, relay and fast commits); TALLY_DATABASE_POOL_SIZE is {}",
            settings.lanes(),
            postgres.pool_size
        );
    }
    let pool = postgres.connect().await?;
    if let Some(path) = &settings.config {
        match crate::policy::seed_from_file(&pool, path).await? {
            Some(applied) => tracing::info!(version = applied.version, file = %path.display(), "tier configuration seeded"),
            None => {
                tracing::info!(file = %path.display(), "a tier configuration is already stored; --config only seeds an empty database (change it with `tally config apply`)")
            }
        }
    }
    let policy = PolicyHandle::new(Policy::builtin());
    policy.sync(&mut *pool.acquire().await?).await?;
    let clients = Clients::default();
    let consumers = (0..settings.lanes())
        .map(|lane| usage_consumer(&kafka, &settings.group, clients.register(format!("usage consumer (lane {lane})"))))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let store = Store {
        pool: pool.clone(),
        group: settings.group.clone(),
        topic: kafka.usage_topic.clone(),
        owner: format!("aggregator-{}", uuid::Uuid::new_v4()),
        decisions_topic: kafka.decisions_topic.clone(),
        quarantine_topic: kafka.quarantine_topic.clone(),
        policies: Default::default(),
        recorder: Default::default(),
    };
    let metrics = Arc::new(Metrics::new());
    let rebuilds =
        metrics.registry.counter("tally_kafka_producer_rebuilds_total", "producers replaced after a fatal error", &[("client", "outbox")]);
    let producer = RebuildingProducer::new(kafka.producer_config(), clients.register("outbox producer"), Some(rebuilds))?;
    let (relay_wake, relay_stop) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let heartbeats = relay::Heartbeats::new(kafka.decisions_topic.clone(), store.owner.clone());
    let relay_task = tokio::spawn(relay::run(pool.clone(), producer.clone(), heartbeats, relay_wake.clone(), relay_stop.clone()));
    let control = control_wake(&kafka, clients.register("control consumer"));
    let health = {
        let metrics = metrics.clone();
        tally_common::health::serve_probes(settings.listen, clients, move || metrics.registry.render()).await?
    };
    // Before consuming, so today's dedupe partitions exist; a failure does not stop counting
    // (a day without its partition goes to the DEFAULT partition until the next run).
    let _ = crate::partitions::maintain_now(&pool, settings.lateness_days).await;
    let partition_upkeep = tokio::spawn(crate::partitions::run_periodically(pool.clone(), settings.lateness_days));
    let vacuums = tokio::spawn(crate::vacuum::run_periodically(pool.clone()));
    let mut scheduler = tokio::spawn(run_scheduler(store.clone(), policy.clone(), relay_wake.clone(), metrics.clone(), control));
    tracing::info!(group = %settings.group, topic = %kafka.usage_topic, owner = %store.owner, "aggregator consuming");
    let timeout = Duration::from_secs(settings.shutdown_timeout_seconds);
    let membership = Membership {
        group: settings.group.clone(),
        topic: kafka.usage_topic.clone(),
        member_id: store.owner.clone(),
        lease: Duration::from_millis(settings.member_lease_ms),
    };
    let committer = Committer {
        store,
        policy,
        metrics: metrics.clone(),
        lateness: chrono::Duration::days(settings.lateness_days),
        refresh: chrono::Duration::milliseconds(settings.snapshot_refresh_ms as i64),
    };
    let mut state = Loop {
        lanes: (0..settings.lanes()).map(|_| Lane::new(settings.headroom_subjects.div_ceil(settings.lanes()))).collect(),
        settings,
        consumers,
        heartbeats: Heartbeats::new(membership.clone()),
        committer,
        owned: HashMap::new(),
        turn: 0,
        fast: FastCommits::default(),
        relay_wake,
        metrics,
        stopped_by: None,
    };
    state.consume_until(shutdown, &mut scheduler, timeout).await;
    if let Err(e) = membership.leave(&pool).await {
        tracing::warn!(error = %e, "could not leave the group; the others take over when the lease ends");
    }
    // Drain: the loop has committed its last batch; publish what the outbox holds.
    relay_stop.notify_one();
    let _ = tokio::time::timeout(timeout, relay_task).await;
    let _ = tokio::time::timeout(timeout, relay::drain(&pool, &producer)).await;
    health.abort();
    scheduler.abort();
    partition_upkeep.abort();
    vacuums.abort();
    if let Some(failure) = state.stopped_by {
        tracing::error!(error = %failure, "aggregator stopped by a permanent failure");
        let context = "the aggregator stopped on a permanent failure that no event causes";
        return Err(anyhow::Error::new(failure).context(context));
    }
    tracing::info!("aggregator stopped");
    Ok(())
}

/// A notifier woken by every message on the control topic (configuration changes), so the
/// scheduler reacts at once rather than at its next tick. Reads from the end: past changes
/// are already in Postgres.
fn control_wake(kafka: &KafkaSettings, health: Arc<ClientHealth>) -> Arc<Notify> {
    let wake = Arc::new(Notify::new());
    let consumer: Result<StreamConsumer<Watched>, _> =
        watched(kafka.consumer_config("tally-control-reader")).create_with_context(Watched::new(health));
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

/// Runs the time-driven scheduler: when the earliest subject is due, at least every
/// [`SCHEDULER_TICK`], and at once on a control message, decides
/// again the subjects that are due, in [`SCHEDULER_WORKERS`] chunks at a time (see
/// [`Store::decide_due`]) until fewer are due than a round takes. A transient failure is
/// tried again at the next tick; a permanent one (the scheduler handles no events, so none
/// is to blame) ends it, returning the failure for the loop to stop on.
async fn run_scheduler(
    store: Store,
    policy: PolicyHandle,
    relay_wake: Arc<Notify>,
    metrics: Arc<Metrics>,
    wake: Arc<Notify>,
) -> StoreError {
    loop {
        if let Err(e) = decide_all_due(&store, &policy, &relay_wake, &metrics).await {
            if e.is_permanent() {
                tracing::error!(error = %e, "scheduled decisions failed permanently; the aggregator stops");
                return e;
            }
            tracing::warn!(error = %e, "scheduled decisions failed; retrying");
        }
        let pause = until_next_due(&store).await;
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = wake.notified() => {}
        }
    }
}

/// How long the scheduler sleeps: until the earliest subject due later (so a rollover
/// starts at its boundary, not up to a tick later), at most [`SCHEDULER_TICK`]
/// (configuration changes and overrides are looked at every tick). A subject still due
/// after the tick's rounds is one a batch holds locked: it waits for the next tick rather
/// than making the scheduler spin.
async fn until_next_due(store: &Store) -> Duration {
    let now = Utc::now();
    match store.next_due_at().await {
        Ok(Some(due)) if due > now => (due - now).to_std().unwrap_or_default().clamp(Duration::from_millis(1), SCHEDULER_TICK),
        Ok(_) | Err(_) => SCHEDULER_TICK,
    }
}

/// One scheduler tick: the configuration step, then rounds of concurrent chunks until a
/// round finds fewer due subjects than it could take. Each chunk that committed wakes the
/// relay, so a storm's first unblocks go out while the rest are decided.
async fn decide_all_due(store: &Store, policy: &PolicyHandle, relay_wake: &Notify, metrics: &Metrics) -> Result<(), StoreError> {
    store.mark_due_after_config_change(policy, Utc::now()).await?;
    loop {
        let now = Utc::now();
        let chunks = futures::future::join_all((0..SCHEDULER_WORKERS).map(|_| store.decide_due(policy, now, SCHEDULER_CHUNK))).await;
        let mut full_chunks = 0;
        for chunk in chunks {
            let chunk = chunk?;
            metrics.scheduled_checks.add(chunk.looked_at as u64);
            metrics.snapshots.add(chunk.published as u64);
            if chunk.looked_at > 0 {
                relay_wake.notify_one();
            }
            if chunk.looked_at == SCHEDULER_CHUNK as usize {
                full_chunks += 1;
            }
        }
        if full_chunks == 0 {
            return Ok(());
        }
    }
}

/// What woke the consume loop.
enum Wake {
    Shutdown,
    Settled(Settled),
    /// A message, with the hash of its key.
    Message(Delivery, u64),
    ConsumerError(rdkafka::error::KafkaError),
    /// The scheduler ended: on a permanent failure, or its task panicked.
    SchedulerEnded(Result<StoreError, tokio::task::JoinError>),
    Timer,
}

impl Loop {
    async fn consume_until(
        &mut self,
        shutdown: impl std::future::Future<Output = ()>,
        scheduler: &mut JoinHandle<StoreError>,
        drain_timeout: Duration,
    ) {
        tokio::pin!(shutdown);
        // A finished task's handle must not be polled again.
        let mut scheduler_running = true;
        let mut in_flight: FuturesUnordered<JoinHandle<Settled>> = FuturesUnordered::new();
        self.maintain_ownership().await;
        loop {
            self.start_ready_lanes(&mut in_flight);
            let wake_at = self.wake_at();
            let room = self.lanes_with_room();
            let wake = tokio::select! {
                biased;
                _ = &mut shutdown => Wake::Shutdown,
                Some(done) = in_flight.next() => Wake::Settled(done.expect("a batch commit task panicked")),
                m = receive_any(&self.consumers, &room), if !room.is_empty() => match m {
                    Ok((d, key)) => Wake::Message(d, key),
                    Err(e) => Wake::ConsumerError(e),
                },
                ended = &mut *scheduler, if scheduler_running => Wake::SchedulerEnded(ended),
                _ = tokio::time::sleep_until(wake_at.into()) => Wake::Timer,
            };
            match wake {
                Wake::Shutdown => break,
                Wake::Settled(settled) => {
                    self.settle(settled);
                    if self.stopped_by.is_some() {
                        break;
                    }
                }
                Wake::Message(d, key) => {
                    let now = Instant::now();
                    self.accept(d, key, now);
                    self.accept_ready(&room, now);
                }
                Wake::ConsumerError(e) => {
                    tracing::warn!(error = %e, "consumer error");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Wake::SchedulerEnded(ended) => {
                    scheduler_running = false;
                    match ended {
                        Ok(failure) => {
                            self.stopped_by = Some(failure);
                            break;
                        }
                        Err(e) => tracing::error!(error = %e, "the scheduler task ended; decisions are looked at again only with batches"),
                    }
                }
                Wake::Timer => {}
            }
            self.maintain_ownership().await;
            self.seek_back_if_stalled();
        }
        // Commits in flight finish (within the shutdown timeout); buffered messages are left
        // to the next owner, from the stored offsets.
        let drained = tokio::time::timeout(drain_timeout, async {
            while let Some(done) = in_flight.next().await {
                self.settle(done.expect("a batch commit task panicked"));
            }
        })
        .await;
        if drained.is_err() {
            // Aborted, a commit's transaction rolls back; the next owner counts its events.
            in_flight.iter().for_each(JoinHandle::abort);
            tracing::warn!("batch commits still in flight at the shutdown timeout were aborted; they roll back");
        }
    }

    /// The lanes whose buffer has room, starting with a different one each time, so no lane
    /// is always served first.
    fn lanes_with_room(&mut self) -> Vec<usize> {
        self.turn = self.turn.wrapping_add(1);
        let n = self.lanes.len();
        let max = self.settings.max_batch * BUFFERED_BATCHES;
        (0..n).map(|i| (self.turn + i) % n).filter(|l| self.lanes[*l].buffered() < max).collect()
    }

    fn lane_of(&self, partition: i32) -> usize {
        partition.rem_euclid(self.lanes.len() as i32) as usize
    }

    /// The earliest instant a lane may become ready without a message, at most [`IDLE_WAKE`]
    /// away.
    fn wake_at(&self) -> Instant {
        let max_wait = self.settings.max_wait();
        let stall_checks = self.owned.values().filter(|o| o.awaiting).filter_map(|o| o.sought_at).map(|t| t + STALL_AFTER);
        self.lanes.iter().filter_map(|l| l.wake_at(max_wait)).chain(stall_checks).fold(Instant::now() + IDLE_WAKE, Instant::min)
    }

    /// Starts a batch commit, as a task of its own, for every idle lane that is ready.
    fn start_ready_lanes(&mut self, in_flight: &mut FuturesUnordered<JoinHandle<Settled>>) {
        let (now, wall) = (Instant::now(), Utc::now());
        let (max_batch, max_wait) = (self.settings.max_batch, self.settings.max_wait());
        let limits = BatchLimits { events: max_batch, subjects: self.settings.max_batch_subjects, refreshes: MAX_REFRESHES_PER_BATCH };
        for lane in 0..self.lanes.len() {
            if !self.lanes[lane].ready(now, wall, max_batch, max_wait) {
                continue;
            }
            let (mut deliveries, refreshes) = self.lanes[lane].take_batch(limits, wall);
            // A partition lost since its messages were buffered would only be refused.
            deliveries.retain(|d| self.owned.contains_key(&d.partition));
            self.fast.mark(&mut deliveries);
            let ranges = self.ranges(&deliveries);
            if deliveries.is_empty() && refreshes.is_empty() {
                self.lanes[lane].settled();
                continue;
            }
            let mut work = LaneWork { lane, deliveries, ranges, refreshes };
            let committer = self.committer.clone();
            in_flight.push(tokio::spawn(async move {
                let result = committer.commit_with_retry(&mut work).await;
                Settled::Batch(work, result)
            }));
        }
        self.start_fast_commit(in_flight);
    }

    /// Starts a fast commit of the urgent deliveries, unless one is in flight.
    fn start_fast_commit(&mut self, in_flight: &mut FuturesUnordered<JoinHandle<Settled>>) {
        let Some((deliveries, waited)) = self.fast.start() else { return };
        let lanes = deliveries.iter().filter_map(|d| Some((d.event()?.subject.clone(), self.lane_of(d.partition)))).collect();
        let committer = self.committer.clone();
        let work = FastWork { deliveries, lanes };
        in_flight.push(tokio::spawn(async move { committer.commit_fast(work, waited).await }));
    }

    /// Heartbeats the membership (at most once a second) and brings the owned partitions in
    /// line with this member's share: drops the ones it lost (and their buffered messages),
    /// claims the ones it gained, and assigns the consumer to exactly the owned ones.
    async fn maintain_ownership(&mut self) {
        let partition_count = || consuming::partition_count(&self.consumers[0], &self.committer.store.topic);
        let owned = self.owned.keys().copied();
        let pool = &self.committer.store.pool;
        let Some(ShareChange { gained, lost }) = self.heartbeats.due_change(pool, owned, partition_count).await else { return };
        for p in &lost {
            self.owned.remove(p);
            self.fast.forget(*p, None);
            tracing::info!(partition = p, "released partition");
        }
        let lost: HashSet<i32> = lost.into_iter().collect();
        self.lanes.iter_mut().for_each(|l| l.drop_partitions(&lost));
        for p in gained {
            self.claim(p).await;
        }
        self.assign_owned();
    }

    /// Points each lane's consumer at exactly the lane's owned partitions, each at its
    /// pending offset.
    fn assign_owned(&mut self) {
        for (lane, consumer) in self.consumers.iter().enumerate() {
            let partitions = self.owned.iter().filter(|(p, _)| self.lane_of(**p) == lane).map(|(p, o)| (*p, o.pending));
            consuming::assign_at(consumer, &self.committer.store.topic, partitions);
        }
        for o in self.owned.values_mut() {
            o.sought_at = Some(Instant::now());
            o.awaiting = true;
        }
        self.metrics.owned_partitions.set(self.owned.len() as i64);
    }

    /// Claims `partition` (retrying until it succeeds) and resumes it from the stored offset;
    /// anything still buffered for it is dropped.
    async fn claim(&mut self, partition: i32) {
        let mut backoff = Duration::from_millis(200);
        loop {
            match self.committer.store.claim(partition).await {
                Ok(claim) => {
                    tracing::info!(partition, next_offset = claim.next_offset, epoch = claim.epoch, "claimed partition");
                    let owned = Owned::claimed(claim.epoch, claim.next_offset);
                    self.owned.insert(partition, owned);
                    let lane = self.lane_of(partition);
                    self.lanes[lane].drop_partitions(&HashSet::from([partition]));
                    self.fast.forget(partition, None);
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
        owned.awaiting = true;
        let topic = &self.committer.store.topic;
        let consumer = &self.consumers[self.lane_of(partition)];
        if let Err(e) = consumer.seek(topic, partition, Offset::Offset(owned.pending), Duration::from_secs(1)) {
            tracing::debug!(partition, offset = owned.pending, error = %e, "seek not possible yet");
        }
    }

    /// Buffers `d` in its lane if it is exactly the pending offset of an owned partition.
    /// Lower offsets are buffered, in flight or counted already; a gap triggers a seek back.
    fn accept(&mut self, d: Delivery, key: u64, now: Instant) {
        let Some(owned) = self.owned.get_mut(&d.partition) else { return };
        owned.arrived(d.offset);
        if d.offset == owned.pending {
            owned.pending += 1;
            let lane = self.lane_of(d.partition);
            if let Some(urgent) = self.lanes[lane].push(d, key, now) {
                self.fast.queue(urgent, now);
            }
        } else if d.offset > owned.pending {
            self.seek_if_due(d.partition);
        }
    }

    /// Accepts, without waiting, what `lanes`' consumers already hold (at most
    /// [`RECEIVE_BURST`]), so a backlog is not received one wake-up at a time.
    fn accept_ready(&mut self, lanes: &[usize], now: Instant) {
        let mut taken = 0;
        while taken < RECEIVE_BURST {
            let before = taken;
            for &lane in lanes {
                // Polled once, without the boxed futures `receive_any` needs to wait on all.
                match self.consumers[lane].recv().now_or_never().map(|r| r.map(|m| keyed_delivery(&m))) {
                    Some(Ok((d, key))) => {
                        self.accept(d, key, now);
                        taken += 1;
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "consumer error");
                        return;
                    }
                    None => {}
                }
            }
            if taken == before {
                return;
            }
        }
    }

    /// Seeks further back every partition that was sought (assigned, rewound, or sought over
    /// a gap) and brought no message within [`STALL_AFTER`]: a broker may answer a fetch
    /// that starts inside a record batch with nothing at all (tansu 0.6 does), and a
    /// partition with nothing more to come brings no later message that would trigger
    /// another seek, so it would stand still for good. The first seek back goes
    /// [`FIRST_STEP_BACK`] messages before `pending`, each later one twice as far, down to
    /// the partition's start; the messages before `pending` are passed over as any
    /// redelivery is, so this costs a re-read and never changes what is counted.
    fn seek_back_if_stalled(&mut self) {
        let stalled: Vec<i32> = self.owned.iter().filter(|(_, o)| o.stalled()).map(|(p, _)| *p).collect();
        for partition in stalled {
            let consumer = &self.consumers[self.lane_of(partition)];
            let Some(owned) = self.owned.get_mut(&partition) else { continue };
            if owned.pending == 0 || owned.stepped_back >= owned.pending {
                // Nothing before `pending` to step back to: the partition has nothing yet.
                owned.awaiting = false;
                continue;
            }
            owned.stepped_back = (owned.stepped_back * 2).max(FIRST_STEP_BACK);
            owned.sought_at = Some(Instant::now());
            let from = (owned.pending - owned.stepped_back).max(0);
            tracing::debug!(partition, pending = owned.pending, from, "no message at the sought offset; seeking further back");
            if let Err(e) = consumer.seek(&self.committer.store.topic, partition, Offset::Offset(from), Duration::from_secs(1)) {
                tracing::debug!(partition, offset = from, error = %e, "seek not possible yet");
            }
        }
    }

    fn seek_if_due(&mut self, partition: i32) {
        let Some(mut owned) = self.owned.get(&partition).copied() else { return };
        if owned.sought_at.is_none_or(|t| t.elapsed() > Duration::from_secs(1)) {
            tracing::info!(partition, offset = owned.pending, "gap before the pending offset; seeking");
            self.seek(partition, &mut owned);
            self.owned.insert(partition, owned);
        }
    }

    fn ranges(&self, deliveries: &[Delivery]) -> Vec<Range> {
        let mut ranges: HashMap<i32, Range> = HashMap::new();
        for d in deliveries {
            let epoch = self.owned.get(&d.partition).map_or(0, |o| o.epoch);
            ranges.entry(d.partition).and_modify(|r| r.next = d.offset + 1).or_insert(Range {
                partition: d.partition,
                epoch,
                start: d.offset,
                next: d.offset + 1,
            });
        }
        let mut ranges: Vec<Range> = ranges.into_values().collect();
        ranges.sort_by_key(|r| r.partition);
        ranges
    }

    fn settle(&mut self, settled: Settled) {
        match settled {
            Settled::Batch(work, result) => {
                self.lanes[work.lane].settled();
                match result {
                    Ok(outcome) => self.committed(&work, outcome),
                    Err(NotCommitted::Fenced(refused)) => self.fenced(work, refused),
                    Err(NotCommitted::Permanent(failure)) => self.stop(work.lane, failure),
                }
            }
            Settled::Fast(work, outcome) => self.fast_committed(work, outcome),
        }
    }

    /// After a lane's commit: counts, stored cursors, the lane's new deferred subjects and
    /// its subjects' headroom.
    fn committed(&mut self, work: &LaneWork, outcome: Outcome) {
        self.count(&outcome);
        self.advance(work.lane, &work.ranges);
        let lane = &mut self.lanes[work.lane];
        lane.deferred.extend(outcome.deferred);
        for (subject, lines) in outcome.headroom {
            lane.headroom.committed(subject, lines);
        }
        self.relay_wake.notify_one();
    }

    fn count(&self, outcome: &Outcome) {
        self.metrics.counted.add(outcome.counted as u64);
        self.metrics.duplicates.add(outcome.duplicates as u64);
        self.metrics.quarantined.add(outcome.quarantined as u64);
        self.metrics.snapshots.add(outcome.snapshots as u64);
        self.metrics.dedupe_fallbacks.add(outcome.dedupe_fell_back as u64);
    }

    /// After a fast commit: its deliveries are decided (their batches skip them), and a
    /// subject whose snapshot it deferred joins the deferred refreshes of its lane. Its
    /// subjects' headroom stays stale until a batch decides them: the fast commit did not
    /// see what their lanes buffered meanwhile.
    fn fast_committed(&mut self, work: FastWork, outcome: Option<Outcome>) {
        self.fast.busy = false;
        let Some(outcome) = outcome else {
            self.metrics.fast_commit_failures.inc();
            return;
        };
        self.metrics.fast_commits.inc();
        self.count(&outcome);
        for (subject, deferred) in outcome.deferred {
            if let Some(&lane) = work.lanes.get(&subject) {
                self.lanes[lane].deferred.insert(subject, deferred);
            }
        }
        // A delivery whose batch committed meanwhile is behind the stored offset: nothing
        // will skip it any more (its batch counted it as a duplicate).
        let pending = |d: &Delivery| self.owned.get(&d.partition).is_some_and(|o| d.offset >= o.next);
        let decided: Vec<(i32, i64)> = work.deliveries.iter().filter(|d| pending(d)).map(|d| (d.partition, d.offset)).collect();
        self.fast.decided.extend(decided);
        self.relay_wake.notify_one();
    }

    /// After a lane's batch was refused: the partition is given up (unless this instance
    /// has claimed it again since the batch's epoch) and its buffered messages dropped; the
    /// lane's other partitions drop what they buffered and re-read from their stored
    /// offsets; the refreshes wait for the lane's next batch.
    fn fenced(&mut self, work: LaneWork, Refused { partition, epoch }: Refused) {
        self.metrics.fenced.inc();
        if self.owned.get(&partition).is_some_and(|o| o.epoch == epoch) {
            tracing::warn!(partition, epoch, "batch refused by fencing; another member owns the partition now");
            self.owned.remove(&partition);
            self.fast.forget(partition, None);
            self.heartbeats.fenced(partition, Duration::from_millis(self.settings.member_lease_ms));
        } else {
            tracing::info!(partition, epoch, "batch refused by fencing: it predates this instance's current claim");
        }
        self.lanes[work.lane].drop_partitions(&HashSet::from([partition]));
        let now = Utc::now();
        self.lanes[work.lane].deferred.extend(work.refreshes.into_iter().map(|(s, key)| (s, (key, now))));
        self.rewind_lane(work.lane);
        self.assign_owned();
    }

    /// After a lane's batch failed permanently without an event to blame: the loop stops
    /// taking messages and starting commits, lets the commits in flight finish, and the
    /// aggregator exits with the failure (see the module docs). The first failure is kept.
    fn stop(&mut self, lane: usize, failure: StoreError) {
        tracing::error!(lane, error = %failure, "batch commit failed permanently and no event of it is to blame; the aggregator stops");
        self.stopped_by.get_or_insert(failure);
    }

    /// After a commit: the stored cursors move on, and Kafka gets them as a resume hint.
    fn advance(&mut self, lane: usize, ranges: &[Range]) {
        let mut hint = TopicPartitionList::new();
        for r in ranges {
            if let Some(o) = self.owned.get_mut(&r.partition).filter(|o| o.epoch == r.epoch) {
                o.next = r.next;
                let _ = hint.add_partition_offset(&self.committer.store.topic, r.partition, Offset::Offset(r.next));
                self.fast.forget(r.partition, Some(r.next));
            }
        }
        if hint.count() > 0 {
            if let Err(e) = self.consumers[lane].commit(&hint, CommitMode::Async) {
                tracing::debug!(error = %e, "offset hint not committed to Kafka");
            }
        }
    }

    /// Drops the lane's buffered messages and moves each of its partitions' pending cursor
    /// back to the stored offset (the lane has nothing in flight when this runs).
    fn rewind_lane(&mut self, lane: usize) {
        let partitions: HashSet<i32> = self.owned.keys().copied().filter(|p| self.lane_of(*p) == lane).collect();
        self.lanes[lane].drop_partitions(&partitions);
        for p in partitions {
            if let Some(o) = self.owned.get_mut(&p) {
                o.pending = o.next;
            }
        }
    }
}

impl Committer {
    /// Commits one lane's batch (with its due refreshes) until it succeeds, is fenced or
    /// fails permanently, acting on the failure's class ([`crate::store::ErrorClass`]): a
    /// refusal by fencing names the partition and the batch's epoch; a transient failure is
    /// retried with backoff; a permanent one looks for the event that causes it
    /// ([`crate::isolate`]). That event is quarantined and the batch tried again at once;
    /// when the failure did not come back, or a transient one interrupted the search, the
    /// batch is retried with backoff; when no event is to blame, the failure is returned and
    /// the aggregator stops.
    async fn commit_with_retry(&self, work: &mut LaneWork) -> Result<Outcome, NotCommitted> {
        let mut backoff = Duration::from_millis(200);
        loop {
            let (now, parsing) = (Utc::now(), Instant::now());
            let parsed = parse_batch(&mut work.deliveries, now, self.lateness);
            let started = Instant::now();
            let result =
                self.store.commit_batch(&work.ranges, parsed, &work.refreshes, &self.policy, now, self.refresh, Finish::Commit).await;
            let failure = match result {
                Ok(outcome) => {
                    let took = started.elapsed();
                    self.metrics.batches.record(took);
                    let (parse_millis, millis) = ((started - parsing).as_millis() as u64, took.as_millis() as u64);
                    tracing::debug!(
                        lane = work.lane,
                        events = work.deliveries.len(),
                        refreshes = work.refreshes.len(),
                        parse_millis,
                        millis,
                        "batch committed"
                    );
                    return Ok(outcome);
                }
                Err(StoreError::Fenced { partition, epoch, .. }) => return Err(NotCommitted::Fenced(Refused { partition, epoch })),
                Err(e) if e.is_transient() => e,
                // Permanent: an event's, or the aggregator's.
                Err(e) => match self.isolate(work, e).await {
                    Isolated::Quarantined => continue,
                    Isolated::RetryLater(e) => e,
                    Isolated::NotAnEvent(e) => return Err(NotCommitted::Permanent(e)),
                },
            };
            self.metrics.db_retries.inc();
            tracing::warn!(error = %failure, lane = work.lane, retry_in_ms = backoff.as_millis() as u64, "batch commit failed; the lane is paused");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// Looks for the delivery that makes `work`'s batch fail with `failure` and marks it
    /// for quarantine.
    async fn isolate(&self, work: &mut LaneWork, failure: StoreError) -> Isolated {
        let len = work.deliveries.len();
        tracing::warn!(error = %failure, lane = work.lane, events = len, "batch commit failed; looking for the event that causes it");
        let mut trials = BatchTrials { committer: self, work: &mut *work };
        match isolate::find_poison(&mut trials, len).await {
            Isolation::Found { index, refusal } => {
                let d = &mut work.deliveries[index];
                tracing::warn!(partition = d.partition, offset = d.offset, reason = %refusal.reason, detail = refusal.detail.as_deref().unwrap_or_default(), "event isolated from its batch; it goes to quarantine");
                d.isolated = Some(refusal);
                self.metrics.isolated.inc();
                Isolated::Quarantined
            }
            Isolation::NotAnEvent(e) => Isolated::NotAnEvent(e),
            Isolation::Interrupted(e) => Isolated::RetryLater(e),
            Isolation::NotReproduced => Isolated::RetryLater(failure),
        }
    }
}

/// What the search for a batch's poison leaves the commit to do.
enum Isolated {
    /// An event was marked for quarantine: commit again at once.
    Quarantined,
    /// The failure passed, or a transient one stopped the search: back off and retry.
    RetryLater(StoreError),
    /// The batch fails without any of its events: a permanent failure of the aggregator's.
    NotAnEvent(StoreError),
}

/// A lane's batch, tried by prefixes in transactions that roll back ([`crate::isolate`]).
struct BatchTrials<'a> {
    committer: &'a Committer,
    work: &'a mut LaneWork,
}

impl isolate::Trials for BatchTrials<'_> {
    async fn try_prefix(&mut self, prefix: usize) -> Result<(), StoreError> {
        let c = self.committer;
        let now = Utc::now();
        // No ranges, so no fencing check: the offsets are the batch's, and a trial commits
        // nothing anyway.
        let parsed = parse_batch(&mut self.work.deliveries[..prefix], now, c.lateness);
        c.store.commit_batch(&[], parsed, &self.work.refreshes, &c.policy, now, c.refresh, Finish::RollBack).await.map(|_| ())
    }

    async fn try_quarantining(&mut self, prefix: usize, index: usize, refusal: &Refusal) -> Result<(), StoreError> {
        self.work.deliveries[index].isolated = Some(refusal.clone());
        let result = self.try_prefix(prefix).await;
        self.work.deliveries[index].isolated = None;
        result
    }
}

impl Committer {
    /// Commits urgent deliveries at once, in a transaction of their own beside the lanes'
    /// batches: dedupe records, ledgers and decisions, but no offsets (the cursor moves with
    /// their batch, which skips them). Counting is by event id, so it needs no claim: a
    /// batch or another instance that meets these events again skips them as duplicates.
    /// One attempt: should it fail, the events are counted with their batches. `waited` is
    /// how long the first of them waited for the fast commit in flight before (logged, with
    /// the age of the oldest event by its own time: the broker hop and the loop's share).
    async fn commit_fast(&self, mut work: FastWork, waited: Duration) -> Settled {
        let (now, started) = (Utc::now(), Instant::now());
        let deliveries = &mut work.deliveries;
        let oldest = deliveries.iter().filter_map(|d| d.event()).map(|e| e.time).min();
        let age_millis = oldest.map_or(0, |t| (now - t).num_milliseconds());
        let parsed = parse_batch(deliveries, now, self.lateness);
        let result = self.store.commit_batch(&[], parsed, &Subjects::new(), &self.policy, now, self.refresh, Finish::Commit).await;
        let outcome = match result {
            Ok(outcome) => {
                let (waited_millis, millis) = (waited.as_millis() as u64, started.elapsed().as_millis() as u64);
                tracing::debug!(events = deliveries.len(), snapshots = outcome.snapshots, age_millis, waited_millis, millis, "fast commit");
                Some(outcome)
            }
            Err(e) => {
                tracing::warn!(error = %e, events = deliveries.len(), "fast commit failed; its events are counted with their batches");
                None
            }
        };
        Settled::Fast(work, outcome)
    }
}

/// The usage topic's consumer of one lane.
fn usage_consumer(kafka: &KafkaSettings, group: &str, health: Arc<ClientHealth>) -> anyhow::Result<StreamConsumer<Watched>> {
    watched(usage_consumer_config(kafka, group)).create_with_context(Watched::new(health)).context("failed to create the usage consumer")
}

/// The configuration of a lane's usage consumer: a small prefetch, refilled soon.
fn usage_consumer_config(kafka: &KafkaSettings, group: &str) -> ClientConfig {
    let mut config = kafka.consumer_config(group);
    config
        // librdkafka prefetches up to 64 MiB by default; a lane holds at most two batches in
        // its buffer and one in flight, so a few MiB ahead keep it busy.
        .set("queued.max.messages.kbytes", PREFETCH_KBYTES.to_string())
        // librdkafka may overshoot the prefetch by one fetch response, 50 MiB by default: with a
        // backlog that is what a consumer held.
        .set("fetch.max.bytes", FETCH_MAX_BYTES.to_string())
        .set("fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS.to_string());
    config
}

/// The next message from any of the `lanes`' consumers, with the hash of its key.
async fn receive_any(consumers: &[StreamConsumer<Watched>], lanes: &[usize]) -> rdkafka::error::KafkaResult<(Delivery, u64)> {
    let receives = lanes.iter().map(|l| Box::pin(consumers[*l].recv()));
    let (received, _, _) = futures::future::select_all(receives).await;
    received.map(|m| keyed_delivery(&m))
}

/// A message as buffered: the delivery, and the hash of its key (the subject). A CloudEvent
/// in binary content mode is buffered as its structured form ([`consuming::payload`]).
fn keyed_delivery(m: &rdkafka::message::BorrowedMessage<'_>) -> (Delivery, u64) {
    let delivery = Delivery::received(m.partition(), m.offset(), consuming::payload(m));
    (delivery, key_hash(m.key()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The settings as the command line gives them with no arguments (the defaults).
    #[derive(clap::Parser)]
    struct Defaults {
        #[command(flatten)]
        kafka: KafkaSettings,
        #[command(flatten)]
        aggregator: crate::AggregatorSettings,
    }

    fn defaults() -> Defaults {
        <Defaults as clap::Parser>::parse_from(["test"])
    }

    /// A setting's value as a number.
    fn number(config: &ClientConfig, key: &str) -> u128 {
        config.get(key).unwrap_or_else(|| panic!("{key} is not set")).parse().unwrap_or_else(|e| panic!("{key}: {e}"))
    }

    /// A full prefetch holds the next fetch back for `fetch.queue.backoff.ms`; an urgent event
    /// behind it waits that long before the loop can see it, so it must be shorter than the
    /// longest a batch waits to fill (librdkafka's default is a whole second).
    #[test]
    fn a_full_prefetch_holds_the_next_fetch_back_for_less_than_a_batch_waits_to_fill() {
        let Defaults { kafka, aggregator } = defaults();
        let config = usage_consumer_config(&kafka, &aggregator.group);
        assert!(number(&config, "fetch.queue.backoff.ms") < aggregator.max_wait().as_millis());
        assert_eq!(number(&config, "queued.max.messages.kbytes"), PREFETCH_KBYTES as u128);
    }
}
