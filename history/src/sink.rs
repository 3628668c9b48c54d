//! ClickHouse side of the history writer: raw rows and rollups, replay-safe.
//!
//! An event is identified as the ledger identifies it: by its id and the UTC day of its own
//! time ([`EventKey`]); the same id on two days is two events.
//!
//! [`Sink::write`] takes events the ledger counted and, in this order:
//! 1. looks up which of them already have a raw row and inserts only the others
//!    (`usage_events`, ReplacingMergeTree keyed by subject, time, id and day, so even a row
//!    inserted twice by racing writers is one row under `FINAL`), as one INSERT carrying an
//!    `insert_deduplication_token` derived from the batch's partition/offset ranges and the
//!    keys of the rows sent: the same insert sent again (its acknowledgement lost, or still
//!    in flight when the writer was killed and replayed after a restart) stores nothing, and
//!    two different inserts never share a token (ClickHouse drops the rows of an insert whose
//!    token it has seen, whatever they are);
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

use chrono::{DateTime, NaiveDate, Timelike, Utc};
use clickhouse::Row;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tally_domain::event::{event_day, UsageEvent};

use crate::budgets::{Basis, Budgets};
use crate::client::{Ch, ChError};

/// An event as the ledger's dedupe record keys it: its id and the UTC day of its own time.
pub type EventKey = (String, NaiveDate);

/// One row of `usage_events`, as sent to ClickHouse.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Row)]
pub struct RawRow {
    pub event_id: String,
    /// The UTC day of the event's own time (for a correction's row, the correction's day).
    #[serde(with = "clickhouse::serde::chrono::date")]
    pub event_day: NaiveDate,
    pub subject: String,
    /// `DateTime64(3, 'UTC')`: milliseconds kept.
    #[serde(with = "clickhouse::serde::chrono::datetime64::millis")]
    pub time: DateTime<Utc>,
    pub scope: String,
    pub model: String,
    pub api_key_sha256: String,
    /// The group the event named (for a correction's row, its target's); empty for none.
    pub event_group: String,
    /// The configuration version the ledger counted it under, which its budgets follow from.
    pub config_version: i64,
    /// The budget subjects it met ([`crate::budgets`]).
    pub budgets: Vec<String>,
    /// The names of the budget ledgers it counted in ([`tally_domain::budget::ledger_name`]).
    pub budget_ledgers: Vec<String>,
    pub requests: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cached_tokens: i64,
    pub cost_micros: i64,
    pub fingerprint: String,
    #[serde(with = "clickhouse::serde::chrono::datetime")]
    pub inserted_at: DateTime<Utc>,
}

impl RawRow {
    /// The history row of a counted event with its budgets.
    pub fn from_counted(c: &Counted, now: DateTime<Utc>) -> RawRow {
        RawRow {
            config_version: c.basis.version,
            budgets: c.budgets.subjects.clone(),
            budget_ledgers: c.budgets.ledgers.clone(),
            ..RawRow::from_event(&c.event, c.day, &c.fingerprint, now)
        }
    }

    /// The history row of a counted event, keyed by `key_day`, without budgets (counted under
    /// version 0). Amounts are exactly what the ledger counted ([`UsageEvent::amounts`]): a
    /// missing cost counts 0.
    pub fn from_event(e: &UsageEvent, key_day: NaiveDate, fingerprint: &str, now: DateTime<Utc>) -> RawRow {
        let a = e.amounts();
        let millis = e.time.timestamp_millis();
        RawRow {
            event_id: e.id.clone(),
            event_day: key_day,
            subject: e.subject.clone(),
            time: DateTime::from_timestamp_millis(millis).unwrap_or(e.time),
            scope: e.scope.clone(),
            model: e.model.clone().unwrap_or_default(),
            api_key_sha256: e.api_key_sha256.clone().unwrap_or_default(),
            event_group: e.group.clone().unwrap_or_default(),
            config_version: 0,
            budgets: Vec::new(),
            budget_ledgers: Vec::new(),
            requests: a.requests,
            input_tokens: a.input_tokens,
            output_tokens: a.output_tokens,
            cached_tokens: a.cached_tokens,
            cost_micros: a.cost_micros,
            fingerprint: fingerprint.to_string(),
            inserted_at: now.with_nanosecond(0).unwrap_or(now),
        }
    }
}

/// A counted event ready to write.
#[derive(Debug, Clone)]
pub struct Counted {
    /// What its row holds (for a counted correction, the negated row: see [`crate::plan`]).
    pub event: UsageEvent,
    pub fingerprint: String,
    /// The UTC day of the delivered event's own time: with its id, its key in the ledger.
    pub day: NaiveDate,
    /// What its budgets follow from besides `event` ([`crate::budgets`]).
    pub basis: Basis,
    /// Its budgets; none until [`crate::budgets::assign`] gives them.
    pub budgets: Budgets,
}

impl Counted {
    /// A counted event as delivered, counted under configuration version 0.
    pub fn new(event: UsageEvent, fingerprint: String) -> Counted {
        let day = event_day(event.time);
        let basis = Basis { version: 0, model: event.model.clone() };
        Counted { event, fingerprint, day, basis, budgets: Budgets::default() }
    }

    pub fn key(&self) -> EventKey {
        (self.event.id.clone(), self.day)
    }
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
    KeysLookedUp,
    RawInserted,
    RollupsWritten,
}

/// Writes history to ClickHouse.
#[derive(Clone)]
pub struct Sink {
    pub ch: Ch,
}

/// Events per lookup of existing rows: the keys travel as a query parameter in the URL, and
/// ids are at most 128 characters, so a lookup stays far below ClickHouse's 1 MiB URL limit.
const LOOKUP_CHUNK: usize = 500;

/// Buckets per rollup statement.
const BUCKET_CHUNK: usize = 200;

fn hour_of(t: DateTime<Utc>) -> i64 {
    t.timestamp() - i64::from(t.minute()) * 60 - i64::from(t.second())
}

fn day_of(t: DateTime<Utc>) -> i64 {
    t.timestamp().div_euclid(86_400) * 86_400
}

/// The insert deduplication token of `rows` written for the batch `ranges` (its
/// partition/offset ranges, e.g. `p0:120-180,p3:7-9`): the ranges, then a digest of the rows'
/// keys in order, so the same rows of the same batch always get the same token and any other
/// insert another one.
pub fn dedup_token(ranges: &str, rows: &[RawRow]) -> String {
    let mut digest = Sha256::new();
    for r in rows {
        digest.update(r.event_id.as_bytes());
        digest.update([0]);
        digest.update(r.event_day.to_string().as_bytes());
        digest.update([0]);
    }
    format!("tally:{ranges}:{}", hex::encode(&digest.finalize()[..16]))
}

/// An event key as a query parameter value: the day as `YYYY-MM-DD`.
fn key_param((id, day): &EventKey) -> (String, String) {
    (id.clone(), day.to_string())
}

#[derive(Debug, Deserialize, Row)]
struct KeyRow {
    event_id: String,
    #[serde(with = "clickhouse::serde::chrono::date")]
    event_day: NaiveDate,
}

#[derive(Debug, Deserialize, Row)]
struct ModelRow {
    event_id: String,
    #[serde(with = "clickhouse::serde::chrono::date")]
    event_day: NaiveDate,
    model: String,
}

impl Sink {
    /// Writes `events` (all counted by the ledger; one per key) and their rollups. `ranges`
    /// names the batch's partition/offset ranges (see [`dedup_token`]). `hook` is called after
    /// each step; the writer's test failpoints use it.
    pub async fn write(&self, events: &[Counted], ranges: &str, now: DateTime<Utc>, hook: impl Fn(Step)) -> Result<Written, ChError> {
        let mut written = Written::default();
        if events.is_empty() {
            return Ok(written);
        }
        let present = self.present_keys(events).await?;
        hook(Step::KeysLookedUp);
        let rows: Vec<RawRow> = events.iter().filter(|c| !present.contains(&c.key())).map(|c| RawRow::from_counted(c, now)).collect();
        written.already_present = events.len() - rows.len();
        written.inserted = rows.len();
        let token = dedup_token(ranges, &rows);
        self.ch.insert::<RawRow>("usage_events", &rows, Some(&token)).await?;
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

    /// The model of each raw row among `targets` (`(subject, time, id)` of events that counted
    /// corrections revert) already in ClickHouse, by the target's key.
    pub async fn raw_models(&self, targets: &[(String, DateTime<Utc>, String)]) -> Result<HashMap<EventKey, String>, ChError> {
        let mut models = HashMap::new();
        for chunk in targets.chunks(LOOKUP_CHUNK) {
            let subjects: BTreeSet<&String> = chunk.iter().map(|(s, _, _)| s).collect();
            let (min, max) = time_bounds(chunk.iter().map(|(_, t, _)| *t));
            let keys: Vec<(String, String)> = chunk.iter().map(|(_, t, id)| key_param(&(id.clone(), event_day(*t)))).collect();
            let query = self
                .ch
                .query(
                    "SELECT event_id, event_day, any(model) AS model FROM usage_events FINAL \
                     WHERE subject IN {subjects:Array(String)} \
                     AND time >= fromUnixTimestamp64Milli({min:Int64}, 'UTC') AND time <= fromUnixTimestamp64Milli({max:Int64}, 'UTC') \
                     AND (event_id, event_day) IN {keys:Array(Tuple(String, Date))} GROUP BY event_id, event_day",
                )
                .param("subjects", subjects)
                .param("min", min)
                .param("max", max)
                .param("keys", keys);
            let rows: Vec<ModelRow> = self.ch.fetch_all(query).await?;
            models.extend(rows.into_iter().map(|r| ((r.event_id, r.event_day), r.model)));
        }
        Ok(models)
    }

    /// The keys among `events` that already have a raw row.
    async fn present_keys(&self, events: &[Counted]) -> Result<HashSet<EventKey>, ChError> {
        let mut present = HashSet::new();
        for chunk in events.chunks(LOOKUP_CHUNK) {
            let subjects: BTreeSet<&String> = chunk.iter().map(|c| &c.event.subject).collect();
            let (min, max) = time_bounds(chunk.iter().map(|c| c.event.time));
            let keys: Vec<(String, String)> = chunk.iter().map(|c| key_param(&c.key())).collect();
            let query = self
                .ch
                .query(
                    "SELECT DISTINCT event_id, event_day FROM usage_events \
                     WHERE subject IN {subjects:Array(String)} \
                     AND time >= fromUnixTimestamp64Milli({min:Int64}, 'UTC') AND time <= fromUnixTimestamp64Milli({max:Int64}, 'UTC') \
                     AND (event_id, event_day) IN {keys:Array(Tuple(String, Date))}",
                )
                .param("subjects", subjects)
                .param("min", min)
                .param("max", max)
                .param("keys", keys);
            let rows: Vec<KeyRow> = self.ch.fetch_all(query).await?;
            present.extend(rows.into_iter().map(|r| (r.event_id, r.event_day)));
        }
        Ok(present)
    }

    async fn recompute_hours(&self, hours: &BTreeSet<(String, i64)>, version: u64) -> Result<(), ChError> {
        for chunk in chunks(hours, BUCKET_CHUNK) {
            self.recompute_buckets(
                "INSERT INTO usage_hourly SELECT toStartOfHour(time) AS hour, subject, scope, model, count() AS events, \
                     sum(requests), sum(input_tokens), sum(output_tokens), sum(cached_tokens), sum(cost_micros), {version:UInt64} \
                     FROM usage_events FINAL WHERE subject IN {subjects:Array(String)} \
                     AND time >= toDateTime({from:Int64}, 'UTC') AND time < toDateTime({to:Int64}, 'UTC') \
                     AND (subject, toUInt32(toStartOfHour(time))) IN {buckets:Array(Tuple(String, UInt32))} \
                     GROUP BY hour, subject, scope, model",
                &chunk,
                3600,
                version,
            )
            .await?;
        }
        Ok(())
    }

    async fn recompute_days(&self, days: &BTreeSet<(String, i64)>, version: u64) -> Result<(), ChError> {
        for chunk in chunks(days, BUCKET_CHUNK) {
            self.recompute_buckets(
                "INSERT INTO usage_daily SELECT toStartOfDay(hour) AS day, subject, scope, model, sum(events), \
                     sum(requests), sum(input_tokens), sum(output_tokens), sum(cached_tokens), sum(cost_micros), {version:UInt64} \
                     FROM usage_hourly FINAL WHERE subject IN {subjects:Array(String)} \
                     AND hour >= toDateTime({from:Int64}, 'UTC') AND hour < toDateTime({to:Int64}, 'UTC') \
                     AND (subject, toUInt32(toStartOfDay(hour))) IN {buckets:Array(Tuple(String, UInt32))} \
                     GROUP BY day, subject, scope, model",
                &chunk,
                86_400,
                version,
            )
            .await?;
            // The same buckets' totals over all scopes and models, from the rows just written.
            self.recompute_buckets(
                "INSERT INTO usage_subject_daily SELECT day, subject, sum(events), sum(requests), sum(input_tokens), \
                     sum(output_tokens), sum(cached_tokens), sum(cost_micros), {version:UInt64} \
                     FROM usage_daily FINAL WHERE subject IN {subjects:Array(String)} \
                     AND day >= toDateTime({from:Int64}, 'UTC') AND day < toDateTime({to:Int64}, 'UTC') \
                     AND (subject, toUInt32(day)) IN {buckets:Array(Tuple(String, UInt32))} GROUP BY day, subject",
                &chunk,
                86_400,
                version,
            )
            .await?;
        }
        Ok(())
    }

    /// Runs one recomputation of `chunk`'s buckets (`width` seconds each): `sql` names the
    /// parameters `version`, `subjects`, `from`, `to` (the chunk's time bounds) and `buckets`.
    async fn recompute_buckets(&self, sql: &str, chunk: &BTreeSet<(String, i64)>, width: i64, version: u64) -> Result<(), ChError> {
        let (from, to) = bounds(chunk, width);
        let query = self
            .ch
            .query(sql)
            .param("version", version)
            .param("subjects", subjects(chunk))
            .param("from", from)
            .param("to", to)
            .param("buckets", buckets(chunk));
        self.ch.execute(query).await
    }
}

/// The smallest and largest of `times`, in milliseconds since the epoch.
fn time_bounds(times: impl Iterator<Item = DateTime<Utc>>) -> (i64, i64) {
    times.map(|t| t.timestamp_millis()).fold((i64::MAX, i64::MIN), |(lo, hi), t| (lo.min(t), hi.max(t)))
}

fn subjects(keys: &BTreeSet<(String, i64)>) -> BTreeSet<&str> {
    keys.iter().map(|(s, _)| s.as_str()).collect()
}

/// `(subject, bucket start)` pairs as the `Array(Tuple(String, UInt32))` parameter.
fn buckets(keys: &BTreeSet<(String, i64)>) -> Vec<(&str, u32)> {
    keys.iter().map(|(s, b)| (s.as_str(), u32::try_from(*b).unwrap_or(0))).collect()
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
        let row = RawRow::from_event(&e, event_day(e.time), "fp", "2026-11-22T11:00:00Z".parse().unwrap());
        assert_eq!(row.time, "2026-11-22T10:00:01.250Z".parse::<DateTime<Utc>>().unwrap());
        assert_eq!(row.event_day, "2026-11-22".parse::<NaiveDate>().unwrap());
        assert_eq!((row.requests, row.input_tokens, row.output_tokens, row.cost_micros), (1, 5, 7, 0));
        assert_eq!(row.model, "m");
    }
}
