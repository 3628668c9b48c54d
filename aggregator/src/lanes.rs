//! Commit lanes: the consume loop's buffers between the consumer and the batch commits.
//!
//! Partitions are split among lanes by `partition % lanes`. Each lane has at most one batch
//! commit in flight; while it runs, the loop goes on receiving and the lane's next batch
//! fills up in its buffer. So the aggregator reads and plans while Postgres applies, and
//! two lanes keep two transactions busy at once.
//!
//! Contract: a lane's buffer holds, per partition, consecutive offsets that continue the
//! lane's batch in flight (or the stored offset when none is in flight); the loop appends
//! only what continues them ([`crate::consumer`]'s pending cursor), and drops a
//! partition's buffered deliveries whenever that partition is rewound or lost.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::plan::Delivery;
use crate::store::{Deferred, Subjects};

/// One commit lane's state in the consume loop.
#[derive(Debug, Default)]
pub struct Lane {
    buffer: Vec<Delivery>,
    /// When the oldest buffered delivery arrived.
    oldest: Option<Instant>,
    /// Whether a batch commit of this lane is in flight.
    pub busy: bool,
    /// Subjects of this lane whose usage changed without a snapshot yet, with when their
    /// refresh is due.
    pub deferred: Deferred,
    /// When the lane last looked for due refreshes while its buffer was empty.
    refreshes_checked: Option<Instant>,
}

/// How often an idle lane with an empty buffer looks for due refreshes.
const REFRESH_POLL: Duration = Duration::from_millis(100);

impl Lane {
    pub fn push(&mut self, delivery: Delivery, now: Instant) {
        if self.buffer.is_empty() {
            self.oldest = Some(now);
        }
        self.buffer.push(delivery);
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

    /// Takes the next batch: the oldest `max_batch` buffered deliveries, and up to
    /// `max_refreshes` due refreshes (the longest overdue first). The lane is busy until
    /// [`Lane::settled`].
    pub fn take_batch(&mut self, max_batch: usize, max_refreshes: usize, wall: DateTime<Utc>) -> (Vec<Delivery>, Subjects) {
        let n = self.buffer.len().min(max_batch);
        let deliveries: Vec<Delivery> = self.buffer.drain(..n).collect();
        if self.buffer.is_empty() {
            self.oldest = None;
        }
        self.busy = true;
        (deliveries, self.take_due_refreshes(max_refreshes, wall))
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
        self.buffer.retain(|d| !partitions.contains(&d.partition));
        if self.buffer.is_empty() {
            self.oldest = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(partition: i32, offset: i64) -> Delivery {
        Delivery { partition, offset, payload: None }
    }

    const WAIT: Duration = Duration::from_millis(50);

    #[test]
    fn a_lane_is_ready_when_full_or_when_its_oldest_delivery_waited_long_enough() {
        let (t0, wall) = (Instant::now(), Utc::now());
        let mut lane = Lane::default();
        lane.push(delivery(0, 0), t0);
        lane.push(delivery(0, 1), t0 + Duration::from_millis(40));
        assert!(!lane.ready(t0 + Duration::from_millis(49), wall, 3, WAIT));
        assert_eq!(lane.wake_at(WAIT), Some(t0 + WAIT));
        assert!(lane.ready(t0 + WAIT, wall, 3, WAIT));
        lane.push(delivery(0, 2), t0 + Duration::from_millis(41));
        assert!(lane.ready(t0 + Duration::from_millis(41), wall, 3, WAIT), "full");
    }

    #[test]
    fn a_busy_lane_keeps_buffering_and_its_next_batch_continues_in_order() {
        let (t0, wall) = (Instant::now(), Utc::now());
        let mut lane = Lane::default();
        (0..5).for_each(|o| lane.push(delivery(1, o), t0));
        let (first, _) = lane.take_batch(3, 10, wall);
        assert_eq!(first.iter().map(|d| d.offset).collect::<Vec<_>>(), [0, 1, 2]);
        lane.push(delivery(1, 5), t0);
        assert!(!lane.ready(t0 + WAIT * 10, wall, 3, WAIT), "one commit in flight at a time");
        assert_eq!(lane.wake_at(WAIT), None);
        lane.settled();
        assert!(lane.ready(t0 + WAIT, wall, 3, WAIT));
        let (second, _) = lane.take_batch(3, 10, wall);
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
        let (deliveries, refreshes) = lane.take_batch(10, 1, wall);
        assert!(deliveries.is_empty());
        assert_eq!(refreshes, Subjects::from([("overdue".to_string(), Some("k".to_string()))]), "the longest overdue first");
        assert_eq!(lane.deferred.keys().collect::<Vec<_>>(), ["due", "later"]);
    }

    #[test]
    fn dropping_a_partition_keeps_the_others_in_order() {
        let t0 = Instant::now();
        let mut lane = Lane::default();
        for o in 0..3 {
            lane.push(delivery(0, o), t0);
            lane.push(delivery(2, o), t0);
        }
        lane.drop_partitions(&HashSet::from([0]));
        let (left, _) = lane.take_batch(10, 0, Utc::now());
        assert_eq!(left.iter().map(|d| (d.partition, d.offset)).collect::<Vec<_>>(), [(2, 0), (2, 1), (2, 2)]);
        lane.drop_partitions(&HashSet::from([2]));
        assert_eq!(lane.wake_at(WAIT), None, "busy");
    }
}
