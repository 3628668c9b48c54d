//! The steady-state section: the pipeline's throughput on a database that holds a month of
//! past, against the same count on a fresh database, in the same run.
//!
//! Two Tallys of their own (two run ids), each set up from scratch:
//! - **fresh**: the timed count alone, as in the pipeline section;
//! - **steady**: first the past, then the same timed count. The past is what a busy
//!   installation holds after running for longer than its lateness window:
//!   - `past_subjects` subjects with ledgers, decisions and thresholds, made the real way:
//!     one event each through an aggregator that is then stopped;
//!   - `past_records` dedupe records spread evenly over the days the lateness window keeps
//!     (today included), written straight into `processed_events` by SQL in one
//!     transaction per day, on a connection of their own (closed before the timing, so its
//!     CPU is not counted as the pipeline's), then `ANALYZE`, and a `VACUUM` of what the
//!     past subjects' own traffic left (relayed snapshots), as the aggregator and autovacuum
//!     would have done over the month.
//!
//! Each count starts right after a `CHECKPOINT`, so neither pays for flushing what came
//! before it (for the steady one, the gigabytes the load wrote); the checkpoints Postgres
//! began during each count are reported.
//!
//! Both counts use new event ids for the same number of subjects and events, on an
//! aggregator started for the count, so the ratio steady / fresh isolates what the past
//! costs. The section also reports the past's size at rest (`processed_events` bytes per
//! record), and how long it took to load.
//!
//! Before loading, the section checks that the Postgres data directory (when it is on this
//! machine) has room for the records, and refuses with the figures if not.

use std::time::Instant;

use anyhow::{bail, Context};
use chrono::{NaiveDate, Utc};
use sqlx::PgPool;

use super::broker::Prepared;
use super::pipeline::{self, Pipeline, Timed};
use super::report::Section;
use super::stack::{SharedServers, Stack};

/// The sizes of the section.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Events of each timed count.
    pub events: usize,
    /// Subjects of each timed count.
    pub subjects: usize,
    /// Dedupe records of the past.
    pub past_records: u64,
    /// Subjects of the past, each with its ledgers and decision.
    pub past_subjects: usize,
    /// The aggregator's lateness window in days: the past covers the days it keeps.
    pub lateness_days: i64,
}

/// Bytes of `processed_events` one record of the past takes at rest, for the room check:
/// 353 measured with 100 million of them, with a margin for the write-ahead log (bounded by
/// `max_wal_size`) and the free space in pages.
const BYTES_PER_RECORD_NEEDED: u64 = 420;

/// Days loaded at once, one transaction and connection each: the machine has two cores.
const LOADERS: usize = 2;

/// Measures the section (see the module docs).
pub async fn measure(servers: &SharedServers<'_>, plan: &Plan, keep: bool) -> anyhow::Result<Section> {
    eprintln!("[bench] steady state: fresh database, {} events over {} subjects", plan.events, plan.subjects);
    let fresh = on_own_tally(servers, plan, keep, false).await?;
    eprintln!(
        "[bench] steady state: a past of {} dedupe records and {} subjects, then the same count",
        plan.past_records, plan.past_subjects
    );
    let steady = on_own_tally(servers, plan, keep, true).await?;
    let past = steady.past.as_ref().context("the steady run loaded no past")?;
    let mut s = Section::default();
    s.figure("events", fresh.timed.events)
        .figure("fresh_events_per_s", fresh.timed.events_per_s)
        .figure("steady_events_per_s", steady.timed.events_per_s)
        .figure("fresh_aggregator_cpu_us_per_event", fresh.timed.aggregator_us_per_event())
        .figure("steady_aggregator_cpu_us_per_event", steady.timed.aggregator_us_per_event())
        .figure("fresh_postgres_cpu_us_per_event", fresh.timed.postgres_us_per_event())
        .figure("steady_postgres_cpu_us_per_event", steady.timed.postgres_us_per_event())
        .figure("past_dedupe_records", past.records as f64)
        .figure("past_subjects", past.subjects as f64)
        .figure("past_days", past.days as f64)
        .figure("past_load_seconds", past.load_seconds)
        .figure("past_records_per_s", past.records as f64 / past.load_seconds.max(1e-9))
        .figure("dedupe_bytes_at_rest", past.dedupe_bytes as f64)
        .figure("dedupe_bytes_per_record", past.dedupe_bytes as f64 / (past.records.max(1)) as f64)
        .figure("fresh_checkpoints_during_count", fresh.checkpoints_during as f64)
        .figure("steady_checkpoints_during_count", steady.checkpoints_during as f64)
        .ratio("steady_to_fresh", steady.timed.events_per_s, fresh.timed.events_per_s)
        .ratio(
            "steady_to_fresh_cpu_per_event",
            steady.timed.aggregator_us_per_event() + steady.timed.postgres_us_per_event(),
            fresh.timed.aggregator_us_per_event() + fresh.timed.postgres_us_per_event(),
        )
        .target("steady events_per_s >= 0.8 of fresh", steady.timed.events_per_s >= 0.8 * fresh.timed.events_per_s)
        .note(format!(
            "two Tallys of their own: fresh, and one holding {} dedupe records over the {} days the lateness window keeps plus {} subjects' ledgers and decisions; \
             each times {} new events over {} subjects on a freshly started aggregator",
            past.records, past.days, past.subjects, plan.events, plan.subjects
        ))
        .note("after loading, the past is analyzed and vacuumed (outbox, decisions, ledgers) as the aggregator and autovacuum would have over the month; each count starts right after a CHECKPOINT")
        .note("dedupe_bytes_at_rest: pg_total_relation_size of every partition of processed_events (heap, primary key, TOAST) after the load");
    Timed::explain(&mut s);
    Ok(s)
}

/// What one Tally's count came to, with its past when it had one.
struct Run {
    timed: Timed,
    past: Option<Past>,
    /// Checkpoints Postgres began during the count (timed or requested).
    checkpoints_during: i64,
}

/// The past loaded before a count.
struct Past {
    records: u64,
    subjects: usize,
    days: usize,
    load_seconds: f64,
    dedupe_bytes: i64,
}

/// Sets up a Tally of its own, loads the past when `with_past`, times the count, and
/// removes the Tally (unless `keep`).
async fn on_own_tally(servers: &SharedServers<'_>, plan: &Plan, keep: bool, with_past: bool) -> anyhow::Result<Run> {
    let stack = Stack::new(servers.brokers, servers.database_url, servers.clickhouse_url, &pipeline::tiers_yaml())?;
    let outcome = async {
        stack.setup(&[]).await.context("tally setup for the steady-state section failed")?;
        let mut p = Pipeline::new(stack.clone()).await?;
        let past = if with_past { Some(load_past(&mut p, plan).await?) } else { None };
        let messages = pipeline::events(&format!("{}-load", stack.id()), "s", plan.subjects, plan.events);
        // Both counts start right after a checkpoint, so neither pays for flushing what came
        // before it (for the steady one, the gigabytes the load wrote).
        checkpoint(&p.pool).await;
        let checkpoints_before = checkpoints(&p.pool).await;
        let timed = p.count_timed(messages).await?;
        let checkpoints_during = checkpoints(&p.pool).await - checkpoints_before;
        if let Some(mut agg) = p.aggregator.take() {
            agg.stop();
        }
        Ok(Run { timed, past, checkpoints_during })
    }
    .await;
    if !keep {
        stack.teardown(&stack.all_topics(&[])).await;
        let _ = std::fs::remove_dir_all(stack.log_dir());
    }
    outcome
}

/// Asks Postgres for a checkpoint. Best effort: it needs a superuser or `pg_checkpoint`, and
/// without one the counts are still measured (the notes say the figures then include it).
async fn checkpoint(pool: &PgPool) {
    if let Err(e) = sqlx::query("CHECKPOINT").execute(pool).await {
        eprintln!("[bench] steady state: CHECKPOINT refused ({e}); the count may pay for flushing what came before it");
    }
}

/// Checkpoints the server has begun since its statistics were reset.
async fn checkpoints(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT (checkpoints_timed + checkpoints_req)::bigint FROM pg_stat_bgwriter").fetch_one(pool).await.unwrap_or(0)
}

/// Loads the past (see the module docs) and returns its figures.
async fn load_past(p: &mut Pipeline, plan: &Plan) -> anyhow::Result<Past> {
    let started = Instant::now();
    let days = kept_days(Utc::now().date_naive(), plan.lateness_days);
    let pool = p.stack.postgres().connect().await?;
    ensure_room(&pool, plan.past_records).await?;

    eprintln!("[bench] steady state: {} subjects' ledgers, one event each through the aggregator", plan.past_subjects);
    p.count_timed(past_subject_events(p.stack.id(), plan.past_subjects)).await?;
    if let Some(mut agg) = p.aggregator.take() {
        agg.stop();
    }

    eprintln!("[bench] steady state: {} dedupe records over {} days, {LOADERS} days at a time", plan.past_records, days.len());
    let per_day = split_evenly(plan.past_records, days.len());
    let jobs: Vec<DayLoad> = days.iter().zip(per_day).map(|(&day, records)| DayLoad { day, records }).collect();
    let done = std::sync::atomic::AtomicU64::new(0);
    let total = plan.past_records;
    let loaders = jobs.chunks(jobs.len().div_ceil(LOADERS).max(1)).map(|share| {
        let (pool, done, id) = (&pool, &done, p.stack.id());
        async move {
            let mut loaded = 0;
            for job in share {
                loaded += job.load(pool, id, plan.past_subjects).await?;
                let so_far = done.fetch_add(job.records, std::sync::atomic::Ordering::Relaxed) + job.records;
                eprintln!(
                    "[bench] steady state: day {} loaded ({so_far} of {total} records, {:.0} s)",
                    job.day,
                    started.elapsed().as_secs_f64()
                );
            }
            anyhow::Ok(loaded)
        }
    });
    let mut loaded = 0;
    for result in futures::future::join_all(loaders).await {
        loaded += result?;
    }
    if loaded != plan.past_records {
        bail!("the past holds {loaded} dedupe records, not the {} asked for", plan.past_records);
    }
    sqlx::query("ANALYZE processed_events").execute(&pool).await.context("ANALYZE processed_events failed")?;
    // What the past's own traffic left to clean up (a million relayed snapshots, ledger
    // and decision rows written once) is cleaned up as the aggregator and autovacuum would
    // have over the month, not during the timing.
    sqlx::query("VACUUM (ANALYZE) outbox, decisions, ledgers").execute(&pool).await.context("VACUUM after the past failed")?;
    let dedupe_bytes: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(pg_total_relation_size(inhrelid)), 0)::bigint FROM pg_inherits WHERE inhparent = 'processed_events'::regclass",
    )
    .fetch_one(&pool)
    .await?;
    // The loading connections' CPU is not the pipeline's: they go before the timing.
    pool.close().await;
    Ok(Past {
        records: plan.past_records,
        subjects: plan.past_subjects,
        days: days.len(),
        load_seconds: started.elapsed().as_secs_f64(),
        dedupe_bytes,
    })
}

/// The days whose dedupe records the aggregator keeps on `today` with a lateness window of
/// `lateness_days`: the window's days up to today.
pub fn kept_days(today: NaiveDate, lateness_days: i64) -> Vec<NaiveDate> {
    let first = today - chrono::Duration::days(lateness_days.max(1) - 1);
    first.iter_days().take_while(|d| *d <= today).collect()
}

/// `total` split into `parts` whole shares that differ by at most one and sum to `total`.
pub fn split_evenly(total: u64, parts: usize) -> Vec<u64> {
    let parts = parts.max(1) as u64;
    (0..parts).map(|i| total / parts + u64::from(i < total % parts)).collect()
}

/// One event for each past subject (`past<n>`), with ids of their own.
fn past_subject_events(run: &str, subjects: usize) -> Vec<Prepared> {
    pipeline::events(&format!("{run}-past"), "past", subjects, subjects)
}

/// One day's share of the past dedupe records.
struct DayLoad {
    day: NaiveDate,
    records: u64,
}

impl DayLoad {
    /// Inserts the day's records in one transaction: ids `<run>-past-<day>-<n>`, event times
    /// spread over the day, subjects among the past subjects, amounts as the bench's events
    /// carry, a 64-hex-digit fingerprint. Returns how many records it inserted.
    async fn load(&self, pool: &PgPool, run: &str, subjects: usize) -> anyhow::Result<u64> {
        if self.records == 0 {
            return Ok(0);
        }
        let mut tx = pool.begin().await?;
        // The records are the bench's own and rebuilt on a crash: no need to wait for the disk.
        sqlx::query("SET LOCAL synchronous_commit = off").execute(&mut *tx).await?;
        let inserted = sqlx::query(
            "INSERT INTO processed_events (event_id, fingerprint, subject, event_time, processed_at, scope, api_key_sha256,
                                           requests, input_tokens, output_tokens, cached_tokens, cost_micros, config_version, event_day)
             SELECT $1 || '-past-' || $2::text || '-' || g,
                    md5(g::text) || md5($2::text || g::text),
                    'past' || (g % $4),
                    $2::date + make_interval(secs => (g - 1) * 86400.0 / $3),
                    $2::date + make_interval(secs => (g - 1) * 86400.0 / $3),
                    'chat', NULL, 1, 300, 100, 0, 105000, 1, $2::date
               FROM generate_series(1::bigint, $3::bigint) AS g",
        )
        .bind(run)
        .bind(self.day)
        .bind(self.records as i64)
        .bind(subjects.max(1) as i64)
        .execute(&mut *tx)
        .await
        .with_context(|| format!("failed to load the past dedupe records of {}", self.day))?;
        tx.commit().await?;
        Ok(inserted.rows_affected())
    }
}

/// Refuses to load `records` dedupe records when the Postgres data directory is on this
/// machine and has less room than they need. A server elsewhere (or one that does not say
/// where its data is) is not checked.
async fn ensure_room(pool: &PgPool, records: u64) -> anyhow::Result<()> {
    let Ok(dir) = sqlx::query_scalar::<_, String>("SHOW data_directory").fetch_one(pool).await else {
        return Ok(());
    };
    let Some(free) = free_bytes(&dir) else { return Ok(()) };
    let needed = records.saturating_mul(BYTES_PER_RECORD_NEEDED);
    if free < needed {
        bail!(
            "the Postgres data directory has {:.1} GB free, and {records} past dedupe records need about {:.1} GB: \
             give a smaller --past-records",
            free as f64 / 1e9,
            needed as f64 / 1e9
        );
    }
    Ok(())
}

/// Free bytes of the file system holding `path`, when it is on this machine.
fn free_bytes(path: &str) -> Option<u64> {
    let c_path = std::ffi::CString::new(path).ok()?;
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c_path` is a valid NUL-terminated string and `stat` a valid out-pointer.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) };
    (rc == 0).then(|| stat.f_bavail as u64 * stat.f_frsize as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_past_covers_the_days_the_lateness_window_keeps_up_to_today() {
        let today = NaiveDate::from_ymd_opt(2026, 3, 2).unwrap();
        let days = kept_days(today, 3);
        let expected: Vec<NaiveDate> = ["2026-02-28", "2026-03-01", "2026-03-02"].iter().map(|d| d.parse().unwrap()).collect();
        assert_eq!(days, expected);
        assert_eq!(kept_days(today, 35).len(), 35);
        assert_eq!(kept_days(today, 0), vec![today], "a window of no days still holds today");
    }

    #[test]
    fn records_split_evenly_over_the_days_and_sum_to_the_total() {
        assert_eq!(split_evenly(10, 3), vec![4, 3, 3]);
        assert_eq!(split_evenly(2, 4), vec![1, 1, 0, 0]);
        let shares = split_evenly(100_000_000, 35);
        assert_eq!(shares.iter().sum::<u64>(), 100_000_000);
        assert!(shares.iter().max().unwrap() - shares.iter().min().unwrap() <= 1);
    }
}
