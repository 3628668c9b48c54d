//! The pure part of a history batch: which messages the ledger has decided on yet, and which
//! of those it counted. No I/O.

use std::collections::{HashMap, HashSet};

use tally_domain::event::parse_event;

use crate::sink::Counted;

/// One message as consumed.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub partition: i32,
    pub offset: i64,
    pub payload: Option<Vec<u8>>,
}

/// The deliveries of a batch split at the ledger's progress: `ready` are below the ledger's
/// stored offset of their partition (the ledger has decided on them), `held` gives, per
/// partition, the first offset the ledger has not reached yet.
#[derive(Debug, Default)]
pub struct Gate {
    pub ready: Vec<Delivery>,
    pub held: HashMap<i32, i64>,
}

/// Splits `deliveries` (in order per partition) at `ledger_next` (the ledger's next offset
/// per partition; a partition the ledger has not claimed yet holds everything).
pub fn gate(deliveries: Vec<Delivery>, ledger_next: &HashMap<i32, i64>) -> Gate {
    let mut g = Gate::default();
    for d in deliveries {
        let next = ledger_next.get(&d.partition).copied().unwrap_or(0);
        if d.offset < next && !g.held.contains_key(&d.partition) {
            g.ready.push(d);
        } else {
            g.held.entry(d.partition).or_insert(d.offset);
        }
    }
    g
}

/// What became of the ready messages of a batch.
#[derive(Debug, Default)]
pub struct Selection {
    /// Events the ledger counted, one per id, in delivery order.
    pub counted: Vec<Counted>,
    /// Messages the ledger did not count: unparsable, quarantined (late, future, conflict,
    /// corrections not supported) or a redelivery with another payload.
    pub not_counted: usize,
    /// Redeliveries of an id already in this batch.
    pub duplicates: usize,
}

/// The ids of the parsable events among `ready` (to look up in `processed_events`).
pub fn candidate_ids(ready: &[Delivery]) -> Vec<String> {
    let mut seen = HashSet::new();
    ready
        .iter()
        .filter_map(|d| parse_event(d.payload.as_deref()?).ok())
        .map(|e| e.id)
        .filter(|id| seen.insert(id.clone()))
        .collect()
}

/// Keeps exactly the events the ledger counted: parsable, and with the very fingerprint
/// recorded in `processed_events` for their id (`counted`: id -> fingerprint).
pub fn select(ready: &[Delivery], counted: &HashMap<String, String>) -> Selection {
    let mut s = Selection::default();
    let mut taken: HashSet<String> = HashSet::new();
    for d in ready {
        let Some(event) = d.payload.as_deref().and_then(|p| parse_event(p).ok()) else {
            s.not_counted += 1;
            continue;
        };
        let fingerprint = event.fingerprint();
        if counted.get(&event.id) != Some(&fingerprint) {
            s.not_counted += 1;
            continue;
        }
        if !taken.insert(event.id.clone()) {
            s.duplicates += 1;
            continue;
        }
        s.counted.push(Counted { event, fingerprint });
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn d(partition: i32, offset: i64, v: serde_json::Value) -> Delivery {
        Delivery { partition, offset, payload: Some(serde_json::to_vec(&v).unwrap()) }
    }

    fn ev(id: &str, tokens: i64) -> serde_json::Value {
        json!({"id": id, "subject": "a", "time": "2026-11-22T10:00:00Z", "input_tokens": tokens})
    }

    #[test]
    fn the_gate_holds_what_the_ledger_has_not_reached() {
        let batch = vec![d(0, 5, ev("a", 1)), d(0, 6, ev("b", 1)), d(1, 0, ev("c", 1)), d(0, 7, ev("d", 1))];
        let g = gate(batch, &HashMap::from([(0, 7)]));
        assert_eq!(g.ready.iter().map(|d| (d.partition, d.offset)).collect::<Vec<_>>(), vec![(0, 5), (0, 6)]);
        assert_eq!(g.held, HashMap::from([(0, 7), (1, 0)]));
    }

    #[test]
    fn only_events_counted_with_their_fingerprint_are_kept() {
        let first = ev("e1", 5);
        let conflicting = ev("e1", 6);
        let fp = tally_domain::event::parse_event(&serde_json::to_vec(&first).unwrap()).unwrap().fingerprint();
        let ready = vec![
            d(0, 0, first.clone()),
            d(0, 1, conflicting),
            d(0, 2, first),
            d(0, 3, ev("late", 1)),
            Delivery { partition: 0, offset: 4, payload: Some(b"not json".to_vec()) },
            Delivery { partition: 0, offset: 5, payload: None },
        ];
        assert_eq!(candidate_ids(&ready), vec!["e1".to_string(), "late".to_string()]);
        let s = select(&ready, &HashMap::from([("e1".to_string(), fp)]));
        assert_eq!(s.counted.len(), 1);
        assert_eq!(s.counted[0].event.input_tokens, 5);
        assert_eq!(s.duplicates, 1);
        assert_eq!(s.not_counted, 4);
    }
}
