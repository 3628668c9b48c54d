//! The heartbeat record of `tally.decisions.v1`.
//!
//! Besides the decision snapshots (key = subject), the aggregator's outbox relay publishes a
//! heartbeat to every partition of the decisions topic about once a second, after it has
//! published what the outbox held. Its key is [`HEARTBEAT_KEY_PREFIX`] followed by the
//! partition number (`__tally_heartbeat__/3`), so the compacted topic keeps one heartbeat
//! per partition; it carries the header [`HEARTBEAT_HEADER`] and a JSON body
//! `{"heartbeat": true, "instance": "...", "partition": 3, "at": "<RFC 3339>"}`.
//!
//! A heartbeat says: the decisions committed before `at` are on this partition. Readers of
//! the topic skip heartbeats as decisions ([`is_heartbeat_key`]) and use them for freshness:
//! no snapshot and no heartbeat for a while means decisions stopped flowing. Subjects whose
//! name starts with the prefix are reserved.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The key prefix of heartbeat records; the partition number follows it.
pub const HEARTBEAT_KEY_PREFIX: &str = "__tally_heartbeat__/";

/// The header every heartbeat record carries (its value is `1`).
pub const HEARTBEAT_HEADER: &str = "tally-heartbeat";

/// The body of a heartbeat record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Always `true`: tells a heartbeat from a snapshot by its body alone.
    pub heartbeat: bool,
    /// The aggregator instance that published it.
    pub instance: String,
    /// The partition it was published to.
    pub partition: i32,
    /// When the relay had published everything the outbox held before it.
    pub at: DateTime<Utc>,
}

impl Heartbeat {
    pub fn new(instance: &str, partition: i32, at: DateTime<Utc>) -> Heartbeat {
        Heartbeat { heartbeat: true, instance: instance.to_string(), partition, at }
    }

    /// The record's key: the prefix and the partition.
    pub fn key(&self) -> String {
        format!("{HEARTBEAT_KEY_PREFIX}{}", self.partition)
    }
}

/// Whether a decisions-topic record with this key is a heartbeat rather than a snapshot.
pub fn is_heartbeat_key(key: Option<&[u8]>) -> bool {
    key.is_some_and(|k| k.starts_with(HEARTBEAT_KEY_PREFIX.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heartbeat_is_told_by_its_key_and_round_trips() {
        let at: DateTime<Utc> = "2026-12-07T10:00:00Z".parse().unwrap();
        let h = Heartbeat::new("aggregator-1", 3, at);
        assert_eq!(h.key(), "__tally_heartbeat__/3");
        assert!(is_heartbeat_key(Some(h.key().as_bytes())));
        assert!(!is_heartbeat_key(Some(b"alice")));
        assert!(!is_heartbeat_key(None));
        let json = serde_json::to_value(&h).unwrap();
        assert_eq!(json["heartbeat"], true);
        assert_eq!(serde_json::from_value::<Heartbeat>(json).unwrap(), h);
    }
}
