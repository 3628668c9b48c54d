//! HTTP routes of the API service, and who may call them.
//!
//! Every route is listed once in [`routes`] with the role it needs; the router, the auth
//! layers and the OpenAPI test are built from that list.
//!
//! Access (see [`Auth`]): `public` routes (`/healthz`, `/readyz`, `/metrics`,
//! `/openapi.json`) need no token. `read` routes (check, decision, usage, history) need the
//! read or the admin token when a read token is configured, and are open otherwise.
//! `admin` routes need the admin token, and are refused (401) when none is configured.
//! `--no-auth` opens everything (local development only; logged loudly at start).
//! A refused request reaches no handler, so it changes nothing.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put, MethodRouter};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tally_common::auth::{authorized, Token};
use tally_common::metrics::{Counter, Registry};
use tally_domain::decision::DecisionSnapshot;

use crate::check::StalePolicy;
use crate::configs::{ConfigCache, Editor};
use crate::error::AppError;
use crate::keys::LastUse;
use crate::view::DecisionView;

/// Bearer tokens of the API (the ingest token is the ingest service's).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AuthSettings {
    /// Token for the admin API (`/v1/admin/...`); also accepted on read routes. Without
    /// it the admin API refuses every request.
    #[arg(long = "admin-token", env = "TALLY_ADMIN_TOKEN", hide_env_values = true)]
    pub admin: Option<Token>,
    /// Token for read routes (check, decision, usage, history). Without it they are open.
    #[arg(long = "read-token", env = "TALLY_READ_TOKEN", hide_env_values = true)]
    pub read: Option<Token>,
    /// Serve every route without tokens, the admin API included. Local development only.
    #[arg(long = "no-auth", env = "TALLY_API_NO_AUTH")]
    pub no_auth: bool,
}

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Public,
    Read,
    Admin,
}

/// The auth layer's state.
pub struct Auth {
    pub settings: AuthSettings,
    pub rejected: Counter,
}

impl Auth {
    pub fn allows(&self, role: Role, header: Option<&str>) -> bool {
        let s = &self.settings;
        if s.no_auth {
            return true;
        }
        let admin = s.admin.iter();
        match role {
            Role::Public => true,
            Role::Read => match &s.read {
                None => true,
                Some(read) => authorized(header, admin.chain(std::iter::once(read))),
            },
            Role::Admin => authorized(header, admin),
        }
    }

    /// Says at start what is open, without printing any token.
    pub fn log_posture(&self) {
        let s = &self.settings;
        if s.no_auth {
            tracing::warn!("AUTH DISABLED (--no-auth): every route, the admin API included, is open to anyone who can reach this address");
            return;
        }
        if s.admin.is_none() {
            tracing::warn!("no admin token configured (TALLY_ADMIN_TOKEN): the admin API refuses every request");
        }
        if s.read.is_none() {
            tracing::warn!("no read token configured (TALLY_READ_TOKEN): check, decision, usage and history are open to anyone who can reach this address");
        }
    }
}

/// The auth middleware for one role.
pub async fn require(role: Role, auth: Arc<Auth>, req: Request, next: Next) -> Response {
    let header = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    if auth.allows(role, header) {
        next.run(req).await
    } else {
        auth.rejected.inc();
        AppError::unauthorized().into_response()
    }
}

/// Applies the auth layer of `role` to `router`.
pub fn guard<S: Clone + Send + Sync + 'static>(router: Router<S>, role: Role, auth: &Arc<Auth>) -> Router<S> {
    let auth = auth.clone();
    router.route_layer(axum::middleware::from_fn(move |req: Request, next: Next| require(role, auth.clone(), req, next)))
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
    pub announcer: Option<crate::configs::Announcer>,
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

/// One route: method, path (axum syntax), role and handler.
pub struct RouteSpec {
    pub method: &'static str,
    pub path: &'static str,
    pub role: Role,
    pub handler: MethodRouter<Arc<AppState>>,
}

fn r(method: &'static str, path: &'static str, role: Role, handler: MethodRouter<Arc<AppState>>) -> RouteSpec {
    RouteSpec { method, path, role, handler }
}

/// Every route of this module and of [`crate::admin`].
pub fn routes() -> Vec<RouteSpec> {
    use crate::admin as a;
    use Role::*;
    vec![
        r("GET", "/healthz", Public, get(|| async { "ok" })),
        r("GET", "/readyz", Public, get(readyz)),
        r("GET", "/metrics", Public, get(metrics)),
        r("GET", "/openapi.json", Public, get(crate::openapi::serve)),
        r("POST", "/v1/check", Read, post(crate::check::check)),
        r("GET", "/v1/subjects/{subject}/decision", Read, get(decision)),
        r("GET", "/v1/subjects/{subject}/usage", Read, get(usage)),
        r("GET", "/v1/admin/config", Admin, get(a::config_show)),
        r("GET", "/v1/admin/tiers", Admin, get(a::tiers_list)),
        r("POST", "/v1/admin/tiers", Admin, post(a::tier_create)),
        r("GET", "/v1/admin/tiers/{name}", Admin, get(a::tier_get)),
        r("PUT", "/v1/admin/tiers/{name}", Admin, put(a::tier_put)),
        r("DELETE", "/v1/admin/tiers/{name}", Admin, delete(a::tier_delete)),
        r("GET", "/v1/admin/groups", Admin, get(a::groups_list)),
        r("GET", "/v1/admin/groups/{group}", Admin, get(a::group_get)),
        r("PUT", "/v1/admin/groups/{group}", Admin, put(a::group_put)),
        r("DELETE", "/v1/admin/groups/{group}", Admin, delete(a::group_delete)),
        r("GET", "/v1/admin/groups/{group}/members", Admin, get(a::members_list)),
        r("PUT", "/v1/admin/groups/{group}/members/{subject}", Admin, put(a::member_put)),
        r("DELETE", "/v1/admin/groups/{group}/members/{subject}", Admin, delete(a::member_delete)),
        r("GET", "/v1/admin/assignments", Admin, get(a::assignments_list)),
        r("GET", "/v1/admin/assignments/{subject}", Admin, get(a::assignment_get)),
        r("PUT", "/v1/admin/assignments/{subject}", Admin, put(a::assignment_put)),
        r("DELETE", "/v1/admin/assignments/{subject}", Admin, delete(a::assignment_delete)),
        r("GET", "/v1/admin/overrides", Admin, get(a::overrides_list)),
        r("POST", "/v1/admin/overrides", Admin, post(a::override_create)),
        r("GET", "/v1/admin/overrides/{id}", Admin, get(a::override_get)),
        r("DELETE", "/v1/admin/overrides/{id}", Admin, delete(a::override_delete)),
        r("GET", "/v1/admin/api-keys", Admin, get(a::keys_list)),
        r("POST", "/v1/admin/api-keys", Admin, post(a::key_create)),
        r("GET", "/v1/admin/api-keys/{id}", Admin, get(a::key_get)),
        r("DELETE", "/v1/admin/api-keys/{id}", Admin, delete(a::key_delete)),
    ]
}

/// The router of [`routes`], each behind the auth layer of its role.
pub fn router(state: Arc<AppState>) -> Router {
    let auth = state.auth.clone();
    let mut out = Router::new();
    for role in [Role::Public, Role::Read, Role::Admin] {
        let mut part = Router::new();
        for spec in routes().into_iter().filter(|s| s.role == role) {
            part = part.route(spec.path, spec.handler);
        }
        out = out.merge(guard(part, role, &auth));
    }
    out.with_state(state)
}

async fn metrics(State(state): State<Arc<AppState>>) -> String {
    let mut text = state.registry.render();
    text.push_str(&format!(
        "# HELP tally_api_view_subjects subjects in the decision view\n# TYPE tally_api_view_subjects gauge\ntally_api_view_subjects {}\n",
        state.view.len()
    ));
    if let Some(s) = state.view.staleness(Utc::now()) {
        text.push_str(&format!(
            "# HELP tally_api_view_staleness_milliseconds time since the decision view last caught up with its topic\n# TYPE tally_api_view_staleness_milliseconds gauge\ntally_api_view_staleness_milliseconds {}\n",
            s.num_milliseconds()
        ));
    }
    text.push_str(&format!(
        "# HELP tally_api_config_version the tier configuration version the API knows\n# TYPE tally_api_config_version gauge\ntally_api_config_version {}\n",
        state.configs.current().version
    ));
    text
}

#[derive(Serialize)]
struct Readiness {
    ready: bool,
    postgres: &'static str,
    broker: &'static str,
    decision_view: &'static str,
    /// How far behind the aggregators' decisions the view may be (see [`crate::view`]);
    /// informative: a stale view does not make the API unready, checks answer by policy.
    decision_staleness_ms: Option<i64>,
    /// The state of each Kafka client ([`tally_common::health`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    clients: Vec<tally_common::health::ClientStatus>,
}

/// Ready when Postgres answers, the broker answers, no Kafka client is disconnected or broken
/// and the decision view caught up once.
async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let postgres = match tokio::time::timeout(Duration::from_secs(2), sqlx::query("SELECT 1").execute(&state.pool)).await {
        Ok(Ok(_)) => "ok",
        _ => "unavailable",
    };
    let (broker, clients) = match &state.broker {
        None => ("not_checked", None),
        Some(b) => {
            let client = b.producer.producer();
            let probe = tokio::task::spawn_blocking(move || {
                rdkafka::producer::Producer::client(&client).fetch_metadata(None, Duration::from_secs(2)).is_ok()
            });
            let broker = if matches!(probe.await, Ok(true)) { "ok" } else { "unavailable" };
            (broker, Some(b.clients.report(std::time::Instant::now())))
        }
    };
    let decision_view = if state.view.caught_up_at().is_some() { "caught_up" } else { "catching_up" };
    let clients_ready = clients.as_ref().is_none_or(|c| c.ready);
    let ready = postgres == "ok" && broker != "unavailable" && clients_ready && decision_view == "caught_up";
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let decision_staleness_ms = state.view.staleness(Utc::now()).map(|s| s.num_milliseconds());
    let clients = clients.map(|c| c.clients).unwrap_or_default();
    (status, Json(Readiness { ready, postgres, broker, decision_view, decision_staleness_ms, clients })).into_response()
}

#[derive(Serialize)]
struct DecisionAnswer<'a> {
    #[serde(flatten)]
    snapshot: &'a DecisionSnapshot,
    /// Milliseconds between the snapshot's calculation and this answer.
    age_ms: i64,
    /// `view` (the in-memory view) or `database` (the Postgres fallback).
    source: &'static str,
}

/// The stored decision of `subject` in Postgres.
pub(crate) async fn stored_decision(state: &AppState, subject: &str) -> Result<Option<DecisionSnapshot>, sqlx::Error> {
    let row: Option<(sqlx::types::Json<DecisionSnapshot>,)> =
        sqlx::query_as("SELECT snapshot FROM decisions WHERE subject = $1").bind(subject).fetch_optional(&state.pool).await?;
    let found = row.map(|(s,)| s.0);
    if found.is_some() {
        state.metrics.decisions_from_database.inc();
    }
    Ok(found)
}

async fn latest_decision(state: &AppState, subject: &str) -> Result<Option<(Arc<DecisionSnapshot>, &'static str)>, sqlx::Error> {
    if let Some(s) = state.view.get(subject) {
        state.metrics.decisions_from_view.inc();
        return Ok(Some((s, "view")));
    }
    Ok(stored_decision(state, subject).await?.map(|s| (Arc::new(s), "database")))
}

/// Whether an `If-None-Match` value matches the (weak) entity tag `etag`.
fn none_match(header: &str, etag: &str) -> bool {
    let strip = |t: &str| t.trim().trim_start_matches("W/").to_string();
    header.split(',').any(|t| t.trim() == "*" || strip(t) == strip(etag))
}

/// `GET /v1/subjects/{subject}/decision`, with a weak ETag of the snapshot's version: the
/// body's `age_ms` changes with time, the decision only with a new version.
async fn decision(State(state): State<Arc<AppState>>, Path(subject): Path<String>, headers: HeaderMap) -> Result<Response, AppError> {
    let Some((snapshot, source)) = latest_decision(&state, &subject).await? else {
        return Err(AppError::not_found("subject", format!("no decision for subject {subject:?} yet")));
    };
    let etag = format!("W/\"{}\"", snapshot.version);
    let etag_value = HeaderValue::from_str(&etag).map_err(|e| AppError::unavailable("encoder", e))?;
    let inm = headers.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok());
    if inm.is_some_and(|h| none_match(h, &etag)) {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag_value)]).into_response());
    }
    let age_ms = (Utc::now() - snapshot.calculated_at).num_milliseconds().max(0);
    Ok((
        [(header::ETAG, etag_value), (header::CACHE_CONTROL, HeaderValue::from_static("no-cache"))],
        Json(DecisionAnswer { snapshot: &snapshot, age_ms, source }),
    )
        .into_response())
}

#[derive(Serialize)]
struct UsageRow {
    quota: String,
    metric: String,
    /// `null` for a quota over all scopes.
    scope: Option<String>,
    period: String,
    period_start: DateTime<Utc>,
    period_end: DateTime<Utc>,
    used: i64,
    limit: i64,
}

#[derive(Serialize)]
struct UsageAnswer {
    subject: String,
    ledgers: Vec<UsageRow>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageParams {
    limit: Option<String>,
}

type LedgerRow = (String, String, String, String, DateTime<Utc>, DateTime<Utc>, i64, i64);

/// `GET /v1/subjects/{subject}/usage?limit=N`: the latest ledger rows, newest period first.
async fn usage(
    State(state): State<Arc<AppState>>,
    Path(subject): Path<String>,
    params: Result<Query<UsageParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, AppError> {
    let Query(params) = params.map_err(|e| AppError::bad("query", e.body_text()))?;
    let limit = crate::admin::page_limit(params.limit.as_deref(), state.max_page.max(1000))?;
    let rows: Vec<LedgerRow> = sqlx::query_as(
        "SELECT quota, metric, scope, period, period_start, period_end, used, limit_value FROM ledgers
         WHERE subject = $1 ORDER BY period_start DESC, metric, scope, period LIMIT $2",
    )
    .bind(&subject)
    .bind(limit as i64)
    .fetch_all(&state.pool)
    .await?;
    let ledgers = rows
        .into_iter()
        .map(|(quota, metric, scope, period, period_start, period_end, used, limit)| UsageRow {
            quota,
            metric,
            scope: (scope != "*").then_some(scope),
            period,
            period_start,
            period_end,
            used,
            limit,
        })
        .collect();
    Ok(Json(UsageAnswer { subject, ledgers }).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn if_none_match_compares_weakly() {
        assert!(none_match("W/\"7\"", "W/\"7\""));
        assert!(none_match("\"7\"", "W/\"7\""));
        assert!(none_match("\"3\", W/\"7\"", "W/\"7\""));
        assert!(none_match("*", "W/\"7\""));
        assert!(!none_match("W/\"8\"", "W/\"7\""));
    }

    #[test]
    fn roles_and_tokens() {
        let admin = Token::new("admin-token-0123456789");
        let read = Token::new("read-token-0123456789");
        let auth = |settings| Auth { settings, rejected: Registry::default().counter("x", "x", &[]) };
        let open = auth(AuthSettings::default());
        assert!(open.allows(Role::Read, None));
        assert!(!open.allows(Role::Admin, None), "no admin token configured: the admin API is closed");
        let both = auth(AuthSettings { admin: Some(admin), read: Some(read), no_auth: false });
        assert!(!both.allows(Role::Read, None));
        assert!(both.allows(Role::Read, Some("Bearer read-token-0123456789")));
        assert!(both.allows(Role::Read, Some("Bearer admin-token-0123456789")));
        assert!(!both.allows(Role::Admin, Some("Bearer read-token-0123456789")));
        assert!(both.allows(Role::Admin, Some("Bearer admin-token-0123456789")));
        assert!(both.allows(Role::Public, None));
        let dev = auth(AuthSettings { no_auth: true, ..AuthSettings::default() });
        assert!(dev.allows(Role::Admin, None));
    }
}
