//! Commit lanes: the consume loop's buffers between the consumer and the batch commits.
//!
//! Partitions are split among lanes by `partition % lanes`. Each lane has at most one batch
//! commit in flight (a task that parses, plans and commits); while it runs, the loop goes on
//! receiving and the lane's next batch fills up in its buffer. So one lane's task plans
//! while Postgres applies another's, and two lanes keep two transactions busy at once.
//!
//! Contract: a lane's buffer holds, per partition, consecutive offsets that continue the
//! lane's batch in flight (or the stored offset when none is in flight); the loop appends
//! only what continues them ([`crate::consumer`]'s pending cursor), and drops a
//! partition's buffered deliveries whenever that partition is rewound or lost.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::headroom::Headroom;
use crate::keys::{Deferred, Subjects};
use crate::plan::Delivery;

/// One commit lane's state in the consume loop.
#[derive(Debug, Default)]
pub struct Lane {
    /// Buffered deliveries, each with a hash of its message key (the subject).
    buffer: Vec<(Delivery, u64)>,
    /// When the buffer last went from empty to non-empty (a batch that leaves deliveries
    /// behind leaves this as it was: they have waited since).
    oldest: Option<Instant>,
    /// Whether a batch commit of this lane is in flight.
    pub busy: bool,
    /// Subjects of this lane whose usage changed without a snapshot yet, with when their
    /// refresh is due.
    pub deferred: Deferred,
    /// When the lane last looked for due refreshes while its buffer was empty.
    refreshes_checked: Option<Instant>,
    /// How much of each metric the lane's subjects may still use before their decisions
    /// change, to tell urgent events on arrival.
    pub headroom: Headroom,
}

/// What one batch may hold. Its memory and its ledger rows grow with the distinct subjects
/// in it; more events of the same subjects cost little more, and are summed into the same
/// ledger rows.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    pub events: usize,
    /// Distinct message keys; the usage topic is keyed by subject.
    pub subjects: usize,
    pub refreshes: usize,
}

/// How often an idle lane with an empty buffer looks for due refreshes.
const REFRESH_POLL: Duration = Duration::from_millis(100);

impl Lane {
    /// A lane that keeps the headroom of up to `headroom_subjects` subjects per generation.
    pub fn new(headroom_subjects: usize) -> Self {
        Lane { headroom: Headroom::with_capacity(headroom_subjects), ..Lane::default() }
    }

    /// Buffers a delivery with the [`crate::keys::key_hash`] of its message key. Returns a copy of it
    /// when its event is urgent: it may change its subject's decision ([`Headroom::spend`]).
    pub fn push(&mut self, delivery: Delivery, key: u64, now: Instant) -> Option<Delivery> {
        if self.buffer.is_empty() {
            self.oldest = Some(now);
        }
        let urgent = delivery.event().is_some_and(|e| self.headroom.spend(e)).then(|| delivery.clone());
        self.buffer.push((delivery, key));
        urgent
    }

    pub fn buffered(&self) -> usize {
        self.buffer.len()
    }

    /// Whether the lane should start a commit now: it is idle, and its buffer is full or its
    /// oldest delivery has waited `max_wait`, or (polled every [`REFRESH_POLL`]) a deferred
    /// refresh is due.
    pub fn ready(&mut self, now: Instant, wall: DateTime<Utc>, max_batch: usize, max_wait: Duration) -> bool {
        if self.busy {
            return false;
        }
        if self.buffer.len() >= max_batch || self.oldest.is_some_and(|t| now >= t + max_wait) {
            return true;
        }
        if !self.buffer.is_empty() || self.refreshes_checked.is_some_and(|t| now < t + REFRESH_POLL) {
            return false;
        }
        self.refreshes_checked = Some(now);
        self.deferred.values().any(|(_, due)| *due <= wall)
    }

    /// When [`Lane::ready`] may next turn true without a new delivery.
    pub fn wake_at(&self, max_wait: Duration) -> Option<Instant> {
        if self.busy {
            return None;
        }
        match self.oldest {
            Some(t) => Some(t + max_wait),
            None => self.refreshes_checked.map(|t| t + REFRESH_POLL),
        }
    }

    /// Takes the next batch: the oldest buffered deliveries, at most `limits.events` of
    /// them with at most `limits.subjects` distinct message keys, and up to
    /// `limits.refreshes` due refreshes (the longest overdue first). The lane is busy until
    /// [`Lane::settled`].
    pub fn take_batch(&mut self, limits: BatchLimits, wall: DateTime<Utc>) -> (Vec<Delivery>, Subjects) {
        let n = self.batch_len(limits);
        let deliveries: Vec<Delivery> = self.buffer.drain(..n).map(|(d, _)| d).collect();
        if self.buffer.is_empty() {
            self.oldest = None;
        }
        self.busy = true;
        for event in deliveries.iter().filter_map(Delivery::event) {
            self.headroom.taken(event);
        }
        (deliveries, self.take_due_refreshes(limits.refreshes, wall))
    }

    /// How many of the oldest buffered deliveries fit in one batch.
    fn batch_len(&self, limits: BatchLimits) -> usize {
        let mut keys = HashSet::new();
        for (i, (_, key)) in self.buffer.iter().enumerate().take(limits.events) {
            if keys.insert(*key) && keys.len() > limits.subjects {
                return i;
            }
        }
        self.buffer.len().min(limits.events)
    }

    fn take_due_refreshes(&mut self, max: usize, wall: DateTime<Utc>) -> Subjects {
        let mut due: Vec<(DateTime<Utc>, &String)> =
            self.deferred.iter().filter(|(_, (_, at))| *at <= wall).map(|(s, (_, at))| (*at, s)).collect();
        due.sort_unstable();
        let taken: Vec<String> = due.into_iter().take(max).map(|(_, s)| s.clone()).collect();
        taken.into_iter().filter_map(|s| self.deferred.remove(&s).map(|(key, _)| (s, key))).collect()
    }

    /// The commit in flight ended (committed or refused).
    pub fn settled(&mut self) {
        self.busy = false;
    }

    /// Drops the buffered deliveries of `partitions` (rewound or no longer owned).
    pub fn drop_partitions(&mut self, partitions: &HashSet<i32>) {
        self.buffer.retain(|(d, _)| !partitions.contains(&d.partition));
        if self.buffer.is_empty() {
            self.oldest = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::key_hash;

    fn delivery(partition: i32, offset: i64) -> Delivery {
        Delivery { partition, offset, ..Delivery::default() }
    }

    const WAIT: Duration = Duration::from_millis(50);

    fn limits(events: usize, refreshes: usize) -> BatchLimits {
        BatchLimits { events, subjects: usize::MAX, refreshes }
    }

    #[test]
    fn a_lane_is_ready_when_full_or_when_its_oldest_delivery_waited_long_enough() {
        let (t0, wall) = (Instant::now(), Utc::now());
        let mut lane = Lane::default();
        lane.push(delivery(0, 0), key_hash(None), t0);
        lane.push(delivery(0, 1), key_hash(None), t0 + Duration::from_millis(40));
        assert!(!lane.ready(t0 + Duration::from_millis(49), wall, 3, WAIT));
        assert_eq!(lane.wake_at(WAIT), Some(t0 + WAIT));
        assert!(lane.ready(t0 + WAIT, wall, 3, WAIT));
        lane.push(delivery(0, 2), key_hash(None), t0 + Duration::from_millis(41));
        assert!(lane.ready(t0 + Duration::from_millis(41), wall, 3, WAIT), "full");
    }

    #[test]
    fn a_busy_lane_keeps_buffering_and_its_next_batch_continues_in_order() {
        let (t0, wall) = (Instant::now(), Utc::now());
        let mut lane = Lane::default();
        (0..5).for_each(|o| {
            lane.push(delivery(1, o), key_hash(None), t0);
        });
        let (first, _) = lane.take_batch(limits(3, 10), wall);
        assert_eq!(first.iter().map(|d| d.offset).collect::<Vec<_>>(), [0, 1, 2]);
        lane.push(delivery(1, 5), key_hash(None), t0);
        assert!(!lane.ready(t0 + WAIT * 10, wall, 3, WAIT), "one commit in flight at a time");
        assert_eq!(lane.wake_at(WAIT), None);
        lane.settled();
        assert!(lane.ready(t0 + WAIT, wall, 3, WAIT));
        let (second, _) = lane.take_batch(limits(3, 10), wall);
        assert_eq!(second.iter().map(|d| d.offset).collect::<Vec<_>>(), [3, 4, 5]);
        assert_eq!(lane.buffered(), 0);
    }

    #[test]
    fn an_idle_lane_commits_due_refreshes_alone_and_keeps_the_rest() {
        let (t0, wall) = (Instant::now(), Utc::now());
        let mut lane = Lane::default();
        lane.deferred.insert("later".into(), (None, wall + chrono::Duration::seconds(5)));
        assert!(!lane.ready(t0, wall, 10, WAIT));
        assert!(!lane.ready(t0 + Duration::from_millis(1), wall + chrono::Duration::seconds(6), 10, WAIT), "polled, not every time");
        lane.deferred.insert("overdue".into(), (Some("k".into()), wall - chrono::Duration::seconds(1)));
        lane.deferred.insert("due".into(), (None, wall));
        assert!(lane.ready(t0 + REFRESH_POLL, wall, 10, WAIT));
        let (deliveries, refreshes) = lane.take_batch(limits(10, 1), wall);
        assert!(deliveries.is_empty());
        assert_eq!(refreshes, Subjects::from([("overdue".to_string(), Some("k".to_string()))]), "the longest overdue first");
        assert_eq!(lane.deferred.keys().collect::<Vec<_>>(), ["due", "later"]);
    }

    #[test]
    fn a_batch_stops_before_the_first_subject_over_the_limit_and_takes_more_events_of_those_in_it() {
        let (t0, wall) = (Instant::now(), Utc::now());
        let mut lane = Lane::default();
        for (o, key) in ["a", "b", "a", "c", "b", "a"].iter().enumerate() {
            lane.push(delivery(0, o as i64), key_hash(Some(key.as_bytes())), t0);
        }
        let two_subjects = BatchLimits { events: 10, subjects: 2, refreshes: 0 };
        let (first, _) = lane.take_batch(two_subjects, wall);
        assert_eq!(first.iter().map(|d| d.offset).collect::<Vec<_>>(), [0, 1, 2]);
        lane.settled();
        let (second, _) = lane.take_batch(two_subjects, wall);
        assert_eq!(second.iter().map(|d| d.offset).collect::<Vec<_>>(), [3, 4]);
        assert_eq!(lane.buffered(), 1);
    }

    #[test]
    fn a_push_returns_a_copy_of_an_urgent_delivery_and_keeps_it_buffered_in_order() {
        let t0 = Instant::now();
        let event = |offset: i64, tokens: i64| {
            let v =
                serde_json::json!({"id": format!("e{offset}"), "subject": "s", "time": Utc::now().to_rfc3339(), "input_tokens": tokens});
            Delivery::received(0, offset, Some(serde_json::to_vec(&v).unwrap()))
        };
        let mut lane = Lane::default();
        let left = Box::new([crate::headroom::Line { metric: tally_domain::metric::Metric::InputTokens, scope: None, left: 10 }]);
        lane.headroom.committed(crate::keys::SubjectKey::of("s"), left);
        assert!(lane.push(event(0, 9), key_hash(Some(b"s")), t0).is_none());
        let urgent = lane.push(event(1, 1), key_hash(Some(b"s")), t0).expect("the 10th token is urgent");
        assert_eq!((urgent.offset, urgent.event().map(|e| e.input_tokens)), (1, Some(1)));
        let (batch, _) = lane.take_batch(limits(10, 0), Utc::now());
        assert_eq!(batch.iter().map(|d| d.offset).collect::<Vec<_>>(), [0, 1], "the urgent one stays in its batch, for the cursor");
    }

    #[test]
    fn dropping_a_partition_keeps_the_others_in_order() {
        let t0 = Instant::now();
        let mut lane = Lane::default();
        for o in 0..3 {
            lane.push(delivery(0, o), key_hash(None), t0);
            lane.push(delivery(2, o), key_hash(None), t0);
        }
        lane.drop_partitions(&HashSet::from([0]));
        let (left, _) = lane.take_batch(limits(10, 0), Utc::now());
        assert_eq!(left.iter().map(|d| (d.partition, d.offset)).collect::<Vec<_>>(), [(2, 0), (2, 1), (2, 2)]);
        lane.drop_partitions(&HashSet::from([2]));
        assert_eq!(lane.wake_at(WAIT), None, "busy");
    }
}
