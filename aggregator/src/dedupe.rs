//! The dedupe record of a batch: one `processed_events` row per candidate event id, written
//! in the batch's transaction (see the crate docs).
//!
//! # Contract
//! [`Recorder::record_event_ids`] inserts a row for every candidate whose key is not recorded
//! yet and reports, for the others, the fingerprint they were first recorded with. Afterwards
//! every candidate key is recorded exactly once, whichever statement did it.
//!
//! # Keyed by id and day, kept for the lateness window
//! A record's key is the event id and the UTC day of the event time ([`DedupeKey`],
//! [`tally_domain::event::event_day`]): `processed_events` is partitioned by that day
//! (primary key `(event_id, event_day)`), and every insert and lookup names the day, so it
//! touches that day's partition only, whose size is the day's traffic, not the history's.
//! A redelivery is the same message, so it has the same time and day and meets its first
//! copy. Two copies of an id on different days are two events; a copy with other content on
//! the same day is a conflict (docs/semantics.md).
//!
//! No record is needed past its day plus the lateness window: an event older than the window,
//! or more than [`tally_domain::event::MAX_FUTURE`] ahead, is quarantined before dedupe
//! ([`crate::plan::parse_batch`]), so it can never meet a record of a day out of the window.
//! [`crate::partitions`] drops a day's partition whole once the day left the window (with two
//! days of margin) and makes the partitions of the coming days in advance; a row of a day
//! without its partition goes to the DEFAULT partition, and moves into the day's partition
//! when that is made.
//!
//! # Two ways to insert
//! - **Plain** (binary `COPY`), inside a savepoint. It writes each row once, which costs
//!   Postgres about half of what the skipping insert does (one heap and one index record
//!   per row, against three WAL records and twice the buffer reads for a speculative
//!   insertion); `COPY` also writes its heap rows a page at a time
//!   and reads them without unnesting arrays. The rows are encoded straight from the
//!   candidates and streamed in chunks of [`COPY_CHUNK`] bytes, so Postgres inserts while
//!   the rest is encoded. If any id is already recorded, or is being recorded by a
//!   concurrent transaction that then commits, the `COPY` fails with a unique violation and
//!   the savepoint is rolled back: none of its rows is visible (their dead tuples go at the
//!   next vacuum).
//! - **Skipping** (`ON CONFLICT (event_id, event_day) DO NOTHING RETURNING ...`), which
//!   inserts the new keys and tells them apart from the known ones.
//!
//! A batch tries the plain insert first and falls back to the skipping one when it fails.
//! Redeliveries of known ids tend to come in runs (a replay, a gateway retrying), so after a
//! plain insert failed the next [`CAUTIOUS_BATCHES`] batches of this [`Recorder`] go straight
//! to the skipping insert, and a lasting stream of duplicates costs a failed attempt only
//! once in that many batches.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::postgres::{PgArguments, PgConnection};
use sqlx::query::Query;
use sqlx::{Acquire, Postgres, Row, Transaction};

use crate::plan::Candidate;

/// Batches that use the skipping insert directly after a plain insert met a known id.
pub const CAUTIOUS_BATCHES: u32 = 16;

/// Chooses between the plain and the skipping insert, shared by the lanes of one instance.
#[derive(Debug, Clone, Default)]
pub struct Recorder {
    /// Batches left that go straight to the skipping insert.
    cautious_left: Arc<AtomicU32>,
}

impl Recorder {
    /// Whether this batch tries the plain insert (counting down a cautious stretch).
    fn tries_plain(&self) -> bool {
        self.cautious_left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| left.checked_sub(1)).is_err()
    }

    /// A plain insert met a known id: the next batches skip known ids from the start.
    fn met_known_id(&self) {
        self.cautious_left.store(CAUTIOUS_BATCHES, Ordering::Relaxed);
    }

    /// Records the candidates' ids (see the module docs).
    pub async fn record_event_ids(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        candidates: &[Candidate<'_>],
        config_version: i64,
    ) -> Result<Recorded, sqlx::Error> {
        if candidates.is_empty() {
            return Ok(Recorded::default());
        }
        let mut fell_back = false;
        if self.tries_plain() {
            let mut savepoint = tx.begin().await?;
            match copy_rows(&mut savepoint, candidates, config_version).await {
                Ok(()) => {
                    savepoint.commit().await?;
                    return Ok(Recorded { fresh: Fresh::All, ..Recorded::default() });
                }
                Err(e) if is_unique_violation(&e) => {
                    savepoint.rollback().await?;
                    self.met_known_id();
                    fell_back = true;
                    tracing::debug!("a batch met event ids recorded before; skipping known ids for the next batches");
                }
                Err(e) => return Err(e),
            }
        }
        let rows = DedupeRows::of(candidates, config_version);
        let inserted = rows.bind(sqlx::query(INSERT_SKIPPING_KNOWN)).fetch_all(&mut **tx).await?;
        let fresh: HashSet<DedupeKey> =
            inserted.iter().map(|r| Ok(DedupeKey { id: r.try_get(0)?, day: r.try_get(1)? })).collect::<Result<_, sqlx::Error>>()?;
        let known: Vec<DedupeKey> = candidates.iter().map(DedupeKey::of).filter(|key| !fresh.contains(key)).collect();
        let seen_before = first_fingerprints(tx, &known).await?;
        Ok(Recorded { fresh: Fresh::Only(fresh), seen_before, fell_back })
    }
}

/// What identifies a dedupe record: the event id and the UTC day of the event time. Two
/// copies of an id are the same event only if they fall on the same day ([`tally_domain::event::event_day`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DedupeKey {
    pub id: String,
    pub day: NaiveDate,
}

impl DedupeKey {
    pub fn of(c: &Candidate<'_>) -> Self {
        DedupeKey { id: c.event.id.clone(), day: c.day }
    }
}

/// What recording a batch's ids found.
#[derive(Debug, Default)]
pub struct Recorded {
    fresh: Fresh,
    /// For each key recorded before this batch, the fingerprint it was recorded with.
    pub seen_before: HashMap<DedupeKey, String>,
    /// Whether a plain insert was tried and failed on an id recorded before.
    pub fell_back: bool,
}

impl Recorded {
    /// Whether `c` was recorded by this batch (counted now, not seen before).
    pub fn is_fresh(&self, c: &Candidate<'_>) -> bool {
        match &self.fresh {
            Fresh::All => true,
            Fresh::Only(keys) => keys.contains(&DedupeKey::of(c)),
        }
    }

    /// The fingerprint `c`'s id was recorded with on `c`'s day before this batch, if it was.
    pub fn fingerprint_before(&self, c: &Candidate<'_>) -> Option<&str> {
        self.seen_before.get(&DedupeKey::of(c)).map(String::as_str)
    }
}

/// The keys a batch recorded.
#[derive(Debug)]
enum Fresh {
    /// Every candidate's (the plain insert succeeded).
    All,
    Only(HashSet<DedupeKey>),
}

impl Default for Fresh {
    fn default() -> Self {
        Fresh::Only(HashSet::new())
    }
}

/// The columns of a dedupe row as both ways write them, in the order of [`copy_row`]'s fields
/// and of the skipping insert's parameters. No column name holds a comma ([`column_count`]).
macro_rules! dedupe_columns {
    () => {
        "processed_events (event_id, fingerprint, subject, event_time, scope, api_key_sha256, requests,
                           input_tokens, output_tokens, cached_tokens, cost_micros, corrects, config_version, event_day,
                           model, event_group)"
    };
}
const COPY_PLAIN: &str = concat!("COPY ", dedupe_columns!(), " FROM STDIN (FORMAT binary)");
/// `$13` is the configuration version of the whole batch, `$14` the event days (which key the
/// conflict together with the id, so a known id is looked for in its day's partition only). The arrays are unnested in the
/// select list (see "Bulk statements" in the [`crate`] docs).
const INSERT_SKIPPING_KNOWN: &str = concat!(
    "INSERT INTO ",
    dedupe_columns!(),
    " SELECT unnest($1::text[]), unnest($2::text[]), unnest($3::text[]), unnest($4::timestamptz[]), unnest($5::text[]),
             unnest($6::text[]), unnest($7::bigint[]), unnest($8::bigint[]), unnest($9::bigint[]), unnest($10::bigint[]),
             unnest($11::bigint[]), unnest($12::text[]), $13::bigint, unnest($14::date[]), unnest($15::text[]),
             unnest($16::text[])
      ON CONFLICT (event_id, event_day) DO NOTHING RETURNING event_id, event_day"
);

/// About how many bytes of `COPY` data are encoded before they are sent: Postgres inserts
/// one chunk while the next is encoded, and the connection's write buffer stays this small.
pub const COPY_CHUNK: usize = 256 * 1024;

/// The signature, flags and header extension length that open binary `COPY` data.
const COPY_HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
/// The field count that ends binary `COPY` data.
const COPY_TRAILER: i16 = -1;
/// Fields per row: the columns of [`dedupe_columns`], counted from the list.
const COPY_FIELDS: i16 = column_count(dedupe_columns!());
/// Postgres' epoch (2000-01-01T00:00:00Z): a binary `timestamptz` counts microseconds from it.
const POSTGRES_EPOCH: DateTime<Utc> = DateTime::from_timestamp(946_684_800, 0).expect("a valid instant");

/// The columns in a list of the form `table (a, b, ...)`: one more than its commas.
const fn column_count(list: &str) -> i16 {
    let (bytes, mut i, mut commas) = (list.as_bytes(), 0, 0);
    while i < bytes.len() {
        commas += (bytes[i] == b',') as i16;
        i += 1;
    }
    commas + 1
}

/// Records every candidate the plain way: one binary `COPY`, streamed in chunks.
async fn copy_rows(conn: &mut PgConnection, candidates: &[Candidate<'_>], config_version: i64) -> Result<(), sqlx::Error> {
    let mut copy = conn.copy_in_raw(COPY_PLAIN).await?;
    let mut chunk = Vec::with_capacity(COPY_CHUNK + 1024);
    chunk.extend_from_slice(COPY_HEADER);
    for c in candidates {
        copy_row(&mut chunk, c, config_version);
        if chunk.len() >= COPY_CHUNK {
            copy.send(chunk.as_slice()).await?;
            chunk.clear();
        }
    }
    chunk.extend_from_slice(&COPY_TRAILER.to_be_bytes());
    copy.send(chunk.as_slice()).await?;
    let copied = copy.finish().await?;
    if copied != candidates.len() as u64 {
        // Not expected: a malformed stream fails instead. Refused, the batch is retried.
        return Err(sqlx::Error::Protocol(format!("COPY recorded {copied} dedupe rows of {}", candidates.len())));
    }
    Ok(())
}

/// Appends a candidate's dedupe row in binary `COPY` form: the field count, then each field
/// as its length and its bytes in the type's binary form (-1 for NULL).
fn copy_row(out: &mut Vec<u8>, c: &Candidate<'_>, config_version: i64) {
    let (e, amounts) = (&c.event, c.event.amounts());
    out.extend_from_slice(&COPY_FIELDS.to_be_bytes());
    copy_text(out, Some(&e.id));
    copy_text(out, Some(&c.fingerprint));
    copy_text(out, Some(&e.subject));
    copy_bigint(out, postgres_micros(e.time));
    copy_text(out, Some(&e.scope));
    copy_text(out, e.api_key_sha256.as_deref());
    for amount in [amounts.requests, amounts.input_tokens, amounts.output_tokens, amounts.cached_tokens, amounts.cost_micros] {
        copy_bigint(out, amount);
    }
    copy_text(out, e.corrects.as_deref());
    copy_bigint(out, config_version);
    copy_date(out, c.day);
    copy_text(out, e.model.as_deref());
    copy_text(out, e.group.as_deref());
}

/// A `date` in binary form: days since Postgres' epoch.
fn copy_date(out: &mut Vec<u8>, day: NaiveDate) {
    let days = (day - POSTGRES_EPOCH.date_naive()).num_days() as i32;
    out.extend_from_slice(&4i32.to_be_bytes());
    out.extend_from_slice(&days.to_be_bytes());
}

/// A time as a binary `timestamptz`: microseconds since Postgres' epoch, a fraction of a
/// microsecond cut toward that epoch, as sqlx encodes the skipping insert's times.
fn postgres_micros(time: DateTime<Utc>) -> i64 {
    // Every `DateTime` is less than 2^63 microseconds from 2000.
    (time - POSTGRES_EPOCH).num_microseconds().unwrap_or(i64::MAX)
}

fn copy_text(out: &mut Vec<u8>, text: Option<&str>) {
    match text {
        Some(t) => {
            out.extend_from_slice(&(t.len() as i32).to_be_bytes());
            out.extend_from_slice(t.as_bytes());
        }
        None => out.extend_from_slice(&(-1i32).to_be_bytes()),
    }
}

/// A `bigint`, or a `timestamptz` given in microseconds since Postgres' epoch.
fn copy_bigint(out: &mut Vec<u8>, value: i64) {
    out.extend_from_slice(&8i32.to_be_bytes());
    out.extend_from_slice(&value.to_be_bytes());
}

/// Whether `e` is Postgres refusing a row because its key exists.
fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.is_unique_violation())
}

/// The fingerprint each of `keys` was recorded with. The days are also given as a list of
/// their own, so Postgres reads only the partitions of those days.
async fn first_fingerprints(tx: &mut Transaction<'_, Postgres>, keys: &[DedupeKey]) -> Result<HashMap<DedupeKey, String>, sqlx::Error> {
    if keys.is_empty() {
        return Ok(HashMap::new());
    }
    let ids: Vec<&str> = keys.iter().map(|k| k.id.as_str()).collect();
    let days: Vec<NaiveDate> = keys.iter().map(|k| k.day).collect();
    let rows: Vec<(String, NaiveDate, String)> = sqlx::query_as(
        "SELECT p.event_id, p.event_day, p.fingerprint
         FROM processed_events p JOIN unnest($1::text[], $2::date[]) AS k(id, day) ON p.event_id = k.id AND p.event_day = k.day
         WHERE p.event_day = ANY($2)",
    )
    .bind(&ids)
    .bind(&days)
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows.into_iter().map(|(id, day, fingerprint)| (DedupeKey { id, day }, fingerprint)).collect())
}

/// The columns of a batch's dedupe rows, in the order of the insert's parameters.
struct DedupeRows<'a> {
    ids: Vec<&'a str>,
    fingerprints: Vec<&'a str>,
    subjects: Vec<&'a str>,
    times: Vec<DateTime<Utc>>,
    scopes: Vec<&'a str>,
    api_keys: Vec<Option<&'a str>>,
    requests: Vec<i64>,
    input_tokens: Vec<i64>,
    output_tokens: Vec<i64>,
    cached_tokens: Vec<i64>,
    cost_micros: Vec<i64>,
    corrects: Vec<Option<&'a str>>,
    config_version: i64,
    days: Vec<NaiveDate>,
    models: Vec<Option<&'a str>>,
    groups: Vec<Option<&'a str>>,
}

impl<'a> DedupeRows<'a> {
    fn of(candidates: &'a [Candidate<'_>], config_version: i64) -> Self {
        let n = candidates.len();
        let mut rows = DedupeRows {
            ids: Vec::with_capacity(n),
            fingerprints: Vec::with_capacity(n),
            subjects: Vec::with_capacity(n),
            times: Vec::with_capacity(n),
            scopes: Vec::with_capacity(n),
            api_keys: Vec::with_capacity(n),
            requests: Vec::with_capacity(n),
            input_tokens: Vec::with_capacity(n),
            output_tokens: Vec::with_capacity(n),
            cached_tokens: Vec::with_capacity(n),
            cost_micros: Vec::with_capacity(n),
            corrects: Vec::with_capacity(n),
            config_version,
            days: Vec::with_capacity(n),
            models: Vec::with_capacity(n),
            groups: Vec::with_capacity(n),
        };
        for c in candidates {
            let (e, amounts) = (&c.event, c.event.amounts());
            rows.ids.push(&e.id);
            rows.fingerprints.push(&c.fingerprint);
            rows.subjects.push(&e.subject);
            rows.times.push(e.time);
            rows.scopes.push(&e.scope);
            rows.api_keys.push(e.api_key_sha256.as_deref());
            rows.requests.push(amounts.requests);
            rows.input_tokens.push(amounts.input_tokens);
            rows.output_tokens.push(amounts.output_tokens);
            rows.cached_tokens.push(amounts.cached_tokens);
            rows.cost_micros.push(amounts.cost_micros);
            rows.corrects.push(e.corrects.as_deref());
            rows.days.push(c.day);
            rows.models.push(e.model.as_deref());
            rows.groups.push(e.group.as_deref());
        }
        rows
    }

    fn bind<'q>(&'q self, query: Query<'q, Postgres, PgArguments>) -> Query<'q, Postgres, PgArguments> {
        query
            .bind(&self.ids)
            .bind(&self.fingerprints)
            .bind(&self.subjects)
            .bind(&self.times)
            .bind(&self.scopes)
            .bind(&self.api_keys)
            .bind(&self.requests)
            .bind(&self.input_tokens)
            .bind(&self.output_tokens)
            .bind(&self.cached_tokens)
            .bind(&self.cost_micros)
            .bind(&self.corrects)
            .bind(self.config_version)
            .bind(&self.days)
            .bind(&self.models)
            .bind(&self.groups)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_met_known_id_makes_the_next_batches_skip_known_ids_then_plain_again() {
        let recorder = Recorder::default();
        assert!(recorder.tries_plain());
        recorder.met_known_id();
        let choices: Vec<bool> = (0..CAUTIOUS_BATCHES + 2).map(|_| recorder.tries_plain()).collect();
        assert!(choices[..CAUTIOUS_BATCHES as usize].iter().all(|plain| !plain), "{choices:?}");
        assert!(choices[CAUTIOUS_BATCHES as usize..].iter().all(|plain| *plain), "{choices:?}");
    }

    #[test]
    fn the_recorder_is_shared_by_its_clones() {
        let recorder = Recorder::default();
        recorder.clone().met_known_id();
        assert!(!recorder.tries_plain());
    }
}
