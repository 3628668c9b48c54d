//! Poison isolation: finding the event that makes a batch's transaction fail.
//!
//! A batch commits all its events or none. When its transaction fails permanently
//! ([`crate::store::ErrorClass::Permanent`]), the failure may be caused by one of its
//! events: an amount that takes a ledger row past the bound, a configuration it cannot be
//! counted under, anything the database refuses. Retrying the batch as it is would fail
//! for ever and stop every subject of its partitions.
//!
//! Contract:
//! - The search tries prefixes of the batch (its first `k` deliveries, with the batch's due
//!   refreshes, no offsets) in transactions that are rolled back. The whole batch must fail
//!   again, else the failure was a passing one and nothing is blamed
//!   ([`Isolation::NotReproduced`]); the empty prefix must commit, else no event is to blame
//!   ([`Isolation::NotAnEvent`]: the caller stops the aggregator, see [`crate::consumer`]).
//!   Every verdict rests on trials: a binary search then finds a prefix that fails whose
//!   prefix one shorter commits; its last delivery is the suspect. Usage only adds (a correction, which subtracts, cannot break a bound), so for
//!   an overflow that is the delivery whose arrival breaks the batch after the events
//!   before it. Last, that prefix is tried once more with the suspect quarantined instead
//!   of counted, as the batch's next commit will do: only if that commits is the suspect
//!   blamed. So a failure that any write meets (a read-only server after a failover,
//!   revoked permissions), which the empty prefix, writing nothing, does not show, blames
//!   nobody: quarantining the suspect fails too.
//! - The caller quarantines the poison with the refusal found (`overflow` for a ledger
//!   bound, `unprocessable` with the database's words otherwise), and commits the batch
//!   again: every other event is counted exactly once, and the offsets move past all.
//! - A transient failure during the search interrupts it ([`Isolation::Interrupted`]); the
//!   caller backs off and tries the whole batch again, so nothing is quarantined for a
//!   failure of the database.
//!
//! It costs about `log2(batch size)` trial transactions per poison event, on a path that
//! healthy traffic never takes.

use crate::plan::Refusal;
use crate::store::StoreError;

/// A batch whose prefixes can be tried.
pub trait Trials {
    /// Whether the batch's first `prefix` deliveries (and its refreshes) would commit.
    fn try_prefix(&mut self, prefix: usize) -> impl std::future::Future<Output = Result<(), StoreError>> + Send;

    /// Whether the first `prefix` deliveries would commit with the one at `index`
    /// quarantined as `refusal` instead of counted.
    fn try_quarantining(
        &mut self,
        prefix: usize,
        index: usize,
        refusal: &Refusal,
    ) -> impl std::future::Future<Output = Result<(), StoreError>> + Send;
}

/// What the search found.
#[derive(Debug)]
pub enum Isolation {
    /// The delivery at `index` fails the batch: the prefix before it commits, the prefix
    /// with it fails with `refusal`'s cause.
    Found { index: usize, refusal: Refusal },
    /// The batch fails without any of its events: not an event's fault.
    NotAnEvent(StoreError),
    /// The whole batch did not fail again: its failure passed.
    NotReproduced,
    /// A transient failure stopped the search.
    Interrupted(StoreError),
}

/// Finds the delivery that makes a batch of `len` deliveries fail.
pub async fn find_poison(trials: &mut impl Trials, len: usize) -> Isolation {
    let failure = match trials.try_prefix(len).await {
        Ok(()) => return Isolation::NotReproduced,
        Err(e) if e.is_transient() => return Isolation::Interrupted(e),
        Err(e) => e,
    };
    match trials.try_prefix(0).await {
        Ok(()) => {}
        Err(e) if e.is_transient() => return Isolation::Interrupted(e),
        Err(e) => return Isolation::NotAnEvent(e),
    }
    // Invariant: the prefix of `good` deliveries commits, the prefix of `bad` fails with
    // `cause`.
    let (mut good, mut bad, mut cause) = (0, len, failure);
    while bad - good > 1 {
        let mid = good + (bad - good) / 2;
        match trials.try_prefix(mid).await {
            Ok(()) => good = mid,
            Err(e) if e.is_transient() => return Isolation::Interrupted(e),
            Err(e) => (bad, cause) = (mid, e),
        }
    }
    if bad == 0 {
        return Isolation::NotAnEvent(cause);
    }
    let (index, refusal) = (bad - 1, refusal_of(&cause));
    match trials.try_quarantining(bad, index, &refusal).await {
        Ok(()) => Isolation::Found { index, refusal },
        Err(e) if e.is_transient() => Isolation::Interrupted(e),
        Err(e) => Isolation::NotAnEvent(e),
    }
}

/// How an isolated event is quarantined, from the failure it causes.
pub fn refusal_of(cause: &StoreError) -> Refusal {
    if cause.is_overflow() {
        let detail = format!(
            "counting it would take a ledger row past the largest amount Tally counts, {} (10^15): {cause}",
            tally_domain::metric::MAX_AMOUNT
        );
        return Refusal::overflow(detail);
    }
    Refusal::unprocessable(format!("its batch's transaction fails with it: {cause}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quarantine::QuarantineReason;

    /// A batch that fails once its prefix counts `poison` (or never), counting the trials;
    /// with `writes_fail`, every prefix that writes anything fails.
    struct Fake {
        fails_from: Option<usize>,
        transient_at: Option<usize>,
        writes_fail: bool,
        tried: Vec<usize>,
    }

    impl Fake {
        fn outcome(&mut self, prefix: usize, quarantined: Option<usize>) -> Result<(), StoreError> {
            self.tried.push(prefix);
            if self.transient_at == Some(prefix) {
                return Err(StoreError::Database(sqlx::Error::PoolTimedOut));
            }
            if self.writes_fail && prefix > 0 {
                return Err(StoreError::Config(anyhow::anyhow!("cannot execute INSERT in a read-only transaction")));
            }
            match self.fails_from {
                Some(poison) if prefix > poison && quarantined != Some(poison) => {
                    Err(StoreError::Config(anyhow::anyhow!("event {poison} cannot be counted")))
                }
                _ => Ok(()),
            }
        }
    }

    impl Trials for Fake {
        async fn try_prefix(&mut self, prefix: usize) -> Result<(), StoreError> {
            self.outcome(prefix, None)
        }

        async fn try_quarantining(&mut self, prefix: usize, index: usize, _: &Refusal) -> Result<(), StoreError> {
            self.outcome(prefix, Some(index))
        }
    }

    fn fake(fails_from: Option<usize>) -> Fake {
        Fake { fails_from, transient_at: None, writes_fail: false, tried: Vec::new() }
    }

    #[tokio::test]
    async fn finds_the_poison_at_every_position_in_about_log2_trials() {
        for len in [1usize, 2, 3, 10, 10_001] {
            for poison in [0, len / 2, len - 1] {
                let mut trials = fake(Some(poison));
                let Isolation::Found { index, refusal } = find_poison(&mut trials, len).await else {
                    panic!("len {len}, poison {poison}: not found");
                };
                assert_eq!(index, poison, "len {len}");
                assert_eq!(refusal.reason.kind, QuarantineReason::Unprocessable);
                assert!(refusal.detail.unwrap().contains(&format!("event {poison} cannot be counted")), "len {len}, poison {poison}");
                let bound = 4 + (len as f64).log2().ceil() as usize;
                assert!(trials.tried.len() <= bound, "len {len}: {} trials", trials.tried.len());
            }
        }
    }

    #[tokio::test]
    async fn a_batch_that_fails_without_events_blames_none() {
        struct Always;
        impl Trials for Always {
            async fn try_prefix(&mut self, _: usize) -> Result<(), StoreError> {
                Err(StoreError::Config(anyhow::anyhow!("stored configuration cannot load")))
            }

            async fn try_quarantining(&mut self, prefix: usize, _: usize, _: &Refusal) -> Result<(), StoreError> {
                self.try_prefix(prefix).await
            }
        }
        assert!(matches!(find_poison(&mut Always, 100).await, Isolation::NotAnEvent(_)));
    }

    #[tokio::test]
    async fn a_failure_every_write_meets_blames_none_though_the_empty_prefix_commits() {
        let mut trials = Fake { writes_fail: true, ..fake(None) };
        assert!(matches!(find_poison(&mut trials, 1000).await, Isolation::NotAnEvent(_)));
    }

    #[tokio::test]
    async fn a_failure_that_does_not_come_back_blames_none() {
        let mut trials = fake(None);
        assert!(matches!(find_poison(&mut trials, 100).await, Isolation::NotReproduced));
        assert_eq!(trials.tried, [100], "one trial of the whole batch, then nothing");
    }

    #[tokio::test]
    async fn a_transient_failure_interrupts_the_search_and_blames_none() {
        for at in [100, 0, 50, 75] {
            let mut trials = Fake { transient_at: Some(at), ..fake(Some(90)) };
            let found = find_poison(&mut trials, 100).await;
            assert!(matches!(found, Isolation::Interrupted(_)), "transient at {at}: {found:?}");
        }
    }

    #[test]
    fn transient_failures_are_told_from_the_batch_s_own() {
        assert!(StoreError::Database(sqlx::Error::PoolTimedOut).is_transient());
        assert!(StoreError::Database(sqlx::Error::Io(std::io::Error::other("reset"))).is_transient());
        assert!(!StoreError::Database(sqlx::Error::RowNotFound).is_transient());
        assert!(!StoreError::Config(anyhow::anyhow!("x")).is_transient());
        let lost = anyhow::Error::new(sqlx::Error::PoolTimedOut).context("failed to load configuration version 3");
        assert!(StoreError::Config(lost).is_transient(), "a configuration that could not be read for a lost connection");
        assert_eq!(refusal_of(&StoreError::Database(sqlx::Error::RowNotFound)).reason.kind, QuarantineReason::Unprocessable);
    }
}
