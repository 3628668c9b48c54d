//! The aggregator: usage events in, exactly-once ledgers and decision snapshots out.
//!
//! # Delivery guarantee
//! Every usage event is counted in the ledgers exactly once, however often the broker
//! delivers it. The aggregator consumes the usage topic with auto-commit off and, for each
//! batch, in ONE Postgres transaction:
//! 1. records each event id with the fingerprint of its canonical form (`processed_events`,
//!    kept per UTC day of the event time for the lateness window, [`dedupe`] and
//!    [`partitions`]); an id seen before on the same day with the same fingerprint is a
//!    duplicate and is skipped, with another fingerprint a conflict and is quarantined;
//! 2. applies the ledger deltas of the new events with one bulk statement;
//! 3. writes changed decision snapshots (with a per-subject version that only grows) and
//!    quarantined events to the `outbox`;
//! 4. advances the consumed offsets stored in `consumer_offsets`, refusing the whole batch if
//!    it does not start exactly at the stored offset or if this instance no longer owns the
//!    partition at the epoch it claimed (fencing).
//!
//! An urgent event (one that may change a decision, [`headroom`]) is also committed at once,
//! ahead of its batch, by a fast commit: steps 1-3 in a transaction of its own, without
//! step 4. Its batch skips it and moves the offsets past it; a replay or another instance
//! meets its dedupe record and skips it as a duplicate.
//!
//! Offsets live in Postgres; the offsets committed to Kafka afterwards are only a hint for
//! where to resume fetching, and anything below the stored offset is skipped on arrival.
//! The outbox is relayed to Kafka by [`relay`] after the commit, so a crash between commit
//! and publish republishes (at least once) but never loses a snapshot; consumers keep the
//! highest version.
//!
//! # Bulk statements
//! A batch sends a table's rows in bulk, one array per column (decisions and the outbox per
//! chunk of 2 000 subjects), except the dedupe records while none is known, which go by
//! binary `COPY` ([`dedupe`]). Every bulk insert (dedupe records that skip known ids,
//! ledgers, thresholds, snapshots, outbox) unnests its arrays in the select list, side by
//! side, rather than in
//! `FROM UNNEST(...)`: Postgres stores a table function's rows in a tuplestore before the
//! insert reads them, a cost per row the select-list form does not pay (`DESIGN.md` beside
//! this file). The arrays of one statement always
//! have the same length, so both forms give the same rows. Updates and reads join their
//! arrays as `FROM UNNEST(...)`, which a join needs.
//!
//! Those arrays make a batch's statements megabytes long, and a Postgres connection keeps
//! the largest buffers it ever needed; so after each commit the batch's connection gives
//! them back before it returns to the pool; otherwise every pooled connection would hold the
//! largest batch's buffers for as long as the process runs.

pub mod consumer;
pub mod dedupe;
pub mod headroom;
pub mod isolate;
pub mod keys;
pub mod lanes;
pub mod partitions;
pub mod plan;
pub mod policy;
pub mod quarantine;
pub mod relay;
pub mod store;
pub mod vacuum;

use std::time::Duration;

use tally_common::kafka::KafkaSettings;
use tally_common::postgres::PostgresSettings;

/// The lateness window, in days, when none is given.
pub const DEFAULT_LATENESS_DAYS: i64 = 35;

/// The aggregator's own settings.
#[derive(Debug, Clone, clap::Args)]
pub struct AggregatorSettings {
    /// Consumer group of the ledger path. Instances in one group split the partitions.
    #[arg(long, env = "TALLY_AGGREGATOR_GROUP", default_value = "tally-ledger")]
    pub group: String,
    /// Tier configuration (YAML) to seed an empty database with. Once a configuration is
    /// stored, change it with `tally config apply` (or the admin API); this file is then
    /// ignored. With none stored and no file, the built-in default tier applies.
    #[arg(long = "config", env = "TALLY_CONFIG")]
    pub config: Option<std::path::PathBuf>,
    /// Most events in one batch (one Postgres transaction). Under load a lane's next batch
    /// fills while its previous one commits, so batches grow with the load up to this.
    #[arg(long, env = "TALLY_AGGREGATOR_MAX_BATCH", default_value_t = 40_000, value_parser = at_least_one)]
    pub max_batch: usize,
    /// Most distinct subjects (message keys) in one batch. A batch's memory and ledger rows
    /// grow with its subjects; more events of subjects already in it join it up to
    /// `--max-batch`, summed into the same ledger rows. Keep it above the subjects one lane
    /// sees between two of its commits: below that, batches close at about one event per
    /// subject and every event pays for its own ledger rows.
    #[arg(long, env = "TALLY_AGGREGATOR_MAX_BATCH_SUBJECTS", default_value_t = 10_000, value_parser = at_least_one)]
    pub max_batch_subjects: usize,
    /// Commit lanes: partitions are split among this many lanes (`partition % lanes`), each
    /// committing its own batches, one transaction at a time, while the loop goes on
    /// receiving; lanes commit concurrently. Each lane holds a database connection while it
    /// commits.
    #[arg(long, env = "TALLY_AGGREGATOR_LANES", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub lanes: u16,
    /// Subjects whose headroom (what each may still use before its next threshold or
    /// limit) the instance keeps, to commit an event that reaches one at once rather than
    /// with its batch. Split among the lanes; each lane keeps up to twice its share and
    /// forgets the subjects it has not seen for longest (their events are then decided with
    /// their batches, until a batch decides them again).
    #[arg(long, env = "TALLY_AGGREGATOR_HEADROOM_SUBJECTS", default_value_t = 200_000, value_parser = at_least_one)]
    pub headroom_subjects: usize,
    /// Longest wait, in milliseconds, to fill a batch once its first event arrived.
    #[arg(long, env = "TALLY_AGGREGATOR_MAX_WAIT_MS", default_value_t = 50)]
    pub max_wait_ms: u64,
    /// Events older than this many days go to quarantine.
    #[arg(long, env = "TALLY_LATENESS_DAYS", default_value_t = DEFAULT_LATENESS_DAYS)]
    pub lateness_days: i64,
    /// A subject whose quota states did not change gets a fresh snapshot (with its new
    /// usage) at most this often, in milliseconds; the scheduler publishes it when due. A
    /// state change (a threshold, a block, a new period or tier) is published at once. Every
    /// refresh is a snapshot to write, relay and read, so this bounds that work to active
    /// subjects / interval.
    #[arg(long, env = "TALLY_SNAPSHOT_REFRESH_MS", default_value_t = 5000)]
    pub snapshot_refresh_ms: u64,
    /// A member whose heartbeat is older than this many milliseconds is considered gone and
    /// its partitions are split among the others.
    #[arg(long, env = "TALLY_MEMBER_LEASE_MS", default_value_t = 10_000)]
    pub member_lease_ms: u64,
    /// Address of the aggregator's `/healthz` and `/metrics`.
    #[arg(long = "listen", env = "TALLY_AGGREGATOR_LISTEN", default_value = "127.0.0.1:8082")]
    pub listen: std::net::SocketAddr,
    /// Longest time, in seconds, to drain and commit on shutdown.
    #[arg(long, env = "TALLY_SHUTDOWN_TIMEOUT_SECONDS", default_value_t = 10)]
    pub shutdown_timeout_seconds: u64,
}

/// A count that must be at least 1 (a batch of 0 would never drain).
fn at_least_one(value: &str) -> Result<usize, String> {
    match value.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("{value:?} is not a whole number of at least 1")),
    }
}

impl AggregatorSettings {
    pub fn lanes(&self) -> usize {
        usize::from(self.lanes.max(1))
    }

    pub fn max_wait(&self) -> Duration {
        Duration::from_millis(self.max_wait_ms)
    }
}

/// Runs the aggregator until `shutdown` resolves, then drains and commits.
pub async fn run(
    settings: AggregatorSettings,
    kafka: KafkaSettings,
    postgres: PostgresSettings,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    consumer::run(settings, kafka, postgres, shutdown).await
}
