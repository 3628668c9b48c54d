//! Postgres side of the history writer: its own stored offsets (`history_offsets`, claimed
//! and fenced like the aggregator's) and the ledger's truth (`consumer_offsets` of the ledger
//! group, `processed_events`).

use std::collections::HashMap;

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::PgPool;
use tally_domain::metric::Amounts;

use crate::plan::{Ledgered, Reverted};
use crate::sink::EventKey;

/// The first UTC day whose dedupe records are still kept: the oldest day partition of
/// `processed_events` (the aggregator drops a day's partition once the day left the lateness
/// window). `None` when no day partition exists.
pub async fn first_kept_day(pool: &PgPool) -> Result<Option<NaiveDate>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT min(to_date(substr(c.relname::text, 19), 'YYYYMMDD'))
         FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = 'processed_events'::regclass AND c.relname::text ~ '^processed_events_p[0-9]{8}$'",
    )
    .fetch_one(pool)
    .await
}

/// Why progress was not stored.
#[derive(Debug, thiserror::Error)]
pub enum ProgressError {
    /// Another instance claimed the partition, or the batch does not continue from the stored
    /// offset. The batch's ClickHouse writes are harmless (idempotent); the partition must be
    /// claimed again before writing more.
    #[error("fenced on partition {partition}: batch starts at {start}, epoch {epoch}, but the stored owner/offset differ")]
    Fenced { partition: i32, start: i64, epoch: i64 },
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// A partition this instance owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    pub partition: i32,
    pub next_offset: i64,
    pub epoch: i64,
}

/// The offsets a batch covers on one partition: `start..next`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub partition: i32,
    pub epoch: i64,
    pub start: i64,
    pub next: i64,
}

/// An event of a batch that ClickHouse refused on its own, with ClickHouse's words.
#[derive(Debug, Clone, Copy)]
pub struct IsolatedEvent<'a> {
    pub event: &'a tally_domain::event::UsageEvent,
    pub reason: &'a str,
}

#[derive(Clone)]
pub struct Progress {
    pub pool: PgPool,
    pub group: String,
    pub ledger_group: String,
    pub topic: String,
    pub owner: String,
}

impl Progress {
    /// Takes `partition` for this instance (bumping its epoch) and returns where to resume.
    pub async fn claim(&self, partition: i32) -> Result<Claim, sqlx::Error> {
        let (next_offset, epoch): (i64, i64) = sqlx::query_as(
            "INSERT INTO history_offsets (group_id, topic, partition, next_offset, owner, epoch)
             VALUES ($1, $2, $3, 0, $4, 1)
             ON CONFLICT (group_id, topic, partition)
             DO UPDATE SET owner = EXCLUDED.owner, epoch = history_offsets.epoch + 1, updated_at = now()
             RETURNING next_offset, epoch",
        )
        .bind(&self.group)
        .bind(&self.topic)
        .bind(partition)
        .bind(&self.owner)
        .fetch_one(&self.pool)
        .await?;
        Ok(Claim { partition, next_offset, epoch })
    }

    /// Advances the stored offsets of every range in one transaction, or none of them, and
    /// records in it the batch's events that ClickHouse refused ([`crate::isolate`]).
    pub async fn advance(&self, ranges: &[Range], isolated: &[IsolatedEvent<'_>]) -> Result<(), ProgressError> {
        let mut tx = self.pool.begin().await?;
        if !isolated.is_empty() {
            sqlx::query(
                "INSERT INTO history_isolated (group_id, event_id, subject, event_time, reason)
                 SELECT $1, unnest($2::text[]), unnest($3::text[]), unnest($4::timestamptz[]), unnest($5::text[])
                 ON CONFLICT (group_id, event_id) DO NOTHING",
            )
            .bind(&self.group)
            .bind(isolated.iter().map(|i| i.event.id.as_str()).collect::<Vec<_>>())
            .bind(isolated.iter().map(|i| i.event.subject.as_str()).collect::<Vec<_>>())
            .bind(isolated.iter().map(|i| i.event.time).collect::<Vec<_>>())
            .bind(isolated.iter().map(|i| i.reason).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await?;
        }
        for r in ranges {
            let updated = sqlx::query(
                "UPDATE history_offsets SET next_offset = $1, updated_at = now()
                 WHERE group_id = $2 AND topic = $3 AND partition = $4 AND owner = $5 AND epoch = $6 AND next_offset = $7",
            )
            .bind(r.next)
            .bind(&self.group)
            .bind(&self.topic)
            .bind(r.partition)
            .bind(&self.owner)
            .bind(r.epoch)
            .bind(r.start)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if updated != 1 {
                return Err(ProgressError::Fenced { partition: r.partition, start: r.start, epoch: r.epoch });
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// The ledger's stored next offset per partition: every message below it has been
    /// counted, skipped as a duplicate or quarantined by the aggregator.
    pub async fn ledger_offsets(&self, partitions: &[i32]) -> Result<HashMap<i32, i64>, sqlx::Error> {
        let rows: Vec<(i32, i64)> = sqlx::query_as(
            "SELECT partition, next_offset FROM consumer_offsets WHERE group_id = $1 AND topic = $2 AND partition = ANY($3)",
        )
        .bind(&self.ledger_group)
        .bind(&self.topic)
        .bind(partitions)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().collect())
    }

    /// What `processed_events` holds for each event among `ids` the ledger counted, by its key
    /// (id and UTC day, the record's primary key): the fingerprint, the configuration version
    /// it was counted under, and for a counted correction the event it reverted (the row whose `corrected_by` is the correction, read
    /// in the same query so both come from one snapshot). `days` are the UTC days of the
    /// events' times: only their partitions are read for the ids.
    pub async fn counted(&self, ids: &[&str], days: &[NaiveDate]) -> Result<HashMap<EventKey, Ledgered>, sqlx::Error> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let rows: Vec<CountedRow> = sqlx::query_as(
            "SELECT c.event_id AS id, c.event_day AS day, c.fingerprint, c.cost_micros AS counted_cost, c.config_version,
                    t.event_id AS target, t.subject, t.event_time AS time, t.scope, t.api_key_sha256, t.requests,
                    t.input_tokens AS input, t.output_tokens AS output, t.cached_tokens AS cached, t.cost_micros AS cost,
                    t.config_version AS target_config_version, t.model, t.event_group
             FROM processed_events c
             LEFT JOIN processed_events t ON c.corrects IS NOT NULL AND t.event_id = c.corrects AND t.corrected_by = c.event_id
             WHERE c.event_id = ANY($1) AND c.event_day = ANY($2)",
        )
        .bind(ids)
        .bind(days)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(CountedRow::into_entry).collect())
    }

    /// Messages the ledger consumed but history has not yet written, over every partition of
    /// the topic this writer's group knows (0 when history is caught up).
    pub async fn lag(&self) -> Result<i64, sqlx::Error> {
        let lag: Option<i64> = sqlx::query_scalar(
            "SELECT sum(GREATEST(l.next_offset - COALESCE(h.next_offset, 0), 0))::bigint
             FROM consumer_offsets l
             LEFT JOIN history_offsets h ON h.group_id = $2 AND h.topic = l.topic AND h.partition = l.partition
             WHERE l.group_id = $1 AND l.topic = $3",
        )
        .bind(&self.ledger_group)
        .bind(&self.group)
        .bind(&self.topic)
        .fetch_one(&self.pool)
        .await?;
        Ok(lag.unwrap_or(0))
    }
}

/// One row of [`Progress::counted`]: the id, its day, its fingerprint, the cost the ledger
/// counted and the configuration version it counted under, then the reverted event's columns
/// (all `None` unless the id is a counted correction).
#[derive(sqlx::FromRow)]
struct CountedRow {
    id: String,
    day: NaiveDate,
    fingerprint: String,
    counted_cost: Option<i64>,
    config_version: Option<i64>,
    target: Option<String>,
    subject: Option<String>,
    time: Option<DateTime<Utc>>,
    scope: Option<String>,
    api_key_sha256: Option<String>,
    requests: Option<i64>,
    input: Option<i64>,
    output: Option<i64>,
    cached: Option<i64>,
    cost: Option<i64>,
    target_config_version: Option<i64>,
    model: Option<String>,
    event_group: Option<String>,
}

impl CountedRow {
    fn into_entry(self) -> (EventKey, Ledgered) {
        let r = self;
        let reverts = match (r.target, r.subject, r.time) {
            (Some(event_id), Some(subject), Some(time)) => Some(Reverted {
                event_id,
                subject,
                time,
                scope: r.scope.unwrap_or_default(),
                api_key_sha256: r.api_key_sha256,
                amounts: Amounts {
                    requests: r.requests.unwrap_or(0),
                    input_tokens: r.input.unwrap_or(0),
                    output_tokens: r.output.unwrap_or(0),
                    cached_tokens: r.cached.unwrap_or(0),
                    cost_micros: r.cost.unwrap_or(0),
                },
                // As the aggregator reads them back to revert (0: the built-in default).
                config_version: r.target_config_version.unwrap_or(0),
                model: r.model,
                group: r.event_group,
            }),
            _ => None,
        };
        let ledgered =
            Ledgered { fingerprint: r.fingerprint, cost_micros: r.counted_cost, config_version: r.config_version.unwrap_or(0), reverts };
        ((r.id, r.day), ledgered)
    }
}
