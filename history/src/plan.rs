//! The pure part of a history batch: which messages the ledger has decided on yet, which
//! of those it counted, and what row a counted correction becomes. No I/O.
//!
//! # Corrections
//! A correction (`"corrects": "<id>"`) that the ledger counted reverted, once, exactly what
//! the named event (its target) added; one it refused was quarantined and its id removed from
//! `processed_events`, so "in `processed_events` with the same fingerprint" means counted for
//! corrections too. History writes a counted correction as one raw row that nets its target
//! out, so raw sums and rollups converge to the ledger:
//! - `event_id`, `fingerprint`: the correction's own;
//! - amounts: the target's amounts as the ledger recorded them, negated;
//! - `subject`, `time`, `scope`, `api_key_sha256`, `event_group`: the target's (the ledger
//!   reverts in the target's periods and scope, so the row lands in the target's buckets);
//! - `model`: the target's raw history row's model when that row exists (in this batch or
//!   already in ClickHouse), so the row nets out in the target's rollup key; else the
//!   correction's own `model`; else empty. (The dedupe record keeps the model only since
//!   budgets came, so the raw row is what older targets have.)
//! - `config_version`, `budgets`, `budget_ledgers`: the target's, from its dedupe record's
//!   version, model and group, which is what the ledger reverted ([`crate::budgets`]).
//!
//! A counted correction whose target row cannot be found (which the aggregator's transaction
//! rules out) is not written and is counted in [`Selection::orphan_corrections`]:
//! reconciliation then reports the drift.

use std::collections::{BTreeSet, HashMap, HashSet};

use chrono::{DateTime, NaiveDate, Utc};
use tally_domain::event::{event_day, parse_event, UsageEvent};
use tally_domain::metric::Amounts;

use crate::budgets::{Basis, Budgets};
use crate::sink::{Counted, EventKey};

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

/// The event a counted correction reverted, as the ledger recorded it in `processed_events`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reverted {
    pub event_id: String,
    pub subject: String,
    pub time: DateTime<Utc>,
    pub scope: String,
    pub api_key_sha256: Option<String>,
    pub amounts: Amounts,
    /// The configuration version it was counted under (0: the built-in default).
    pub config_version: i64,
    /// Its model and the group it named, as its dedupe record keeps them (`None` in a record
    /// made before they were kept).
    pub model: Option<String>,
    pub group: Option<String>,
}

/// What `processed_events` says about a counted id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ledgered {
    pub fingerprint: String,
    /// The cost the ledger counted: as sent, or priced from the model when the event had
    /// none. History stores this one, so it agrees with the ledger.
    pub cost_micros: Option<i64>,
    /// The configuration version it was counted under (0: the built-in default).
    pub config_version: i64,
    /// For a counted correction: the event it reverted (`corrected_by` = the correction).
    pub reverts: Option<Reverted>,
}

impl Ledgered {
    pub fn plain(fingerprint: impl Into<String>) -> Ledgered {
        Ledgered { fingerprint: fingerprint.into(), cost_micros: None, config_version: 0, reverts: None }
    }
}

/// The history row of a counted correction, as an event (see the module docs): the model is
/// the correction's own until [`resolve_models`] puts the target's in.
pub fn negated(correction: &UsageEvent, target: &Reverted) -> UsageEvent {
    let a = target.amounts;
    UsageEvent {
        id: correction.id.clone(),
        subject: target.subject.clone(),
        time: target.time,
        api_key_sha256: target.api_key_sha256.clone(),
        scope: target.scope.clone(),
        model: correction.model.clone(),
        group: target.group.clone(),
        requests: -a.requests,
        input_tokens: -a.input_tokens,
        output_tokens: -a.output_tokens,
        cached_tokens: -a.cached_tokens,
        cost_micros: Some(-a.cost_micros),
        attributes: correction.attributes.clone(),
        corrects: Some(target.event_id.clone()),
    }
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
    /// Counted corrections among `counted` (written as negated rows).
    pub corrections: usize,
    /// Counted corrections whose reverted event was not found: not written (see the module
    /// docs).
    pub orphan_corrections: usize,
}

/// The ids of the parsable events among `ready` and the UTC days of their times (to look up
/// in `processed_events`, whose partitions are by that day).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Lookup {
    pub ids: Vec<String>,
    pub days: Vec<NaiveDate>,
}

/// What to look up in `processed_events` for `ready` ([`Lookup`]).
pub fn candidate_ids(ready: &[Delivery]) -> Lookup {
    let (mut seen, mut days) = (HashSet::new(), BTreeSet::new());
    let mut lookup = Lookup::default();
    for e in ready.iter().filter_map(|d| parse_event(d.payload.as_deref()?).ok()) {
        days.insert(event_day(e.time));
        if seen.insert(e.id.clone()) {
            lookup.ids.push(e.id);
        }
    }
    lookup.days = days.into_iter().collect();
    lookup
}

/// How many parsable events among `ready` are of a day before `first_kept`: the ledger's
/// dedupe records of those days are gone, so whether it counted them cannot be known.
pub fn past_retention(ready: &[Delivery], first_kept: NaiveDate) -> usize {
    ready.iter().filter_map(|d| parse_event(d.payload.as_deref()?).ok()).filter(|e| event_day(e.time) < first_kept).count()
}

/// Keeps exactly the events the ledger counted: parsable, and with the very fingerprint
/// recorded in `processed_events` for their key (id and UTC day of the event time: the same id
/// on two days is two events). Counted corrections become their negated rows ([`negated`]).
pub fn select(ready: &[Delivery], counted: &HashMap<EventKey, Ledgered>) -> Selection {
    let mut s = Selection::default();
    let mut taken: HashSet<EventKey> = HashSet::new();
    for d in ready {
        let Some(event) = d.payload.as_deref().and_then(|p| parse_event(p).ok()) else {
            s.not_counted += 1;
            continue;
        };
        let fingerprint = event.fingerprint();
        let key = (event.id.clone(), event_day(event.time));
        let Some(ledgered) = counted.get(&key).filter(|l| l.fingerprint == fingerprint) else {
            s.not_counted += 1;
            continue;
        };
        if !taken.insert(key) {
            s.duplicates += 1;
            continue;
        }
        if event.corrects.is_none() {
            let mut event = event;
            if ledgered.cost_micros.is_some() {
                event.cost_micros = ledgered.cost_micros;
            }
            let mut counted = Counted::new(event, fingerprint);
            counted.basis.version = ledgered.config_version;
            s.counted.push(counted);
            continue;
        }
        match &ledgered.reverts {
            Some(target) => {
                s.corrections += 1;
                // Keyed by the correction's own day, as the ledger keyed it; the row sits at
                // the target's time, and its budgets are the target's as the ledger reverted
                // them.
                let basis = Basis { version: target.config_version, model: target.model.clone() };
                let day = event_day(event.time);
                s.counted.push(Counted { event: negated(&event, target), fingerprint, day, basis, budgets: Budgets::default() });
            }
            None => s.orphan_corrections += 1,
        }
    }
    s
}

/// The key of the event a correction's row reverts: its id, and the day of the row's time
/// (the target's time).
fn target_key(c: &Counted) -> Option<EventKey> {
    Some((c.event.corrects.clone()?, event_day(c.event.time)))
}

/// The reverted events of the corrections in `counted` whose raw row is not in this batch:
/// `(subject, time, id)` to look up in ClickHouse for their model.
pub fn targets_to_look_up(counted: &[Counted]) -> Vec<(String, DateTime<Utc>, String)> {
    let in_batch: HashSet<EventKey> = counted.iter().filter(|c| c.event.corrects.is_none()).map(Counted::key).collect();
    counted
        .iter()
        .filter(|c| target_key(c).is_some_and(|k| !in_batch.contains(&k)))
        .filter_map(|c| Some((c.event.subject.clone(), c.event.time, c.event.corrects.clone()?)))
        .collect()
}

/// Gives each correction row the model of its target's raw row: from this batch, else from
/// `stored` (target key -> model of its row already in ClickHouse); without either, the
/// correction keeps its own model.
pub fn resolve_models(counted: &mut [Counted], stored: &HashMap<EventKey, String>) {
    let in_batch: HashMap<EventKey, String> =
        counted.iter().filter(|c| c.event.corrects.is_none()).map(|c| (c.key(), c.event.model.clone().unwrap_or_default())).collect();
    for c in counted.iter_mut() {
        let Some(target) = target_key(c) else { continue };
        if let Some(model) = in_batch.get(&target).or_else(|| stored.get(&target)) {
            c.event.model = Some(model.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn d(partition: i32, offset: i64, v: serde_json::Value) -> Delivery {
        Delivery { partition, offset, payload: Some(serde_json::to_vec(&v).unwrap()) }
    }

    /// The key of an event of the tests' day.
    fn k(id: &str) -> EventKey {
        (id.to_string(), "2026-11-22".parse().unwrap())
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
        let lookup = candidate_ids(&ready);
        assert_eq!(lookup.ids, vec!["e1".to_string(), "late".to_string()]);
        assert_eq!(lookup.days, vec!["2026-11-22".parse::<NaiveDate>().unwrap()]);
        assert_eq!(past_retention(&ready, "2026-11-22".parse().unwrap()), 0);
        assert_eq!(past_retention(&ready, "2026-11-23".parse().unwrap()), 4);
        let s = select(&ready, &HashMap::from([(k("e1"), Ledgered::plain(fp))]));
        assert_eq!(s.counted.len(), 1);
        assert_eq!(s.counted[0].event.input_tokens, 5);
        assert_eq!(s.duplicates, 1);
        assert_eq!(s.not_counted, 4);
    }

    fn fp(v: &serde_json::Value) -> String {
        parse_event(&serde_json::to_vec(v).unwrap()).unwrap().fingerprint()
    }

    fn target(id: &str) -> Reverted {
        Reverted {
            event_id: id.to_string(),
            subject: "a".to_string(),
            time: "2026-11-22T09:30:00Z".parse().unwrap(),
            scope: "chat".to_string(),
            api_key_sha256: Some("k".to_string()),
            amounts: Amounts { requests: 1, input_tokens: 40, output_tokens: 2, cached_tokens: 3, cost_micros: 77 },
            config_version: 3,
            model: Some("big".to_string()),
            group: Some("eng".to_string()),
        }
    }

    #[test]
    fn a_counted_correction_becomes_the_negated_row_of_its_target() {
        let original =
            json!({"id": "t1", "subject": "a", "time": "2026-11-22T09:30:00Z", "scope": "chat", "input_tokens": 40, "model": "big"});
        let correction = json!({"id": "c1", "subject": "a", "time": "2026-11-22T10:00:00Z", "corrects": "t1", "model": "small"});
        let refused = json!({"id": "c2", "subject": "a", "time": "2026-11-22T10:00:00Z", "corrects": "t9"});
        let orphan = json!({"id": "c3", "subject": "a", "time": "2026-11-22T10:00:00Z", "corrects": "t8"});
        let ready = vec![
            d(0, 0, original.clone()),
            d(0, 1, correction.clone()),
            d(0, 2, correction.clone()),
            d(0, 3, refused),
            d(0, 4, orphan.clone()),
        ];
        let counted = HashMap::from([
            (k("t1"), Ledgered { config_version: 3, ..Ledgered::plain(fp(&original)) }),
            (k("c1"), Ledgered { fingerprint: fp(&correction), cost_micros: Some(0), config_version: 5, reverts: Some(target("t1")) }),
            (k("c3"), Ledgered::plain(fp(&orphan))),
        ]);
        let mut s = select(&ready, &counted);
        assert_eq!((s.counted.len(), s.corrections, s.duplicates, s.not_counted, s.orphan_corrections), (2, 1, 1, 1, 1));
        let row = &s.counted[1].event;
        assert_eq!(row.id, "c1");
        assert_eq!(s.counted[1].fingerprint, fp(&correction));
        assert_eq!(row.time, target("t1").time, "the row lands in the target's bucket");
        assert_eq!((row.scope.as_str(), row.api_key_sha256.as_deref()), ("chat", Some("k")));
        assert_eq!(row.amounts(), Amounts { requests: -1, input_tokens: -40, output_tokens: -2, cached_tokens: -3, cost_micros: -77 });
        assert_eq!(row.model.as_deref(), Some("small"), "the correction's own model until resolved");
        // Its budgets follow the target's record, as the ledger reverted it.
        assert_eq!(row.group.as_deref(), Some("eng"));
        assert_eq!(s.counted[1].basis, Basis { version: 3, model: Some("big".to_string()) });
        assert_eq!(s.counted[0].basis, Basis { version: 3, model: Some("big".to_string()) }, "a plain event: its record's version");
        // The target is in the batch: nothing to look up, and its model wins.
        assert!(targets_to_look_up(&s.counted).is_empty());
        resolve_models(&mut s.counted, &HashMap::new());
        assert_eq!(s.counted[1].event.model.as_deref(), Some("big"));
    }

    #[test]
    fn a_correction_takes_the_stored_row_model_else_its_own() {
        let correction = json!({"id": "c1", "subject": "a", "time": "2026-11-22T10:00:00Z", "corrects": "t1", "model": "small"});
        let counted = HashMap::from([(
            k("c1"),
            Ledgered { fingerprint: fp(&correction), cost_micros: Some(0), config_version: 5, reverts: Some(target("t1")) },
        )]);
        let mut s = select(&[d(0, 0, correction.clone())], &counted);
        assert_eq!(targets_to_look_up(&s.counted), vec![("a".to_string(), target("t1").time, "t1".to_string())]);
        resolve_models(&mut s.counted, &HashMap::from([(k("t1"), String::new())]));
        assert_eq!(s.counted[0].event.model.as_deref(), Some(""), "a stored row without a model still wins");
        let mut s = select(&[d(0, 0, correction)], &counted);
        resolve_models(&mut s.counted, &HashMap::from([(k("other"), "big".to_string())]));
        assert_eq!(s.counted[0].event.model.as_deref(), Some("small"));
    }

    #[test]
    fn the_same_id_on_two_utc_days_is_two_events() {
        let day1 = json!({"id": "e1", "subject": "a", "time": "2026-11-22T23:59:59.999Z", "input_tokens": 5});
        let day2 = json!({"id": "e1", "subject": "a", "time": "2026-11-23T00:00:00Z", "input_tokens": 7});
        let ready = vec![d(0, 0, day1.clone()), d(0, 1, day2.clone()), d(0, 2, day2.clone())];
        let lookup = candidate_ids(&ready);
        assert_eq!(lookup.ids, vec!["e1".to_string()]);
        assert_eq!(lookup.days.len(), 2);
        let counted = HashMap::from([
            (k("e1"), Ledgered::plain(fp(&day1))),
            (("e1".to_string(), "2026-11-23".parse().unwrap()), Ledgered::plain(fp(&day2))),
        ]);
        let s = select(&ready, &counted);
        assert_eq!((s.counted.len(), s.duplicates, s.not_counted), (2, 1, 0));
        let keys: Vec<EventKey> = s.counted.iter().map(Counted::key).collect();
        assert_eq!(keys, vec![k("e1"), ("e1".to_string(), "2026-11-23".parse().unwrap())]);
        assert_eq!(s.counted[1].event.input_tokens, 7);
        // Counted on one day only: the other day's event is not history's.
        let s = select(&ready, &HashMap::from([(k("e1"), Ledgered::plain(fp(&day1)))]));
        assert_eq!((s.counted.len(), s.not_counted), (1, 2));
    }
}
