//! The pure part of a batch: parse, quarantine, dedupe within the batch, compute ledger deltas
//! and decide. No I/O here; [`crate::store`] applies a plan in one transaction.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};

// The batch's hot maps hash with foldhash (randomly seeded): their keys come from the
// batch, not from a caller who could choose them to collide, and SipHash's extra cost is
// paid on every event (DESIGN.md beside this file).
use foldhash::{HashMap, HashMapExt};

use chrono::{DateTime, Duration, NaiveDate, Utc};
use serde::Serialize;
use tally_domain::budget::EventFacts;
use tally_domain::decision::QuotaDecision;
use tally_domain::event::{event_day, parse_event_with_fingerprint, timeliness, EventErrorKind, Timeliness, UsageEvent};
use tally_domain::period::{PeriodSpec, Window};

use crate::dedupe::DedupeKey;
use crate::keys::Fnv1a;
use crate::policy::{BudgetTarget, Policy, Quota, Resolved};
use crate::quarantine::{QuarantineReason, Reason};

/// One message as consumed.
#[derive(Debug, Clone, Default)]
pub struct Delivery {
    pub partition: i32,
    pub offset: i64,
    pub payload: Option<Vec<u8>>,
    /// The payload parsed when it was received ([`Delivery::received`]), taken by the first
    /// [`parse_batch`] of its batch; `None` is parsed then (a retry parses again). Boxed: a
    /// lane's buffer keeps its capacity, and a parsed event is several times the size of
    /// the rest of a delivery.
    pub parsed: Option<Box<ParseResult>>,
    /// Decided already by a fast commit ([`crate::headroom`]): counted, or skipped as a
    /// duplicate, or quarantined. Its batch only moves the cursor past it.
    pub decided_early: bool,
    /// Found to fail its batch's transaction on its own ([`crate::isolate`]): its batch
    /// quarantines it with this refusal instead of counting it.
    pub isolated: Option<Refusal>,
}

/// A payload parsed: the event and its fingerprint, or why it goes to quarantine.
pub type ParseResult = Result<(UsageEvent, String), Refusal>;

/// Why a message goes to quarantine: its [`Reason`] (see [`crate::quarantine`]) and, where
/// there is more to say, a `detail`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: Reason,
    pub detail: Option<String>,
}

impl Refusal {
    pub fn new(reason: impl Into<Reason>) -> Self {
        Refusal { reason: reason.into(), detail: None }
    }

    /// An amount past [`tally_domain::metric::MAX_AMOUNT`], or a sum of amounts past a
    /// ledger's bound: counting it would overflow.
    pub fn overflow(detail: impl Into<String>) -> Self {
        Refusal { reason: QuarantineReason::Overflow.into(), detail: Some(detail.into()) }
    }

    /// An event that fails its batch's transaction on its own ([`crate::isolate`]).
    pub fn unprocessable(detail: impl Into<String>) -> Self {
        Refusal { reason: QuarantineReason::Unprocessable.into(), detail: Some(detail.into()) }
    }
}

impl Delivery {
    /// A delivery as received, its payload parsed at once: the loop reads the event's
    /// amounts on arrival ([`crate::headroom`]), and its batch does not parse it again.
    pub fn received(partition: i32, offset: i64, payload: Option<Vec<u8>>) -> Self {
        let parsed = Some(Box::new(parse_payload(payload.as_deref())));
        Delivery { partition, offset, payload, parsed, decided_early: false, isolated: None }
    }

    /// The event, when the payload parsed (and was parsed on receipt).
    pub fn event(&self) -> Option<&UsageEvent> {
        self.parsed.as_deref().and_then(|p| p.as_ref().ok()).map(|(e, _)| e)
    }
}

fn parse_payload(payload: Option<&[u8]>) -> ParseResult {
    match payload.map(parse_event_with_fingerprint) {
        None => Err(Refusal::new(QuarantineReason::EmptyMessage)),
        Some(Err(e)) if e.kind == EventErrorKind::OutOfRange => Err(Refusal::overflow(e.to_string())),
        Some(Err(e)) => Err(Refusal::new(Reason::with_words(QuarantineReason::InvalidEvent, e.to_string()))),
        Some(Ok(parsed)) => Ok(parsed),
    }
}

/// A message refused by the aggregator, published to the quarantine topic with its reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Quarantined {
    pub reason: Reason,
    /// More about the reason, where there is more to say (which amount overflowed, the
    /// database's refusal of an isolated event).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
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
    pub fn new(reason: impl Into<Reason>, event_id: Option<String>, d: &Delivery) -> Self {
        let bytes = d.payload.as_deref().unwrap_or_default();
        let (original, original_encoding) = match std::str::from_utf8(bytes) {
            Ok(text) => (text.to_string(), "utf8"),
            Err(_) => (bytes.iter().map(|b| format!("{b:02x}")).collect(), "hex"),
        };
        Quarantined { reason: reason.into(), detail: None, event_id, partition: d.partition, offset: d.offset, original, original_encoding }
    }

    /// The quarantine record of a refusal.
    pub fn refused(refusal: Refusal, event_id: Option<String>, d: &Delivery) -> Self {
        Quarantined { detail: refusal.detail, ..Quarantined::new(refusal.reason, event_id, d) }
    }
}

/// An event that parsed, is on time and is the first with its id in this batch.
#[derive(Debug, Clone)]
pub struct Candidate<'a> {
    pub event: UsageEvent,
    pub fingerprint: String,
    /// The UTC day of the event time, which keys its dedupe record with the id
    /// ([`tally_domain::event::event_day`]).
    pub day: NaiveDate,
    pub delivery: &'a Delivery,
}

/// The outcome of parsing a batch.
#[derive(Debug, Default)]
pub struct Parsed<'a> {
    pub candidates: Vec<Candidate<'a>>,
    pub quarantined: Vec<Quarantined>,
    /// Exact redeliveries within this batch (same id and fingerprint), skipped.
    pub duplicates: usize,
}

/// Parses every delivery (or takes what was parsed on receipt), quarantines what does not
/// fit, and keeps the first event per id. Deliveries decided early are left out.
pub fn parse_batch(deliveries: &mut [Delivery], now: DateTime<Utc>, lateness: Duration) -> Parsed<'_> {
    // Boxed as taken: a vector of unboxed results would be megabytes per batch.
    let results: Vec<Option<Box<ParseResult>>> = deliveries
        .iter_mut()
        .map(|d| (!d.decided_early).then(|| d.parsed.take().unwrap_or_else(|| Box::new(parse_payload(d.payload.as_deref())))))
        .collect();
    let deliveries = &*deliveries;
    let mut parsed = Parsed { candidates: Vec::with_capacity(deliveries.len()), ..Parsed::default() };
    // Dedupe key (event id and day) -> its candidate's index.
    let mut first_with_id: HashMap<DedupeKey, usize> = HashMap::with_capacity(deliveries.len());
    for (d, result) in deliveries.iter().zip(results) {
        let (event, fingerprint) = match result.map(|r| *r) {
            None => continue,
            Some(Err(refusal)) => {
                parsed.quarantined.push(Quarantined::refused(refusal, None, d));
                continue;
            }
            Some(Ok((event, fingerprint))) => match &d.isolated {
                Some(refusal) => {
                    parsed.quarantined.push(Quarantined::refused(refusal.clone(), Some(event.id), d));
                    continue;
                }
                None => (event, fingerprint),
            },
        };
        match timeliness(event.time, now, lateness) {
            Timeliness::OnTime => {}
            Timeliness::TooLate => {
                let words = format!("event time {} is older than the lateness window of {} days", event.time, lateness.num_days());
                let reason = Reason::with_words(QuarantineReason::Late, words);
                parsed.quarantined.push(Quarantined::new(reason, Some(event.id), d));
                continue;
            }
            Timeliness::InFuture => {
                let reason =
                    Reason::with_words(QuarantineReason::Future, format!("event time {} is more than 5 minutes ahead", event.time));
                parsed.quarantined.push(Quarantined::new(reason, Some(event.id), d));
                continue;
            }
        }
        let key = DedupeKey { id: event.id.clone(), day: event_day(event.time) };
        match first_with_id.get(&key).copied() {
            Some(i) if parsed.candidates[i].fingerprint == fingerprint => parsed.duplicates += 1,
            Some(_) => parsed.quarantined.push(conflict(&event.id, d)),
            None => {
                let day = key.day;
                first_with_id.insert(key, parsed.candidates.len());
                parsed.candidates.push(Candidate { event, fingerprint, day, delivery: d });
            }
        }
    }
    parsed
}

/// The quarantine record for an id already seen with another payload.
pub fn conflict(id: &str, d: &Delivery) -> Quarantined {
    let words = format!("event id {id:?} was already counted with a different payload");
    Quarantined::new(Reason::with_words(QuarantineReason::Conflict, words), Some(id.to_string()), d)
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

/// The ledger row an event at `at` counts in for `quota`: the period containing it, or for a
/// rolling window of `N` days the `N`-minute bucket containing it
/// ([`tally_domain::period::rolling_bucket`]; a rolling quota's usage is the sum of the
/// buckets that have not left the window, so a key has at most 1441 of them).
pub fn ledger_window(quota: &Quota, at: DateTime<Utc>, tz: chrono_tz::Tz) -> Window {
    match quota.period {
        PeriodSpec::Rolling { days } => tally_domain::period::rolling_bucket(at, days),
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
/// subject's effective tier (at the event's time), and of every budget it meets
/// ([`tally_domain::budget::event_budgets`]), whose scope and models match, in the period that
/// contains the event time.
///
/// A batch holds many events of one subject, so resolutions are reused (see
/// [`Resolutions`]), and each resolution keeps a running sum per quota for the window its
/// recent events fell in, next to the resolution itself: an event adds to it without a
/// lookup in a map of every row of the batch (which, with tens of thousands of rows, missed
/// the cache on most events). The ledger keys are built once per row at the end, sorted,
/// and rows that several resolutions or windows share are merged.
pub fn ledger_deltas(events: &[&UsageEvent], policy: &Policy) -> BTreeMap<LedgerKey, LedgerDelta> {
    let mut resolutions = Resolutions::new(policy);
    // Running sums a resolution closed because a later event fell in another window.
    let mut closed: Vec<(usize, usize, RunningSum)> = Vec::new();
    for event in events {
        let at = event.time;
        let request = Request::of(event);
        let r = resolutions.index_at(&request, at);
        let amounts = event.amounts();
        let CachedResolution { subject, resolved, budgets, sums, shares_row, .. } = &mut resolutions.entries[r];
        for (q, (target, quota)) in counted(subject, resolved, budgets).enumerate() {
            if shares_row[q] || !quota.counts(&event.scope, event.model.as_deref()) {
                continue;
            }
            let running = match &mut sums[q] {
                Some(running) if running.window.contains(at) => running,
                slot => {
                    let fresh = RunningSum { window: ledger_window(quota, at, target.timezone), used: 0, latest: at };
                    if let Some(done) = slot.replace(fresh) {
                        closed.push((r, q, done));
                    }
                    slot.as_mut().expect("just set")
                }
            };
            // Saturating: a sum past the ledger bound is refused by the ledger's check.
            running.used = running.used.saturating_add(amounts.get(quota.metric));
            running.latest = running.latest.max(at);
        }
    }
    let mut sums = closed;
    for (r, entry) in resolutions.entries.iter_mut().enumerate() {
        sums.extend(entry.sums.iter_mut().enumerate().filter_map(|(q, open)| Some((r, q, open.take()?))));
    }
    merge_rows(&resolutions, sums)
}

/// One ledger row per key from the running sums: amounts added up. A row's quota name and
/// limit are those in force at its latest event; a tie (two resolutions or quotas of one row
/// with events at the same instant) goes to the later resolution and quota, so the result
/// does not depend on the order of `sums`.
fn merge_rows(resolutions: &Resolutions<'_>, sums: Vec<(usize, usize, RunningSum)>) -> BTreeMap<LedgerKey, LedgerDelta> {
    // The rank of a row's quota: (latest event, resolution, quota), the highest wins.
    type Ranked = (LedgerKey, LedgerDelta, (DateTime<Utc>, usize, usize));
    let mut rows: Vec<Ranked> = sums
        .into_iter()
        .map(|(r, q, sum)| {
            let (target, quota) = resolutions.entries[r].counted().nth(q).expect("a sum is of a counted quota");
            let key = LedgerKey {
                subject: target.subject.to_string(),
                metric: quota.metric.as_str().to_string(),
                scope: quota.ledger_scope(),
                period: quota.period.to_string(),
                period_start: sum.window.start,
            };
            let delta = LedgerDelta { period_end: sum.window.end, used: sum.used, quota: quota.name.clone(), limit: quota.limit };
            (key, delta, (sum.latest, r, q))
        })
        .collect();
    rows.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    // Merged in place: each run of equal keys folds into its first row.
    rows.dedup_by(|(key, delta, rank), (kept_key, kept, kept_rank)| {
        if key != kept_key {
            return false;
        }
        kept.used = kept.used.saturating_add(delta.used);
        if *rank > *kept_rank {
            (kept.quota, kept.limit, *kept_rank) = (std::mem::take(&mut delta.quota), delta.limit, *rank);
        }
        true
    });
    rows.into_iter().map(|(key, delta, _)| (key, delta)).collect()
}

/// The amount one resolution's events added to one quota's window so far.
#[derive(Debug, Clone, Copy)]
pub struct RunningSum {
    window: Window,
    used: i64,
    /// The latest event time in it.
    latest: DateTime<Utc>,
}

/// What resolves an event's quotas: who, with which key and group, in which scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Request<'a> {
    pub subject: &'a str,
    pub api_key: Option<&'a str>,
    pub scope: &'a str,
    /// The group the event names.
    pub group: Option<&'a str>,
}

impl<'a> Request<'a> {
    pub fn of(event: &'a UsageEvent) -> Self {
        Request { subject: &event.subject, api_key: event.api_key_sha256.as_deref(), scope: &event.scope, group: event.group.as_deref() }
    }

    /// A request of `subject` with `api_key` in the default scope, naming no group.
    pub fn plain(subject: &'a str, api_key: Option<&'a str>) -> Self {
        Request { subject, api_key, scope: "", group: None }
    }
}

/// Resolutions of a [`Request`] reused across a batch. A resolution holds from the instant
/// it was made until the subject's next override or assignment change
/// ([`Policy::next_change_after`]); an event outside that span is resolved again.
pub struct Resolutions<'a> {
    policy: &'a Policy,
    index: HashMap<Request<'a>, usize>,
    pub entries: Vec<CachedResolution<'a>>,
}

pub struct CachedResolution<'a> {
    pub subject: &'a str,
    pub resolved: Resolved,
    /// The budgets the request meets besides the subject's own quotas.
    pub budgets: Vec<std::sync::Arc<BudgetTarget>>,
    /// Per quota of [`CachedResolution::counted`], the running sum of the window its latest
    /// events fell in.
    pub sums: Vec<Option<RunningSum>>,
    /// Per quota of [`CachedResolution::counted`], whether an earlier one counts in the same
    /// ledger rows (same owner, metric, scope key and period: a soft and a hard cap of one
    /// budget, say): an event adds to such rows once, through the first.
    shares_row: Vec<bool>,
    from: DateTime<Utc>,
    until: Option<DateTime<Utc>>,
}

/// Whose ledger a quota counts in: the subject's own or a budget's, and in which timezone.
#[derive(Debug, Clone, Copy)]
pub struct Counted<'r> {
    pub subject: &'r str,
    pub timezone: chrono_tz::Tz,
}

impl CachedResolution<'_> {
    /// Every quota the request counts in, with whose ledger: the subject's own quotas, then
    /// each budget's. [`CachedResolution::sums`] follows this order.
    pub fn counted(&self) -> impl Iterator<Item = (Counted<'_>, &Quota)> {
        counted(self.subject, &self.resolved, &self.budgets)
    }
}

/// For each of `quotas`, whether an earlier one counts in the same ledger rows (same owner,
/// metric, scope, models and period). Compared in place: a resolution has a handful of
/// quotas, and a batch makes thousands of resolutions.
fn rows_shared<'q>(quotas: impl Iterator<Item = (Counted<'q>, &'q Quota)>) -> Vec<bool> {
    let quotas: Vec<(Counted<'q>, &'q Quota)> = quotas.collect();
    let same_rows = |(a, p): &(Counted<'q>, &Quota), (b, q): &(Counted<'q>, &Quota)| {
        a.subject == b.subject && p.metric == q.metric && p.scope == q.scope && p.models == q.models && p.period == q.period
    };
    quotas.iter().enumerate().map(|(i, this)| quotas[..i].iter().any(|earlier| same_rows(earlier, this))).collect()
}

/// [`CachedResolution::counted`] of its parts, so its sums can be borrowed beside it.
fn counted<'r>(
    subject: &'r str,
    resolved: &'r Resolved,
    budgets: &'r [std::sync::Arc<BudgetTarget>],
) -> impl Iterator<Item = (Counted<'r>, &'r Quota)> {
    let own = Counted { subject, timezone: resolved.timezone };
    let own = resolved.quotas.iter().map(move |q| (own, q));
    let budgets = budgets.iter().flat_map(|b| {
        let target = Counted { subject: b.subject.as_str(), timezone: b.timezone };
        b.quotas.iter().map(move |q| (target, q))
    });
    own.chain(budgets)
}

impl<'a> Resolutions<'a> {
    pub fn new(policy: &'a Policy) -> Self {
        Resolutions { policy, index: HashMap::new(), entries: Vec::new() }
    }

    /// The index in `entries` of the resolution of `request` in force at `at`.
    pub fn index_at(&mut self, request: &Request<'a>, at: DateTime<Utc>) -> usize {
        if let Some(&i) = self.index.get(request) {
            let e = &self.entries[i];
            if e.from <= at && e.until.is_none_or(|u| at < u) {
                return i;
            }
        }
        let resolved = self.policy.resolve(request.subject, request.api_key, request.scope, at);
        let facts = EventFacts { subject: request.subject, api_key_sha256: request.api_key, group: request.group };
        let budgets = self.policy.budgets_met(&facts, &resolved.tier);
        let shares_row = rows_shared(counted(request.subject, &resolved, &budgets));
        let sums = vec![None; shares_row.len()];
        let until = self.policy.next_change_after(request.subject, at);
        self.entries.push(CachedResolution { subject: request.subject, resolved, budgets, sums, shares_row, from: at, until });
        let i = self.entries.len() - 1;
        self.index.insert(*request, i);
        i
    }
}

/// The ledger rows a subject's decision at `now` reads: the current window of each quota.
/// For a rolling quota the key stands for every bucket that ends after its `period_start`
/// (the window start) and the reset instant is filled in from the buckets by the caller.
pub fn current_keys(subject: &str, quotas: &[Quota], tz: chrono_tz::Tz, now: DateTime<Utc>) -> Vec<(LedgerKey, DateTime<Utc>)> {
    quotas
        .iter()
        .map(|q| {
            let w = q.window(now, tz);
            let key = LedgerKey {
                subject: subject.to_string(),
                metric: q.metric.as_str().to_string(),
                scope: q.ledger_scope(),
                period: q.period.to_string(),
                period_start: w.start,
            };
            (key, w.end)
        })
        .collect()
}

/// The decision lines for a subject given the usage of each current ledger row (0 for a row
/// that does not exist).
pub fn decide(quotas: &[Quota], keys: &[(LedgerKey, DateTime<Utc>)], used: impl Fn(&LedgerKey) -> i64) -> Vec<QuotaDecision> {
    quotas.iter().zip(keys).map(|(q, (key, resets_at))| q.decision_line(used(key), *resets_at)).collect()
}

/// When a subject's decision must be looked at again with no new traffic: the end of the
/// current period of every quota that is not `ok` (its rollover may unblock), or the next
/// change of its overrides or assignments, whichever comes first.
pub fn next_check_at(quotas: &[QuotaDecision], policy_change: Option<DateTime<Utc>>) -> Option<DateTime<Utc>> {
    quotas.iter().filter(|q| q.state != tally_domain::decision::QuotaState::Ok).map(|q| q.resets_at).chain(policy_change).min()
}

/// What the aggregator keeps of a subject's last published snapshot (in `decisions`): enough
/// to tell whether a new decision differs from it, without reading or parsing the snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// Digest of the tier and of each line's quota, state, action, limit and reset instant.
    pub shape: i64,
    /// Digest of each line's usage.
    pub usage: i64,
    pub calculated_at: DateTime<Utc>,
}

impl Published {
    /// The digests of a decision. A 64-bit digest could collide, missing a change with odds
    /// of 2^-64 per decision; a digest computed differently by another build only causes one
    /// extra publication.
    pub fn of(tier: &str, quotas: &[QuotaDecision], calculated_at: DateTime<Utc>) -> Published {
        let mut shape = Fnv1a::default();
        tier.hash(&mut shape);
        let mut usage = Fnv1a::default();
        for q in quotas {
            (&q.quota, q.state, &q.action, q.limit, q.resets_at).hash(&mut shape);
            q.used.hash(&mut usage);
        }
        Published { shape: shape.finish() as i64, usage: usage.finish() as i64, calculated_at }
    }
}

/// Whether a new snapshot must be published: when a threshold fired, on the first decision,
/// on any change of state, action, limit, reset instant or tier, and otherwise when usage
/// changed and the last snapshot is older than `refresh`.
pub fn should_publish(previous: Option<&Published>, current: &Published, quotas: &[QuotaDecision], refresh: Duration) -> bool {
    let Some(prev) = previous else { return true };
    if quotas.iter().any(|q| !q.fired.is_empty()) {
        return true;
    }
    let changed_usage = prev.usage != current.usage;
    prev.shape != current.shape || (changed_usage && current.calculated_at - prev.calculated_at >= refresh)
}

/// When a subject whose usage changed, but whose snapshot was kept back by the refresh
/// interval, is due for a fresh snapshot: `refresh` after the last one. `None` when its usage
/// did not change.
pub fn refresh_due_at(previous: &Published, current: &Published, refresh: Duration) -> Option<DateTime<Utc>> {
    (previous.usage != current.usage).then(|| previous.calculated_at + refresh)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn delivery(offset: i64, value: serde_json::Value) -> Delivery {
        Delivery { partition: 0, offset, payload: Some(serde_json::to_vec(&value).unwrap()), ..Delivery::default() }
    }

    fn now() -> DateTime<Utc> {
        "2026-11-22T12:00:00Z".parse().unwrap()
    }

    #[test]
    fn a_rolling_quota_counts_in_buckets_of_n_minutes_for_n_days() {
        let policy = Policy::from_yaml(
            "default_tier: t\ntimezone: UTC\nquotas:\n  - {name: month, metric: output_tokens, period: rolling 30d, limit: 10}\ntiers:\n  - {name: t, priority: 0, rate_multiplier: 1}\n",
            "test",
        )
        .unwrap();
        let event = |id: &str, at: &str| {
            tally_domain::event::event_from_value(json!({"id": id, "subject": "s", "time": at, "output_tokens": 4})).unwrap()
        };
        // Two events 20 minutes apart share a 30-minute bucket; the third starts the next.
        let (a, b, c) = (event("a", "2026-11-22T11:00:00Z"), event("b", "2026-11-22T11:20:58.700Z"), event("c", "2026-11-22T11:30:00Z"));
        let deltas: Vec<_> = ledger_deltas(&[&a, &b, &c], &policy).into_iter().collect();
        let rows: Vec<_> =
            deltas.iter().map(|(k, d)| (k.period.as_str(), k.period_start.to_rfc3339(), d.period_end.to_rfc3339(), d.used)).collect();
        assert_eq!(
            rows,
            [
                ("rolling 30d", "2026-11-22T11:00:00+00:00".to_string(), "2026-11-22T11:30:00+00:00".to_string(), 8),
                ("rolling 30d", "2026-11-22T11:30:00+00:00".to_string(), "2026-11-22T12:00:00+00:00".to_string(), 4),
            ]
        );
    }

    #[test]
    fn events_out_of_time_order_across_a_period_boundary_add_to_each_period_once() {
        let policy = Policy::from_yaml(
            "default_tier: t\ntimezone: UTC\nquotas:\n  - {name: daily, metric: input_tokens, period: day, limit: 100}\n\
             tiers:\n  - {name: t, priority: 0, rate_multiplier: 1}\n",
            "test",
        )
        .unwrap();
        let event = |id: &str, subject: &str, time: &str, tokens: i64| {
            tally_domain::event::event_from_value(json!({"id": id, "subject": subject, "time": time, "input_tokens": tokens})).unwrap()
        };
        // Day 21, day 22, back to day 21 and 22 (each window's events end up in two running
        // sums, merged into one row), with another subject's events between.
        let events = [
            event("a", "s", "2026-11-21T23:59:59Z", 1),
            event("b", "other", "2026-11-21T23:00:00Z", 10),
            event("c", "s", "2026-11-22T00:00:01Z", 2),
            event("d", "s", "2026-11-21T12:00:00Z", 4),
            event("e", "other", "2026-11-22T01:00:00Z", 20),
            event("f", "s", "2026-11-22T10:00:00Z", 8),
        ];
        let refs: Vec<&UsageEvent> = events.iter().collect();
        let sums: Vec<(String, String, i64)> =
            ledger_deltas(&refs, &policy).into_iter().map(|(k, d)| (k.subject, k.period_start.format("%d").to_string(), d.used)).collect();
        let row = |s: &str, day: &str, used: i64| (s.to_string(), day.to_string(), used);
        assert_eq!(sums, [row("other", "21", 10), row("other", "22", 20), row("s", "21", 5), row("s", "22", 10)]);
    }

    #[test]
    fn one_batch_across_an_override_boundary_counts_each_event_under_its_own_limit_and_period() {
        let policy = Policy::from_yaml(
            "default_tier: t\ntimezone: UTC\nquotas:\n  - {name: daily, metric: input_tokens, period: day, limit: 100}\n\
             tiers:\n  - {name: t, priority: 0, rate_multiplier: 1}\n\
             overrides:\n  - {subject: s, quota: daily, limit: 500, starts_at: 2026-11-22T10:00:00Z, expires_at: 2026-11-22T11:00:00Z, reason: r, created_by: test}\n",
            "test",
        )
        .unwrap();
        let at = |id: &str, time: &str, n: i64| {
            tally_domain::event::event_from_value(json!({"id": id, "subject": "s", "time": time, "input_tokens": n})).unwrap()
        };
        // Out of order on purpose: inside, before, after the override, then the previous day.
        let events = [
            at("a", "2026-11-22T10:30:00Z", 1),
            at("b", "2026-11-22T09:59:59Z", 2),
            at("c", "2026-11-22T11:00:00Z", 4),
            at("d", "2026-11-22T10:59:59Z", 8),
            at("e", "2026-11-21T23:00:00Z", 16),
        ];
        let refs: Vec<&UsageEvent> = events.iter().collect();
        let deltas = ledger_deltas(&refs, &policy);
        let day = |d: &str| d.parse::<DateTime<Utc>>().unwrap();
        let today: Vec<&LedgerDelta> =
            deltas.iter().filter(|(k, _)| k.period_start == day("2026-11-22T00:00:00Z")).map(|(_, d)| d).collect();
        let yesterday: Vec<&LedgerDelta> =
            deltas.iter().filter(|(k, _)| k.period_start == day("2026-11-21T00:00:00Z")).map(|(_, d)| d).collect();
        assert_eq!(deltas.len(), 2, "{deltas:?}");
        assert_eq!(today[0].used, 15);
        assert_eq!(today[0].limit, 100, "the limit in force at the row's latest event (11:00, after the override)");
        assert_eq!(yesterday[0].used, 16);
        assert_eq!(yesterday[0].period_end, day("2026-11-22T00:00:00Z"));
        // The same quotas, reused: one resolution per span without an override change.
        let mut r = Resolutions::new(&policy);
        let inside = r.index_at(&Request::plain("s", None), day("2026-11-22T10:30:00Z"));
        assert_eq!(r.entries[inside].resolved.quotas[0].limit, 500);
        assert_eq!(r.index_at(&Request::plain("s", None), day("2026-11-22T10:59:59Z")), inside);
        let after = r.index_at(&Request::plain("s", None), day("2026-11-22T11:00:00Z"));
        assert_ne!(after, inside);
        assert_eq!(r.entries[after].resolved.quotas[0].limit, 100);
        let before = r.index_at(&Request::plain("s", None), day("2026-11-22T09:00:00Z"));
        assert_eq!(r.entries[before].resolved.quotas[0].limit, 100);
        let at_start = r.index_at(&Request::plain("s", None), day("2026-11-22T10:00:00Z"));
        assert_eq!(r.entries[at_start].resolved.quotas[0].limit, 500);
    }

    #[test]
    fn a_row_shared_by_two_resolutions_at_the_same_instant_takes_the_later_ones_limit_every_time() {
        let key = tally_domain::event::hash_api_key("pro-key");
        let policy = Policy::from_yaml(
            &format!(
                "default_tier: t\ntimezone: UTC\nquotas:\n  - {{name: daily, metric: input_tokens, period: day, limit: 100}}\n\
                 tiers:\n  - {{name: t, priority: 0, rate_multiplier: 1}}\n  - {{name: pro, priority: 10, rate_multiplier: 10}}\n\
                 api_keys:\n  - {{key_sha256: {key}, tier: pro}}\n"
            ),
            "test",
        )
        .unwrap();
        let time = "2026-11-22T10:00:00Z";
        let events = [
            tally_domain::event::event_from_value(json!({"id": "a", "subject": "s", "time": time, "input_tokens": 1})).unwrap(),
            tally_domain::event::event_from_value(
                json!({"id": "b", "subject": "s", "time": time, "input_tokens": 2, "api_key_sha256": key}),
            )
            .unwrap(),
        ];
        let refs: Vec<&UsageEvent> = events.iter().collect();
        // The sums are walked in a randomly seeded hash order: many runs, one answer.
        for _ in 0..50 {
            let deltas = ledger_deltas(&refs, &policy);
            assert_eq!(deltas.len(), 1, "{deltas:?}");
            let delta = deltas.values().next().unwrap();
            assert_eq!((delta.used, delta.limit), (3, 1000), "the pro key's resolution comes later in the batch");
        }
    }

    #[test]
    fn an_event_counts_in_its_own_quotas_and_in_every_budget_it_meets_once() {
        let key = tally_domain::event::hash_api_key("sk-1");
        let policy = Policy::from_yaml(
            &format!(
                "default_tier: free\ntimezone: UTC\nquotas:\n  - {{name: daily, metric: total_tokens, period: day, limit: 100}}\n\
                 tiers:\n  - {{name: free, priority: 0}}\n\
                 members: {{alice: [eng]}}\n\
                 budgets:\n\
                 \x20 - {{group: eng, quotas: [{{name: team, metric: total_tokens, period: month, limit: 1000}}]}}\n\
                 \x20 - {{group: ops, quotas: [{{name: ops, metric: requests, period: month, limit: 10}}]}}\n\
                 \x20 - {{api_key: {key}, quotas: [{{name: cap, metric: total_tokens, period: day, limit: 50}}]}}\n\
                 \x20 - tier: free\n    quotas:\n\
                 \x20     - {{name: pool, metric: total_tokens, period: day, limit: 10000}}\n\
                 \x20     - {{name: pool_4o, metric: total_tokens, period: day, limit: 500, models: [gpt-4o]}}\n"
            ),
            "test",
        )
        .unwrap();
        let event = |v: serde_json::Value| tally_domain::event::event_from_value(v).unwrap();
        let at = "2026-11-22T10:00:00Z";
        let events = [
            // alice is in eng; her key has a cap; gpt-4o counts in the pool's model budget too.
            event(json!({"id": "a", "subject": "alice", "time": at, "input_tokens": 3, "api_key": "sk-1", "model": "gpt-4o"})),
            // bob names ops himself; another model.
            event(json!({"id": "b", "subject": "bob", "time": at, "input_tokens": 5, "group": "ops", "model": "gpt-4o-mini"})),
            // carol, no group, no key, no model.
            event(json!({"id": "c", "subject": "carol", "time": at, "input_tokens": 7})),
        ];
        let refs: Vec<&UsageEvent> = events.iter().collect();
        let rows: Vec<(String, String, String, i64)> =
            ledger_deltas(&refs, &policy).into_iter().map(|(k, d)| (k.subject, k.metric, k.scope, d.used)).collect();
        let row = |s: &str, m: &str, scope: &str, used: i64| (s.to_string(), m.to_string(), scope.to_string(), used);
        let budget = |kind: &str, name: &str| format!("__tally_budget__/{kind}/{name}");
        assert_eq!(
            rows,
            [
                row(&budget("api_key", &key), "total_tokens", "*", 3),
                row(&budget("group", "eng"), "total_tokens", "*", 3),
                row(&budget("group", "ops"), "requests", "*", 1),
                row(&budget("tier", "free"), "total_tokens", "*", 15),
                row(&budget("tier", "free"), "total_tokens", "*|models=gpt-4o", 3),
                row("alice", "total_tokens", "*", 3),
                row("bob", "total_tokens", "*", 5),
                row("carol", "total_tokens", "*", 7),
            ]
        );
    }

    #[test]
    fn two_quotas_that_share_a_ledger_row_count_an_event_in_it_once() {
        // A soft and a hard cap of one budget, and a subject tier quota beside a base one, each
        // pair on the same metric, scope and period.
        let policy = Policy::from_yaml(
            "default_tier: t\ntimezone: UTC\nquotas:\n  - {name: daily, metric: total_tokens, period: day, limit: 100}\n\
             tiers:\n  - name: t\n    quotas: [{name: daily_warn, metric: total_tokens, period: day, limit: 50, action: soft}]\n\
             budgets:\n  - tier: t\n    quotas:\n\
             \x20     - {name: soft_cap, metric: total_tokens, period: day, limit: 1000, action: soft}\n\
             \x20     - {name: hard_cap, metric: total_tokens, period: day, limit: 2000}\n",
            "test",
        )
        .unwrap();
        let event =
            tally_domain::event::event_from_value(json!({"id": "a", "subject": "s", "time": "2026-11-22T10:00:00Z", "input_tokens": 10}))
                .unwrap();
        let rows: Vec<(String, i64)> = ledger_deltas(&[&event], &policy).into_iter().map(|(k, d)| (k.subject, d.used)).collect();
        assert_eq!(rows, [("__tally_budget__/tier/t".to_string(), 10), ("s".to_string(), 10)]);
    }

    #[test]
    fn duplicates_are_skipped_and_conflicts_quarantined_within_a_batch() {
        let e = json!({"id": "e1", "subject": "a", "time": "2026-11-22T11:00:00Z", "input_tokens": 5});
        let changed = json!({"id": "e1", "subject": "a", "time": "2026-11-22T11:00:00Z", "input_tokens": 6});
        let mut batch = [delivery(0, e.clone()), delivery(1, e), delivery(2, changed)];
        let parsed = parse_batch(&mut batch, now(), Duration::days(35));
        assert_eq!(parsed.candidates.len(), 1);
        assert_eq!(parsed.candidates[0].event.input_tokens, 5);
        assert_eq!(parsed.duplicates, 1);
        assert_eq!(parsed.quarantined.len(), 1);
        assert_eq!(parsed.quarantined[0].offset, 2);
        assert_eq!(parsed.quarantined[0].reason.kind, QuarantineReason::Conflict);
        assert!(parsed.quarantined[0].reason.to_string().starts_with("conflict: event id "));
    }

    #[test]
    fn a_batch_takes_what_was_parsed_on_receipt_and_leaves_out_what_was_decided_early() {
        let e = |id: &str| json!({"id": id, "subject": "a", "time": "2026-11-22T11:00:00Z", "input_tokens": 5});
        let payload = |v: serde_json::Value| Some(serde_json::to_vec(&v).unwrap());
        let mut early = Delivery::received(0, 1, payload(e("early")));
        early.decided_early = true;
        let mut batch = [Delivery::received(0, 0, payload(e("a"))), early, Delivery::received(0, 2, payload(e("a")))];
        assert!(batch[0].event().is_some(), "parsed on receipt");
        let parsed = parse_batch(&mut batch, now(), Duration::days(35));
        let ids: Vec<&str> = parsed.candidates.iter().map(|c| c.event.id.as_str()).collect();
        assert_eq!(
            (ids, parsed.duplicates, parsed.quarantined.len()),
            (vec!["a"], 1, 0),
            "the early one is neither counted nor a duplicate"
        );
        let fingerprint = parsed.candidates[0].fingerprint.clone();
        // A retry parses the payloads again, with the same result.
        assert!(batch[0].parsed.is_none(), "taken by the first parse");
        let again = parse_batch(&mut batch, now(), Duration::days(35));
        assert_eq!(again.candidates.len(), 1);
        assert_eq!(again.candidates[0].fingerprint, fingerprint);
    }

    #[test]
    fn poison_late_and_future_events_are_quarantined_with_reason_and_bytes() {
        let mut batch = [
            Delivery::received(1, 7, Some(b"{not json".to_vec())),
            Delivery { partition: 1, offset: 8, payload: None, ..Delivery::default() },
            delivery(9, json!({"id": "old", "subject": "a", "time": "2026-09-01T00:00:00Z"})),
            delivery(10, json!({"id": "new", "subject": "a", "time": "2026-11-22T12:06:00Z"})),
            Delivery::received(1, 11, Some(vec![0xff, 0x00])),
        ];
        let parsed = parse_batch(&mut batch, now(), Duration::days(35));
        assert!(parsed.candidates.is_empty());
        let reasons: Vec<String> = parsed.quarantined.iter().map(|q| q.reason.to_string()).collect();
        assert!(reasons[0].starts_with("invalid event: "), "{reasons:?}");
        assert_eq!(reasons[1], "empty message");
        assert_eq!(reasons[2], "late: event time 2026-09-01 00:00:00 UTC is older than the lateness window of 35 days");
        assert_eq!(reasons[3], "future: event time 2026-11-22 12:06:00 UTC is more than 5 minutes ahead");
        let written = serde_json::to_value(&parsed.quarantined[2]).unwrap();
        assert_eq!(written["reason"], reasons[2].as_str(), "the record carries the reason as one string");
        assert_eq!(parsed.quarantined[0].original, "{not json");
        assert_eq!(parsed.quarantined[4].original, "ff00");
        assert_eq!(parsed.quarantined[4].original_encoding, "hex");
        assert_eq!(parsed.quarantined[2].event_id.as_deref(), Some("old"));
    }

    fn published(tier: &str, quotas: &[QuotaDecision], at: DateTime<Utc>) -> Published {
        Published::of(tier, quotas, at)
    }

    fn line(used: i64, limit: i64) -> QuotaDecision {
        QuotaDecision {
            quota: "q".into(),
            metric: tally_domain::metric::Metric::TotalTokens,
            period: "month".into(),
            scope: None,
            models: None,
            state: tally_domain::decision::quota_state(used, limit, 0, &[80]),
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
        assert_eq!(next_check_at(std::slice::from_ref(&ok), None), None);
        assert_eq!(next_check_at(&[ok.clone(), breached.clone()], None), Some(now() + Duration::seconds(30)));
        assert_eq!(next_check_at(&[breached], Some(now() + Duration::seconds(5))), Some(now() + Duration::seconds(5)));
        assert_eq!(next_check_at(&[ok], Some(now())), Some(now()));
    }

    #[test]
    fn a_fired_threshold_is_always_published() {
        let prev = published("free", &[line(10, 100)], now());
        let mut fired = line(10, 100);
        fired.fired = vec![80];
        let fired = [fired];
        assert!(should_publish(Some(&prev), &published("free", &fired, now()), &fired, Duration::seconds(60)));
    }

    #[test]
    fn publish_on_state_change_at_once_and_on_usage_change_after_refresh() {
        let refresh = Duration::seconds(1);
        let prev = published("free", &[line(10, 100)], now());
        let soon = now() + Duration::milliseconds(10);
        let decide = |tier: &str, line: QuotaDecision, at| {
            let lines = [line];
            should_publish(Some(&prev), &published(tier, &lines, at), &lines, refresh)
        };
        assert!(should_publish(None, &published("free", &[line(10, 100)], soon), &[line(10, 100)], refresh));
        assert!(!decide("free", line(20, 100), soon));
        assert!(decide("free", line(80, 100), soon), "warning crossed");
        assert!(decide("pro", line(10, 100), soon), "tier changed");
        let mut later_reset = line(10, 100);
        later_reset.resets_at = now() + Duration::days(30);
        assert!(decide("free", later_reset, soon), "new period");
        assert!(decide("free", line(20, 100), now() + refresh));
        assert!(!decide("free", line(10, 100), now() + refresh), "nothing changed");
        assert_eq!(refresh_due_at(&prev, &published("free", &[line(20, 100)], soon), refresh), Some(now() + refresh));
        assert_eq!(refresh_due_at(&prev, &published("free", &[line(10, 100)], soon), refresh), None);
    }

    #[test]
    fn digests_are_fixed_values_so_another_process_compares_equal() {
        let a = published("free", &[line(10, 100)], now());
        let b = published("free", &[line(10, 100)], now() + Duration::hours(1));
        assert_eq!((a.shape, a.usage), (b.shape, b.usage));
        assert_ne!(a.usage, published("free", &[line(11, 100)], now()).usage);
        assert_ne!(a.shape, published("free", &[line(10, 101)], now()).shape);
    }
}
