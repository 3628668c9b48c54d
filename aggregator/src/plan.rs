//! The pure part of a batch: parse, quarantine, dedupe within the batch, compute ledger deltas
//! and decide. No I/O here; [`crate::store`] applies a plan in one transaction.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Duration, Utc};
use serde::Serialize;
use tally_domain::decision::{quota_state, DecisionSnapshot, QuotaDecision};
use tally_domain::event::{parse_event, timeliness, Timeliness, UsageEvent};
use tally_domain::period::{PeriodSpec, Window};

use crate::policy::{Policy, Quota};

/// One message as consumed.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub partition: i32,
    pub offset: i64,
    pub payload: Option<Vec<u8>>,
}

/// A message refused by the aggregator, published to the quarantine topic with its reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Quarantined {
    pub reason: String,
    /// The event id when the message parsed far enough to have one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    pub partition: i32,
    pub offset: i64,
    /// The original bytes: as text when they are UTF-8, else hex (`original_encoding`).
    pub original: String,
    pub original_encoding: &'static str,
}

impl Quarantined {
    pub fn new(reason: impl Into<String>, event_id: Option<String>, d: &Delivery) -> Self {
        let bytes = d.payload.as_deref().unwrap_or_default();
        let (original, original_encoding) = match std::str::from_utf8(bytes) {
            Ok(text) => (text.to_string(), "utf8"),
            Err(_) => (bytes.iter().map(|b| format!("{b:02x}")).collect(), "hex"),
        };
        Quarantined { reason: reason.into(), event_id, partition: d.partition, offset: d.offset, original, original_encoding }
    }
}

/// An event that parsed, is on time and is the first with its id in this batch.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub event: UsageEvent,
    pub fingerprint: String,
    pub delivery: Delivery,
}

/// The outcome of parsing a batch.
#[derive(Debug, Default)]
pub struct Parsed {
    pub candidates: Vec<Candidate>,
    pub quarantined: Vec<Quarantined>,
    /// Exact redeliveries within this batch (same id and fingerprint), skipped.
    pub duplicates: usize,
}

/// Parses every delivery, quarantines what does not fit, and keeps the first event per id.
pub fn parse_batch(deliveries: &[Delivery], now: DateTime<Utc>, lateness: Duration) -> Parsed {
    let mut parsed = Parsed::default();
    let mut seen: HashMap<String, String> = HashMap::new();
    for d in deliveries {
        let event = match d.payload.as_deref().map(parse_event) {
            None => {
                parsed.quarantined.push(Quarantined::new("empty message", None, d));
                continue;
            }
            Some(Err(e)) => {
                parsed.quarantined.push(Quarantined::new(format!("invalid event: {e}"), None, d));
                continue;
            }
            Some(Ok(event)) => event,
        };
        match timeliness(event.time, now, lateness) {
            Timeliness::OnTime => {}
            Timeliness::TooLate => {
                let reason = format!("late: event time {} is older than the lateness window of {} days", event.time, lateness.num_days());
                parsed.quarantined.push(Quarantined::new(reason, Some(event.id), d));
                continue;
            }
            Timeliness::InFuture => {
                let reason = format!("future: event time {} is more than 5 minutes ahead", event.time);
                parsed.quarantined.push(Quarantined::new(reason, Some(event.id), d));
                continue;
            }
        }
        let fingerprint = event.fingerprint();
        match seen.get(&event.id) {
            Some(fp) if *fp == fingerprint => parsed.duplicates += 1,
            Some(_) => parsed.quarantined.push(conflict(&event.id, d)),
            None => {
                seen.insert(event.id.clone(), fingerprint.clone());
                parsed.candidates.push(Candidate { event, fingerprint, delivery: d.clone() });
            }
        }
    }
    parsed
}

/// The quarantine record for an id already seen with another payload.
pub fn conflict(id: &str, d: &Delivery) -> Quarantined {
    Quarantined::new(format!("conflict: event id {id:?} was already counted with a different payload"), Some(id.to_string()), d)
}

/// The key of one ledger row.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LedgerKey {
    pub subject: String,
    pub metric: String,
    /// `*` for a quota over all scopes.
    pub scope: String,
    pub period: String,
    pub period_start: DateTime<Utc>,
}

/// The summed change to one ledger row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerDelta {
    pub period_end: DateTime<Utc>,
    pub used: i64,
    pub quota: String,
    pub limit: i64,
}

/// The scope key of a quota: `*` when it counts every scope.
pub fn scope_key(scope: Option<&str>) -> String {
    scope.unwrap_or("*").to_string()
}

/// The ledger row an event at `at` counts in for `quota`: the period containing it, or for a
/// rolling window the one-second bucket containing it (a rolling quota's usage is the sum of
/// the buckets inside the window, so usage leaves the window to the second).
pub fn ledger_window(quota: &Quota, at: DateTime<Utc>, tz: chrono_tz::Tz) -> Window {
    match quota.period {
        PeriodSpec::Rolling { .. } => {
            let start = DateTime::from_timestamp(at.timestamp(), 0).unwrap_or(at);
            Window { start, end: start + Duration::seconds(1) }
        }
        _ => quota.window(at, tz),
    }
}

/// For a rolling quota, the number of days of its window.
pub fn rolling_days(quota: &Quota) -> Option<u32> {
    match quota.period {
        PeriodSpec::Rolling { days } => Some(days),
        _ => None,
    }
}

/// Sums, per ledger row, what the new events add. Each event counts in every quota of its
/// subject's effective tier (at the event's time) whose scope matches, in the period that
/// contains the event time.
pub fn ledger_deltas(events: &[&UsageEvent], policy: &Policy) -> BTreeMap<LedgerKey, LedgerDelta> {
    let mut deltas: BTreeMap<LedgerKey, LedgerDelta> = BTreeMap::new();
    for event in events {
        let resolved = policy.resolve(&event.subject, event.api_key_sha256.as_deref(), &event.scope, event.time);
        let amounts = event.amounts();
        for quota in resolved.quotas.iter().filter(|q| q.counts_scope(&event.scope)) {
            let window = ledger_window(quota, event.time, resolved.timezone);
            let key = LedgerKey {
                subject: event.subject.clone(),
                metric: quota.metric.as_str().to_string(),
                scope: scope_key(quota.scope.as_deref()),
                period: quota.period.to_string(),
                period_start: window.start,
            };
            let delta = deltas.entry(key).or_insert_with(|| LedgerDelta {
                period_end: window.end,
                used: 0,
                quota: quota.name.clone(),
                limit: quota.limit,
            });
            delta.used += amounts.get(quota.metric);
        }
    }
    deltas
}

/// The ledger rows a subject's decision at `now` reads: the current window of each quota.
/// For a rolling quota the key stands for every bucket after its `period_start` (the window
/// start) and the reset instant is filled in from the buckets by the caller.
pub fn current_keys(subject: &str, quotas: &[Quota], tz: chrono_tz::Tz, now: DateTime<Utc>) -> Vec<(LedgerKey, DateTime<Utc>)> {
    quotas
        .iter()
        .map(|q| {
            let w = q.window(now, tz);
            let key = LedgerKey {
                subject: subject.to_string(),
                metric: q.metric.as_str().to_string(),
                scope: scope_key(q.scope.as_deref()),
                period: q.period.to_string(),
                period_start: w.start,
            };
            (key, w.end)
        })
        .collect()
}

/// The decision lines for a subject given the usage of each current ledger row.
pub fn decide(quotas: &[Quota], keys: &[(LedgerKey, DateTime<Utc>)], used: &HashMap<LedgerKey, i64>) -> Vec<QuotaDecision> {
    quotas
        .iter()
        .zip(keys)
        .map(|(q, (key, resets_at))| {
            let used = used.get(key).copied().unwrap_or(0);
            QuotaDecision {
                quota: q.name.clone(),
                metric: q.metric,
                period: q.period.to_string(),
                scope: q.scope.clone(),
                state: quota_state(used, q.limit, q.burst, &q.thresholds),
                action: q.action.clone(),
                used,
                limit: q.limit,
                remaining: (q.limit.saturating_add(q.burst) - used).max(0),
                resets_at: *resets_at,
                fired: Vec::new(),
            }
        })
        .collect()
}

/// When a subject's decision must be looked at again with no new traffic: the end of the
/// current period of every quota that is not `ok` (its rollover may unblock), or the next
/// change of its overrides or assignments, whichever comes first.
pub fn next_check_at(quotas: &[QuotaDecision], policy_change: Option<DateTime<Utc>>) -> Option<DateTime<Utc>> {
    quotas
        .iter()
        .filter(|q| q.state != tally_domain::decision::QuotaState::Ok)
        .map(|q| q.resets_at)
        .chain(policy_change)
        .min()
}

/// Whether a new snapshot must be published: when a threshold fired, on the first decision, on any change of state,
/// action, limit, period or tier, and otherwise when usage changed and the last snapshot is
/// older than `refresh`.
pub fn should_publish(
    previous: Option<&DecisionSnapshot>,
    tier: &str,
    quotas: &[QuotaDecision],
    now: DateTime<Utc>,
    refresh: Duration,
) -> bool {
    let Some(prev) = previous else { return true };
    if quotas.iter().any(|q| !q.fired.is_empty()) {
        return true;
    }
    let shape = |q: &QuotaDecision| (q.quota.clone(), q.state, q.action.clone(), q.limit, q.resets_at);
    let changed_state = prev.tier != tier || prev.quotas.iter().map(shape).ne(quotas.iter().map(shape));
    let changed_usage = prev.quotas.iter().map(|q| q.used).ne(quotas.iter().map(|q| q.used));
    changed_state || (changed_usage && now - prev.calculated_at >= refresh)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn delivery(offset: i64, value: serde_json::Value) -> Delivery {
        Delivery { partition: 0, offset, payload: Some(serde_json::to_vec(&value).unwrap()) }
    }

    fn now() -> DateTime<Utc> {
        "2026-11-22T12:00:00Z".parse().unwrap()
    }

    #[test]
    fn a_rolling_quota_counts_in_one_second_buckets() {
        let policy = Policy::from_yaml(
            "default_tier: t\ntimezone: UTC\nquotas:\n  - {name: week, metric: output_tokens, period: rolling 7d, limit: 10}\ntiers:\n  - {name: t, priority: 0, rate_multiplier: 1}\n",
            "test",
        )
        .unwrap();
        let at: DateTime<Utc> = "2026-11-22T11:59:58.700Z".parse().unwrap();
        let e = tally_domain::event::event_from_value(json!({"id": "a", "subject": "s", "time": at.to_rfc3339(), "output_tokens": 4})).unwrap();
        let deltas = ledger_deltas(&[&e, &e], &policy);
        assert_eq!(deltas.len(), 1);
        let (key, delta) = deltas.iter().next().unwrap();
        assert_eq!(key.period_start, "2026-11-22T11:59:58Z".parse::<DateTime<Utc>>().unwrap());
        assert_eq!(key.period, "rolling 7d");
        assert_eq!((delta.used, delta.period_end - key.period_start), (8, Duration::seconds(1)));
    }

    #[test]
    fn duplicates_are_skipped_and_conflicts_quarantined_within_a_batch() {
        let e = json!({"id": "e1", "subject": "a", "time": "2026-11-22T11:00:00Z", "input_tokens": 5});
        let changed = json!({"id": "e1", "subject": "a", "time": "2026-11-22T11:00:00Z", "input_tokens": 6});
        let batch = [delivery(0, e.clone()), delivery(1, e), delivery(2, changed)];
        let parsed = parse_batch(&batch, now(), Duration::days(35));
        assert_eq!(parsed.candidates.len(), 1);
        assert_eq!(parsed.candidates[0].event.input_tokens, 5);
        assert_eq!(parsed.duplicates, 1);
        assert_eq!(parsed.quarantined.len(), 1);
        assert_eq!(parsed.quarantined[0].offset, 2);
        assert!(parsed.quarantined[0].reason.starts_with("conflict"));
    }

    #[test]
    fn poison_late_and_future_events_are_quarantined_with_reason_and_bytes() {
        let batch = [
            Delivery { partition: 1, offset: 7, payload: Some(b"{not json".to_vec()) },
            Delivery { partition: 1, offset: 8, payload: None },
            delivery(9, json!({"id": "old", "subject": "a", "time": "2026-09-01T00:00:00Z"})),
            delivery(10, json!({"id": "new", "subject": "a", "time": "2026-11-22T12:06:00Z"})),
            Delivery { partition: 1, offset: 11, payload: Some(vec![0xff, 0x00]) },
        ];
        let parsed = parse_batch(&batch, now(), Duration::days(35));
        assert!(parsed.candidates.is_empty());
        let reasons: Vec<&str> = parsed.quarantined.iter().map(|q| q.reason.as_str()).collect();
        assert!(reasons[0].starts_with("invalid event"), "{reasons:?}");
        assert_eq!(reasons[1], "empty message");
        assert!(reasons[2].starts_with("late"));
        assert!(reasons[3].starts_with("future"));
        assert_eq!(parsed.quarantined[0].original, "{not json");
        assert_eq!(parsed.quarantined[4].original, "ff00");
        assert_eq!(parsed.quarantined[4].original_encoding, "hex");
        assert_eq!(parsed.quarantined[2].event_id.as_deref(), Some("old"));
    }

    fn snapshot(quotas: Vec<QuotaDecision>, at: DateTime<Utc>) -> DecisionSnapshot {
        DecisionSnapshot { subject: "a".into(), allowed: true, version: 1, calculated_at: at, tier: "free".into(), quotas }
    }

    fn line(used: i64, limit: i64) -> QuotaDecision {
        QuotaDecision {
            quota: "q".into(),
            metric: tally_domain::metric::Metric::TotalTokens,
            period: "month".into(),
            scope: None,
            state: quota_state(used, limit, 0, &[80]),
            action: Default::default(),
            used,
            limit,
            remaining: (limit - used).max(0),
            resets_at: now(),
            fired: vec![],
        }
    }

    #[test]
    fn next_check_is_the_earliest_rollover_of_a_quota_that_is_not_ok_or_a_policy_change() {
        let mut breached = line(100, 100);
        breached.resets_at = now() + Duration::seconds(30);
        let ok = line(1, 100);
        assert_eq!(next_check_at(&[ok.clone()], None), None);
        assert_eq!(next_check_at(&[ok.clone(), breached.clone()], None), Some(now() + Duration::seconds(30)));
        assert_eq!(next_check_at(&[breached], Some(now() + Duration::seconds(5))), Some(now() + Duration::seconds(5)));
        assert_eq!(next_check_at(&[ok], Some(now())), Some(now()));
    }

    #[test]
    fn a_fired_threshold_is_always_published() {
        let prev = snapshot(vec![line(10, 100)], now());
        let mut fired = line(10, 100);
        fired.fired = vec![80];
        assert!(should_publish(Some(&prev), "free", &[fired], now(), Duration::seconds(60)));
    }

    #[test]
    fn publish_on_state_change_at_once_and_on_usage_change_after_refresh() {
        let refresh = Duration::seconds(1);
        let prev = snapshot(vec![line(10, 100)], now());
        let soon = now() + Duration::milliseconds(10);
        assert!(should_publish(None, "free", &[line(10, 100)], soon, refresh));
        assert!(!should_publish(Some(&prev), "free", &[line(20, 100)], soon, refresh));
        assert!(should_publish(Some(&prev), "free", &[line(80, 100)], soon, refresh), "warning crossed");
        assert!(should_publish(Some(&prev), "pro", &[line(10, 100)], soon, refresh), "tier changed");
        assert!(should_publish(Some(&prev), "free", &[line(20, 100)], now() + refresh, refresh));
        assert!(!should_publish(Some(&prev), "free", &[line(10, 100)], now() + refresh, refresh), "nothing changed");
    }
}
