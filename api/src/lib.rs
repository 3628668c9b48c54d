//! The API service.
//!
//! Contract:
//! - Decisions are answered from an in-memory [`view::DecisionView`] fed by the decisions
//!   topic, keeping the highest `version` per subject; a subject the view has not seen falls
//!   back to the `decisions` table in Postgres. Every answer says its age (`age_ms`, from the
//!   snapshot's `calculated_at`) and its `source`.
//! - Ledgers are read from Postgres; the API never writes them.
//! - Usage history, top subjects and reconciliation are read from ClickHouse (and the
//!   ledger) by [`history`]; a ClickHouse outage only fails those routes.

pub mod history;
pub mod routes;
pub mod view;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tally_common::clickhouse::ClickHouseSettings;
use tally_common::kafka::KafkaSettings;
use tally_common::postgres::PostgresSettings;

/// The API service's own settings.
#[derive(Debug, Clone, clap::Args)]
pub struct ApiSettings {
    /// Address to listen on.
    #[arg(long = "listen", env = "TALLY_API_LISTEN", default_value = "127.0.0.1:8081")]
    pub listen: SocketAddr,
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
    let feeder = view::spawn_feeder(view.clone(), &kafka)?;
    let history = Arc::new(history::HistoryState { ch: tally_history::ch::Ch::new(&clickhouse), pool: pool.clone() });
    let state = routes::AppState::new(view, pool);
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("failed to listen on {}", settings.listen))?;
    tracing::info!(listen = %settings.listen, topic = %kafka.decisions_topic, "api listening");
    let served = axum::serve(listener, routes::router(state).merge(history::router(history))).with_graceful_shutdown(shutdown).await;
    feeder.abort();
    served.context("api server failed")
}
