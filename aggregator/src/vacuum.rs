//! Vacuuming of the tables the aggregator churns, whatever the server's autovacuum does.
//!
//! The `outbox` is a queue: every snapshot is inserted and, once relayed, deleted, so its ids
//! only grow and its live rows sit at the right end of its primary key. The relay reads it
//! from the left (`ORDER BY id`). Until a VACUUM removes them, the index keeps an entry for
//! every row ever deleted, and each read walks all of them: with autovacuum off, two million
//! relayed snapshots make every relay round read 96 000 pages, about a second (Postgres 15).
//! `decisions` is alike for the scheduler: a subject's row is updated with a new
//! `next_check_at`, and the scheduler reads the oldest entries of that index first.
//! Autovacuum handles both when it runs, but it is a server setting that a shared or tuned
//! server may have off; so the aggregator vacuums them itself.
//!
//! # Contract
//! - [`run_periodically`] vacuums each table of [`CHURNED`] at its own interval, one instance
//!   at a time per table (a session advisory lock; an instance that does not get it skips that
//!   round), on a pooled connection, outside any transaction (VACUUM refuses one).
//! - A failure is logged and tried again at the next round; counting never waits for it.
//! - VACUUM takes no lock that a batch, the relay or the scheduler waits on (it conflicts only
//!   with schema changes and other VACUUMs), and with the visibility map it reads only the
//!   pages changed since its last run.

use std::time::{Duration, Instant};

use sqlx::PgPool;

/// A table the aggregator vacuums, and how often.
#[derive(Debug, Clone, Copy)]
pub struct Churned {
    pub table: &'static str,
    pub every: Duration,
    /// The session advisory lock that makes one instance vacuum it at a time.
    pub lock: i64,
}

/// The tables vacuumed, each as often as its churn calls for: the outbox sees every
/// snapshot, decisions every subject's next check.
pub const CHURNED: [Churned; 2] = [
    Churned { table: "outbox", every: Duration::from_secs(10), lock: 0x7a11_7661_6301 },
    Churned { table: "decisions", every: Duration::from_secs(60), lock: 0x7a11_7661_6302 },
];

/// How often [`run_periodically`] looks whether a table is due.
const TICK: Duration = Duration::from_secs(1);

/// Vacuums each table of [`CHURNED`] when its interval has passed since its last try, for
/// ever (see the module docs).
pub async fn run_periodically(pool: PgPool) {
    let mut last: [Option<Instant>; CHURNED.len()] = [None; CHURNED.len()];
    loop {
        for (table, last) in CHURNED.iter().zip(last.iter_mut()) {
            if last.is_some_and(|at| at.elapsed() < table.every) {
                continue;
            }
            *last = Some(Instant::now());
            if let Err(e) = vacuum(&pool, table).await {
                tracing::warn!(table = table.table, error = %e, "vacuum failed; trying again later");
            }
        }
        tokio::time::sleep(TICK).await;
    }
}

/// Vacuums `table` unless another instance holds its lock. Returns whether it ran.
pub async fn vacuum(pool: &PgPool, table: &Churned) -> Result<bool, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)").bind(table.lock).fetch_one(&mut *conn).await?;
    if !locked {
        return Ok(false);
    }
    let started = Instant::now();
    let result = sqlx::query(&format!("VACUUM (ANALYZE) {}", table.table)).execute(&mut *conn).await;
    // A connection that failed may be gone with its lock; a failure to unlock is not the run's.
    let _ = sqlx::query("SELECT pg_advisory_unlock($1)").bind(table.lock).execute(&mut *conn).await;
    result?;
    tracing::debug!(table = table.table, millis = started.elapsed().as_millis() as u64, "vacuumed");
    Ok(true)
}
