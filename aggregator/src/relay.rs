//! The outbox relay: publishes what committed batches wrote to the `outbox`, in id order,
//! and deletes a row only after the broker acknowledged it.
//!
//! One relay runs at a time across all instances (a Postgres advisory lock), so snapshots of
//! a subject reach the compacted decisions topic in version order. A crash between publish
//! and delete republishes; consumers keep the highest version.
//!
//! The producer replaces itself after a fatal error ([`tally_common::producing`]); rows that
//! failed stay in the outbox and the next round publishes them again, in id order (the
//! relay does not use the producer's own resend, which could reorder a subject's snapshots).
//!
//! Heartbeats: after a round that left the outbox empty as of its read, the relay publishes
//! a heartbeat ([`tally_domain::heartbeat`]) to every partition of the decisions topic, at
//! most every [`HEARTBEAT_INTERVAL`]. Its `at` is the instant before that read: every
//! decision committed before it is on the topic. Readers use it to tell that decisions
//! still flow when no snapshot changes. No heartbeat goes out while the relay cannot read
//! the outbox (Postgres down) or publish (broker down), nor when no aggregator runs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::future::join_all;
use rdkafka::producer::Producer;
use sqlx::PgPool;
use tally_common::producing::{Outgoing, RebuildingProducer};
use tally_domain::heartbeat::{Heartbeat, HEARTBEAT_HEADER};
use tokio::sync::Notify;

/// Arbitrary constant naming the relay's advisory lock.
const RELAY_LOCK: i64 = 0x7a11_0b0c;
const BATCH: i64 = 2000;

/// Longest wait for room in the producer's queue.
const QUEUE_TIMEOUT: Duration = Duration::from_secs(30);

/// How often the relay publishes heartbeats (while it can).
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);

/// How long the decisions topic's partition list is used before it is read again.
const PARTITIONS_TTL: Duration = Duration::from_secs(60);

/// What one relay round did.
struct Round {
    published: usize,
    /// The outbox was empty, as of `read_at`, once this round's rows were published.
    drained_at: Option<DateTime<Utc>>,
}

/// Publishes pending outbox rows until none is left; returns how many were published.
pub async fn drain(pool: &PgPool, producer: &RebuildingProducer) -> anyhow::Result<usize> {
    Ok(drain_rounds(pool, producer).await?.0)
}

/// As [`drain`], and the instant as of which the outbox was empty (`None` if another
/// instance holds the relay).
async fn drain_rounds(pool: &PgPool, producer: &RebuildingProducer) -> anyhow::Result<(usize, Option<DateTime<Utc>>)> {
    let mut total = 0;
    loop {
        let round = relay_once(pool, producer).await?;
        total += round.published;
        if round.published < BATCH as usize {
            return Ok((total, round.drained_at));
        }
    }
}

async fn relay_once(pool: &PgPool, producer: &RebuildingProducer) -> anyhow::Result<Round> {
    let started = std::time::Instant::now();
    let mut tx = pool.begin().await?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)").bind(RELAY_LOCK).fetch_one(&mut *tx).await?;
    if !locked {
        return Ok(Round { published: 0, drained_at: None });
    }
    let read_at = Utc::now();
    let rows: Vec<(i64, String, String, Vec<u8>)> =
        sqlx::query_as("SELECT id, topic, key, payload FROM outbox ORDER BY id LIMIT $1").bind(BATCH).fetch_all(&mut *tx).await?;
    let drained_at = (rows.len() < BATCH as usize).then_some(read_at);
    if rows.is_empty() {
        return Ok(Round { published: 0, drained_at });
    }
    // Not resent within the round: the next round publishes failed rows again, in id order.
    let sends =
        rows.iter().map(|(_, topic, key, payload)| producer.send_once(Outgoing::new(topic, key.as_bytes(), payload), QUEUE_TIMEOUT));
    for result in join_all(sends).await {
        result.map_err(|e| anyhow::anyhow!("failed to publish an outbox message: {e}"))?;
    }
    let ids: Vec<i64> = rows.iter().map(|r| r.0).collect();
    sqlx::query("DELETE FROM outbox WHERE id = ANY($1)").bind(&ids).execute(&mut *tx).await?;
    tx.commit().await?;
    tracing::debug!(messages = rows.len(), millis = started.elapsed().as_millis() as u64, "outbox relayed");
    Ok(Round { published: rows.len(), drained_at })
}

/// Publishes the heartbeats of the decisions topic (see the module docs).
pub struct Heartbeats {
    pub topic: String,
    /// This aggregator instance, named in each heartbeat.
    pub instance: String,
    last: Option<Instant>,
    partitions: Option<(Instant, Vec<i32>)>,
}

impl Heartbeats {
    pub fn new(topic: String, instance: String) -> Heartbeats {
        Heartbeats { topic, instance, last: None, partitions: None }
    }

    fn due(&self, now: Instant) -> bool {
        self.last.is_none_or(|t| now.duration_since(t) >= HEARTBEAT_INTERVAL)
    }

    /// The decisions topic's partitions, read again after [`PARTITIONS_TTL`].
    async fn partitions(&mut self, producer: &RebuildingProducer) -> anyhow::Result<Vec<i32>> {
        if let Some((at, list)) = &self.partitions {
            if at.elapsed() < PARTITIONS_TTL && !list.is_empty() {
                return Ok(list.clone());
            }
        }
        let (client, topic) = (producer.producer(), self.topic.clone());
        let list = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<i32>> {
            let metadata = client.client().fetch_metadata(Some(&topic), Duration::from_secs(5))?;
            Ok(metadata.topics().iter().filter(|t| t.name() == topic).flat_map(|t| t.partitions().iter().map(|p| p.id())).collect())
        })
        .await??;
        if list.is_empty() {
            anyhow::bail!("the decisions topic {} has no partitions yet", self.topic);
        }
        self.partitions = Some((Instant::now(), list.clone()));
        Ok(list)
    }

    /// Publishes one heartbeat per partition, saying the outbox was drained at `at`.
    async fn publish(&mut self, producer: &RebuildingProducer, at: DateTime<Utc>) -> anyhow::Result<()> {
        let partitions = self.partitions(producer).await?;
        let records: Vec<(String, Vec<u8>, i32)> = partitions
            .iter()
            .map(|&p| {
                let h = Heartbeat::new(&self.instance, p, at);
                (h.key(), serde_json::to_vec(&h).expect("a heartbeat serializes"), p)
            })
            .collect();
        let headers: &[(&str, &[u8])] = &[(HEARTBEAT_HEADER, b"1")];
        let sends = records.iter().map(|(key, payload, p)| {
            let message = Outgoing { partition: Some(*p), headers, ..Outgoing::new(&self.topic, key.as_bytes(), payload) };
            producer.send(message, QUEUE_TIMEOUT)
        });
        for result in join_all(sends).await {
            if let Err(e) = result {
                // The partition list may be out of date.
                self.partitions = None;
                anyhow::bail!("failed to publish a heartbeat: {e}");
            }
        }
        self.last = Some(Instant::now());
        Ok(())
    }
}

/// Runs the relay until `stop` is notified: after every `wake` and at least every 500 ms,
/// with a heartbeat at most every [`HEARTBEAT_INTERVAL`] after a round that drained the
/// outbox.
pub async fn run(
    pool: PgPool,
    producer: Arc<RebuildingProducer>,
    mut heartbeats: Heartbeats,
    wake: std::sync::Arc<Notify>,
    stop: std::sync::Arc<Notify>,
) {
    loop {
        match drain_rounds(&pool, &producer).await {
            Ok((_, Some(at))) if heartbeats.due(Instant::now()) => {
                if let Err(e) = heartbeats.publish(&producer, at).await {
                    tracing::warn!(error = %e, "decisions heartbeat failed; retrying");
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "outbox relay failed; retrying"),
        }
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = stop.notified() => return,
        }
    }
}
