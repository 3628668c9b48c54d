//! The history writer's consume loop.
//!
//! Partitions are split among the live writers of the group through Postgres membership
//! ([`tally_common::membership`], group = the writer's `--group`), not by a Kafka consumer
//! group: tansu 0.6 keeps a SIGKILLed group leader for ever, so a restarted writer would
//! never get partitions from `subscribe`. Between batches the loop heartbeats (at most once
//! a second); on gaining a partition it claims it in `history_offsets` (bumping the epoch,
//! which fences the previous owner) and the consumer is `assign`ed exactly the owned
//! partitions at their stored offsets. A member that stops heartbeating (killed) loses its
//! share after the lease (`TALLY_HISTORY_MEMBER_LEASE_MS`), so a restarted writer owns every
//! partition again within one lease; a clean shutdown leaves the group at once.
//!
//! For each batch the loop keeps the run of messages continuing exactly from the stored
//! offset, holds back what the ledger has not decided on yet, gives each counted event its
//! budgets under the configuration version it was counted under ([`budgets`]; a version
//! that is not stored or no longer validates is a permanent failure), writes the counted
//! events (and counted corrections, as negated rows: see [`plan`]) with [`Sink::write`], and
//! only then advances its offsets. A transient failure (ClickHouse or Postgres unreachable, a
//! ClickHouse server error, a serialization failure) rewinds the batch's partitions to the
//! stored offsets and retries with a backoff. A permanent failure that no event causes (a
//! ClickHouse or Postgres refusal that every part of the batch meets, a schema that does
//! not match: [`ChError::is_retryable`], [`tally_common::postgres::is_transient`]) would
//! come back on every retry: the writer stops, leaves the group, and [`run`] returns the
//! failure, so the process logs it and exits non-zero. A batch refused by fencing drops the
//! partition, which is not claimed again for one lease (the other member owns it).
//!
//! Held and rewound partitions are sought back to their next offset. A broker that answers
//! a fetch starting inside a record batch with nothing (tansu 0.6) would leave such a
//! partition stalled for good once nothing more is produced to it, so a partition that
//! brings no message at its next offset soon after is sought further back
//! ([`Loop::seek_back_if_stalled`]). Each batch's time is split by phase in
//! `tally_history_batch_phase_micros_total`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use tally_common::clickhouse::ClickHouseSettings;
use tally_common::consuming;
use tally_common::health::{watched, Clients, Watched};
use tally_common::kafka::KafkaSettings;
use tally_common::membership::{Heartbeats, Membership, ShareChange};
use tally_common::metrics::{Counter, Gauge, Registry, Timing};
use tally_common::postgres::PostgresSettings;

use crate::budgets::{self, ConfigVersions, VersionError};
use crate::client::{Ch, ChError};
use crate::isolate;
use crate::plan::{self, Delivery};
use crate::progress::{IsolatedEvent, Progress, ProgressError, Range};
use crate::sink::{Counted, Sink, Step, Written};
use crate::WriterSettings;

/// How long a partition sought back may bring no message at its next offset before it is
/// sought further back (see [`Loop::seek_back_if_stalled`]).
const STALL_AFTER: Duration = Duration::from_millis(250);

/// The first step back of a stalled partition, in messages: librdkafka's producers put at
/// most 10000 messages in a record batch (`batch.num.messages`), so one step usually reaches
/// the start of the batch holding the next offset.
const FIRST_STEP_BACK: i64 = 10_000;

#[derive(Debug, Clone, Copy)]
struct Owned {
    epoch: i64,
    next: i64,
    sought_at: Option<Instant>,
    /// Sought back to `next` (a hold or a rewind) and no message at `next` seen since.
    awaiting: bool,
    /// How far before `next` the last seek of a stalled partition went (0: none yet).
    stepped_back: i64,
}

struct Metrics {
    registry: Registry,
    written: Counter,
    replayed: Counter,
    not_counted: Counter,
    corrections: Counter,
    orphan_corrections: Counter,
    past_retention: Counter,
    batches: Timing,
    failures: Counter,
    isolated: Counter,
    fenced: Counter,
    held: Counter,
    owned_partitions: Gauge,
    lag: Gauge,
    phases: Phases,
}

/// Where a written batch's time goes, phase by phase (`tally_history_batch_phase_micros_total`
/// by `phase`): the ledger's offsets (`ledger`), the dedupe records (`counted`), the
/// ClickHouse lookup of rows already present (`lookup`), the raw insert (`insert`), the
/// rollups (`rollups`) and the stored progress (`progress`). A batch split by [`isolate`]
/// adds every try's time.
struct Phases {
    ledger: Counter,
    counted: Counter,
    lookup: Counter,
    insert: Counter,
    rollups: Counter,
    progress: Counter,
}

impl Phases {
    fn new(r: &Registry) -> Self {
        let phase = |name: &str| {
            r.counter("tally_history_batch_phase_micros_total", "time spent in each phase of writing batches", &[("phase", name)])
        };
        Phases {
            ledger: phase("ledger"),
            counted: phase("counted"),
            lookup: phase("lookup"),
            insert: phase("insert"),
            rollups: phase("rollups"),
            progress: phase("progress"),
        }
    }
}

/// Adds the time since `since` to `counter` and restarts the clock.
fn lap(counter: &Counter, since: &mut Instant) {
    let now = Instant::now();
    counter.add((now - *since).as_micros() as u64);
    *since = now;
}

impl Metrics {
    fn new() -> Self {
        let r = Registry::default();
        Metrics {
            written: r.counter("tally_history_events_written_total", "raw history rows inserted", &[]),
            replayed: r.counter("tally_history_events_replayed_total", "counted events whose raw row was already in ClickHouse", &[]),
            not_counted: r.counter(
                "tally_history_events_not_counted_total",
                "messages the ledger did not count (quarantined, conflicts)",
                &[],
            ),
            corrections: r.counter("tally_history_corrections_total", "counted corrections written (or replayed) as negated rows", &[]),
            orphan_corrections: r.counter(
                "tally_history_corrections_without_target_total",
                "counted corrections whose reverted event was not found in processed_events (not written)",
                &[],
            ),
            past_retention: r.counter(
                "tally_history_events_past_retention_total",
                "events reached after their dedupe records aged out (history lagging past the lateness window; not written)",
                &[],
            ),
            batches: Timing::new(&r, "tally_history_batch_micros_total", "tally_history_batches_total", "time spent writing batches"),
            failures: r.counter("tally_history_batch_failures_total", "batches rewound after a ClickHouse or Postgres failure", &[]),
            isolated: r.counter(
                "tally_history_events_isolated_total",
                "counted events ClickHouse refused on their own, left out of history and recorded in history_isolated",
                &[],
            ),
            fenced: r.counter("tally_history_batches_fenced_total", "batches refused by fencing", &[]),
            held: r.counter("tally_history_waits_for_ledger_total", "batches cut short because the ledger had not reached them", &[]),
            owned_partitions: r.gauge("tally_history_owned_partitions", "partitions this instance owns", &[]),
            lag: r.gauge("tally_history_lag_messages", "messages the ledger consumed that history has not written", &[]),
            phases: Phases::new(&r),
            registry: r,
        }
    }
}

/// A deliberate refusal for tests (`TALLY_HISTORY_REFUSE_EVENT`): any write holding the
/// event with this id fails as ClickHouse refusing it would.
fn refused_event() -> Option<String> {
    std::env::var("TALLY_HISTORY_REFUSE_EVENT").ok().filter(|id| !id.is_empty())
}

/// The sink's writes as [`isolate`] tries them, with the test failpoints.
struct SinkWrites<'a> {
    sink: &'a Sink,
    /// The batch's partition/offset ranges, for the insert deduplication token.
    ranges: String,
    crash_at: Option<Step>,
    refuse: Option<&'a str>,
    phases: &'a Phases,
}

impl isolate::Writes for SinkWrites<'_> {
    async fn write(&mut self, events: &[Counted]) -> Result<Written, ChError> {
        if let Some(id) = self.refuse.filter(|id| events.iter().any(|c| c.event.id == *id)) {
            return Err(ChError::Refused { code: None, message: format!("failpoint: event {id:?} refused (TALLY_HISTORY_REFUSE_EVENT)") });
        }
        let crash_at = self.crash_at;
        let (phases, since) = (self.phases, std::sync::Mutex::new(Instant::now()));
        self.sink
            .write(events, &self.ranges, Utc::now(), |step| {
                if let Ok(mut at) = since.lock() {
                    let counter = match step {
                        Step::KeysLookedUp => &phases.lookup,
                        Step::RawInserted => &phases.insert,
                        Step::RollupsWritten => &phases.rollups,
                    };
                    lap(counter, &mut at);
                }
                if crash_at == Some(step) {
                    tracing::error!(?step, "failpoint: aborting mid-batch");
                    std::process::abort();
                }
            })
            .await
    }
}

/// A deliberate crash point for tests (`TALLY_HISTORY_FAILPOINT`): the process aborts right
/// after the named step of the first non-empty batch, as a SIGKILL would.
fn failpoint() -> Option<Step> {
    match std::env::var("TALLY_HISTORY_FAILPOINT").ok().as_deref() {
        Some("after-raw-insert") => Some(Step::RawInserted),
        Some("after-rollups") => Some(Step::RollupsWritten),
        _ => None,
    }
}

struct Loop {
    settings: WriterSettings,
    topic: String,
    consumer: StreamConsumer<Watched>,
    heartbeats: Heartbeats,
    progress: Progress,
    sink: Sink,
    /// The configuration versions events were counted under, loaded once each.
    versions: ConfigVersions,
    owned: HashMap<i32, Owned>,
    metrics: Arc<Metrics>,
    backoff: Duration,
    crash_at: Option<Step>,
    refuse: Option<String>,
    /// The permanent failure that stopped the loop, once one did.
    stopped_by: Option<String>,
}

/// How lasting a batch's failure is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lasting {
    /// Retrying the batch may well succeed: back off and retry.
    Transient,
    /// Retrying would meet it again, and no event of the batch is to blame: stop.
    Permanent,
}

impl Lasting {
    fn of_postgres(e: &sqlx::Error) -> Lasting {
        if tally_common::postgres::is_transient(e) {
            Lasting::Transient
        } else {
            Lasting::Permanent
        }
    }

    fn of_clickhouse(e: &ChError) -> Lasting {
        if e.is_retryable() {
            Lasting::Transient
        } else {
            Lasting::Permanent
        }
    }

    /// A write's failure: permanent only when no event can be to blame.
    fn of_write(unwritten: &isolate::Unwritten) -> Lasting {
        match Lasting::of_clickhouse(&unwritten.error) {
            Lasting::Permanent if unwritten.not_an_event => Lasting::Permanent,
            _ => Lasting::Transient,
        }
    }
}

/// Runs the history writer until `shutdown` resolves (see the crate docs).
pub async fn run(
    settings: WriterSettings,
    kafka: KafkaSettings,
    postgres: PostgresSettings,
    clickhouse: ClickHouseSettings,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    if settings.group == settings.ledger_group {
        anyhow::bail!(
            "the history writer's group must not be the ledger's ({}): they would split the partitions between them",
            settings.group
        );
    }
    let pool = postgres.connect().await?;
    // The Kafka group only receives offset hints: partitions are assigned manually.
    let clients = Clients::default();
    let consumer: StreamConsumer<Watched> = watched(kafka.consumer_config(&settings.group))
        .create_with_context(Watched::new(clients.register("usage consumer")))
        .context("failed to create the history consumer")?;
    let progress = Progress {
        pool: pool.clone(),
        group: settings.group.clone(),
        ledger_group: settings.ledger_group.clone(),
        topic: kafka.usage_topic.clone(),
        owner: format!("history-{}", uuid::Uuid::new_v4()),
    };
    let membership = Membership {
        group: settings.group.clone(),
        topic: kafka.usage_topic.clone(),
        member_id: progress.owner.clone(),
        lease: settings.member_lease(),
    };
    let metrics = Arc::new(Metrics::new());
    let health = {
        let metrics = metrics.clone();
        tally_common::health::serve_probes(settings.listen, clients.clone(), move || metrics.registry.render()).await?
    };
    let lag = spawn_lag_gauge(progress.clone(), metrics.clone());
    tracing::info!(group = %settings.group, ledger_group = %settings.ledger_group, topic = %kafka.usage_topic, owner = %progress.owner,
        clickhouse = %clickhouse.clickhouse_url, database = %clickhouse.clickhouse_database, "history writer consuming");
    let mut state = Loop {
        topic: kafka.usage_topic.clone(),
        consumer,
        heartbeats: Heartbeats::new(membership.clone()),
        progress,
        sink: Sink { ch: Ch::new(&clickhouse) },
        versions: ConfigVersions::default(),
        owned: HashMap::new(),
        metrics,
        backoff: Duration::ZERO,
        crash_at: failpoint(),
        refuse: refused_event(),
        stopped_by: None,
        settings,
    };
    state.consume_until(shutdown).await;
    if let Err(e) = membership.leave(&pool).await {
        tracing::warn!(error = %e, "could not leave the group; the others take over when the lease ends");
    }
    health.abort();
    lag.abort();
    if let Some(failure) = state.stopped_by {
        tracing::error!(error = failure, "history writer stopped by a permanent failure");
        anyhow::bail!("the history writer stopped on a permanent failure that no event causes: {failure}");
    }
    tracing::info!("history writer stopped");
    Ok(())
}

fn spawn_lag_gauge(progress: Progress, metrics: Arc<Metrics>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            if let Ok(lag) = progress.lag().await {
                metrics.lag.set(lag);
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    })
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
            // A full batch says nothing of a partition whose messages may still be queued.
            let drained = batch.len() < self.settings.max_batch;
            let deliveries = self.accept_in_order(batch);
            if drained {
                self.seek_back_if_stalled();
            }
            if deliveries.is_empty() {
                continue;
            }
            // A batch always ends in a commit or a rewind, so stopping between batches loses
            // nothing: the next run resumes from the stored offsets.
            if let Err(wait) = self.process(deliveries).await {
                if self.stopped_by.is_some() {
                    return;
                }
                tokio::select! {
                    biased;
                    _ = &mut shutdown => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }

    async fn next_batch(&mut self) -> Vec<Delivery> {
        consuming::collect_batch(
            &self.consumer,
            Duration::from_millis(500),
            Duration::from_millis(self.settings.max_wait_ms),
            self.settings.max_batch,
            to_delivery,
        )
        .await
    }

    /// Heartbeats the membership (at most once a second) and brings the owned partitions in
    /// line with this member's share: drops the ones it lost, claims the ones it gained, and
    /// assigns the consumer exactly the owned ones at their stored offsets.
    async fn maintain_ownership(&mut self) {
        let partition_count = || consuming::partition_count(&self.consumer, &self.topic);
        let owned = self.owned.keys().copied();
        let Some(ShareChange { gained, lost }) = self.heartbeats.due_change(&self.progress.pool, owned, partition_count).await else {
            return;
        };
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
        consuming::assign_at(&self.consumer, &self.topic, self.owned.iter().map(|(p, o)| (*p, o.next)));
        for o in self.owned.values_mut() {
            o.sought_at = Some(Instant::now());
        }
        self.metrics.owned_partitions.set(self.owned.len() as i64);
    }

    async fn claim(&mut self, partition: i32) {
        let mut backoff = Duration::from_millis(200);
        loop {
            match self.progress.claim(partition).await {
                Ok(claim) => {
                    tracing::info!(partition, next_offset = claim.next_offset, epoch = claim.epoch, "claimed partition");
                    self.owned.insert(
                        partition,
                        Owned { epoch: claim.epoch, next: claim.next_offset, sought_at: None, awaiting: false, stepped_back: 0 },
                    );
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
        if let Err(e) = self.consumer.seek(&self.topic, partition, Offset::Offset(owned.next), Duration::from_secs(1)) {
            tracing::debug!(partition, offset = owned.next, error = %e, "seek not possible yet");
        }
    }

    fn accept_in_order(&mut self, batch: Vec<Delivery>) -> Vec<Delivery> {
        let mut cursor: HashMap<i32, i64> = self.owned.iter().map(|(p, o)| (*p, o.next)).collect();
        let mut accepted = Vec::with_capacity(batch.len());
        for d in batch {
            let Some(next) = cursor.get_mut(&d.partition) else { continue };
            if d.offset == *next {
                *next += 1;
                if let Some(o) = self.owned.get_mut(&d.partition) {
                    o.awaiting = false;
                    o.stepped_back = 0;
                }
                accepted.push(d);
            } else if d.offset > *next {
                self.seek_if_due(d.partition);
            } else if let Some(o) = self.owned.get_mut(&d.partition).filter(|o| o.awaiting) {
                // Sought back before `next`: the seek is being served, not stalled.
                o.sought_at = Some(Instant::now());
            }
        }
        accepted
    }

    /// Seeks further back a partition that brought no message at all within [`STALL_AFTER`]
    /// of being sought to `next` (a hold or a rewind) or before it, while the consumer had
    /// nothing more to give (a batch short of the most): a broker may answer a
    /// fetch that starts inside a record batch with nothing at all (tansu 0.6 does), and a
    /// partition with nothing more to come brings no later message that would trigger
    /// another seek. The first seek back goes [`FIRST_STEP_BACK`] messages before `next`,
    /// each later one twice as far, down to the partition's start; the messages before
    /// `next` are passed over as any redelivery is, so this costs a re-read and never
    /// changes what is written.
    fn seek_back_if_stalled(&mut self) {
        let stalled: Vec<i32> = self
            .owned
            .iter()
            .filter(|(_, o)| o.awaiting && o.sought_at.is_none_or(|t| t.elapsed() > STALL_AFTER))
            .map(|(p, _)| *p)
            .collect();
        for partition in stalled {
            let Some(owned) = self.owned.get_mut(&partition) else { continue };
            owned.stepped_back = (owned.stepped_back * 2).max(FIRST_STEP_BACK);
            owned.sought_at = Some(Instant::now());
            let (next, from) = (owned.next, (owned.next - owned.stepped_back).max(0));
            tracing::debug!(partition, next, from, "no message at the sought offset; seeking further back");
            if let Err(e) = self.consumer.seek(&self.topic, partition, Offset::Offset(from), Duration::from_secs(1)) {
                tracing::debug!(partition, offset = from, error = %e, "seek not possible yet");
            }
        }
    }

    fn seek_if_due(&mut self, partition: i32) {
        let Some(mut owned) = self.owned.get(&partition).copied() else { return };
        if owned.sought_at.is_none_or(|t| t.elapsed() > Duration::from_secs(1)) {
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

    /// Writes one batch. On failure the partitions are rewound and the wait before the next
    /// try is returned.
    async fn process(&mut self, deliveries: Vec<Delivery>) -> Result<(), Duration> {
        let started = Instant::now();
        let mut phase = started;
        let all = self.ranges(&deliveries);
        let partitions: Vec<i32> = all.iter().map(|r| r.partition).collect();
        let ledger = match self.progress.ledger_offsets(&partitions).await {
            Ok(l) => l,
            Err(e) => return Err(self.fail(&all, Lasting::of_postgres(&e), &format!("failed to read the ledger's progress: {e}"))),
        };
        lap(&self.metrics.phases.ledger, &mut phase);
        let gate = plan::gate(deliveries, &ledger);
        let ready_ranges = self.ranges(&gate.ready);
        let mut wait = Ok(());
        if !gate.held.is_empty() {
            // The ledger has not decided on these yet: come back to them shortly.
            self.metrics.held.inc();
            for (partition, offset) in &gate.held {
                if let Some(mut owned) = self.owned.get(partition).copied() {
                    owned.next = *offset;
                    self.seek(*partition, &mut owned);
                    self.owned.insert(*partition, owned);
                }
            }
            wait = Err(Duration::from_millis(200));
        }
        if gate.ready.is_empty() {
            return wait;
        }
        let lookup = plan::candidate_ids(&gate.ready);
        let id_refs: Vec<&str> = lookup.ids.iter().map(String::as_str).collect();
        let counted = match self.progress.counted(&id_refs, &lookup.days).await {
            Ok(c) => c,
            Err(e) => return Err(self.fail(&ready_ranges, Lasting::of_postgres(&e), &format!("failed to read processed_events: {e}"))),
        };
        lap(&self.metrics.phases.counted, &mut phase);
        let mut selection = plan::select(&gate.ready, &counted);
        if selection.not_counted > 0 {
            self.report_past_retention(&gate.ready).await;
        }
        if selection.orphan_corrections > 0 {
            self.metrics.orphan_corrections.add(selection.orphan_corrections as u64);
            tracing::error!(
                count = selection.orphan_corrections,
                "counted corrections whose reverted event is not in processed_events; not written"
            );
        }
        let targets = plan::targets_to_look_up(&selection.counted);
        let stored_models = if targets.is_empty() {
            HashMap::new()
        } else {
            match self.sink.raw_models(&targets).await {
                Ok(models) => models,
                Err(e) => {
                    let lasting = Lasting::of_clickhouse(&e);
                    return Err(self.fail(&ready_ranges, lasting, &format!("ClickHouse lookup of corrected rows failed: {e}")));
                }
            }
        };
        plan::resolve_models(&mut selection.counted, &stored_models);
        if let Err(e) = self.versions.load(&self.progress.pool, selection.counted.iter().map(|c| c.basis.version)).await {
            let lasting = match &e {
                VersionError::Database { source, .. } => Lasting::of_postgres(source),
                VersionError::Unusable { .. } => Lasting::Permanent,
            };
            return Err(self.fail(&ready_ranges, lasting, &format!("cannot tell the events' budgets: {e}")));
        }
        if let Err(version) = budgets::assign(&mut selection.counted, &self.versions) {
            let what = format!("configuration version {version} was not loaded");
            return Err(self.fail(&ready_ranges, Lasting::Permanent, &what));
        }
        let crash_at = self.crash_at.filter(|_| !selection.counted.is_empty());
        let ranges = ready_ranges.iter().map(|r| format!("p{}:{}-{}", r.partition, r.start, r.next)).collect::<Vec<_>>().join(",");
        let mut writes = SinkWrites { sink: &self.sink, ranges, crash_at, refuse: self.refuse.as_deref(), phases: &self.metrics.phases };
        let outcome = match isolate::write_isolating(&mut writes, &selection.counted).await {
            Ok(outcome) => outcome,
            Err(unwritten) => {
                let lasting = Lasting::of_write(&unwritten);
                return Err(self.fail(&ready_ranges, lasting, &format!("ClickHouse write failed: {}", unwritten.error)));
            }
        };
        let isolated: Vec<IsolatedEvent<'_>> =
            outcome.isolated.iter().map(|i| IsolatedEvent { event: &selection.counted[i.index].event, reason: &i.error }).collect();
        for i in &isolated {
            tracing::error!(event_id = %i.event.id, subject = %i.event.subject, reason = i.reason, "ClickHouse refused this counted event on its own; history goes on without it (history_isolated)");
        }
        let written = outcome.written;
        let mut phase = Instant::now();
        let advanced = self.progress.advance(&ready_ranges, &isolated).await;
        lap(&self.metrics.phases.progress, &mut phase);
        match advanced {
            Ok(()) => {}
            Err(ProgressError::Fenced { partition, .. }) => {
                self.metrics.fenced.inc();
                tracing::warn!(partition, "batch refused by fencing; another member owns the partition now");
                self.owned.remove(&partition);
                self.heartbeats.fenced(partition, self.settings.member_lease());
                self.rewind(&ready_ranges);
                self.assign_owned();
                return wait;
            }
            Err(ProgressError::Database(e)) => {
                return Err(self.fail(&ready_ranges, Lasting::of_postgres(&e), &format!("failed to store progress: {e}")));
            }
        }
        self.backoff = Duration::ZERO;
        self.metrics.batches.record(started.elapsed());
        self.metrics.written.add(written.inserted as u64);
        self.metrics.isolated.add(isolated.len() as u64);
        self.metrics.replayed.add(written.already_present as u64);
        self.metrics.not_counted.add(selection.not_counted as u64);
        self.metrics.corrections.add(selection.corrections as u64);
        tracing::debug!(
            inserted = written.inserted,
            replayed = written.already_present,
            not_counted = selection.not_counted,
            hourly = written.hourly_buckets,
            daily = written.daily_buckets,
            "history batch written"
        );
        self.advance(&ready_ranges);
        wait
    }

    /// Reports, loudly, events this writer reached only after their dedupe records aged out
    /// (the writer lags more than the lateness window): whether the ledger counted them is no
    /// longer known, so they are not written, as events the ledger did not count are not.
    async fn report_past_retention(&self, ready: &[Delivery]) {
        let first_kept = match crate::progress::first_kept_day(&self.progress.pool).await {
            Ok(Some(day)) => day,
            Ok(None) => return,
            Err(e) => return tracing::warn!(error = %e, "could not read which days' dedupe records are kept"),
        };
        let past = plan::past_retention(ready, first_kept);
        if past > 0 {
            self.metrics.past_retention.add(past as u64);
            tracing::error!(
                events = past,
                %first_kept,
                "history lags past the lateness window: events of days whose dedupe records are gone cannot be verified as counted and are not written"
            );
        }
    }

    /// Logs a failed batch, rewinds its partitions and returns the backoff to wait. A
    /// permanent failure stops the loop instead (see the module docs).
    fn fail(&mut self, ranges: &[Range], lasting: Lasting, what: &str) -> Duration {
        self.metrics.failures.inc();
        if lasting == Lasting::Permanent {
            tracing::error!(error = what, "history batch failed permanently and no event of it is to blame; the writer stops");
            self.rewind(ranges);
            self.stopped_by.get_or_insert_with(|| what.to_string());
            return Duration::ZERO;
        }
        self.backoff = if self.backoff.is_zero() { Duration::from_millis(200) } else { (self.backoff * 2).min(Duration::from_secs(5)) };
        tracing::warn!(error = what, retry_in_ms = self.backoff.as_millis() as u64, "history batch not written; will retry");
        self.rewind(ranges);
        self.backoff
    }

    fn advance(&mut self, ranges: &[Range]) {
        let mut hint = TopicPartitionList::new();
        for r in ranges {
            if let Some(o) = self.owned.get_mut(&r.partition) {
                o.next = r.next;
                let _ = hint.add_partition_offset(&self.topic, r.partition, Offset::Offset(r.next));
            }
        }
        if hint.count() > 0 {
            if let Err(e) = self.consumer.commit(&hint, CommitMode::Async) {
                tracing::debug!(error = %e, "offset hint not committed to Kafka");
            }
        }
    }

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
    Delivery { partition: m.partition(), offset: m.offset(), payload: consuming::payload(m) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(code: u32) -> ChError {
        ChError::Refused { code: Some(code), message: format!("Code: {code}. DB::Exception") }
    }

    #[test]
    fn a_refusal_stops_the_writer_only_when_every_part_of_its_batch_met_it() {
        let every_part = |error| isolate::Unwritten { error, not_an_event: true };
        let maybe_an_event = |error| isolate::Unwritten { error, not_an_event: false };
        assert_eq!(Lasting::of_write(&every_part(refused(60))), Lasting::Permanent, "unknown table");
        assert_eq!(Lasting::of_write(&every_part(ChError::Decode("x".into()))), Lasting::Permanent);
        assert_eq!(Lasting::of_write(&every_part(refused(241))), Lasting::Transient, "a memory limit passes");
        assert_eq!(Lasting::of_write(&maybe_an_event(refused(27))), Lasting::Transient, "an event alone in its batch waits for company");
    }

    #[test]
    fn postgres_failures_are_classed_as_the_aggregator_classes_them() {
        assert_eq!(Lasting::of_postgres(&sqlx::Error::PoolTimedOut), Lasting::Transient);
        assert_eq!(Lasting::of_postgres(&sqlx::Error::RowNotFound), Lasting::Permanent);
        assert_eq!(
            Lasting::of_postgres(&sqlx::Error::ColumnNotFound("next_offset".into())),
            Lasting::Permanent,
            "a schema that does not match"
        );
    }
}
