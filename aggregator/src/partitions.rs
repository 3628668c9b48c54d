//! Upkeep of the dedupe record's partitions: `processed_events` is partitioned by the UTC
//! day of the event time (migration 0018), one partition per day plus a DEFAULT partition.
//!
//! # Contract
//! [`maintain`] makes the partitions for every day from `today - lateness - 1` to
//! `today + 2` exist, and drops the partitions of days before `today - lateness - 2`. An
//! event older than the lateness window, or more than [`MAX_FUTURE`] ahead, is quarantined
//! before dedupe, so no record of a dropped day can be needed again; the two days of margin
//! cover the future tolerance and clock skew between instances.
//!
//! - **Idempotent**: a second run in the same day changes nothing.
//! - **One at a time**: it runs under a Postgres advisory lock; an instance that does not
//!   get it leaves the work to the one that has it.
//! - **Never loses a row**: a row whose day had no partition went to the DEFAULT partition;
//!   creating that day's partition moves those rows into it in the same transaction.
//! - **Short locks**: each partition is created or dropped in a transaction of its own with
//!   a lock timeout, so a batch commit waits at most that long behind it; a step that times
//!   out fails the run, which is tried again later ([`run_periodically`]). Counting never
//!   waits for maintenance: a missing partition only sends rows to DEFAULT.
//!
//! [`MAX_FUTURE`]: tally_domain::event::MAX_FUTURE

use std::collections::BTreeSet;
use std::time::Duration as StdDuration;

use chrono::{Duration, NaiveDate, Utc};
use sqlx::{PgConnection, PgPool};

/// The advisory lock key under which one instance maintains the partitions ("dedupe" in ASCII).
const MAINTENANCE_LOCK: i64 = 0x6465_6475_7065;
/// How long one step waits for a table lock before the run gives up (and is tried again).
const LOCK_TIMEOUT: &str = "2s";
/// Days kept past the lateness window: the future tolerance and clock skew, with room.
const MARGIN_DAYS: i64 = 2;
/// Days ahead of today whose partitions exist in advance.
const DAYS_AHEAD: i64 = 2;
/// The name of a day's partition is this prefix and the day as `YYYYMMDD`.
const PARTITION_PREFIX: &str = "processed_events_p";
/// How often [`run_periodically`] maintains when the last run succeeded, and when it failed.
const EVERY: StdDuration = StdDuration::from_secs(3600);
const RETRY_AFTER: StdDuration = StdDuration::from_secs(60);

/// The days whose partitions should exist, and the first day kept, for `today`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Partitions of days before this one are dropped.
    pub first_kept: NaiveDate,
    /// The first day whose partition is made in advance (`today - lateness - 1`).
    pub first_made: NaiveDate,
    /// The last day whose partition is made in advance.
    pub last_made: NaiveDate,
}

impl Retention {
    pub fn for_day(today: NaiveDate, lateness_days: i64) -> Self {
        Retention {
            first_kept: today - Duration::days(lateness_days + MARGIN_DAYS),
            first_made: today - Duration::days(lateness_days + 1),
            last_made: today + Duration::days(DAYS_AHEAD),
        }
    }

    /// The days whose partitions should exist.
    fn days_made(&self) -> impl Iterator<Item = NaiveDate> {
        self.first_made.iter_days().take_while(|d| *d <= self.last_made).collect::<Vec<_>>().into_iter()
    }
}

/// What one run of [`maintain`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Maintained {
    /// Whether this instance held the lock (else it did nothing).
    pub locked: bool,
    pub created: Vec<NaiveDate>,
    pub dropped: Vec<NaiveDate>,
    /// Rows moved out of the DEFAULT partition into partitions created now.
    pub moved_from_default: u64,
}

/// The name of `day`'s partition.
pub fn partition_name(day: NaiveDate) -> String {
    format!("{PARTITION_PREFIX}{}", day.format("%Y%m%d"))
}

/// The day of a partition named by [`partition_name`], or `None` for any other table.
fn day_of(name: &str) -> Option<NaiveDate> {
    NaiveDate::parse_from_str(name.strip_prefix(PARTITION_PREFIX)?, "%Y%m%d").ok()
}

/// Brings the partitions in line with `retention` (see the module docs).
pub async fn maintain(pool: &PgPool, retention: Retention) -> Result<Maintained, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)").bind(MAINTENANCE_LOCK).fetch_one(&mut *conn).await?;
    if !locked {
        return Ok(Maintained::default());
    }
    let result = maintain_locked(&mut conn, retention).await;
    // A connection that failed may be gone with its lock; a failure to unlock is not the run's.
    let _ = sqlx::query("SELECT pg_advisory_unlock($1)").bind(MAINTENANCE_LOCK).execute(&mut *conn).await;
    result
}

async fn maintain_locked(conn: &mut PgConnection, retention: Retention) -> Result<Maintained, sqlx::Error> {
    let existing = existing_days(conn).await?;
    let mut done = Maintained { locked: true, ..Maintained::default() };
    for day in retention.days_made().filter(|d| !existing.contains(d)) {
        done.moved_from_default += create_partition(conn, day).await?;
        done.created.push(day);
    }
    for day in existing.iter().copied().filter(|d| *d < retention.first_kept) {
        drop_partition(conn, day).await?;
        done.dropped.push(day);
    }
    Ok(done)
}

/// The days that have a partition.
async fn existing_days(conn: &mut PgConnection) -> Result<BTreeSet<NaiveDate>, sqlx::Error> {
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = 'processed_events'::regclass",
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(names.iter().filter_map(|n| day_of(n)).collect())
}

/// Creates `day`'s partition, moving into it any rows of that day the DEFAULT partition
/// caught (a partition cannot be attached while DEFAULT holds rows of its range). Returns
/// how many rows moved.
async fn create_partition(conn: &mut PgConnection, day: NaiveDate) -> Result<u64, sqlx::Error> {
    let name = partition_name(day);
    let next = day + Duration::days(1);
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    sqlx::query(&format!("SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")).execute(&mut *tx).await?;
    // Taken first, so no batch adds a row of this day to DEFAULT between the move and the attach.
    sqlx::query("LOCK TABLE processed_events_default IN ACCESS EXCLUSIVE MODE").execute(&mut *tx).await?;
    sqlx::query(&format!("CREATE TABLE {name} (LIKE processed_events INCLUDING DEFAULTS INCLUDING CONSTRAINTS)")).execute(&mut *tx).await?;
    let moved = sqlx::query(&format!(
        "WITH moved AS (DELETE FROM processed_events_default WHERE event_day >= $1 AND event_day < $2 RETURNING *)
         INSERT INTO {name} SELECT * FROM moved"
    ))
    .bind(day)
    .bind(next)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    sqlx::query(&format!("ALTER TABLE processed_events ATTACH PARTITION {name} FOR VALUES FROM ('{day}') TO ('{next}')"))
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    if moved > 0 {
        tracing::warn!(%day, rows = moved, "dedupe records of a day without a partition moved from the DEFAULT partition into it");
    }
    Ok(moved)
}

async fn drop_partition(conn: &mut PgConnection, day: NaiveDate) -> Result<(), sqlx::Error> {
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    sqlx::query(&format!("SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")).execute(&mut *tx).await?;
    sqlx::query(&format!("DROP TABLE {}", partition_name(day))).execute(&mut *tx).await?;
    tx.commit().await
}

/// Maintains once for today, logging what it did or why it failed.
pub async fn maintain_now(pool: &PgPool, lateness_days: i64) -> Result<Maintained, sqlx::Error> {
    let retention = Retention::for_day(Utc::now().date_naive(), lateness_days);
    match maintain(pool, retention).await {
        Ok(done) => {
            if !done.created.is_empty() || !done.dropped.is_empty() {
                tracing::info!(created = done.created.len(), dropped = done.dropped.len(), first_kept = %retention.first_kept, "dedupe partitions maintained");
            }
            Ok(done)
        }
        Err(e) => {
            tracing::warn!(error = %e, "dedupe partition maintenance failed; counting goes on, it is tried again");
            Err(e)
        }
    }
}

/// Maintains every [`EVERY`], or [`RETRY_AFTER`] after a failure, for ever.
pub async fn run_periodically(pool: PgPool, lateness_days: i64) {
    loop {
        let wait = match maintain_now(&pool, lateness_days).await {
            Ok(_) => EVERY,
            Err(_) => RETRY_AFTER,
        };
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn day(s: &str) -> NaiveDate {
        s.parse().unwrap()
    }

    #[test]
    fn retention_keeps_the_window_and_the_margin() {
        let r = Retention::for_day(day("2026-12-07"), 35);
        assert_eq!(r.first_kept, day("2026-10-31"));
        assert_eq!(r.first_made, day("2026-11-01"));
        assert_eq!(r.last_made, day("2026-12-09"));
        assert_eq!(r.days_made().count(), 39);
    }

    #[test]
    fn partition_names_round_trip_and_other_tables_are_ignored() {
        assert_eq!(partition_name(day("2026-01-02")), "processed_events_p20260102");
        assert_eq!(day_of("processed_events_p20260102"), Some(day("2026-01-02")));
        assert_eq!(day_of("processed_events_default"), None);
        assert_eq!(day_of("processed_events_pxyz"), None);
    }
}
