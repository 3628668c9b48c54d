//! Postgres side of the ledger path: partition claims (fencing) and the one-transaction
//! batch commit described in the crate docs.

use std::collections::{BTreeMap, HashSet};

use foldhash::{HashMap, HashMapExt};

use chrono::{DateTime, Duration, NaiveDate, Utc};
use sqlx::{PgPool, Postgres, Transaction};
use tally_common::postgres;
use tally_domain::decision::{thresholds_reached, DecisionSnapshot, QuotaDecision};
use tally_domain::event::UsageEvent;
use tally_domain::metric::MAX_AMOUNT;
use tally_domain::period::RollingBucket;

use crate::headroom;
use crate::keys::{Deferred, SubjectKey, Subjects};
use crate::plan::{self, Candidate, LedgerDelta, LedgerKey, Parsed, Quarantined, Refusal};
use crate::policy::{Policy, PolicyHandle};
use crate::quarantine::{QuarantineReason, Reason};

/// Why a batch was not committed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// This instance lost the partition, or the batch does not continue from the stored
    /// offset. The batch is refused; the partition must be claimed again before consuming.
    #[error("fenced on partition {partition}: batch starts at {start}, epoch {epoch}, but the stored owner/offset differ")]
    Fenced { partition: i32, start: i64, epoch: i64 },
    /// Postgres failed: transient or permanent by its cause ([`StoreError::class`]).
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// A tier configuration (the one in force, or the one an event being corrected was
    /// counted under) could not be loaded: transient when a database error caused it.
    #[error("configuration error: {0:#}")]
    Config(#[from] anyhow::Error),
}

/// What a failed commit calls for. Decided here, where failures are classified; the
/// consume loop acts on it and decides nothing itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The batch is refused: this instance lost the partition, or the batch does not
    /// continue the stored offset. Retrying cannot help; the partition is given up or
    /// rewound.
    Fenced,
    /// The same transaction may well succeed if tried again, whatever it holds: a lost or
    /// refused connection, a serialization failure or deadlock, a server shutting down or
    /// out of resources. Retried with backoff.
    Transient,
    /// The same transaction fails again however often it is tried. Either an event of the
    /// batch causes it, and [`crate::isolate`] finds and quarantines that event, or none
    /// does (a stored configuration that cannot load, a schema that does not match,
    /// revoked permissions), and retrying would loop for ever: the aggregator stops.
    Permanent,
}

impl StoreError {
    /// What this failure calls for (see [`ErrorClass`]).
    pub fn class(&self) -> ErrorClass {
        let transient = match self {
            StoreError::Fenced { .. } => return ErrorClass::Fenced,
            StoreError::Database(e) => postgres::is_transient(e),
            // Loading a configuration reads Postgres too: its failure is transient when a
            // database error under it is.
            StoreError::Config(e) => e.chain().filter_map(|cause| cause.downcast_ref::<sqlx::Error>()).any(postgres::is_transient),
        };
        if transient {
            ErrorClass::Transient
        } else {
            ErrorClass::Permanent
        }
    }

    /// Whether the same transaction may well succeed if tried again ([`ErrorClass::Transient`]).
    pub fn is_transient(&self) -> bool {
        self.class() == ErrorClass::Transient
    }

    /// Whether the same transaction fails again however often it is tried
    /// ([`ErrorClass::Permanent`]).
    pub fn is_permanent(&self) -> bool {
        self.class() == ErrorClass::Permanent
    }

    /// Whether this failure is a ledger bound refusing a sum: a ledger row past
    /// [`tally_domain::metric::MAX_AMOUNT`] (the `ledgers_used_within_bound` check) or past
    /// what a `bigint` holds.
    pub fn is_overflow(&self) -> bool {
        let StoreError::Database(sqlx::Error::Database(e)) = self else { return false };
        match e.code().as_deref() {
            Some(NUMERIC_VALUE_OUT_OF_RANGE) => true,
            Some(CHECK_VIOLATION) => e.constraint() == Some(LEDGER_BOUND_CONSTRAINT),
            _ => false,
        }
    }
}

/// SQLSTATE of a value out of a type's range (a `bigint` sum past 2^63 - 1).
const NUMERIC_VALUE_OUT_OF_RANGE: &str = "22003";
/// SQLSTATE of a failed `CHECK` constraint.
const CHECK_VIOLATION: &str = "23514";
/// The check that keeps every ledger row's `used` within the amount bound (migration 0015).
const LEDGER_BOUND_CONSTRAINT: &str = "ledgers_used_within_bound";

/// Whether [`Store::commit_batch`] commits its transaction or rolls it back (a trial of
/// [`crate::isolate`], which only wants to know whether the batch would commit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    Commit,
    RollBack,
}

/// A partition this instance owns, with the offset to resume from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    pub partition: i32,
    pub next_offset: i64,
    pub epoch: i64,
}

/// The offsets one batch covers on one partition: `start..next`.
#[derive(Debug, Clone, Copy)]
pub struct Range {
    pub partition: i32,
    pub epoch: i64,
    pub start: i64,
    pub next: i64,
}

/// What a committed batch did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub counted: usize,
    pub duplicates: usize,
    pub quarantined: usize,
    pub snapshots: usize,
    /// Whether the batch's plain dedupe insert met ids recorded before and the batch
    /// recorded its ids with the skipping insert instead ([`crate::dedupe`]).
    pub dedupe_fell_back: bool,
    /// Subjects whose usage changed without a state change, with when their refresh is due;
    /// the loop hands them back to a later batch ([`Store::commit_batch`]'s `refreshes`).
    pub deferred: Deferred,
    /// Every decided subject's headroom as of this commit ([`crate::headroom`]).
    pub headroom: Vec<(SubjectKey, Box<[headroom::Line]>)>,
}

/// What deciding a chunk of subjects gave.
struct Decided {
    snapshots: usize,
    deferred: Deferred,
    headroom: Vec<(SubjectKey, Box<[headroom::Line]>)>,
}

/// The aggregator's handle on its Postgres tables.
#[derive(Clone)]
pub struct Store {
    pub pool: PgPool,
    pub group: String,
    pub topic: String,
    /// This instance's identity in `consumer_offsets.owner`.
    pub owner: String,
    pub decisions_topic: String,
    pub quarantine_topic: String,
    /// Earlier configuration versions, for corrections of events counted under them.
    pub policies: crate::policy::PolicyHistory,
    /// Writes the dedupe records (`processed_events`) of each batch.
    pub recorder: crate::dedupe::Recorder,
}

impl Store {
    /// Takes ownership of `partition` for this instance: bumps the epoch (fencing out the
    /// previous owner) and returns the offset to resume from.
    pub async fn claim(&self, partition: i32) -> Result<Claim, sqlx::Error> {
        let (next_offset, epoch): (i64, i64) = sqlx::query_as(
            "INSERT INTO consumer_offsets (group_id, topic, partition, next_offset, owner, epoch)
             VALUES ($1, $2, $3, 0, $4, 1)
             ON CONFLICT (group_id, topic, partition)
             DO UPDATE SET owner = EXCLUDED.owner, epoch = consumer_offsets.epoch + 1, updated_at = now()
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

    /// Commits one batch atomically (see the crate docs for the steps). `refreshes` are
    /// subjects without events in the batch whose usage refresh is due: they are decided in
    /// the same transaction, which costs far less than a transaction of their own.
    #[allow(clippy::too_many_arguments)]
    pub async fn commit_batch(
        &self,
        ranges: &[Range],
        parsed: Parsed<'_>,
        refreshes: &Subjects,
        policy: &PolicyHandle,
        now: DateTime<Utc>,
        refresh: Duration,
        finish: Finish,
    ) -> Result<Outcome, StoreError> {
        let mut phases = Phases::start();
        let mut conn = self.pool.acquire().await?;
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        let policy = &*policy.sync(&mut tx).await?;
        let Parsed { mut candidates, mut quarantined, duplicates } = parsed;
        // Priced before anything is recorded, so the dedupe record, the ledgers and history
        // (which reads the cost back from the dedupe record) agree. The fingerprint is of the
        // event as sent.
        for c in candidates.iter_mut() {
            c.event.cost_micros = policy.cost_micros(&c.event);
        }
        quarantine_overpriced(&mut candidates, &mut quarantined);
        quarantine_unknown_groups(policy, &mut candidates, &mut quarantined);
        let recorded = self.recorder.record_event_ids(&mut tx, &candidates, policy.version).await?;
        phases.lap("dedupe");
        let mut outcome = Outcome { duplicates, dedupe_fell_back: recorded.fell_back, ..Outcome::default() };
        let (new, known): (Vec<&Candidate<'_>>, Vec<&Candidate<'_>>) = candidates.iter().partition(|c| recorded.is_fresh(c));
        for c in known {
            match recorded.fingerprint_before(c) {
                Some(fp) if fp == c.fingerprint => outcome.duplicates += 1,
                _ => quarantined.push(plan::conflict(&c.event.id, c.delivery)),
            }
        }
        let (corrections, counted): (Vec<&Candidate<'_>>, Vec<&Candidate<'_>>) = new.into_iter().partition(|c| c.event.corrects.is_some());
        let counted: Vec<&UsageEvent> = counted.into_iter().map(|c| &c.event).collect();
        let mut deltas = plan::ledger_deltas(&counted, policy);
        let reverted = self.revert(&mut tx, &corrections, policy, &mut deltas, &mut quarantined).await?;
        outcome.counted = counted.len() + reverted.len();
        let updated = apply_ledger_deltas(&mut tx, &deltas).await?;
        phases.lap("ledgers");
        let mut touched = refreshes.clone();
        touched.extend(subjects_of(&counted));
        touched.extend(budget_subjects(&deltas));
        touched.extend(reverted.iter().map(|e| (e.subject.clone(), e.api_key_sha256.clone())));
        // In chunks, so a large batch does not hold every touched subject's plan and
        // snapshot in memory at once.
        for chunk in chunks(touched, DECISION_CHUNK) {
            let decided = self.publish_decisions(&mut tx, &chunk, &updated, policy, now, refresh).await?;
            outcome.snapshots += decided.snapshots;
            outcome.deferred.extend(decided.deferred);
            outcome.headroom.extend(decided.headroom);
        }
        phases.lap("decisions");
        outcome.quarantined = quarantined.len();
        self.enqueue_quarantine(&mut tx, &quarantined).await?;
        self.advance_offsets(&mut tx, ranges).await?;
        match finish {
            Finish::Commit => tx.commit().await?,
            Finish::RollBack => tx.rollback().await?,
        }
        // A batch's statements carry megabytes of arrays, and a connection keeps the largest
        // buffers it ever needed; give them back before the connection returns to the pool.
        sqlx::Connection::shrink_buffers(&mut *conn);
        phases.lap("commit");
        tracing::debug!(events = candidates.len(), snapshots = outcome.snapshots, phases = %phases, "batch phases");
        Ok(outcome)
    }

    /// Applies fresh correction events: each reverts, once, exactly what the event it names
    /// added (the same ledger rows, from the configuration version it was counted under).
    /// A correction of an unknown, already corrected or foreign event is quarantined and its
    /// dedupe record removed, so `processed_events` holds only what was counted. Returns the
    /// reverted events (with negated amounts).
    async fn revert(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        corrections: &[&Candidate<'_>],
        policy: &Policy,
        deltas: &mut BTreeMap<LedgerKey, LedgerDelta>,
        quarantined: &mut Vec<Quarantined>,
    ) -> Result<Vec<UsageEvent>, StoreError> {
        if corrections.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<&str> = corrections.iter().map(|c| c.event.id.as_str()).collect();
        let targets: Vec<&str> = corrections.iter().map(|c| c.event.corrects.as_deref().unwrap_or_default()).collect();
        let subjects: Vec<&str> = corrections.iter().map(|c| c.event.subject.as_str()).collect();
        // The target is looked for by id in every partition still kept (the correction does
        // not know its target's day). If the id was counted on several days (two events), the
        // latest one not yet corrected is reverted. Of several corrections of one target in
        // this batch, the first in delivery order reverts it and the others are refused: an
        // UPDATE joined to two source rows would apply one of them unpredictably.
        // `corrected_by IS NULL` is checked again by the update itself, so a concurrent
        // correction of the same target that committed first wins and this one is refused.
        let rows: Vec<RevertedRow> = sqlx::query_as(
            "WITH wanted AS (
                 SELECT DISTINCT ON (c.id) c.id, c.ord, t.event_id, t.event_day
                 FROM UNNEST($1::text[], $2::text[], $3::text[]) WITH ORDINALITY AS c(id, target, subject, ord)
                 JOIN processed_events t ON t.event_id = c.target AND t.subject = c.subject AND t.corrected_by IS NULL
                                        AND t.corrects IS NULL AND t.requests IS NOT NULL
                 ORDER BY c.id, t.event_day DESC, t.event_time DESC
             ), target AS (
                 SELECT DISTINCT ON (event_id, event_day) id, event_id, event_day FROM wanted ORDER BY event_id, event_day, ord
             )
             UPDATE processed_events t SET corrected_by = c.id
             FROM target c
             WHERE t.event_id = c.event_id AND t.event_day = c.event_day AND t.corrected_by IS NULL
             RETURNING c.id AS correction_id, t.event_id, t.subject, t.event_time, t.scope, t.api_key_sha256, t.requests, t.input_tokens,
                       t.output_tokens, t.cached_tokens, t.cost_micros, t.config_version, t.model, t.event_group",
        )
        .bind(&ids)
        .bind(&targets)
        .bind(&subjects)
        .fetch_all(&mut **tx)
        .await?;
        let applied: HashSet<&str> = rows.iter().map(|r| r.correction_id.as_str()).collect();
        let refused: Vec<&str> = ids.iter().copied().filter(|id| !applied.contains(id)).collect();
        for c in corrections.iter().filter(|c| refused.contains(&c.event.id.as_str())) {
            let target = c.event.corrects.as_deref().unwrap_or_default();
            let words = format!("event {target:?} of subject {:?} was never counted, or is already corrected", c.event.subject);
            let reason = Reason::with_words(QuarantineReason::Correction, words);
            quarantined.push(Quarantined::new(reason, Some(c.event.id.clone()), c.delivery));
        }
        if !refused.is_empty() {
            let days: Vec<NaiveDate> = corrections.iter().filter(|c| refused.contains(&c.event.id.as_str())).map(|c| c.day).collect();
            sqlx::query(
                "DELETE FROM processed_events
                 WHERE (event_id, event_day) IN (SELECT * FROM unnest($1::text[], $2::date[])) AND event_day = ANY($2)",
            )
            .bind(&refused)
            .bind(&days)
            .execute(&mut **tx)
            .await?;
        }
        let mut reverted = Vec::with_capacity(rows.len());
        for row in rows {
            let version = row.config_version.unwrap_or(0);
            let counted_under = self.policies.version(tx, version, policy).await?;
            let event = row.into_negated_event();
            for (key, delta) in plan::ledger_deltas(&[&event], &counted_under) {
                let entry = deltas.entry(key).or_insert(LedgerDelta { used: 0, ..delta.clone() });
                entry.used = entry.used.saturating_add(delta.used);
            }
            reverted.push(event);
        }
        Ok(reverted)
    }

    async fn advance_offsets(&self, tx: &mut Transaction<'_, Postgres>, ranges: &[Range]) -> Result<(), StoreError> {
        for r in ranges {
            let updated = sqlx::query(
                "UPDATE consumer_offsets SET next_offset = $1, updated_at = now()
                 WHERE group_id = $2 AND topic = $3 AND partition = $4 AND owner = $5 AND epoch = $6 AND next_offset = $7",
            )
            .bind(r.next)
            .bind(&self.group)
            .bind(&self.topic)
            .bind(r.partition)
            .bind(&self.owner)
            .bind(r.epoch)
            .bind(r.start)
            .execute(&mut **tx)
            .await?
            .rows_affected();
            if updated != 1 {
                return Err(StoreError::Fenced { partition: r.partition, start: r.start, epoch: r.epoch });
            }
        }
        Ok(())
    }

    async fn enqueue_quarantine(&self, tx: &mut Transaction<'_, Postgres>, items: &[Quarantined]) -> Result<(), sqlx::Error> {
        if items.is_empty() {
            return Ok(());
        }
        let keys: Vec<String> = items.iter().map(|q| q.event_id.clone().unwrap_or_default()).collect();
        let payloads: Vec<Vec<u8>> = items.iter().map(|q| serde_json::to_vec(q).unwrap_or_default()).collect();
        enqueue(tx, &self.quarantine_topic, &keys, &payloads).await
    }

    /// Recomputes the decisions of `subjects` (subject -> the API key hash of its latest
    /// event, `None` to keep the stored one) and writes a new snapshot (version + 1) to
    /// `decisions` and the outbox where [`plan::should_publish`] says so; records fired
    /// thresholds; and keeps every subject's API key and `next_check_at` current.
    /// `updated` holds the `used` of ledger rows this transaction already wrote (they are
    /// not read again). Returns how many snapshots were published, the subjects whose
    /// usage changed but whose snapshot waits for `refresh` (with when it is due), and every
    /// subject's headroom.
    ///
    /// A change of usage alone is published at most once per `refresh`. The loop brings a
    /// deferred subject back into a batch when it is due; as a backstop (if this instance
    /// stops first) its `next_check_at` is set one more `refresh` later, for the scheduler.
    async fn publish_decisions(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        subjects: &Subjects,
        updated: &HashMap<LedgerKey, i64>,
        policy: &Policy,
        now: DateTime<Utc>,
        refresh: Duration,
    ) -> Result<Decided, sqlx::Error> {
        if subjects.is_empty() {
            return Ok(Decided { snapshots: 0, deferred: Deferred::new(), headroom: Vec::new() });
        }
        let names: Vec<&str> = subjects.keys().map(String::as_str).collect();
        lock_new_budget_rows(tx, &names).await?;
        let previous = previous_decisions(tx, &names).await?;
        let mut plans: Vec<SubjectPlan> = subjects
            .iter()
            .map(|(subject, key)| {
                let api_key = key.clone().or_else(|| previous.get(subject).and_then(|p| p.api_key_sha256.clone()));
                SubjectPlan::new(subject, api_key, policy, now)
            })
            .collect();
        let unread: Vec<&LedgerKey> =
            plans.iter().flat_map(|p| p.keys.iter().map(|(k, _)| k)).filter(|k| !updated.contains_key(*k)).collect();
        // Rows read now and rolling totals first: a rolling key is not a row of its own.
        let mut used = read_used(tx, &unread).await?;
        self.decide_rolling(tx, &mut plans, &mut used, now).await?;
        let used_of = |k: &LedgerKey| used.get(k).or_else(|| updated.get(k)).copied().unwrap_or(0);
        for p in plans.iter_mut() {
            p.lines = plan::decide(&p.resolved.quotas, &p.keys, used_of);
        }
        fire_thresholds(tx, &mut plans).await?;
        let mut rows = DecisionRows::default();
        let mut checks = Vec::new();
        let mut deferred = Deferred::new();
        let mut headroom = Vec::with_capacity(plans.len());
        for SubjectPlan { subject, api_key, resolved, lines, rolling_drained_at, .. } in plans {
            headroom.push((SubjectKey::of(&subject), headroom::lines_of(&resolved.quotas, &lines)));
            let prev = previous.get(subject.as_str());
            // Also when its rolling usage has all left: deciding it then removes those buckets.
            let mut next_check =
                plan::next_check_at(&lines, policy.next_change_after(&subject, now)).into_iter().chain(rolling_drained_at).min();
            let digest = plan::Published::of(&resolved.tier, &lines, now);
            let published = prev.and_then(|p| p.published.as_ref());
            if !plan::should_publish(published, &digest, &lines, refresh) {
                if let Some(due) = published.and_then(|p| plan::refresh_due_at(p, &digest, refresh)) {
                    let backstop = due + refresh;
                    next_check = Some(next_check.map_or(backstop, |t| t.min(backstop)));
                    deferred.insert(subject.clone(), (api_key.clone(), due));
                }
                let check = Check { subject, api_key, next_check };
                if prev.is_none_or(|p| p.check_differs(&check)) {
                    checks.push(check);
                }
                continue;
            }
            let snapshot = DecisionSnapshot {
                allowed: DecisionSnapshot::allowed_for(&lines),
                version: prev.map_or(1, |p| p.version + 1),
                calculated_at: now,
                tier: resolved.tier,
                budget: resolved.budget,
                quotas: lines,
                subject,
            };
            rows.push(&snapshot, &digest, api_key, next_check);
        }
        save_snapshots(tx, &rows).await?;
        save_checks(tx, &checks).await?;
        enqueue(tx, &self.decisions_topic, &rows.subjects, &rows.bodies).await?;
        Ok(Decided { snapshots: rows.subjects.len(), deferred, headroom })
    }

    /// Fills in the usage and reset instant of every rolling-window quota of `plans`, after
    /// removing the key's buckets that have left the window: usage is the sum of the buckets
    /// that have not left it (see the rolling buckets of [`tally_domain::period`]); a breached
    /// quota resets at the instant enough of the usage that breached it has left the window,
    /// any other at the instant its oldest bucket leaves; and notes when the subject's last
    /// bucket leaves.
    async fn decide_rolling(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        plans: &mut [SubjectPlan],
        used: &mut HashMap<LedgerKey, i64>,
        now: DateTime<Utc>,
    ) -> Result<(), sqlx::Error> {
        let rolling: Vec<RollingKey> = plans
            .iter()
            .flat_map(|p| p.resolved.quotas.iter().zip(p.keys.iter()))
            .filter_map(|(q, (key, _))| plan::rolling_days(q).map(|days| RollingKey { key, days }))
            .collect();
        if rolling.is_empty() {
            return Ok(());
        }
        remove_departed_buckets(tx, &rolling).await?;
        let buckets = read_rolling_buckets(tx, &rolling).await?;
        for p in plans.iter_mut() {
            for (q, (key, resets_at)) in p.resolved.quotas.iter().zip(p.keys.iter_mut()) {
                let Some(days) = plan::rolling_days(q) else { continue };
                let usage = buckets.get(&rolling_id(key)).map(Vec::as_slice).unwrap_or_default();
                let total = usage.iter().fold(0i64, |sum, b| sum.saturating_add(b.used));
                used.insert(key.clone(), total);
                let drained = usage.iter().map(|b| b.leaves_at(days)).max();
                p.rolling_drained_at = p.rolling_drained_at.max(drained);
                *resets_at = tally_domain::period::rolling_unblock_at(usage, q.limit, q.burst, days, now)
                    .or_else(|| usage.iter().map(|b| b.leaves_at(days)).min())
                    .unwrap_or(now + Duration::days(days as i64));
            }
        }
        Ok(())
    }

    /// One pass of the time-driven scheduler: [`Store::mark_due_after_config_change`], then
    /// one chunk of [`Store::decide_due`].
    pub async fn run_due_checks(&self, policy: &PolicyHandle, now: DateTime<Utc>, limit: i64) -> Result<DueChunk, StoreError> {
        self.mark_due_after_config_change(policy, now).await?;
        self.decide_due(policy, now, limit).await
    }

    /// The earliest `next_check_at` of any subject, if one is set: when the scheduler next
    /// has work (a configuration change or an override aside).
    pub async fn next_due_at(&self) -> Result<Option<DateTime<Utc>>, StoreError> {
        Ok(sqlx::query_scalar("SELECT min(next_check_at) FROM decisions").fetch_one(&self.pool).await?)
    }

    /// After a configuration change, makes every subject's decision due once. One instance
    /// does it (an advisory lock; an instance that does not get the lock leaves it to the
    /// one that has it), in a transaction of its own so the chunks that decide the subjects
    /// run concurrently.
    pub async fn mark_due_after_config_change(&self, policy: &PolicyHandle, now: DateTime<Utc>) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)").bind(SCHEDULER_LOCK).fetch_one(&mut *tx).await?;
        if !locked {
            return Ok(());
        }
        let policy = policy.sync(&mut tx).await?;
        let evaluated: i64 = sqlx::query_scalar("SELECT config_version FROM scheduler_state WHERE id = 1").fetch_one(&mut *tx).await?;
        if policy.version > evaluated {
            sqlx::query("UPDATE decisions SET next_check_at = $1").bind(now).execute(&mut *tx).await?;
            sqlx::query("UPDATE scheduler_state SET config_version = $1 WHERE id = 1").bind(policy.version).execute(&mut *tx).await?;
            tracing::info!(version = policy.version, "configuration changed: every subject's decision is due");
        }
        tx.commit().await?;
        Ok(())
    }

    /// Decides again up to `limit` subjects whose `next_check_at` has come (a rollover, an
    /// override change, a usage refresh, a configuration change), oldest first, and
    /// publishes what changed. The subjects' decision rows are locked with `SKIP LOCKED`, so
    /// several chunks, of one instance or of several, run at once on disjoint subjects.
    pub async fn decide_due(&self, policy: &PolicyHandle, now: DateTime<Utc>, limit: i64) -> Result<DueChunk, StoreError> {
        let started = std::time::Instant::now();
        let mut tx = self.pool.begin().await?;
        let policy = policy.sync(&mut tx).await?;
        let due: Vec<String> = sqlx::query_scalar(
            "SELECT subject FROM decisions WHERE next_check_at <= $1 ORDER BY next_check_at LIMIT $2 FOR UPDATE SKIP LOCKED",
        )
        .bind(now)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        if due.is_empty() {
            return Ok(DueChunk { looked_at: 0, published: 0 });
        }
        let subjects: Subjects = due.into_iter().map(|s| (s, None)).collect();
        let decided = self.publish_decisions(&mut tx, &subjects, &HashMap::new(), &policy, now, Duration::zero()).await?;
        tx.commit().await?;
        let millis = started.elapsed().as_millis() as u64;
        tracing::debug!(subjects = subjects.len(), published = decided.snapshots, millis, "due subjects decided");
        Ok(DueChunk { looked_at: subjects.len(), published: decided.snapshots })
    }
}

/// What one chunk of due subjects came to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DueChunk {
    /// Subjects decided again.
    pub looked_at: usize,
    /// Snapshots published (subjects whose decision changed).
    pub published: usize,
}

/// A reverted event as read back from `processed_events`, with the id of the correction
/// that reverts it and the configuration version it was counted under.
#[derive(sqlx::FromRow)]
struct RevertedRow {
    correction_id: String,
    event_id: String,
    subject: String,
    event_time: DateTime<Utc>,
    scope: Option<String>,
    api_key_sha256: Option<String>,
    requests: Option<i64>,
    input_tokens: Option<i64>,
    output_tokens: Option<i64>,
    cached_tokens: Option<i64>,
    cost_micros: Option<i64>,
    config_version: Option<i64>,
    model: Option<String>,
    event_group: Option<String>,
}

impl RevertedRow {
    /// The reverted event with every amount negated: its ledger deltas undo the original's.
    fn into_negated_event(self) -> UsageEvent {
        UsageEvent {
            id: self.event_id,
            subject: self.subject,
            time: self.event_time,
            api_key_sha256: self.api_key_sha256,
            scope: self.scope.unwrap_or_default(),
            model: self.model,
            group: self.event_group,
            requests: -self.requests.unwrap_or(0),
            input_tokens: -self.input_tokens.unwrap_or(0),
            output_tokens: -self.output_tokens.unwrap_or(0),
            cached_tokens: -self.cached_tokens.unwrap_or(0),
            cost_micros: Some(-self.cost_micros.unwrap_or(0)),
            attributes: Default::default(),
            corrects: None,
        }
    }
}

/// Where a batch commit spent its time, for the debug log: milliseconds per phase, each
/// phase timed from the end of the one before (the planning between statements included;
/// parsing happens before the commit and is not counted).
struct Phases {
    last: std::time::Instant,
    laps: Vec<(&'static str, u128)>,
}

impl Phases {
    fn start() -> Self {
        Phases { last: std::time::Instant::now(), laps: Vec::new() }
    }

    fn lap(&mut self, phase: &'static str) {
        self.laps.push((phase, self.last.elapsed().as_millis()));
        self.last = std::time::Instant::now();
    }
}

impl std::fmt::Display for Phases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (phase, ms)) in self.laps.iter().enumerate() {
            write!(f, "{}{phase}={ms}ms", if i == 0 { "" } else { " " })?;
        }
        Ok(())
    }
}

/// Arbitrary constant naming the advisory lock of the scheduler's configuration step.
const SCHEDULER_LOCK: i64 = 0x7a11_5c4e;

/// A subject's stored decision state.
struct Previous {
    version: i64,
    /// `None` for a row written before digests were kept: its next decision is published.
    published: Option<plan::Published>,
    api_key_sha256: Option<String>,
    next_check_at: Option<DateTime<Utc>>,
}

impl Previous {
    /// Whether `check` would change the stored API key or next check instant.
    fn check_differs(&self, check: &Check) -> bool {
        let key_changed = check.api_key.is_some() && check.api_key != self.api_key_sha256;
        key_changed || check.next_check != self.next_check_at
    }
}

/// Columns of the `decisions` rows (and outbox messages) of the snapshots one pass publishes.
#[derive(Default)]
struct DecisionRows {
    subjects: Vec<String>,
    versions: Vec<i64>,
    /// The snapshot as JSON, serialized once for both `decisions` and the outbox.
    bodies: Vec<Vec<u8>>,
    shapes: Vec<i64>,
    usages: Vec<i64>,
    calculated_at: Vec<DateTime<Utc>>,
    api_keys: Vec<Option<String>>,
    next_checks: Vec<Option<DateTime<Utc>>>,
}

impl DecisionRows {
    fn push(&mut self, snapshot: &DecisionSnapshot, digest: &plan::Published, api_key: Option<String>, next_check: Option<DateTime<Utc>>) {
        self.subjects.push(snapshot.subject.clone());
        self.versions.push(snapshot.version);
        self.bodies.push(serde_json::to_vec(snapshot).unwrap_or_default());
        self.shapes.push(digest.shape);
        self.usages.push(digest.usage);
        self.calculated_at.push(digest.calculated_at);
        self.api_keys.push(api_key);
        self.next_checks.push(next_check);
    }
}

/// Records the thresholds each quota line has reached; a threshold not recorded before for
/// the subject, quota and period fires now (it goes into the line's `fired`).
async fn fire_thresholds(tx: &mut Transaction<'_, Postgres>, plans: &mut [SubjectPlan]) -> Result<(), sqlx::Error> {
    let mut rows = ThresholdRows::default();
    for p in plans.iter() {
        for ((q, line), (key, _)) in p.resolved.quotas.iter().zip(p.lines.iter()).zip(p.keys.iter()) {
            // A rolling window has no fixed period for a threshold to fire once in.
            if plan::rolling_days(q).is_some() {
                continue;
            }
            for t in thresholds_reached(line.used, q.limit, &q.thresholds) {
                rows.push(&p.subject, &q.name, key.period_start, t);
            }
        }
    }
    if rows.subjects.is_empty() {
        return Ok(());
    }
    let fired: Vec<(String, String, i32)> = sqlx::query_as(
        "INSERT INTO thresholds_fired (subject, quota, period_start, threshold)
         SELECT unnest($1::text[]), unnest($2::text[]), unnest($3::timestamptz[]), unnest($4::int[])
         ON CONFLICT DO NOTHING RETURNING subject, quota, threshold",
    )
    .bind(&rows.subjects)
    .bind(&rows.quotas)
    .bind(&rows.period_starts)
    .bind(&rows.thresholds)
    .fetch_all(&mut **tx)
    .await?;
    for (subject, quota, threshold) in fired {
        let line = plans.iter_mut().filter(|p| p.subject == subject).flat_map(|p| p.lines.iter_mut()).find(|l| l.quota == quota);
        if let Some(line) = line {
            line.fired.push(threshold as u32);
            line.fired.sort_unstable();
        }
    }
    Ok(())
}

/// Columns of `thresholds_fired` rows for one bulk insert.
#[derive(Default)]
struct ThresholdRows {
    subjects: Vec<String>,
    quotas: Vec<String>,
    period_starts: Vec<DateTime<Utc>>,
    thresholds: Vec<i32>,
}

impl ThresholdRows {
    fn push(&mut self, subject: &str, quota: &str, period_start: DateTime<Utc>, threshold: u32) {
        self.subjects.push(subject.to_string());
        self.quotas.push(quota.to_string());
        self.period_starts.push(period_start);
        self.thresholds.push(threshold as i32);
    }
}

/// One subject's decision in the making: its effective tier and quotas, the ledger rows they
/// read (with each row's reset instant), and the decided quota lines.
struct SubjectPlan {
    subject: String,
    /// The API key its latest event came with (for the key's tier).
    api_key: Option<String>,
    resolved: crate::policy::Resolved,
    keys: Vec<(LedgerKey, DateTime<Utc>)>,
    lines: Vec<QuotaDecision>,
    /// When the last bucket of its rolling quotas leaves its window (`None` without rolling
    /// usage): it is decided again then, so an idle subject's buckets are removed too.
    rolling_drained_at: Option<DateTime<Utc>>,
}

impl SubjectPlan {
    fn new(subject: &str, api_key: Option<String>, policy: &Policy, now: DateTime<Utc>) -> Self {
        let resolved = policy.resolve_for_decision(subject, api_key.as_deref(), now);
        let keys = plan::current_keys(subject, &resolved.quotas, resolved.timezone, now);
        SubjectPlan { subject: subject.to_string(), api_key, resolved, keys, lines: Vec::new(), rolling_drained_at: None }
    }
}

/// A subject's API key and the instant its decision must be looked at again.
struct Check {
    subject: String,
    api_key: Option<String>,
    next_check: Option<DateTime<Utc>>,
}

/// Most subjects whose decisions one statement of a batch commit plans and writes.
const DECISION_CHUNK: usize = 2000;

/// `subjects` split in order into maps of at most `size` entries.
fn chunks(subjects: Subjects, size: usize) -> Vec<Subjects> {
    let mut out: Vec<Subjects> = Vec::new();
    for (subject, key) in subjects {
        match out.last_mut() {
            Some(last) if last.len() < size => {
                last.insert(subject, key);
            }
            _ => out.push(Subjects::from([(subject, key)])),
        }
    }
    out
}

/// The budget subjects whose ledgers `deltas` change, to decide with the batch's subjects.
fn budget_subjects(deltas: &BTreeMap<LedgerKey, LedgerDelta>) -> Subjects {
    let mut subjects = Subjects::new();
    for key in deltas.keys().filter(|k| k.subject.starts_with(tally_domain::budget::BUDGET_SUBJECT_PREFIX)) {
        if !subjects.contains_key(&key.subject) {
            subjects.insert(key.subject.clone(), None);
        }
    }
    subjects
}

/// The subjects of `events`, each with the API key of its latest event (read from the
/// latest back, so each subject and key is cloned once, not once per event).
fn subjects_of(events: &[&UsageEvent]) -> Subjects {
    let mut subjects = Subjects::new();
    for e in events.iter().rev() {
        if !subjects.contains_key(&e.subject) {
            subjects.insert(e.subject.clone(), e.api_key_sha256.clone());
        }
    }
    subjects
}

/// Moves to quarantine, as `unknown group`, every candidate naming a group the policy does
/// not know: its group's budget cannot count it, and counting it without would undercount
/// that budget for good.
fn quarantine_unknown_groups(policy: &Policy, candidates: &mut Vec<Candidate<'_>>, quarantined: &mut Vec<Quarantined>) {
    candidates.retain(|c| {
        let Some(group) = c.event.group.as_deref().filter(|g| !policy.knows_group(g)) else { return true };
        let words = format!("group {group:?} is not a group of configuration version {}", policy.version);
        let reason = Reason::with_words(QuarantineReason::UnknownGroup, words);
        quarantined.push(Quarantined::new(reason, Some(c.event.id.clone()), c.delivery));
        false
    });
}

/// Moves to quarantine, as `overflow`, every candidate whose cost priced from the model's
/// price is past [`MAX_AMOUNT`] (an amount the sender gave was bounded when it was parsed).
fn quarantine_overpriced(candidates: &mut Vec<Candidate<'_>>, quarantined: &mut Vec<Quarantined>) {
    candidates.retain(|c| {
        let cost = c.event.cost_micros.unwrap_or(0);
        if cost <= MAX_AMOUNT {
            return true;
        }
        let detail = format!(
            "the cost priced from model {:?}'s price, {cost} micro-dollars, is above the largest amount Tally counts, {MAX_AMOUNT} (10^15)",
            c.event.model.as_deref().unwrap_or_default()
        );
        quarantined.push(Quarantined::refused(Refusal::overflow(detail), Some(c.event.id.clone()), c.delivery));
        false
    });
}

/// Adds the deltas to the ledgers with one bulk upsert; returns the `used` of every row it
/// wrote, as of this transaction. A rolling bucket that lands on a shorter row of an older
/// version starting at the same instant (one-second rows) extends that row's end to its
/// own, so the row's usage leaves the window no earlier than its latest event.
async fn apply_ledger_deltas(
    tx: &mut Transaction<'_, Postgres>,
    deltas: &BTreeMap<LedgerKey, LedgerDelta>,
) -> Result<HashMap<LedgerKey, i64>, sqlx::Error> {
    if deltas.is_empty() {
        return Ok(HashMap::new());
    }
    let subjects: Vec<&str> = deltas.keys().map(|k| k.subject.as_str()).collect();
    let metrics: Vec<&str> = deltas.keys().map(|k| k.metric.as_str()).collect();
    let scopes: Vec<&str> = deltas.keys().map(|k| k.scope.as_str()).collect();
    let periods: Vec<&str> = deltas.keys().map(|k| k.period.as_str()).collect();
    let starts: Vec<DateTime<Utc>> = deltas.keys().map(|k| k.period_start).collect();
    let ends: Vec<DateTime<Utc>> = deltas.values().map(|d| d.period_end).collect();
    let used: Vec<i64> = deltas.values().map(|d| d.used).collect();
    let quotas: Vec<&str> = deltas.values().map(|d| d.quota.as_str()).collect();
    let limits: Vec<i64> = deltas.values().map(|d| d.limit).collect();
    let rows: Vec<LedgerRow> = sqlx::query_as(
        "INSERT INTO ledgers (subject, metric, scope, period, period_start, period_end, used, quota, limit_value)
         SELECT unnest($1::text[]), unnest($2::text[]), unnest($3::text[]), unnest($4::text[]), unnest($5::timestamptz[]),
                unnest($6::timestamptz[]), unnest($7::bigint[]), unnest($8::text[]), unnest($9::bigint[])
         ON CONFLICT (subject, metric, scope, period, period_start) DO UPDATE
         SET used = ledgers.used + EXCLUDED.used, quota = EXCLUDED.quota, limit_value = EXCLUDED.limit_value,
             period_end = CASE WHEN ledgers.period LIKE 'rolling %' THEN greatest(ledgers.period_end, EXCLUDED.period_end)
                               ELSE ledgers.period_end END,
             updated_at = now()
         RETURNING subject, metric, scope, period, period_start, used",
    )
    .bind(&subjects)
    .bind(&metrics)
    .bind(&scopes)
    .bind(&periods)
    .bind(&starts)
    .bind(&ends)
    .bind(&used)
    .bind(&quotas)
    .bind(&limits)
    .fetch_all(&mut **tx)
    .await?;
    Ok(ledger_usage(rows))
}

/// A ledger row's key and usage as read back from Postgres.
#[derive(sqlx::FromRow)]
struct LedgerRow {
    subject: String,
    metric: String,
    scope: String,
    period: String,
    period_start: DateTime<Utc>,
    used: i64,
}

impl LedgerRow {
    /// The row's key and its `used`.
    fn into_usage(self) -> (LedgerKey, i64) {
        let LedgerRow { subject, metric, scope, period, period_start, used } = self;
        (LedgerKey { subject, metric, scope, period, period_start }, used)
    }
}

fn ledger_usage(rows: Vec<LedgerRow>) -> HashMap<LedgerKey, i64> {
    rows.into_iter().map(LedgerRow::into_usage).collect()
}

/// The `used` of each requested ledger row that exists.
async fn read_used(tx: &mut Transaction<'_, Postgres>, keys: &[&LedgerKey]) -> Result<HashMap<LedgerKey, i64>, sqlx::Error> {
    let subjects: Vec<&str> = keys.iter().map(|k| k.subject.as_str()).collect();
    let metrics: Vec<&str> = keys.iter().map(|k| k.metric.as_str()).collect();
    let scopes: Vec<&str> = keys.iter().map(|k| k.scope.as_str()).collect();
    let periods: Vec<&str> = keys.iter().map(|k| k.period.as_str()).collect();
    if keys.is_empty() {
        return Ok(HashMap::new());
    }
    let starts: Vec<DateTime<Utc>> = keys.iter().map(|k| k.period_start).collect();
    let rows: Vec<LedgerRow> = sqlx::query_as(
        "SELECT l.subject, l.metric, l.scope, l.period, l.period_start, l.used
         FROM ledgers l
         JOIN UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[]) AS k(subject, metric, scope, period, period_start)
           USING (subject, metric, scope, period, period_start)",
    )
    .bind(&subjects)
    .bind(&metrics)
    .bind(&scopes)
    .bind(&periods)
    .bind(&starts)
    .fetch_all(&mut **tx)
    .await?;
    Ok(ledger_usage(rows))
}

/// A rolling quota's ledger rows: subject, metric, scope and period (its buckets differ only
/// by start).
type RollingId = (String, String, String, String);

fn rolling_id(key: &LedgerKey) -> RollingId {
    (key.subject.clone(), key.metric.clone(), key.scope.clone(), key.period.clone())
}

/// A rolling quota's current key (its `period_start` is the window start) and window length.
struct RollingKey<'a> {
    key: &'a LedgerKey,
    days: u32,
}

/// The columns of rolling keys as bind arrays: subject, metric, scope, period, the window
/// start (`since`: a bucket whose end is at or before it has left), and the earliest start
/// a bucket that has not left may have (`since` minus one bucket; rows of older versions
/// are shorter), which bounds the primary key scan.
struct RollingKeyColumns<'a> {
    subjects: Vec<&'a str>,
    metrics: Vec<&'a str>,
    scopes: Vec<&'a str>,
    periods: Vec<&'a str>,
    since: Vec<DateTime<Utc>>,
    earliest_start: Vec<DateTime<Utc>>,
}

impl<'a> RollingKeyColumns<'a> {
    fn of(keys: &[RollingKey<'a>]) -> RollingKeyColumns<'a> {
        let bucket = |days: u32| Duration::seconds(i64::try_from(tally_domain::period::rolling_bucket_seconds(days)).unwrap_or(i64::MAX));
        RollingKeyColumns {
            subjects: keys.iter().map(|k| k.key.subject.as_str()).collect(),
            metrics: keys.iter().map(|k| k.key.metric.as_str()).collect(),
            scopes: keys.iter().map(|k| k.key.scope.as_str()).collect(),
            periods: keys.iter().map(|k| k.key.period.as_str()).collect(),
            since: keys.iter().map(|k| k.key.period_start).collect(),
            earliest_start: keys.iter().map(|k| k.key.period_start - bucket(k.days)).collect(),
        }
    }
}

/// Deletes the buckets of `keys` that have left the window (end at or before the window
/// start): nothing reads them again (the API's usage route lists what is there; the
/// month's reconciliation compares the rows it finds). Rows another transaction holds are
/// skipped, not waited for (a later decision removes them), so this never blocks or
/// deadlocks against a batch writing the same subject.
async fn remove_departed_buckets(tx: &mut Transaction<'_, Postgres>, keys: &[RollingKey<'_>]) -> Result<(), sqlx::Error> {
    let c = RollingKeyColumns::of(keys);
    sqlx::query(
        "DELETE FROM ledgers WHERE (subject, metric, scope, period, period_start) IN (
             SELECT l.subject, l.metric, l.scope, l.period, l.period_start
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[]) AS k(subject, metric, scope, period, since)
             JOIN ledgers l ON l.subject = k.subject AND l.metric = k.metric AND l.scope = k.scope AND l.period = k.period
                           AND l.period_start < k.since AND l.period_end <= k.since
             FOR UPDATE OF l SKIP LOCKED)",
    )
    .bind(&c.subjects)
    .bind(&c.metrics)
    .bind(&c.scopes)
    .bind(&c.periods)
    .bind(&c.since)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// A rolling bucket as read back from Postgres.
#[derive(sqlx::FromRow)]
struct BucketRow {
    subject: String,
    metric: String,
    scope: String,
    period: String,
    period_start: DateTime<Utc>,
    period_end: DateTime<Utc>,
    used: i64,
}

/// The buckets of each rolling key that have not left its window: every row of its subject,
/// metric, scope and period that ends after the key's `period_start` (the window start).
async fn read_rolling_buckets(
    tx: &mut Transaction<'_, Postgres>,
    keys: &[RollingKey<'_>],
) -> Result<HashMap<RollingId, Vec<RollingBucket>>, sqlx::Error> {
    let c = RollingKeyColumns::of(keys);
    let rows: Vec<BucketRow> = sqlx::query_as(
        "SELECT k.subject, k.metric, k.scope, k.period, l.period_start, l.period_end, l.used
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::timestamptz[])
              AS k(subject, metric, scope, period, since, earliest_start)
         JOIN ledgers l ON l.subject = k.subject AND l.metric = k.metric AND l.scope = k.scope AND l.period = k.period
                       AND l.period_start > k.earliest_start AND l.period_end > k.since",
    )
    .bind(&c.subjects)
    .bind(&c.metrics)
    .bind(&c.scopes)
    .bind(&c.periods)
    .bind(&c.since)
    .bind(&c.earliest_start)
    .fetch_all(&mut **tx)
    .await?;
    // Keyed without the window start: Postgres keeps microseconds, the key has nanoseconds.
    let mut out: HashMap<RollingId, Vec<RollingBucket>> = HashMap::new();
    for BucketRow { subject, metric, scope, period, period_start, period_end, used } in rows {
        out.entry((subject, metric, scope, period)).or_default().push(RollingBucket { start: period_start, end: period_end, used });
    }
    Ok(out)
}

/// Makes sure every budget subject among `subjects` has a decision row, so that
/// [`previous_decisions`] locks it. A budget's decision is made by every transaction that
/// counts in it, across lanes and instances: without a row to lock, two transactions that
/// decide a new budget at once would both publish version 1, and the view, which never
/// replaces a version with an equal one, could keep the one that missed the other's usage.
/// The placeholder (version 0, no digests) never commits as such: the transaction that
/// inserts it publishes version 1 over it, and a concurrent one waits for that.
async fn lock_new_budget_rows(tx: &mut Transaction<'_, Postgres>, subjects: &[&str]) -> Result<(), sqlx::Error> {
    let budgets: Vec<&str> = subjects.iter().copied().filter(|s| s.starts_with(tally_domain::budget::BUDGET_SUBJECT_PREFIX)).collect();
    if budgets.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO decisions (subject, version, snapshot)
         SELECT s, 0, 'null'::json FROM unnest($1::text[]) AS s ORDER BY s
         ON CONFLICT (subject) DO NOTHING",
    )
    .bind(&budgets)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The stored decision state of `subjects`, locked for this transaction.
async fn previous_decisions(tx: &mut Transaction<'_, Postgres>, subjects: &[&str]) -> Result<HashMap<String, Previous>, sqlx::Error> {
    type Row = (String, i64, Option<i64>, Option<i64>, Option<DateTime<Utc>>, Option<String>, Option<DateTime<Utc>>);
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT subject, version, shape_digest, usage_digest, calculated_at, api_key_sha256, next_check_at
         FROM decisions WHERE subject = ANY($1) ORDER BY subject FOR UPDATE",
    )
    .bind(subjects)
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(s, version, shape, usage, calculated_at, api_key_sha256, next_check_at)| {
            let published = match (shape, usage, calculated_at) {
                (Some(shape), Some(usage), Some(calculated_at)) => Some(plan::Published { shape, usage, calculated_at }),
                _ => None,
            };
            (s, Previous { version, published, api_key_sha256, next_check_at })
        })
        .collect())
}

/// Stores each subject's API key and next check instant.
async fn save_checks(tx: &mut Transaction<'_, Postgres>, checks: &[Check]) -> Result<(), sqlx::Error> {
    if checks.is_empty() {
        return Ok(());
    }
    let subjects: Vec<&str> = checks.iter().map(|c| c.subject.as_str()).collect();
    let keys: Vec<Option<&str>> = checks.iter().map(|c| c.api_key.as_deref()).collect();
    let at: Vec<Option<DateTime<Utc>>> = checks.iter().map(|c| c.next_check).collect();
    sqlx::query(
        "UPDATE decisions d SET api_key_sha256 = coalesce(c.key, d.api_key_sha256), next_check_at = c.at
         FROM UNNEST($1::text[], $2::text[], $3::timestamptz[]) AS c(subject, key, at)
         WHERE d.subject = c.subject",
    )
    .bind(&subjects)
    .bind(&keys)
    .bind(&at)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Writes published snapshots with their digests, API key and next check instant.
async fn save_snapshots(tx: &mut Transaction<'_, Postgres>, rows: &DecisionRows) -> Result<(), sqlx::Error> {
    if rows.subjects.is_empty() {
        return Ok(());
    }
    let bodies: Vec<&str> = rows.bodies.iter().map(|b| std::str::from_utf8(b).unwrap_or("null")).collect();
    sqlx::query(
        "INSERT INTO decisions (subject, version, snapshot, shape_digest, usage_digest, calculated_at, api_key_sha256, next_check_at)
         SELECT unnest($1::text[]), unnest($2::bigint[]), unnest($3::text[]::json[]), unnest($4::bigint[]), unnest($5::bigint[]),
                unnest($6::timestamptz[]), unnest($7::text[]), unnest($8::timestamptz[])
         ON CONFLICT (subject) DO UPDATE
         SET version = EXCLUDED.version, snapshot = EXCLUDED.snapshot, shape_digest = EXCLUDED.shape_digest,
             usage_digest = EXCLUDED.usage_digest, calculated_at = EXCLUDED.calculated_at,
             api_key_sha256 = coalesce(EXCLUDED.api_key_sha256, decisions.api_key_sha256),
             next_check_at = EXCLUDED.next_check_at, published_at = now()
         WHERE decisions.version < EXCLUDED.version",
    )
    .bind(&rows.subjects)
    .bind(&rows.versions)
    .bind(&bodies)
    .bind(&rows.shapes)
    .bind(&rows.usages)
    .bind(&rows.calculated_at)
    .bind(&rows.api_keys)
    .bind(&rows.next_checks)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Appends messages to the outbox.
async fn enqueue(tx: &mut Transaction<'_, Postgres>, topic: &str, keys: &[String], payloads: &[Vec<u8>]) -> Result<(), sqlx::Error> {
    if keys.is_empty() {
        return Ok(());
    }
    sqlx::query("INSERT INTO outbox (topic, key, payload) SELECT $1, unnest($2::text[]), unnest($3::bytea[])")
        .bind(topic)
        .bind(keys)
        .bind(payloads)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;

    /// A database error with only a SQLSTATE, as Postgres answers one.
    #[derive(Debug)]
    struct Sqlstate(&'static str);

    impl std::fmt::Display for Sqlstate {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "SQLSTATE {}", self.0)
        }
    }

    impl std::error::Error for Sqlstate {}

    impl sqlx::error::DatabaseError for Sqlstate {
        fn message(&self) -> &str {
            self.0
        }

        fn code(&self) -> Option<Cow<'_, str>> {
            Some(Cow::Borrowed(self.0))
        }

        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }

        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }

        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }

        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
    }

    fn postgres(code: &'static str) -> sqlx::Error {
        sqlx::Error::Database(Box::new(Sqlstate(code)))
    }

    #[test]
    fn a_refusal_by_fencing_is_its_own_class() {
        assert_eq!(StoreError::Fenced { partition: 0, start: 1, epoch: 2 }.class(), ErrorClass::Fenced);
    }

    #[test]
    fn failures_that_say_nothing_about_the_batch_are_transient() {
        // Serialization failure, deadlock, connection failure, admin shutdown, too many
        // connections, lock not available, read-only server after a failover.
        for code in ["40001", "40P01", "08006", "57P01", "53300", "55P03", "25006"] {
            assert_eq!(StoreError::Database(postgres(code)).class(), ErrorClass::Transient, "SQLSTATE {code}");
        }
        assert_eq!(StoreError::Database(sqlx::Error::PoolTimedOut).class(), ErrorClass::Transient);
        assert_eq!(StoreError::Database(sqlx::Error::Io(std::io::Error::other("reset"))).class(), ErrorClass::Transient);
        let lost = anyhow::Error::new(sqlx::Error::PoolTimedOut).context("failed to load configuration version 3");
        assert_eq!(StoreError::Config(lost).class(), ErrorClass::Transient, "a configuration unread for a lost connection");
    }

    #[test]
    fn failures_that_come_back_on_every_try_are_permanent() {
        // Undefined table and column (a schema that does not match), insufficient
        // privilege, a check violation (a ledger bound: an event's, found by isolation).
        for code in ["42P01", "42703", "42501", "23514"] {
            assert_eq!(StoreError::Database(postgres(code)).class(), ErrorClass::Permanent, "SQLSTATE {code}");
        }
        assert!(StoreError::Database(sqlx::Error::RowNotFound).is_permanent());
        let unloadable = anyhow::anyhow!("invalid tier configuration (config version 2):\nexpected a mapping");
        assert!(StoreError::Config(unloadable).is_permanent(), "a stored configuration that cannot load");
        let no_table = anyhow::Error::new(postgres("42P01")).context("failed to read config_versions");
        assert!(StoreError::Config(no_table).is_permanent(), "a configuration table that is not there");
        assert!(!StoreError::Config(anyhow::anyhow!("x")).is_transient());
    }

    #[test]
    fn chunks_keep_every_subject_once_in_order() {
        let subjects: Subjects = (0..5).map(|i| (format!("s{i}"), (i % 2 == 0).then(|| format!("k{i}")))).collect();
        let split = chunks(subjects.clone(), 2);
        assert_eq!(split.iter().map(BTreeMap::len).collect::<Vec<_>>(), [2, 2, 1]);
        assert_eq!(split.into_iter().flatten().collect::<Subjects>(), subjects);
        assert!(chunks(Subjects::new(), 2).is_empty());
    }
}
