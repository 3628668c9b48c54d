//! The API's shared state: what every handler reads (the decision view, the pool, the
//! configuration cache and editor, metrics, settings), built once by [`AppState::new`].

use std::sync::Arc;

use serde::Serialize;
use sqlx::PgPool;
use tally_common::metrics::{Counter, Registry};

use crate::auth::{Auth, AuthSettings};
use crate::configs::{Announcer, ConfigCache, Editor};
use crate::keys::LastUse;
use crate::view::DecisionView;

/// What a check answers when the view is staler than the bound (see [`crate::check`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StalePolicy {
    /// Allow every request.
    Open,
    /// Deny every request.
    Closed,
}

/// The check path's settings.
#[derive(Debug, Clone)]
pub struct CheckSettings {
    pub max_staleness: chrono::Duration,
    pub stale_policy: StalePolicy,
}

pub struct Metrics {
    pub decisions_from_view: Counter,
    pub decisions_from_database: Counter,
    pub allowed: Counter,
    pub denied: Counter,
    pub stale_answers: Counter,
    pub refused_keys: Counter,
}

pub struct AppState {
    pub view: Arc<DecisionView>,
    pub pool: PgPool,
    pub registry: Registry,
    pub metrics: Metrics,
    pub configs: Arc<ConfigCache>,
    pub editor: Editor,
    pub last_use: Arc<LastUse>,
    pub check: CheckSettings,
    pub auth: Arc<Auth>,
    /// Largest page a list answers.
    pub max_page: usize,
    /// The broker's clients, for `/readyz`; `None` skips that probe.
    pub broker: Option<Broker>,
}

/// The API's Kafka clients, as `/readyz` sees them.
pub struct Broker {
    /// Probed with a metadata request.
    pub producer: Arc<tally_common::producing::RebuildingProducer>,
    /// Every client's state (the decisions consumer, the control producer).
    pub clients: tally_common::health::Clients,
}

/// What [`AppState::new`] needs.
pub struct Parts {
    pub view: Arc<DecisionView>,
    pub pool: PgPool,
    pub configs: Arc<ConfigCache>,
    pub announcer: Option<Announcer>,
    pub check: CheckSettings,
    pub auth: AuthSettings,
    pub max_page: usize,
    pub broker: Option<Broker>,
}

impl AppState {
    pub fn new(p: Parts) -> Arc<Self> {
        let registry = Registry::default();
        let served = "tally_api_decisions_served_total";
        let help = "decision answers by where they came from";
        let checks = "tally_api_checks_total";
        let checks_help = "check answers by outcome";
        let metrics = Metrics {
            decisions_from_view: registry.counter(served, help, &[("source", "view")]),
            decisions_from_database: registry.counter(served, help, &[("source", "database")]),
            allowed: registry.counter(checks, checks_help, &[("outcome", "allowed")]),
            denied: registry.counter(checks, checks_help, &[("outcome", "denied")]),
            stale_answers: registry.counter("tally_api_stale_checks_total", "checks answered by the staleness policy", &[]),
            refused_keys: registry.counter("tally_api_refused_api_keys_total", "checks refused for an unknown or revoked API key", &[]),
        };
        let auth = Arc::new(Auth {
            settings: p.auth,
            rejected: registry.counter("tally_api_unauthorized_total", "requests refused for a missing or wrong token", &[]),
        });
        Arc::new(AppState {
            view: p.view,
            editor: Editor { pool: p.pool.clone(), cache: p.configs.clone(), announcer: p.announcer },
            pool: p.pool,
            registry,
            metrics,
            configs: p.configs,
            last_use: Arc::new(LastUse::default()),
            check: p.check,
            auth,
            max_page: p.max_page,
            broker: p.broker,
        })
    }
}
