//! Headroom: which events may change a subject's decision, known the moment they arrive.
//!
//! Under load a lane's batch takes up to a second or more, and an event waits for the batch
//! in flight and then for its own. Most events only add usage, whose snapshot waits for the
//! refresh interval anyway. An event that reaches a threshold or a limit changes the
//! decision, and gateways should learn it at once. So each lane keeps, per subject, how much
//! of each metric may still arrive before the subject's next threshold or limit: `left`, as
//! of the lane's last commit that decided the subject, less what arrived since. An event
//! that uses it up is *urgent*. The loop commits urgent events at once in a fast transaction
//! of their own (dedupe records, ledgers, decisions), beside the lanes' batches. Their batch
//! then only moves the cursor past them (see [`crate::consumer`]).
//!
//! Contract: headroom is a hint, never a count. It can miss an urgent event, and the event
//! is then decided in its batch, as before. This happens when the subject has no entry
//! yet, when its tier changed since, when the event's API key brings another tier, or while
//! the subject's entry is stale (after an urgent event, until a batch decides the subject
//! again). It can also flag an event that changes nothing, which costs one small
//! transaction. What arrived and is in no batch yet is spent again from the lines a commit
//! gives, for every line of its metric whatever the line's scope (an over-count, on the safe
//! side). Counting
//! stays with the dedupe records: an event counted early is recorded under its id, so a
//! batch or a replay that meets it again skips it.

// The loop's per-event map hashes with foldhash, like the batch's maps (see `plan`).
use foldhash::HashMap;

use tally_domain::decision::QuotaDecision;
use tally_domain::event::UsageEvent;
use tally_domain::metric::{Amounts, Metric};

use crate::keys::SubjectKey;
use crate::policy::Quota;

/// How much of one quota's metric may still arrive before its decision changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub metric: Metric,
    /// The quota's scope; `None` counts every scope.
    pub scope: Option<Box<str>>,
    /// Usage still to come before the next threshold or the limit (at least 1 when computed).
    pub left: i64,
}

/// The lines of a subject as just decided: one per quota whose decision can still change as
/// usage grows. `quotas` and `decided` are the resolved quotas and their decisions, in the
/// same order.
pub fn lines_of(quotas: &[Quota], decided: &[QuotaDecision]) -> Box<[Line]> {
    quotas
        .iter()
        .zip(decided)
        .filter_map(|(q, d)| {
            let boundary = next_boundary(q, d.used)?;
            Some(Line { metric: q.metric, scope: q.scope.as_deref().map(Into::into), left: boundary - d.used })
        })
        .collect()
}

/// The least usage above `used` at which the quota's decision changes: a threshold not
/// reached yet fires there, or the quota is breached (the limit plus its burst).
fn next_boundary(q: &Quota, used: i64) -> Option<i64> {
    let breach = q.limit.saturating_add(q.burst);
    q.thresholds.iter().map(|&t| threshold_usage(q.limit, t)).chain([breach]).filter(|&b| b > used).min()
}

/// The least usage that reaches threshold `percent` of `limit`:
/// [`tally_domain::decision::thresholds_reached`] counts it once `used * 100 >= limit * percent`.
fn threshold_usage(limit: i64, percent: u32) -> i64 {
    let product = i128::from(limit) * i128::from(percent);
    i64::try_from(product.div_euclid(100) + i128::from(product.rem_euclid(100) != 0)).unwrap_or(i64::MAX)
}

/// One subject's headroom.
#[derive(Debug, Default)]
struct Entry {
    lines: Box<[Line]>,
    /// What arrived and is in no batch yet (the lane's buffer holds it).
    unbatched: Amounts,
    /// An urgent event used a line up: the next boundary is not known until a batch decides
    /// the subject again, and until then no event of it is urgent.
    stale: bool,
}

/// One lane's headroom per subject (see the module docs).
///
/// Bounded: subjects are kept in two generations. When the current one reaches `capacity`
/// subjects it becomes the previous one, and the old previous one is forgotten; a subject
/// met again in the previous generation moves to the current one. So at most twice
/// `capacity` subjects are held, and those forgotten are the ones not seen for longest. A
/// forgotten subject's urgent events wait for their batch until a batch decides it again.
#[derive(Debug)]
pub struct Headroom {
    /// By [`SubjectKey`], which keeps no copy of the name. Two
    /// subjects of one lane sharing a hash would share an entry: a wrong hint, not a wrong
    /// count.
    current: HashMap<u64, Entry>,
    previous: HashMap<u64, Entry>,
    capacity: usize,
}

impl Default for Headroom {
    fn default() -> Self {
        Headroom::with_capacity(DEFAULT_CAPACITY)
    }
}

/// Subjects per generation of a [`Headroom`] made with `default()` (the aggregator sizes its
/// lanes' from `TALLY_AGGREGATOR_HEADROOM_SUBJECTS`).
const DEFAULT_CAPACITY: usize = 100_000;

impl Headroom {
    /// A headroom that keeps up to `capacity` subjects per generation (at least 1).
    pub fn with_capacity(capacity: usize) -> Self {
        Headroom { current: HashMap::default(), previous: HashMap::default(), capacity: capacity.max(1) }
    }

    /// The entry of a subject, from the current generation, else moved there from the
    /// previous one, else new; the generations turn over when the current one is full.
    fn entry(&mut self, SubjectKey(key): SubjectKey) -> &mut Entry {
        if self.current.len() >= self.capacity && !self.current.contains_key(&key) {
            self.previous = std::mem::take(&mut self.current);
        }
        let previous = &mut self.previous;
        self.current.entry(key).or_insert_with(|| previous.remove(&key).unwrap_or_default())
    }

    /// Spends an arriving event from its subject's lines, and says whether it is urgent: it
    /// used a line up, so it may change the subject's decision. Corrections only take usage
    /// away, and are never urgent.
    pub fn spend(&mut self, event: &UsageEvent) -> bool {
        if event.corrects.is_some() {
            return false;
        }
        let entry = self.entry(SubjectKey::of(&event.subject));
        let amounts = event.amounts();
        entry.unbatched += amounts;
        if entry.stale {
            return false;
        }
        let mut urgent = false;
        for line in entry.lines.iter_mut().filter(|l| l.scope.as_deref().is_none_or(|s| s == event.scope)) {
            let amount = amounts.get(line.metric);
            if amount > 0 {
                line.left -= amount;
                urgent |= line.left <= 0;
            }
        }
        entry.stale = urgent;
        urgent
    }

    /// The lane took `event` (spent on arrival) into a batch: its amounts will be in the
    /// lines that batch's commit gives. A subject forgotten meanwhile is left alone.
    pub fn taken(&mut self, event: &UsageEvent) {
        if event.corrects.is_some() {
            return;
        }
        let SubjectKey(key) = SubjectKey::of(&event.subject);
        if let Some(entry) = self.current.get_mut(&key).or_else(|| self.previous.get_mut(&key)) {
            entry.unbatched -= event.amounts();
        }
    }

    /// The lane's batch in flight committed and decided `subject`: `lines` are its headroom
    /// as of that commit. What arrived and is in no batch yet is spent from them again.
    pub fn committed(&mut self, subject: SubjectKey, mut lines: Box<[Line]>) {
        let entry = self.entry(subject);
        for line in lines.iter_mut() {
            line.left -= entry.unbatched.get(line.metric);
        }
        (entry.lines, entry.stale) = (lines, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Policy;
    use chrono::{DateTime, Utc};
    use serde_json::json;
    use tally_domain::decision::thresholds_reached;

    fn event(subject: &str, tokens: i64, scope: &str) -> UsageEvent {
        let value = json!({"id": "e", "subject": subject, "time": "2026-11-22T12:00:00Z", "input_tokens": tokens, "scope": scope});
        tally_domain::event::event_from_value(value).unwrap()
    }

    fn now() -> DateTime<Utc> {
        "2026-11-22T12:00:00Z".parse().unwrap()
    }

    /// A policy whose default tier has `quotas` (YAML flow mappings).
    fn quotas(quotas: &[&str]) -> Vec<Quota> {
        let yaml = format!(
            "default_tier: t\ntimezone: UTC\nquotas:\n{}\ntiers:\n  - {{name: t, priority: 0, rate_multiplier: 1}}\n",
            quotas.iter().map(|q| format!("  - {q}")).collect::<Vec<_>>().join("\n")
        );
        Policy::from_yaml(&yaml, "test").unwrap().resolve_all_scopes("s", None, now()).quotas
    }

    fn decided(quotas: &[Quota], used: i64) -> Vec<QuotaDecision> {
        let keys: Vec<_> = crate::plan::current_keys("s", quotas, chrono_tz::UTC, now());
        crate::plan::decide(quotas, &keys, |_| used)
    }

    #[test]
    fn a_line_ends_at_the_first_usage_that_reaches_the_next_threshold_or_the_limit() {
        let q = quotas(&["{name: m, metric: input_tokens, period: month, limit: 1001, thresholds: [50, 80]}"]);
        for used in [0, 500, 501, 800, 801, 1000] {
            let lines = lines_of(&q, &decided(&q, used));
            let boundary = used + lines[0].left;
            assert!(lines[0].left >= 1);
            // Just below the boundary nothing new is reached; at it, something is.
            let reached = |u: i64| (thresholds_reached(u, 1001, &[50, 80]), u >= 1001);
            assert_eq!(reached(boundary - 1), reached(used), "used {used}: nothing changes before {boundary}");
            assert_ne!(reached(boundary), reached(used), "used {used}: {boundary} changes the decision");
        }
        assert!(lines_of(&q, &decided(&q, 1001)).is_empty(), "a breached quota has no event-driven change left");
    }

    #[test]
    fn the_burst_moves_the_breach_and_thresholds_round_up() {
        let q = quotas(&["{name: m, metric: input_tokens, period: month, limit: 3, burst: 2, thresholds: [50]}"]);
        assert_eq!(lines_of(&q, &decided(&q, 0))[0].left, 2, "50% of 3 is reached at 2 (1.5 rounded up)");
        assert_eq!(lines_of(&q, &decided(&q, 2))[0].left, 3, "then the breach at limit + burst = 5");
    }

    #[test]
    fn an_event_that_uses_a_line_up_is_urgent_and_the_subject_waits_for_its_batch() {
        let q = quotas(&["{name: m, metric: input_tokens, period: month, limit: 100, thresholds: [100]}"]);
        let mut h = Headroom::default();
        assert!(!h.spend(&event("s", 1000, "")), "no entry yet: never urgent");
        h.taken(&event("s", 1000, ""));
        h.committed(SubjectKey::of("s"), lines_of(&q, &decided(&q, 10)));
        assert!(!h.spend(&event("s", 89, "")));
        assert!(h.spend(&event("s", 1, "")), "the 90th token reaches 100");
        assert!(!h.spend(&event("s", 50, "")), "stale until a batch decides it again");
        assert!(!h.spend(&event("other", 1000, "")));
    }

    #[test]
    fn what_is_in_no_batch_yet_is_spent_again_from_the_committed_lines() {
        let q = quotas(&["{name: m, metric: input_tokens, period: month, limit: 100, thresholds: [100]}"]);
        let mut h = Headroom::default();
        for tokens in [30, 40, 5] {
            assert!(!h.spend(&event("s", tokens, "")));
        }
        // The batch took the 30 only (it was full); the 40 and the 5 stay buffered.
        h.taken(&event("s", 30, ""));
        h.committed(SubjectKey::of("s"), lines_of(&q, &decided(&q, 30)));
        assert!(!h.spend(&event("s", 24, "")));
        assert!(h.spend(&event("s", 1, "")), "30 + 40 + 5 + 24 + 1 = 100");
        // Once everything is in a batch, a commit's figure stands alone.
        for tokens in [40, 5, 24, 1] {
            h.taken(&event("s", tokens, ""));
        }
        h.committed(SubjectKey::of("s"), lines_of(&q, &decided(&q, 50)));
        assert!(!h.spend(&event("s", 49, "")));
        assert!(h.spend(&event("s", 1, "")));
    }

    #[test]
    fn the_subjects_not_seen_for_longest_are_forgotten_beyond_two_generations() {
        let q = quotas(&["{name: m, metric: input_tokens, period: month, limit: 100, thresholds: [100]}"]);
        let mut h = Headroom::with_capacity(2);
        for s in ["a", "b"] {
            h.committed(SubjectKey::of(s), lines_of(&q, &decided(&q, 0)));
        }
        h.committed(SubjectKey::of("c"), lines_of(&q, &decided(&q, 0))); // a and b are now the previous generation
        assert!(!h.spend(&event("a", 50, "")), "a moves back to the current generation");
        h.committed(SubjectKey::of("d"), lines_of(&q, &decided(&q, 0))); // the current one (c, a) is full: b is forgotten
        assert!(h.spend(&event("a", 50, "")), "a kept its headroom across the turns");
        assert!(!h.spend(&event("b", 100, "")), "b was forgotten: no hint");
        assert!(h.current.len() + h.previous.len() <= 4);
    }

    #[test]
    fn a_scoped_line_spends_only_its_scope_and_corrections_are_never_urgent() {
        let q = quotas(&["{name: m, metric: input_tokens, period: month, limit: 10, scope: gpt}"]);
        let mut h = Headroom::default();
        h.committed(SubjectKey::of("s"), lines_of(&q, &decided(&q, 0)));
        assert!(!h.spend(&event("s", 50, "claude")));
        let mut correction = event("s", 50, "gpt");
        correction.corrects = Some("x".into());
        assert!(!h.spend(&correction));
        assert!(h.spend(&event("s", 10, "gpt")));
    }
}
