//! The decision view: the latest snapshot per subject, fed by the decisions topic.
//!
//! The feeder reads the whole (compacted) topic from the beginning in a consumer group of its
//! own, commits nothing, and keeps the snapshot with the highest version per subject, so
//! redelivered or reordered snapshots never move a subject backwards.

use std::collections::HashMap;
use std::sync::RwLock;

use anyhow::Context;
use chrono::{DateTime, Utc};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::Message;
use tally_common::kafka::KafkaSettings;
use tally_domain::decision::DecisionSnapshot;

#[derive(Default)]
pub struct DecisionView {
    snapshots: RwLock<HashMap<String, DecisionSnapshot>>,
    last_message_at: RwLock<Option<DateTime<Utc>>>,
}

impl DecisionView {
    /// Keeps `snapshot` if it is newer than what the view has for its subject.
    pub fn offer(&self, snapshot: DecisionSnapshot) -> bool {
        let Ok(mut map) = self.snapshots.write() else { return false };
        match map.get(&snapshot.subject) {
            Some(current) if current.version >= snapshot.version => false,
            _ => {
                map.insert(snapshot.subject.clone(), snapshot);
                true
            }
        }
    }

    pub fn get(&self, subject: &str) -> Option<DecisionSnapshot> {
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
    Ok(tokio::spawn(async move {
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
}
