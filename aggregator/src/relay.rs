//! The outbox relay: publishes what committed batches wrote to the `outbox`, in id order,
//! and deletes a row only after the broker acknowledged it.
//!
//! One relay runs at a time across all instances (a Postgres advisory lock), so snapshots of
//! a subject reach the compacted decisions topic in version order. A crash between publish
//! and delete republishes; consumers keep the highest version.

use std::time::Duration;

use futures::future::join_all;
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::PgPool;
use tokio::sync::Notify;

/// Arbitrary constant naming the relay's advisory lock.
const RELAY_LOCK: i64 = 0x7a11_0b0c;
const BATCH: i64 = 2000;

/// Publishes pending outbox rows until none is left; returns how many were published.
pub async fn drain(pool: &PgPool, producer: &FutureProducer) -> anyhow::Result<usize> {
    let mut total = 0;
    loop {
        let n = relay_once(pool, producer).await?;
        total += n;
        if n < BATCH as usize {
            return Ok(total);
        }
    }
}

async fn relay_once(pool: &PgPool, producer: &FutureProducer) -> anyhow::Result<usize> {
    let started = std::time::Instant::now();
    let mut tx = pool.begin().await?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)").bind(RELAY_LOCK).fetch_one(&mut *tx).await?;
    if !locked {
        return Ok(0);
    }
    let rows: Vec<(i64, String, String, Vec<u8>)> =
        sqlx::query_as("SELECT id, topic, key, payload FROM outbox ORDER BY id LIMIT $1").bind(BATCH).fetch_all(&mut *tx).await?;
    if rows.is_empty() {
        return Ok(0);
    }
    let sends = rows.iter().map(|(_, topic, key, payload)| {
        producer.send(FutureRecord::to(topic).key(key.as_bytes()).payload(payload.as_slice()), Duration::from_secs(30))
    });
    for result in join_all(sends).await {
        result.map_err(|(e, _)| anyhow::anyhow!("failed to publish an outbox message: {e}"))?;
    }
    let ids: Vec<i64> = rows.iter().map(|r| r.0).collect();
    sqlx::query("DELETE FROM outbox WHERE id = ANY($1)").bind(&ids).execute(&mut *tx).await?;
    tx.commit().await?;
    tracing::debug!(messages = rows.len(), millis = started.elapsed().as_millis() as u64, "outbox relayed");
    Ok(rows.len())
}

/// Runs the relay until `stop` is notified: after every `wake` and at least every 500 ms.
pub async fn run(pool: PgPool, producer: FutureProducer, wake: std::sync::Arc<Notify>, stop: std::sync::Arc<Notify>) {
    loop {
        if let Err(e) = drain(&pool, &producer).await {
            tracing::warn!(error = %e, "outbox relay failed; retrying");
        }
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = stop.notified() => return,
        }
    }
}
