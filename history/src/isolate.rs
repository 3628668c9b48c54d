//! Poison isolation in the history writer: writing a batch around the event ClickHouse
//! refuses.
//!
//! History holds events the ledger already counted, so their amounts are bounded and
//! Postgres stored them; still, should ClickHouse refuse one of them, retrying the batch as
//! it is would stop history for every subject of its partitions.
//!
//! Contract:
//! - A batch whose write fails with ClickHouse unreachable is retried whole, as before.
//! - Otherwise the batch is split in halves, recursively, and each part written again. Every
//!   history write is idempotent (raw rows keyed by event, rollup buckets recomputed from the
//!   raw rows), so a part written for real while another is refused costs nothing when the
//!   batch is replayed.
//! - An event is isolated only if it fails alone while some other part of its batch was
//!   written: a failure that every part meets is ClickHouse's, not an event's
//!   ([`Unwritten::not_an_event`]): the caller retries the batch whole when the failure is
//!   transient and stops when it is permanent. (A refused event that is alone in its batch
//!   blames nobody either way, and waits until later events join it on the retries.)
//! - The caller records each isolated event (`history_isolated`, with ClickHouse's words)
//!   and advances past it, so reconciliation can name the difference it leaves.

use std::future::Future;

use crate::client::ChError;
use crate::sink::{Counted, Written};

/// Writes parts of a batch.
pub trait Writes {
    fn write(&mut self, events: &[Counted]) -> impl Future<Output = Result<Written, ChError>> + Send;
}

/// An event of the batch that ClickHouse refused on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Isolated {
    /// Its index in the batch.
    pub index: usize,
    /// How ClickHouse refused it.
    pub error: String,
}

/// What a batch's write did: what was written, and the events isolated.
#[derive(Debug, Default)]
pub struct Outcome {
    pub written: Written,
    pub isolated: Vec<Isolated>,
}

/// A batch's write that failed, and whether any event could be to blame.
#[derive(Debug)]
pub struct Unwritten {
    pub error: ChError,
    /// Every part of a batch of two or more events failed, each event alone included: the
    /// failure is ClickHouse's, not an event's.
    pub not_an_event: bool,
}

impl Unwritten {
    fn retry(error: ChError) -> Self {
        Unwritten { error, not_an_event: false }
    }
}

/// Writes `events`, isolating what ClickHouse refuses on its own (see the module docs).
pub async fn write_isolating(w: &mut impl Writes, events: &[Counted]) -> Result<Outcome, Unwritten> {
    let first = match w.write(events).await {
        Ok(written) => return Ok(Outcome { written, isolated: Vec::new() }),
        Err(e) if is_unreachable(&e) || events.len() < 2 => return Err(Unwritten::retry(e)),
        Err(e) => e,
    };
    let mut outcome = Outcome::default();
    let mut wrote_any = false;
    // Ranges of the batch still to write; each failed before as a whole.
    let mut pending = vec![(0, events.len())];
    while let Some((start, end)) = pending.pop() {
        if end - start == 1 {
            continue;
        }
        let mid = start + (end - start) / 2;
        for (a, b) in [(start, mid), (mid, end)] {
            match w.write(&events[a..b]).await {
                Ok(written) => {
                    wrote_any = true;
                    add(&mut outcome.written, &written);
                }
                Err(e) if is_unreachable(&e) => return Err(Unwritten::retry(e)),
                Err(e) if b - a == 1 => outcome.isolated.push(Isolated { index: a, error: e.to_string() }),
                Err(_) => pending.push((a, b)),
            }
        }
    }
    if !wrote_any {
        return Err(Unwritten { error: first, not_an_event: true });
    }
    outcome.isolated.sort_by_key(|i| i.index);
    Ok(outcome)
}

fn is_unreachable(e: &ChError) -> bool {
    matches!(e, ChError::Unreachable { .. })
}

fn add(total: &mut Written, part: &Written) {
    total.inserted += part.inserted;
    total.already_present += part.already_present;
    total.hourly_buckets += part.hourly_buckets;
    total.daily_buckets += part.daily_buckets;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_domain::event::UsageEvent;

    /// ClickHouse as a fake: refuses any write holding one of `refused`, or every write.
    struct Fake {
        refused: Vec<String>,
        refuse_all: bool,
        writes: usize,
    }

    impl Writes for Fake {
        async fn write(&mut self, events: &[Counted]) -> Result<Written, ChError> {
            self.writes += 1;
            if self.refuse_all || events.iter().any(|c| self.refused.contains(&c.event.id)) {
                return Err(ChError::Refused { code: Some(27), message: "Code: 27. Cannot parse input".to_string() });
            }
            Ok(Written { inserted: events.len(), ..Written::default() })
        }
    }

    fn events(n: usize) -> Vec<Counted> {
        let event = |i: usize| UsageEvent {
            id: format!("e{i}"),
            subject: "s".to_string(),
            time: chrono::Utc::now(),
            api_key_sha256: None,
            scope: String::new(),
            model: None,
            group: None,
            requests: 1,
            input_tokens: 0,
            output_tokens: 0,
            cached_tokens: 0,
            cost_micros: None,
            attributes: Default::default(),
            corrects: None,
        };
        (0..n).map(|i| Counted::new(event(i), String::new())).collect()
    }

    fn fake(refused: &[&str]) -> Fake {
        Fake { refused: refused.iter().map(|s| s.to_string()).collect(), refuse_all: false, writes: 0 }
    }

    #[tokio::test]
    async fn every_other_event_is_written_and_each_refused_one_isolated() {
        for (n, refused) in [(2, vec!["e0"]), (100, vec!["e37"]), (100, vec!["e0", "e99"]), (1000, vec!["e1", "e2", "e500"])] {
            let mut w = fake(&refused);
            let outcome = write_isolating(&mut w, &events(n)).await.unwrap();
            let isolated: Vec<String> = outcome.isolated.iter().map(|i| format!("e{}", i.index)).collect();
            assert_eq!(isolated, refused, "n {n}");
            assert_eq!(outcome.written.inserted, n - refused.len(), "n {n}");
            assert!(outcome.isolated[0].error.contains("Cannot parse input"));
        }
    }

    #[tokio::test]
    async fn a_failure_every_part_meets_isolates_nothing_and_blames_no_event() {
        let mut w = Fake { refuse_all: true, ..fake(&[]) };
        let unwritten = write_isolating(&mut w, &events(64)).await.unwrap_err();
        assert!(unwritten.not_an_event, "every part of the batch failed: ClickHouse's failure");
        let mut alone = fake(&["e0"]);
        let unwritten = write_isolating(&mut alone, &events(1)).await.unwrap_err();
        assert!(!unwritten.not_an_event, "alone in its batch, an event may be to blame: it waits for company");
        assert_eq!(alone.writes, 1);
    }

    #[tokio::test]
    async fn a_batch_that_writes_takes_one_write() {
        let mut w = fake(&[]);
        let outcome = write_isolating(&mut w, &events(500)).await.unwrap();
        assert_eq!((outcome.written.inserted, outcome.isolated.len(), w.writes), (500, 0, 1));
    }
}
