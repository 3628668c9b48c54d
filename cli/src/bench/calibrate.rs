//! The machine's own speed, measured at the start of every run with work that is not
//! Tally's, so that two machines' figures can be told apart: a slower machine shows here
//! too, a Tally regression does not.
//!
//! - `cpu_sha256_mib_per_s`: one thread hashing 1 KiB strings with SHA-256 (what the
//!   aggregator does per event for fingerprints), 128 MiB in all.
//! - `postgres_sum_ms`: the server summing ten million integers from `generate_series`:
//!   its executor's speed on one backend, with no I/O.
//! - `postgres_insert_rows_per_s`: the server inserting 200 000 rows with a text primary key
//!   into a temporary table: index and heap work, no write-ahead log.
//!
//! Each is the best of three, the figure least disturbed by other work on the machine.

use std::time::{Duration, Instant};

use serde::Serialize;
use sqlx::Connection;

/// The machine's speed figures (see the module docs).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Calibration {
    pub cpu_sha256_mib_per_s: f64,
    pub postgres_sum_ms: f64,
    pub postgres_insert_rows_per_s: f64,
}

const ROUNDS: usize = 3;
const HASHED_MIB: usize = 128;
const INSERTED_ROWS: i64 = 200_000;

/// Measures the machine; a Postgres figure is 0 when the server does not answer.
pub async fn measure(database_url: &str) -> Calibration {
    let cpu_sha256_mib_per_s = HASHED_MIB as f64 / best_of(ROUNDS, hash_once).as_secs_f64();
    let (postgres_sum_ms, postgres_insert_rows_per_s) = match postgres(database_url).await {
        Ok((sum, insert)) => (sum.as_secs_f64() * 1000.0, INSERTED_ROWS as f64 / insert.as_secs_f64()),
        Err(e) => {
            eprintln!("[bench] calibration: Postgres not measured: {e:#}");
            (0.0, 0.0)
        }
    };
    Calibration { cpu_sha256_mib_per_s, postgres_sum_ms, postgres_insert_rows_per_s }
}

fn best_of(rounds: usize, mut once: impl FnMut() -> Duration) -> Duration {
    (0..rounds).map(|_| once()).min().unwrap_or_default()
}

fn hash_once() -> Duration {
    let block = "x".repeat(1024);
    let started = Instant::now();
    let mut digests = 0usize;
    for _ in 0..HASHED_MIB * 1024 {
        digests += tally_domain::event::hash_api_key(std::hint::black_box(&block)).len();
    }
    std::hint::black_box(digests);
    started.elapsed()
}

async fn postgres(database_url: &str) -> anyhow::Result<(Duration, Duration)> {
    let options: sqlx::postgres::PgConnectOptions = database_url.parse()?;
    // The server's own database: the calibration needs no Tally schema.
    let mut conn = sqlx::PgConnection::connect_with(&options.database("postgres")).await?;
    let mut sum = Duration::MAX;
    let mut insert = Duration::MAX;
    for _ in 0..ROUNDS {
        let started = Instant::now();
        sqlx::query("SELECT sum(g) FROM generate_series(1, 10000000) AS g").execute(&mut conn).await?;
        sum = sum.min(started.elapsed());
        sqlx::query("CREATE TEMP TABLE tally_calibration (id text PRIMARY KEY, v bigint)").execute(&mut conn).await?;
        let started = Instant::now();
        sqlx::query("INSERT INTO tally_calibration SELECT md5(g::text), g FROM generate_series(1, $1) AS g")
            .bind(INSERTED_ROWS)
            .execute(&mut conn)
            .await?;
        insert = insert.min(started.elapsed());
        sqlx::query("DROP TABLE tally_calibration").execute(&mut conn).await?;
    }
    conn.close().await?;
    Ok((sum, insert))
}
