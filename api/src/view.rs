//! The decision view: the latest snapshot per subject, fed by the decisions topic.
//!
//! The feeder reads the whole (compacted) topic from the beginning in a consumer group of its
//! own, commits nothing, and keeps the snapshot with the highest version per subject, so
//! redelivered or reordered snapshots never move a subject backwards.
//!
//! Freshness: a watcher compares, about once a second, the feeder's position with the
//! topic's high watermarks. When every partition is consumed up to its high watermark, the
//! view holds every snapshot published before that instant, and [`DecisionView::caught_up_at`]
//! moves to it. The view's staleness is the time since then: it grows when the broker is
//! unreachable or the feeder falls behind, and an idle topic stays fresh.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use anyhow::Context;
use chrono::{DateTime, Utc};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::Message;
use tally_common::kafka::KafkaSettings;
use tally_domain::decision::DecisionSnapshot;

#[derive(Default)]
pub struct DecisionView {
    /// Shared, so a check reads a snapshot without copying its quota lines.
    snapshots: RwLock<HashMap<String, Arc<DecisionSnapshot>>>,
    last_message_at: RwLock<Option<DateTime<Utc>>>,
    caught_up_at: RwLock<Option<DateTime<Utc>>>,
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

    /// How far behind the topic the view may be at `now`; `None` if it never caught up.
    pub fn staleness(&self, now: DateTime<Utc>) -> Option<chrono::Duration> {
        self.caught_up_at().map(|t| (now - t).max(chrono::Duration::zero()))
    }

    /// When the feeder last received a message.
    pub fn last_message_at(&self) -> Option<DateTime<Utc>> {
        self.last_message_at.read().ok().and_then(|t| *t)
    }
}

/// Starts the task that feeds `view` from the decisions topic.
pub fn spawn_feeder(
    view: std::sync::Arc<DecisionView>,
    kafka: &KafkaSettings,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let group = format!("tally-api-view-{}", uuid::Uuid::new_v4());
    let consumer: StreamConsumer = kafka.consumer_config(&group).create().context("failed to create the decisions consumer")?;
    consumer
        .subscribe(&[kafka.decisions_topic.as_str()])
        .with_context(|| format!("failed to subscribe to {}", kafka.decisions_topic))?;
    let consumer = std::sync::Arc::new(consumer);
    let watcher = tokio::spawn(watch_freshness(view.clone(), consumer.clone(), kafka.decisions_topic.clone()));
    Ok(tokio::spawn(async move {
        let _watcher = AbortOnDrop(watcher);
        loop {
            match consumer.recv().await {
                Ok(message) => {
                    view.touch();
                    let Some(payload) = message.payload() else { continue };
                    match serde_json::from_slice::<DecisionSnapshot>(payload) {
                        Ok(snapshot) => {
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
/// Blocking (broker round trips); run it off the async threads.
fn caught_up(consumer: &StreamConsumer, topic: &str) -> anyhow::Result<bool> {
    let timeout = std::time::Duration::from_secs(2);
    let metadata = consumer.fetch_metadata(Some(topic), timeout).context("failed to fetch the decisions topic's metadata")?;
    let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) else { return Ok(false) };
    if t.partitions().is_empty() {
        return Ok(false);
    }
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

async fn watch_freshness(view: std::sync::Arc<DecisionView>, consumer: std::sync::Arc<StreamConsumer>, topic: String) {
    loop {
        let started = Utc::now();
        let (c, t) = (consumer.clone(), topic.clone());
        match tokio::task::spawn_blocking(move || caught_up(&c, &t)).await {
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
}
