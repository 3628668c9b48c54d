//! The API service.
//!
//! Contract:
//! - Decisions are answered from an in-memory [`view::DecisionView`] fed by the decisions
//!   topic, keeping the highest `version` per subject; a subject the view has not seen falls
//!   back to the `decisions` table in Postgres. Every answer says its age (`age_ms`, from the
//!   snapshot's `calculated_at`) and its `source`. `GET .../decision` carries a weak ETag of
//!   the version and answers 304 to a matching `If-None-Match`.
//! - `POST /v1/check` ([`check`]) answers from the view and the cached configuration with no
//!   database round trip while the view is fresh; a staleness bound and a fail-open or
//!   fail-closed policy apply when it is not, and the answer says so. Every budget the
//!   request meets (its API key's, its groups', its tier's pool) must pass too; their
//!   decisions are in the view under their budget subjects ([`budgets`] reads them).
//! - The admin API ([`admin`]) edits the tier configuration in Postgres, the same versioned
//!   documents `tally config apply` writes, and announces each version on the control topic.
//! - Ledgers are read from Postgres; the API never writes them.
//! - Usage history, top subjects and reconciliation are read from ClickHouse (and the
//!   ledger) by [`history`]; a ClickHouse outage only fails those routes.
//! - Access: bearer tokens per role ([`auth::AuthSettings`]), compared in constant time,
//!   never logged. Bodies are limited (`--max-body-bytes`, counted after decoding a
//!   `Content-Encoding` of gzip, deflate or br), lists are paged (`--max-page`).
//! - Every refusal is JSON `{"error", "field"}`: bad JSON bodies (400 naming the field, 413,
//!   415), unknown routes (404) and wrong methods (405 with `Allow`) included.
//! - Shutdown: stops accepting, finishes in-flight requests, writes the pending API-key
//!   last-use times, then stops the background tasks.

pub mod admin;
pub mod auth;
pub mod budgets;
pub mod check;
pub mod configs;
pub mod error;
pub mod history;
pub mod keys;
pub mod openapi;
pub mod paging;
pub mod probes;
pub mod routes;
pub mod state;
pub mod subjects;
pub mod view;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::extract::DefaultBodyLimit;
use axum::Router;
use tally_common::clickhouse::ClickHouseSettings;
use tally_common::kafka::KafkaSettings;
use tally_common::postgres::PostgresSettings;

/// The API service's own settings.
#[derive(Debug, Clone, clap::Args)]
pub struct ApiSettings {
    /// Address to listen on.
    #[arg(long = "listen", env = "TALLY_API_LISTEN", default_value = "127.0.0.1:8081")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub auth: auth::AuthSettings,
    /// A check answered while the decision view has not caught up with its topic for longer
    /// than this many milliseconds follows --stale-policy.
    #[arg(long, env = "TALLY_CHECK_MAX_STALENESS_MS", default_value_t = 10_000)]
    pub max_staleness_ms: u64,
    /// What a check answers when the view is too stale: `open` allows, `closed` denies.
    #[arg(long, env = "TALLY_CHECK_STALE_POLICY", value_enum, default_value = "open")]
    pub stale_policy: state::StalePolicy,
    /// Largest request body accepted, in bytes.
    #[arg(long, env = "TALLY_API_MAX_BODY_BYTES", default_value_t = 64 * 1024)]
    pub max_body_bytes: usize,
    /// Largest page a list answers (`?limit=`).
    #[arg(long, env = "TALLY_API_MAX_PAGE", default_value_t = 1000)]
    pub max_page: usize,
}

/// The whole router: the routes of [`routes::routes`] and, when given, the history routes
/// (read role), with JSON answers for unknown routes and wrong methods, the body limit, and
/// compressed request bodies decoded before the limit counts them (`tally_common::http`).
pub fn app(state: Arc<state::AppState>, history: Option<Arc<history::HistoryState>>, max_body_bytes: usize) -> Router {
    let auth = state.auth.clone();
    let mut app = routes::router(state);
    if let Some(h) = history {
        app = app.merge(auth::guard(history::router(h), auth::Role::Read, &auth));
    }
    tally_common::http::decoding(tally_common::http::json_fallbacks(app).layer(DefaultBodyLimit::max(max_body_bytes)))
}

/// Runs the API until `shutdown` resolves.
pub async fn run(
    settings: ApiSettings,
    kafka: KafkaSettings,
    postgres: PostgresSettings,
    clickhouse: ClickHouseSettings,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let pool = postgres.connect().await?;
    let view = Arc::new(view::DecisionView::default());
    let clients = tally_common::health::Clients::default();
    let feeder = view::spawn_feeder(view.clone(), &kafka, clients.register("decisions consumer"))?;
    let configs = Arc::new(configs::ConfigCache::new(configs::Loaded::builtin()?));
    if let Err(e) = configs.refresh(&pool).await {
        tracing::warn!(error = %e, "failed to load the tier configuration; retrying in the background");
    }
    let refresher = configs.spawn_refresher(pool.clone());
    let producer = tally_common::producing::RebuildingProducer::new(kafka.producer_config(), clients.register("control producer"), None)?;
    let history = Arc::new(history::HistoryState { ch: tally_history::client::Ch::new(&clickhouse), pool: pool.clone() });
    let state = state::AppState::new(state::Parts {
        view,
        pool: pool.clone(),
        configs,
        announcer: Some(configs::Announcer { producer: producer.clone(), topic: kafka.control_topic.clone() }),
        check: state::CheckSettings {
            max_staleness: chrono::Duration::milliseconds(i64::try_from(settings.max_staleness_ms).unwrap_or(i64::MAX)),
            stale_policy: settings.stale_policy,
        },
        auth: settings.auth.clone(),
        max_page: settings.max_page.max(1),
        broker: Some(state::Broker { producer, clients }),
    });
    state.auth.log_posture();
    let flusher = state.last_use.spawn_flusher(pool.clone());
    let listener =
        tokio::net::TcpListener::bind(settings.listen).await.with_context(|| format!("failed to listen on {}", settings.listen))?;
    tracing::info!(listen = %settings.listen, topic = %kafka.decisions_topic, stale_policy = ?settings.stale_policy, "api listening");
    let served = axum::serve(listener, app(state.clone(), Some(history), settings.max_body_bytes)).with_graceful_shutdown(shutdown).await;
    flusher.abort();
    if let Err(e) = state.last_use.flush(&pool).await {
        tracing::warn!(error = %e, "failed to record the last API key uses at shutdown");
    }
    refresher.abort();
    feeder.abort();
    served.context("api server failed")
}
