//! ClickHouse side of the history writer: raw rows and rollups, replay-safe.
//!
//! [`Sink::write`] takes events the ledger counted and, in this order:
//! 1. looks up which of their ids already have a raw row and inserts only the others
//!    (`usage_events`, ReplacingMergeTree keyed by subject, time and id, so even a row
//!    inserted twice by racing writers is one row under `FINAL`);
//! 2. recomputes every hourly bucket (subject, UTC hour) the events fall in from the raw
//!    table under `FINAL`, and inserts the whole bucket with a new version
//!    (`usage_hourly`, ReplacingMergeTree(version): the new rows replace the old ones);
//! 3. recomputes every daily bucket touched from the hourly rollup, the same way
//!    (`usage_daily`), and right after it the bucket's total over all scopes and models
//!    from the daily rollup, with the same version (`usage_subject_daily`, one row per
//!    subject and day, which top-N reads).
//!
//! Each step is idempotent and reads the truth rather than adding deltas, so a batch written
//! twice, or cut by a crash after any step and written again, leaves the same rows. The
//! caller advances its offsets only after `write` returned `Ok`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use chrono::{DateTime, Timelike, Utc};
use serde::{Deserialize, Serialize};
use tally_domain::event::UsageEvent;

use crate::ch::{quote, Ch, ChError};

/// One row of `usage_events`, as sent to ClickHouse.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RawRow {
    pub event_id: String,
    pub subject: String,
    /// `YYYY-MM-DD hh:mm:ss` in UTC.
    pub time: String,
    pub time_ms: u16,
    pub scope: String,
    pub model: String,
    pub api_key_sha256: String,
    pub requests: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cached_tokens: i64,
    pub cost_micros: i64,
    pub fingerprint: String,
    pub inserted_at: String,
}

/// ClickHouse's text form of a UTC DateTime.
pub fn ch_time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S").to_string()
}

impl RawRow {
    /// The history row of a counted event. Amounts are exactly what the ledger counted
    /// ([`UsageEvent::amounts`]): a missing cost counts 0.
    pub fn from_event(e: &UsageEvent, fingerprint: &str, now: DateTime<Utc>) -> RawRow {
        let a = e.amounts();
        RawRow {
            event_id: e.id.clone(),
            subject: e.subject.clone(),
            time: ch_time(e.time),
            time_ms: (e.time.timestamp_subsec_millis().min(999)) as u16,
            scope: e.scope.clone(),
            model: e.model.clone().unwrap_or_default(),
            api_key_sha256: e.api_key_sha256.clone().unwrap_or_default(),
            requests: a.requests,
            input_tokens: a.input_tokens,
            output_tokens: a.output_tokens,
            cached_tokens: a.cached_tokens,
            cost_micros: a.cost_micros,
            fingerprint: fingerprint.to_string(),
            inserted_at: ch_time(now),
        }
    }
}

/// A counted event ready to write.
#[derive(Debug, Clone)]
pub struct Counted {
    pub event: UsageEvent,
    pub fingerprint: String,
}

/// What one [`Sink::write`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Written {
    /// Raw rows inserted.
    pub inserted: usize,
    /// Events whose raw row was already there (replays).
    pub already_present: usize,
    pub hourly_buckets: usize,
    pub daily_buckets: usize,
}

/// Where a failure happened inside [`Sink::write`] (for tests that crash on purpose).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    RawInserted,
    RollupsWritten,
}

/// Writes history to ClickHouse.
#[derive(Clone)]
pub struct Sink {
    pub ch: Ch,
}

/// Ids per query when looking up existing rows (keeps each query well under ClickHouse's
/// default `max_query_size` of 256 KiB: ids are at most 128 characters).
const LOOKUP_CHUNK: usize = 500;

fn hour_of(t: DateTime<Utc>) -> i64 {
    t.timestamp() - i64::from(t.minute()) * 60 - i64::from(t.second())
}

fn day_of(t: DateTime<Utc>) -> i64 {
    t.timestamp().div_euclid(86_400) * 86_400
}

/// The `(subject, bucket)` tuples of `keys` as a ClickHouse IN list.
fn tuple_list(keys: &BTreeSet<(String, i64)>) -> String {
    keys.iter().map(|(s, b)| format!("({}, {b})", quote(s))).collect::<Vec<_>>().join(", ")
}

fn subject_list<'a>(subjects: impl Iterator<Item = &'a String>) -> String {
    subjects.map(|s| quote(s)).collect::<Vec<_>>().join(", ")
}

#[derive(Deserialize)]
struct Id {
    event_id: String,
}

impl Sink {
    /// Writes `events` (all counted by the ledger; one per id) and their rollups. `hook` is
    /// called after each step; the writer's test failpoints use it.
    pub async fn write(&self, events: &[Counted], now: DateTime<Utc>, hook: impl Fn(Step)) -> Result<Written, ChError> {
        let mut written = Written::default();
        if events.is_empty() {
            return Ok(written);
        }
        let present = self.present_ids(events).await?;
        let rows: Vec<RawRow> =
            events.iter().filter(|c| !present.contains(&c.event.id)).map(|c| RawRow::from_event(&c.event, &c.fingerprint, now)).collect();
        written.already_present = events.len() - rows.len();
        written.inserted = rows.len();
        self.ch.insert(&self.ch.table("usage_events"), &rows).await?;
        hook(Step::RawInserted);

        let hours: BTreeSet<(String, i64)> = events.iter().map(|c| (c.event.subject.clone(), hour_of(c.event.time))).collect();
        let days: BTreeSet<(String, i64)> = events.iter().map(|c| (c.event.subject.clone(), day_of(c.event.time))).collect();
        // Versions grow with the wall clock; within one process they strictly grow.
        let version = now.timestamp_micros().max(0) as u64;
        self.recompute_hours(&hours, version).await?;
        self.recompute_days(&days, version).await?;
        written.hourly_buckets = hours.len();
        written.daily_buckets = days.len();
        hook(Step::RollupsWritten);
        Ok(written)
    }

    /// The model of each raw row among `targets` (`(subject, time, id)`) already in
    /// ClickHouse (the rows of events that counted corrections revert).
    pub async fn raw_models(&self, targets: &[(String, DateTime<Utc>, String)]) -> Result<HashMap<String, String>, ChError> {
        #[derive(Deserialize)]
        struct Model {
            event_id: String,
            model: String,
        }
        let mut models = HashMap::new();
        for chunk in targets.chunks(LOOKUP_CHUNK) {
            let subjects: BTreeSet<&String> = chunk.iter().map(|(s, _, _)| s).collect();
            let min = chunk.iter().map(|(_, t, _)| t.timestamp()).min().unwrap_or(0);
            let max = chunk.iter().map(|(_, t, _)| t.timestamp()).max().unwrap_or(0);
            let ids = chunk.iter().map(|(_, _, id)| quote(id)).collect::<Vec<_>>().join(", ");
            let sql = format!(
                "SELECT event_id, any(model) AS model FROM {} FINAL WHERE subject IN ({}) AND time >= toDateTime({min}, 'UTC') \
                 AND time <= toDateTime({max}, 'UTC') AND event_id IN ({ids}) GROUP BY event_id",
                self.ch.table("usage_events"),
                subject_list(subjects.into_iter()),
            );
            models.extend(self.ch.select::<Model>(&sql).await?.into_iter().map(|r| (r.event_id, r.model)));
        }
        Ok(models)
    }

    /// The ids among `events` that already have a raw row.
    async fn present_ids(&self, events: &[Counted]) -> Result<HashSet<String>, ChError> {
        let mut present = HashSet::new();
        for chunk in events.chunks(LOOKUP_CHUNK) {
            let subjects: BTreeSet<&String> = chunk.iter().map(|c| &c.event.subject).collect();
            let min = chunk.iter().map(|c| c.event.time.timestamp()).min().unwrap_or(0);
            let max = chunk.iter().map(|c| c.event.time.timestamp()).max().unwrap_or(0);
            let ids = chunk.iter().map(|c| quote(&c.event.id)).collect::<Vec<_>>().join(", ");
            let sql = format!(
                "SELECT DISTINCT event_id FROM {} WHERE subject IN ({}) AND time >= toDateTime({min}, 'UTC') \
                 AND time <= toDateTime({max}, 'UTC') AND event_id IN ({ids})",
                self.ch.table("usage_events"),
                subject_list(subjects.into_iter()),
            );
            present.extend(self.ch.select::<Id>(&sql).await?.into_iter().map(|r| r.event_id));
        }
        Ok(present)
    }

    async fn recompute_hours(&self, hours: &BTreeSet<(String, i64)>, version: u64) -> Result<(), ChError> {
        for chunk in chunks(hours, 200) {
            let (min, max) = bounds(&chunk, 3600);
            let sql = format!(
                "INSERT INTO {hourly} SELECT toStartOfHour(time) AS hour, subject, scope, model, count() AS events, \
                 sum(requests), sum(input_tokens), sum(output_tokens), sum(cached_tokens), sum(cost_micros), {version} \
                 FROM {raw} FINAL WHERE subject IN ({subjects}) AND time >= toDateTime({min}, 'UTC') AND time < toDateTime({max}, 'UTC') \
                 AND (subject, toUInt32(toStartOfHour(time))) IN ({tuples}) GROUP BY hour, subject, scope, model",
                hourly = self.ch.table("usage_hourly"),
                raw = self.ch.table("usage_events"),
                subjects = subject_list(chunk.iter().map(|(s, _)| s)),
                tuples = tuple_list(&chunk),
            );
            self.ch.execute(&sql).await?;
        }
        Ok(())
    }

    async fn recompute_days(&self, days: &BTreeSet<(String, i64)>, version: u64) -> Result<(), ChError> {
        for chunk in chunks(days, 200) {
            let (min, max) = bounds(&chunk, 86_400);
            let subjects = subject_list(chunk.iter().map(|(s, _)| s));
            let tuples = tuple_list(&chunk);
            let sql = format!(
                "INSERT INTO {daily} SELECT toDateTime(toUInt32(intDiv(toUInt32(hour), 86400) * 86400), 'UTC') AS day, subject, scope, model, \
                 sum(events), sum(requests), sum(input_tokens), sum(output_tokens), sum(cached_tokens), sum(cost_micros), {version} \
                 FROM {hourly} FINAL WHERE subject IN ({subjects}) AND hour >= toDateTime({min}, 'UTC') AND hour < toDateTime({max}, 'UTC') \
                 AND (subject, intDiv(toUInt32(hour), 86400) * 86400) IN ({tuples}) GROUP BY day, subject, scope, model",
                daily = self.ch.table("usage_daily"),
                hourly = self.ch.table("usage_hourly"),
            );
            self.ch.execute(&sql).await?;
            // The same buckets' totals over all scopes and models, from the rows just written.
            let sql = format!(
                "INSERT INTO {totals} SELECT day, subject, sum(events), sum(requests), sum(input_tokens), sum(output_tokens), \
                 sum(cached_tokens), sum(cost_micros), {version} \
                 FROM {daily} FINAL WHERE subject IN ({subjects}) AND day >= toDateTime({min}, 'UTC') AND day < toDateTime({max}, 'UTC') \
                 AND (subject, toUInt32(day)) IN ({tuples}) GROUP BY day, subject",
                totals = self.ch.table("usage_subject_daily"),
                daily = self.ch.table("usage_daily"),
            );
            self.ch.execute(&sql).await?;
        }
        Ok(())
    }
}

fn chunks(set: &BTreeSet<(String, i64)>, size: usize) -> Vec<BTreeSet<(String, i64)>> {
    let items: Vec<&(String, i64)> = set.iter().collect();
    items.chunks(size).map(|c| c.iter().map(|k| (*k).clone()).collect()).collect()
}

/// The smallest bucket start and the end of the largest bucket.
fn bounds(keys: &BTreeSet<(String, i64)>, width: i64) -> (i64, i64) {
    let min = keys.iter().map(|(_, b)| *b).min().unwrap_or(0);
    let max = keys.iter().map(|(_, b)| *b).max().unwrap_or(0) + width;
    (min, max)
}

/// Sums of every metric (for tests and reconciliation).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub struct Sums {
    pub events: i64,
    pub requests: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cached_tokens: i64,
    pub cost_micros: i64,
}

/// Per-subject sums, keyed by subject (used by checks comparing tables).
pub type SubjectSums = BTreeMap<String, Sums>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_utc_hours_and_days() {
        let t: DateTime<Utc> = "2026-11-22T10:59:59.900Z".parse().unwrap();
        assert_eq!(hour_of(t), "2026-11-22T10:00:00Z".parse::<DateTime<Utc>>().unwrap().timestamp());
        assert_eq!(day_of(t), "2026-11-22T00:00:00Z".parse::<DateTime<Utc>>().unwrap().timestamp());
    }

    #[test]
    fn a_raw_row_carries_what_the_ledger_counts() {
        let e = tally_domain::event::parse_event(
            br#"{"id":"e1","subject":"a","time":"2026-11-22T10:00:01.250Z","input_tokens":5,"output_tokens":7,"model":"m"}"#,
        )
        .unwrap();
        let row = RawRow::from_event(&e, "fp", "2026-11-22T11:00:00Z".parse().unwrap());
        assert_eq!(row.time, "2026-11-22 10:00:01");
        assert_eq!(row.time_ms, 250);
        assert_eq!((row.requests, row.input_tokens, row.output_tokens, row.cost_micros), (1, 5, 7, 0));
        assert_eq!(row.model, "m");
    }
}
