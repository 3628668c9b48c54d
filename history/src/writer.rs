//! The history writer's consume loop.
//!
//! Rebalance callbacks only post a note on a channel; the loop claims assigned partitions in
//! `history_offsets` and seeks to the stored offset. For each batch it keeps the run of
//! messages continuing exactly from the stored offset, holds back what the ledger has not
//! decided on yet, writes the counted events with [`Sink::write`], and only then advances
//! its offsets. Any failure (ClickHouse down, Postgres down, fenced) rewinds the batch's
//! partitions to the stored offsets and retries with a backoff while still polling the
//! consumer, so the group membership survives a long outage.

use std::collections::HashMap;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use tally_common::clickhouse::ClickHouseSettings;
use tally_common::kafka::KafkaSettings;
use tally_common::metrics::{Counter, Gauge, Registry, Timing};
use tally_common::postgres::PostgresSettings;

use crate::ch::Ch;
use crate::plan::{self, Delivery};
use crate::progress::{Progress, ProgressError, Range};
use crate::sink::{Sink, Step};
use crate::WriterSettings;

#[derive(Debug)]
enum Note {
    Assigned(Vec<i32>),
    Revoked(Vec<i32>),
}

struct RebalanceNotes {
    topic: String,
    tx: Mutex<Sender<Note>>,
}

impl RebalanceNotes {
    fn partitions(&self, tpl: &TopicPartitionList) -> Vec<i32> {
        tpl.elements().iter().filter(|e| e.topic() == self.topic).map(|e| e.partition()).collect()
    }
    fn post(&self, note: Note) {
        if let Ok(tx) = self.tx.lock() {
            let _ = tx.send(note);
        }
    }
}

impl ClientContext for RebalanceNotes {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        use rdkafka::config::RDKafkaLogLevel as L;
        match level {
            L::Emerg | L::Alert | L::Critical | L::Error => tracing::error!(fac, "librdkafka: {log_message}"),
            L::Warning => tracing::warn!(fac, "librdkafka: {log_message}"),
            L::Notice | L::Info => tracing::info!(fac, "librdkafka: {log_message}"),
            L::Debug => tracing::debug!(fac, "librdkafka: {log_message}"),
        }
    }
}

impl ConsumerContext for RebalanceNotes {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            self.post(Note::Revoked(self.partitions(tpl)));
        }
    }
    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            self.post(Note::Assigned(self.partitions(tpl)));
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Owned {
    epoch: i64,
    next: i64,
    sought_at: Option<Instant>,
}

struct Metrics {
    registry: Registry,
    written: Counter,
    replayed: Counter,
    not_counted: Counter,
    batches: Timing,
    failures: Counter,
    fenced: Counter,
    held: Counter,
    owned_partitions: Gauge,
    lag: Gauge,
}

impl Metrics {
    fn new() -> Self {
        let r = Registry::default();
        Metrics {
            written: r.counter("tally_history_events_written_total", "raw history rows inserted", &[]),
            replayed: r.counter("tally_history_events_replayed_total", "counted events whose raw row was already in ClickHouse", &[]),
            not_counted: r.counter("tally_history_events_not_counted_total", "messages the ledger did not count (quarantined, conflicts)", &[]),
            batches: Timing::new(&r, "tally_history_batch_micros_total", "tally_history_batches_total", "time spent writing batches"),
            failures: r.counter("tally_history_batch_failures_total", "batches rewound after a ClickHouse or Postgres failure", &[]),
            fenced: r.counter("tally_history_batches_fenced_total", "batches refused by fencing", &[]),
            held: r.counter("tally_history_waits_for_ledger_total", "batches cut short because the ledger had not reached them", &[]),
            owned_partitions: r.gauge("tally_history_owned_partitions", "partitions this instance owns", &[]),
            lag: r.gauge("tally_history_lag_messages", "messages the ledger consumed that history has not written", &[]),
            registry: r,
        }
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
    consumer: StreamConsumer<RebalanceNotes>,
    notes: Receiver<Note>,
    progress: Progress,
    sink: Sink,
    owned: HashMap<i32, Owned>,
    metrics: Arc<Metrics>,
    backoff: Duration,
    crash_at: Option<Step>,
}

/// Runs the history writer until `shutdown` resolves (see the crate docs).
pub async fn run(
    settings: WriterSettings,
    kafka: KafkaSettings,
    postgres: PostgresSettings,
    clickhouse: ClickHouseSettings,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let pool = postgres.connect().await?;
    let (tx, notes) = channel();
    let context = RebalanceNotes { topic: kafka.usage_topic.clone(), tx: Mutex::new(tx) };
    let consumer: StreamConsumer<RebalanceNotes> = kafka
        .consumer_config(&settings.group)
        .create_with_context(context)
        .context("failed to create the history consumer")?;
    consumer
        .subscribe(&[kafka.usage_topic.as_str()])
        .with_context(|| format!("failed to subscribe to {}", kafka.usage_topic))?;
    let progress = Progress {
        pool,
        group: settings.progress_group.clone().unwrap_or_else(|| settings.group.clone()),
        ledger_group: settings.ledger_group.clone(),
        topic: kafka.usage_topic.clone(),
        owner: format!("history-{}", uuid::Uuid::new_v4()),
    };
    let metrics = Arc::new(Metrics::new());
    let health = spawn_health_server(settings.listen, metrics.clone()).await?;
    let lag = spawn_lag_gauge(progress.clone(), metrics.clone());
    tracing::info!(group = %settings.group, ledger_group = %settings.ledger_group, topic = %kafka.usage_topic,
        clickhouse = %clickhouse.clickhouse_url, database = %clickhouse.clickhouse_database, "history writer consuming");
    let mut state = Loop {
        topic: kafka.usage_topic.clone(),
        consumer,
        notes,
        progress,
        sink: Sink { ch: Ch::new(&clickhouse) },
        owned: HashMap::new(),
        metrics,
        backoff: Duration::ZERO,
        crash_at: failpoint(),
        settings,
    };
    state.consume_until(shutdown).await;
    health.abort();
    lag.abort();
    tracing::info!("history writer stopped");
    Ok(())
}

async fn spawn_health_server(listen: std::net::SocketAddr, metrics: Arc<Metrics>) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use axum::routing::get;
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("failed to listen on {listen}"))?;
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(move || async move { metrics.registry.render() }));
    Ok(tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    }))
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
        loop {
            let batch = tokio::select! {
                biased;
                _ = &mut shutdown => return,
                batch = self.next_batch() => batch,
            };
            self.apply_notes().await;
            let deliveries = self.accept_in_order(batch);
            if deliveries.is_empty() {
                continue;
            }
            // A batch always ends in a commit or a rewind, so stopping between batches loses
            // nothing: the next run resumes from the stored offsets.
            if let Err(wait) = self.process(deliveries).await {
                tokio::select! {
                    biased;
                    _ = &mut shutdown => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }

    async fn next_batch(&mut self) -> Vec<Delivery> {
        let mut batch = Vec::new();
        let first = loop {
            match tokio::time::timeout(Duration::from_millis(500), self.consumer.recv()).await {
                Err(_) => return batch,
                Ok(Ok(m)) => break to_delivery(&m),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "usage consumer error");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        batch.push(first);
        let deadline = tokio::time::Instant::now() + Duration::from_millis(self.settings.max_wait_ms);
        while batch.len() < self.settings.max_batch {
            match tokio::time::timeout_at(deadline, self.consumer.recv()).await {
                Ok(Ok(m)) => batch.push(to_delivery(&m)),
                Ok(Err(e)) => tracing::warn!(error = %e, "usage consumer error"),
                Err(_) => break,
            }
        }
        batch
    }

    async fn apply_notes(&mut self) {
        while let Ok(note) = self.notes.try_recv() {
            match note {
                Note::Revoked(partitions) => {
                    for p in partitions {
                        self.owned.remove(&p);
                    }
                }
                Note::Assigned(partitions) => {
                    for p in partitions {
                        self.claim(p).await;
                    }
                }
            }
        }
        self.metrics.owned_partitions.set(self.owned.len() as i64);
    }

    async fn claim(&mut self, partition: i32) {
        let mut backoff = Duration::from_millis(200);
        loop {
            match self.progress.claim(partition).await {
                Ok(claim) => {
                    tracing::info!(partition, next_offset = claim.next_offset, epoch = claim.epoch, "claimed partition");
                    let mut owned = Owned { epoch: claim.epoch, next: claim.next_offset, sought_at: None };
                    self.seek(partition, &mut owned);
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

    /// Writes one batch. On failure the partitions are rewound and the wait before the next
    /// try is returned.
    async fn process(&mut self, deliveries: Vec<Delivery>) -> Result<(), Duration> {
        let started = Instant::now();
        let all = self.ranges(&deliveries);
        let partitions: Vec<i32> = all.iter().map(|r| r.partition).collect();
        let ledger = match self.progress.ledger_offsets(&partitions).await {
            Ok(l) => l,
            Err(e) => return Err(self.fail(&all, &format!("failed to read the ledger's progress: {e}"))),
        };
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
        let ids = plan::candidate_ids(&gate.ready);
        let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let counted = match self.progress.counted(&id_refs).await {
            Ok(c) => c,
            Err(e) => return Err(self.fail(&ready_ranges, &format!("failed to read processed_events: {e}"))),
        };
        let selection = plan::select(&gate.ready, &counted);
        let crash_at = self.crash_at.filter(|_| !selection.counted.is_empty());
        let written = match self
            .sink
            .write(&selection.counted, Utc::now(), |step| {
                if crash_at == Some(step) {
                    tracing::error!(?step, "failpoint: aborting mid-batch");
                    std::process::abort();
                }
            })
            .await
        {
            Ok(w) => w,
            Err(e) => return Err(self.fail(&ready_ranges, &format!("ClickHouse write failed: {e}"))),
        };
        match self.progress.advance(&ready_ranges).await {
            Ok(()) => {}
            Err(ProgressError::Fenced { partition, .. }) => {
                self.metrics.fenced.inc();
                tracing::warn!(partition, "batch refused by fencing; dropping the partition until it is assigned again");
                self.owned.remove(&partition);
                self.rewind(&ready_ranges);
                return wait;
            }
            Err(e) => return Err(self.fail(&ready_ranges, &format!("failed to store progress: {e}"))),
        }
        self.backoff = Duration::ZERO;
        self.metrics.batches.record(started.elapsed());
        self.metrics.written.add(written.inserted as u64);
        self.metrics.replayed.add(written.already_present as u64);
        self.metrics.not_counted.add(selection.not_counted as u64);
        tracing::debug!(inserted = written.inserted, replayed = written.already_present, not_counted = selection.not_counted,
            hourly = written.hourly_buckets, daily = written.daily_buckets, "history batch written");
        self.advance(&ready_ranges);
        wait
    }

    /// Logs a failed batch, rewinds its partitions and returns the backoff to wait.
    fn fail(&mut self, ranges: &[Range], what: &str) -> Duration {
        self.metrics.failures.inc();
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

fn to_delivery<M: Message>(m: &M) -> Delivery {
    Delivery { partition: m.partition(), offset: m.offset(), payload: m.payload().map(<[u8]>::to_vec) }
}
