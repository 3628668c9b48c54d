//! Partition ownership for a consumer group, coordinated through Postgres.
//!
//! Each instance heartbeats into `consumer_members`; the members whose heartbeat is younger
//! than the lease are live, and partition `p` belongs to the live member at position
//! `p % live.len()` in member-id order. Every instance computes the same split from the same
//! rows, so no broker-side group coordinator is involved: the consumer uses manual
//! assignment, which behaves the same on Apache Kafka, Redpanda and tansu. (tansu 0.6's
//! coordinator keeps a killed leader in the group for ever, so broker-side rebalancing does
//! not survive `kill -9` there.)
//!
//! This table only says who *should* own a partition. Correctness does not depend on it:
//! the new owner claims the partition in `consumer_offsets` (bumping its epoch) and a member
//! that still consumes a partition it lost is refused at its next commit.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use sqlx::PgPool;

/// One instance's membership in a consumer group.
#[derive(Debug, Clone)]
pub struct Membership {
    pub group: String,
    pub topic: String,
    pub member_id: String,
    /// A member whose last heartbeat is older than this is considered gone.
    pub lease: Duration,
}

/// The partitions `member` owns among `live` members (any order) for `partitions` partitions.
pub fn split(live: &[String], member: &str, partitions: i32) -> Vec<i32> {
    let mut sorted: Vec<&String> = live.iter().collect();
    sorted.sort();
    sorted.dedup();
    let Some(position) = sorted.iter().position(|m| m.as_str() == member) else { return Vec::new() };
    (0..partitions).filter(|p| (*p as usize) % sorted.len() == position).collect()
}

/// How a member's owned partitions must change to match its share.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ShareChange {
    /// In the share, not owned, and not fenced recently: to claim.
    pub gained: Vec<i32>,
    /// Owned but no longer in the share: to release.
    pub lost: Vec<i32>,
}

/// Compares the share with what is owned. A partition this member was fenced from is left
/// alone until its entry in `fenced_until` passes (expired entries are dropped), so two
/// members with briefly different views do not take it from each other back and forth.
pub fn share_change(share: &[i32], owned: impl IntoIterator<Item = i32>, fenced_until: &mut HashMap<i32, Instant>) -> ShareChange {
    let now = Instant::now();
    fenced_until.retain(|_, until| *until > now);
    let desired: BTreeSet<i32> = share.iter().copied().collect();
    let owned: BTreeSet<i32> = owned.into_iter().collect();
    ShareChange {
        gained: desired.difference(&owned).filter(|p| !fenced_until.contains_key(p)).copied().collect(),
        lost: owned.difference(&desired).copied().collect(),
    }
}

impl Membership {
    /// Records a heartbeat and returns the partitions this member should own now.
    pub async fn heartbeat(&self, pool: &PgPool, partitions: i32) -> Result<Vec<i32>, sqlx::Error> {
        let lease_ms = self.lease.as_millis() as i64;
        let live: Vec<String> = sqlx::query_scalar(
            "WITH beat AS (
                 INSERT INTO consumer_members (group_id, topic, member_id, heartbeat_at) VALUES ($1, $2, $3, now())
                 ON CONFLICT (group_id, topic, member_id) DO UPDATE SET heartbeat_at = now()
             )
             SELECT member_id FROM consumer_members
             WHERE group_id = $1 AND topic = $2 AND heartbeat_at > now() - make_interval(secs => $4::double precision / 1000)
               AND member_id <> $3
             UNION ALL SELECT $3",
        )
        .bind(&self.group)
        .bind(&self.topic)
        .bind(&self.member_id)
        .bind(lease_ms)
        .fetch_all(pool)
        .await?;
        Ok(split(&live, &self.member_id, partitions))
    }

    /// Leaves the group at shutdown so the others take over at once.
    pub async fn leave(&self, pool: &PgPool) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM consumer_members WHERE group_id = $1 AND topic = $2 AND member_id = $3")
            .bind(&self.group)
            .bind(&self.topic)
            .bind(&self.member_id)
            .execute(pool)
            .await?;
        Ok(())
    }
}

/// The membership side of a consume loop (the aggregator's and the history writer's): a
/// heartbeat at most once a second, the partition count learnt once, and the partitions
/// fenced from recently.
#[derive(Debug)]
pub struct Heartbeats {
    pub membership: Membership,
    /// Partitions of the topic, from the broker's metadata (0 until known).
    partitions: i32,
    last: Option<Instant>,
    /// Partitions this member was fenced from, left alone until the given instant.
    fenced_until: HashMap<i32, Instant>,
}

impl Heartbeats {
    pub fn new(membership: Membership) -> Self {
        Heartbeats { membership, partitions: 0, last: None, fenced_until: HashMap::new() }
    }

    /// Leaves `partition` alone for `lease`: another member claimed it.
    pub fn fenced(&mut self, partition: i32, lease: Duration) {
        self.fenced_until.insert(partition, Instant::now() + lease);
    }

    /// At most once a second, heartbeats and returns how the `owned` partitions must change.
    /// `None` when not due, while the partition count (`partition_count`, asked until it is
    /// known) is still 0, when the heartbeat failed (logged; the current partitions are
    /// kept), or when nothing changes.
    pub async fn due_change(
        &mut self,
        pool: &PgPool,
        owned: impl IntoIterator<Item = i32>,
        partition_count: impl FnOnce() -> i32,
    ) -> Option<ShareChange> {
        if self.last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
            return None;
        }
        self.last = Some(Instant::now());
        if self.partitions == 0 {
            self.partitions = partition_count();
            if self.partitions == 0 {
                return None;
            }
        }
        let share = match self.membership.heartbeat(pool, self.partitions).await {
            Ok(share) => share,
            Err(e) => {
                tracing::warn!(error = %e, "membership heartbeat failed; keeping the current partitions");
                return None;
            }
        };
        let change = share_change(&share, owned, &mut self.fenced_until);
        (!change.gained.is_empty() || !change.lost.is_empty()).then_some(change)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn share_change_claims_what_is_new_unless_recently_fenced() {
        let mut fenced = HashMap::from([(2, Instant::now() + Duration::from_secs(60)), (3, Instant::now())]);
        let change = share_change(&[0, 2, 3], [0, 1], &mut fenced);
        assert_eq!(change, ShareChange { gained: vec![3], lost: vec![1] });
        assert!(!fenced.contains_key(&3), "an expired fence is dropped");
    }

    #[test]
    fn live_members_split_every_partition_exactly_once() {
        let live = vec!["b".to_string(), "a".to_string(), "c".to_string()];
        let mut all: Vec<i32> = ["a", "b", "c"].iter().flat_map(|m| split(&live, m, 8)).collect();
        all.sort();
        assert_eq!(all, (0..8).collect::<Vec<_>>());
        assert_eq!(split(&live, "a", 8), vec![0, 3, 6]);
        assert_eq!(split(&live, "z", 8), Vec::<i32>::new());
        assert_eq!(split(&["a".to_string()], "a", 4), vec![0, 1, 2, 3]);
    }
}
