//! The decision view: the latest snapshot per subject, fed by the decisions topic.
//!
//! The feeder reads the whole (compacted) topic from the beginning in a consumer group of its
//! own, commits nothing, and keeps the snapshot with the highest version per subject, so
//! redelivered or reordered snapshots never move a subject backwards.
//!
//! Freshness has two parts, and the view is as fresh as the older of the two:
//! - *caught up*: a watcher compares, about twice a second, the feeder's position with the
//!   topic's high watermarks. When every partition is consumed up to its high watermark, the
//!   view holds every snapshot published before that instant, and
//!   [`DecisionView::caught_up_at`] moves to it. This stops when the broker is unreachable
//!   or the feeder falls behind.
//! - *flowing*: the aggregators' relay publishes a heartbeat to every partition about once
//!   a second ([`tally_domain::heartbeat`]), saying the decisions committed before its `at`
//!   are on the topic. Per partition the view keeps the latest `at` of a heartbeat or
//!   `calculated_at` of a snapshot it read. This stops when decisions stop flowing (no
//!   aggregator running, the relay unable to read Postgres or to publish), which a caught-up
//!   view cannot see: with nothing published it stays caught up.
//!
//! [`DecisionView::fresh_as_of`] is the earlier of the last catch-up and, over the topic's
//! partitions, the oldest latest heartbeat-or-snapshot; the staleness is the time since
//! then. A partition with neither yet leaves the view without a freshness (stale). Until the
//! watcher read the topic's partition count, only the catch-up counts. Heartbeat times come
//! from the aggregators' clocks: clock skew between hosts adds to (or hides) staleness.
//! Heartbeat records are never taken as decisions.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use anyhow::Context;
use chrono::{DateTime, Utc};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::Message;
use tally_common::health::{watched, ClientHealth, Watched};
use tally_common::kafka::KafkaSettings;
use tally_domain::decision::DecisionSnapshot;
use tally_domain::heartbeat::{is_heartbeat_key, Heartbeat};

#[derive(Default)]
pub struct DecisionView {
    /// Shared, so a check reads a snapshot without copying its quota lines.
    snapshots: RwLock<HashMap<String, Arc<DecisionSnapshot>>>,
    last_message_at: RwLock<Option<DateTime<Utc>>>,
    caught_up_at: RwLock<Option<DateTime<Utc>>>,
    /// The topic's partition count, once the watcher read it (0 before).
    partitions: AtomicUsize,
    /// Per partition, the latest heartbeat `at` or snapshot `calculated_at` read.
    flow: RwLock<HashMap<i32, DateTime<Utc>>>,
}

impl DecisionView {
    /// Keeps `snapshot` if it is newer than what the view has for its subject.
    pub fn offer(&self, snapshot: DecisionSnapshot) -> bool {
        let Ok(mut map) = self.snapshots.write() else { return false };
        match map.get(&snapshot.subject) {
            Some(current) if current.version >= snapshot.version => false,
            _ => {
                map.insert(snapshot.subject.clone(), Arc::new(snapshot));
                true
            }
        }
    }

    pub fn get(&self, subject: &str) -> Option<Arc<DecisionSnapshot>> {
        self.snapshots.read().ok()?.get(subject).cloned()
    }

    pub fn len(&self) -> usize {
        self.snapshots.read().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn touch(&self) {
        if let Ok(mut t) = self.last_message_at.write() {
            *t = Some(Utc::now());
        }
    }

    /// Records that the view held everything published on the topic before `at`.
    pub fn mark_caught_up(&self, at: DateTime<Utc>) {
        if let Ok(mut t) = self.caught_up_at.write() {
            if t.is_none_or(|prev| prev < at) {
                *t = Some(at);
            }
        }
    }

    /// The last instant at which the view was known to hold every published snapshot;
    /// `None` until it first caught up.
    pub fn caught_up_at(&self) -> Option<DateTime<Utc>> {
        self.caught_up_at.read().ok().and_then(|t| *t)
    }

    /// Records the topic's partition count.
    pub fn set_partitions(&self, n: usize) {
        self.partitions.store(n, Ordering::Relaxed);
    }

    /// Records a heartbeat's `at` or a snapshot's `calculated_at` read from `partition`.
    pub fn note_flow(&self, partition: i32, at: DateTime<Utc>) {
        if let Ok(mut flow) = self.flow.write() {
            let t = flow.entry(partition).or_insert(at);
            if *t < at {
                *t = at;
            }
        }
    }

    /// The instant as of which the view holds every decision the aggregators committed (see
    /// the module docs); `None` before it caught up, or while a partition has had neither a
    /// heartbeat nor a snapshot.
    pub fn fresh_as_of(&self) -> Option<DateTime<Utc>> {
        let caught_up = self.caught_up_at()?;
        let n = self.partitions.load(Ordering::Relaxed);
        if n == 0 {
            return Some(caught_up);
        }
        let flow = self.flow.read().ok()?;
        let oldest = (0..n as i32).map(|p| flow.get(&p).copied()).collect::<Option<Vec<_>>>()?.into_iter().min()?;
        Some(caught_up.min(oldest))
    }

    /// How far behind the aggregators' decisions the view may be at `now` (see
    /// [`DecisionView::fresh_as_of`]); `None` when that is unknown.
    pub fn staleness(&self, now: DateTime<Utc>) -> Option<chrono::Duration> {
        self.fresh_as_of().map(|t| (now - t).max(chrono::Duration::zero()))
    }

    /// When the feeder last received a message.
    pub fn last_message_at(&self) -> Option<DateTime<Utc>> {
        self.last_message_at.read().ok().and_then(|t| *t)
    }
}

/// Starts the task that feeds `view` from the decisions topic; the consumer reports to
/// `health`.
pub fn spawn_feeder(
    view: std::sync::Arc<DecisionView>,
    kafka: &KafkaSettings,
    health: Arc<ClientHealth>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let group = format!("tally-api-view-{}", uuid::Uuid::new_v4());
    let consumer: StreamConsumer<Watched> = watched(kafka.consumer_config(&group))
        .create_with_context(Watched::new(health))
        .context("failed to create the decisions consumer")?;
    consumer.subscribe(&[kafka.decisions_topic.as_str()]).with_context(|| format!("failed to subscribe to {}", kafka.decisions_topic))?;
    let consumer = std::sync::Arc::new(consumer);
    let watcher = tokio::spawn(watch_freshness(view.clone(), consumer.clone(), kafka.decisions_topic.clone()));
    Ok(tokio::spawn(async move {
        let _watcher = AbortOnDrop(watcher);
        loop {
            match consumer.recv().await {
                Ok(message) => {
                    view.touch();
                    let Some(payload) = message.payload() else { continue };
                    if is_heartbeat_key(message.key()) {
                        match serde_json::from_slice::<Heartbeat>(payload) {
                            Ok(h) => view.note_flow(message.partition(), h.at),
                            Err(e) => tracing::debug!(error = %e, offset = message.offset(), "skipping an unreadable heartbeat"),
                        }
                        continue;
                    }
                    match serde_json::from_slice::<DecisionSnapshot>(payload) {
                        Ok(snapshot) => {
                            view.note_flow(message.partition(), snapshot.calculated_at);
                            view.offer(snapshot);
                        }
                        Err(e) => tracing::warn!(error = %e, offset = message.offset(), "skipping an unreadable decision snapshot"),
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "decisions consumer error");
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
            }
        }
    }))
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Whether `consumer` has consumed every partition of `topic` up to its high watermark.
/// Records the partition count in `view` first. Blocking (broker round trips); run it off
/// the async threads.
fn caught_up(view: &DecisionView, consumer: &StreamConsumer<Watched>, topic: &str) -> anyhow::Result<bool> {
    let timeout = std::time::Duration::from_secs(2);
    let metadata = consumer.fetch_metadata(Some(topic), timeout).context("failed to fetch the decisions topic's metadata")?;
    let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) else { return Ok(false) };
    if t.partitions().is_empty() {
        return Ok(false);
    }
    view.set_partitions(t.partitions().len());
    let position = consumer.position().context("failed to read the feeder's position")?;
    for p in t.partitions() {
        let (low, high) = consumer.fetch_watermarks(topic, p.id(), timeout).context("failed to fetch watermarks")?;
        let at = position.find_partition(topic, p.id()).and_then(|e| e.offset().to_raw());
        let done = match at {
            Some(offset) if offset >= 0 => offset >= high,
            // Nothing consumed from this partition yet: caught up only if it is empty.
            _ => low >= high,
        };
        if !done {
            return Ok(false);
        }
    }
    Ok(true)
}

async fn watch_freshness(view: std::sync::Arc<DecisionView>, consumer: std::sync::Arc<StreamConsumer<Watched>>, topic: String) {
    loop {
        let started = Utc::now();
        let (v, c, t) = (view.clone(), consumer.clone(), topic.clone());
        match tokio::task::spawn_blocking(move || caught_up(&v, &c, &t)).await {
            Ok(Ok(true)) => view.mark_caught_up(started),
            Ok(Ok(false)) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "decision view freshness check failed"),
            Err(e) => tracing::warn!(error = %e, "decision view freshness check panicked"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(version: i64, allowed: bool) -> DecisionSnapshot {
        DecisionSnapshot {
            subject: "alice".into(),
            allowed,
            version,
            calculated_at: Utc::now(),
            tier: "default".into(),
            budget: None,
            quotas: vec![],
        }
    }

    #[test]
    fn an_older_or_equal_version_never_replaces_a_newer_one() {
        let view = DecisionView::default();
        assert!(view.offer(snap(2, false)));
        assert!(!view.offer(snap(1, true)));
        assert!(!view.offer(snap(2, true)));
        assert!(!view.get("alice").unwrap().allowed);
        assert!(view.offer(snap(3, true)));
        assert!(view.get("alice").unwrap().allowed);
    }

    #[test]
    fn staleness_counts_from_the_last_catch_up_and_never_goes_back() {
        let view = DecisionView::default();
        let t0 = Utc::now();
        assert_eq!(view.staleness(t0), None);
        view.mark_caught_up(t0);
        view.mark_caught_up(t0 - chrono::Duration::seconds(5));
        assert_eq!(view.staleness(t0 + chrono::Duration::seconds(3)), Some(chrono::Duration::seconds(3)));
    }

    #[test]
    fn once_the_partitions_are_known_every_one_needs_a_recent_heartbeat_or_snapshot() {
        let (view, t0, s) = (DecisionView::default(), Utc::now(), chrono::Duration::seconds);
        view.mark_caught_up(t0);
        view.set_partitions(2);
        // Caught up, but nothing says decisions flow on partition 1.
        view.note_flow(0, t0 - s(1));
        assert_eq!(view.fresh_as_of(), None);
        assert_eq!(view.staleness(t0), None);
        view.note_flow(1, t0 - s(30));
        assert_eq!(view.staleness(t0), Some(s(30)), "the oldest partition counts");
        view.note_flow(1, t0 - s(2));
        view.note_flow(1, t0 - s(40));
        assert_eq!(view.staleness(t0), Some(s(2)), "a partition's time never goes back");
        // Heartbeats go on but the view stopped catching up: the catch-up counts.
        view.note_flow(0, t0 + s(20));
        view.note_flow(1, t0 + s(20));
        assert_eq!(view.staleness(t0 + s(20)), Some(s(20)));
    }
}
