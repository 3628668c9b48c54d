//! Usage history in ClickHouse: the history writer, history queries, month-end
//! reconciliation and billing export.
//!
//! # Delivery guarantee
//! History converges to exactly the events the ledger counted: no loss, no duplicates in raw
//! rows or rollups, after any replay, crash or ClickHouse outage.
//!
//! - The writer consumes the usage topic in its own group (default `tally-history`), so its
//!   lag or a ClickHouse outage never holds back the aggregator. Partitions are split among
//!   the group's live writers through Postgres membership and assigned manually (see
//!   [`writer`]); a writer killed and restarted resumes within the membership lease.
//! - The ledger is the truth of what was counted. A message is written only once the
//!   aggregator's stored offset (`consumer_offsets` of the ledger group) has passed it, and
//!   only if `processed_events` holds its id with the same fingerprint: quarantined messages
//!   (refused corrections included) and conflicting redeliveries of an id never reach history.
//! - A counted correction is written as one row holding the NEGATED amounts of the event it
//!   reverted, in that event's subject, time, scope, API key and (when its row is known)
//!   model, so raw sums and rollups net out exactly as the ledger did (see [`plan`]).
//! - Each raw row carries the budgets its event met and the budget ledgers it counted in,
//!   computed with the aggregator's own rule under the configuration version the ledger
//!   counted it under ([`budgets`]); a correction's row carries its target's.
//! - The writer's progress lives in Postgres (`history_offsets`, claimed and fenced per
//!   partition like the aggregator's) and advances only after ClickHouse accepted the raw rows
//!   and the rollups of the batch ([`sink`]). A crash anywhere before that replays the batch.
//! - An event is its id and the UTC day of its time, as the ledger's dedupe record keys it:
//!   the same id on two days is two events, in history and in reconciliation alike.
//! - Every write is idempotent by construction ([`sink`]): raw rows are keyed by the event
//!   (ReplacingMergeTree, and events already present are not inserted again), and each
//!   batch's insert carries a deduplication token derived from its partition/offset ranges
//!   and its rows, so the same insert sent again stores nothing; rollups are recomputed per
//!   touched bucket from the raw table and replace the bucket (ReplacingMergeTree(version)),
//!   never fed by a materialized view (a deduplicated insert still reaches one). Reads use
//!   `FINAL`. Why this is exact: ARCHITECTURE.md, "history/".
//! - Every ClickHouse call goes through the `clickhouse` crate ([`client`]): typed rows in
//!   RowBinary validated against the tables' schema, LZ4, query parameters.
//!
//! [`query`] answers dashboards from the rollups where the buckets allow it (and from the
//! raw rows per API key or budget), [`reconcile`] proves ledger == history == accepted events
//! per subject, quota and period, and every budget ledger row == the raw rows that counted in
//! it, and [`billing`] closes periods and exports billing lines per subject and per budget.

pub mod billing;
pub mod budgets;
pub mod client;
pub mod isolate;
pub mod plan;
pub mod progress;
pub mod query;
pub mod reconcile;
pub mod sink;
pub mod writer;

/// The history writer's own settings.
#[derive(Debug, Clone, clap::Args)]
pub struct WriterSettings {
    /// Group of the history writers (never the ledger's): the membership group that splits
    /// the partitions among live writers (`consumer_members`), the key of their progress in
    /// `history_offsets`, and the Kafka group that receives offset hints.
    #[arg(long = "group", env = "TALLY_HISTORY_GROUP", default_value = "tally-history")]
    pub group: String,
    /// Consumer group of the aggregator, whose stored offsets and `processed_events` say what
    /// the ledger counted.
    #[arg(long = "ledger-group", env = "TALLY_AGGREGATOR_GROUP", default_value = "tally-ledger")]
    pub ledger_group: String,
    /// Most messages in one batch.
    #[arg(long, env = "TALLY_HISTORY_MAX_BATCH", default_value_t = 5000)]
    pub max_batch: usize,
    /// Longest wait, in milliseconds, to fill a batch once its first message arrived.
    #[arg(long, env = "TALLY_HISTORY_MAX_WAIT_MS", default_value_t = 200)]
    pub max_wait_ms: u64,
    /// Milliseconds after its last heartbeat at which a writer is considered gone and its
    /// partitions go to the live writers (a writer killed with SIGKILL and restarted owns
    /// every partition again within this lease).
    #[arg(long = "member-lease-ms", env = "TALLY_HISTORY_MEMBER_LEASE_MS", default_value_t = 10_000)]
    pub member_lease_ms: u64,
    /// Address of the writer's `/healthz` and `/metrics`.
    #[arg(long = "listen", env = "TALLY_HISTORY_LISTEN", default_value = "127.0.0.1:8083")]
    pub listen: std::net::SocketAddr,
}

impl WriterSettings {
    pub fn member_lease(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.member_lease_ms)
    }
}

pub use writer::run;
