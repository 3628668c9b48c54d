//! What each Kafka client of a service knows about itself, for `/healthz` and `/readyz`.
//!
//! Every producer and consumer a service runs is created with a [`Watched`] context that
//! holds the client's [`ClientHealth`]. librdkafka tells the context:
//! - through its error callback: all brokers down (`_ALL_BROKERS_DOWN`) marks the client
//!   *disconnected* from that instant; a fatal error (`_FATAL`, e.g. a fenced idempotent
//!   producer) marks it *broken* until it is replaced ([`crate::producing`]);
//! - through its statistics (`statistics.interval.ms`, once a second, see [`watched`]): a
//!   broker connection that is up clears *disconnected*; with none up, brokers that
//!   librdkafka is connecting to, or connection attempts made since the last statistics,
//!   mark it. Brokers in `INIT` with no new attempt say nothing: librdkafka leaves a broker
//!   there both between reconnect attempts and when an idle client needs no connection
//!   (sparse connections). So an idle client is no longer disconnected once no broker was
//!   reported down for [`IDLE_CLEARS_AFTER`] (longer than librdkafka's longest reconnect
//!   backoff, 10 s by default, after which a client that wants a connection tries again).
//!
//! (A consumer's errors come back from its `poll`/`recv`, not through the error callback,
//! so for consumers the statistics are what tells.)
//!
//! A delivered message clears *disconnected* too. A client is reported disconnected only
//! after [`DISCONNECTED_GRACE`], so a reconnect does not flap readiness.
//!
//! [`Clients`] is the set a service reports: `/readyz` is 503 while any client is
//! disconnected or broken; `/healthz` (liveness) is 503 only when a client stayed broken for
//! [`BROKEN_LIVENESS`], i.e. replacing it did not help and a restart might.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::ConsumerContext;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, ClientContext};
use serde::{Deserialize, Serialize};

/// How long a client must have lost every broker before it is reported disconnected.
pub const DISCONNECTED_GRACE: Duration = Duration::from_secs(2);

/// How long after the last report of brokers down an idle client counts as connected again.
pub const IDLE_CLEARS_AFTER: Duration = Duration::from_secs(15);

/// How long a client may stay broken (a fatal error, not replaced) before liveness fails.
pub const BROKEN_LIVENESS: Duration = Duration::from_secs(30);

/// How often librdkafka reports a watched client's statistics, in milliseconds.
pub const STATS_INTERVAL_MS: u32 = 1000;

/// `config` with librdkafka's statistics on, so a [`Watched`] context sees broker states.
pub fn watched(mut config: ClientConfig) -> ClientConfig {
    config.set("statistics.interval.ms", STATS_INTERVAL_MS.to_string());
    config
}

#[derive(Debug, Default)]
struct State {
    /// Incremented each time the client is replaced; callbacks of an older one are ignored.
    generation: u64,
    disconnected_since: Option<Instant>,
    /// The last report of every broker down (error callback or statistics).
    last_down: Option<Instant>,
    broken_since: Option<Instant>,
    last_error: Option<String>,
    rebuilds: u64,
}

/// The state of one Kafka client (across the instances that replace one another).
#[derive(Debug)]
pub struct ClientHealth {
    name: String,
    state: Mutex<State>,
    /// Whether `disconnected_since` is set: lets a delivery skip the lock in the usual case.
    disconnected: AtomicBool,
}

/// One client's line in a health report.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ClientStatus {
    pub client: String,
    /// `ok`, `disconnected` (no broker reachable) or `broken` (a fatal error; being replaced).
    pub state: &'static str,
    /// Milliseconds in that state; `null` when ok.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub for_ms: Option<u64>,
    /// The last error librdkafka reported, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// How often the client was replaced after a fatal error.
    pub rebuilds: u64,
}

impl ClientHealth {
    /// A client's health, not registered anywhere (see [`Clients::register`]).
    pub fn new(name: impl Into<String>) -> Arc<ClientHealth> {
        Arc::new(ClientHealth { name: name.into(), state: Mutex::new(State::default()), disconnected: AtomicBool::new(false) })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let out = f(&mut s);
        self.disconnected.store(s.disconnected_since.is_some(), Ordering::Relaxed);
        out
    }

    /// The generation of the client instance now in use.
    pub fn generation(&self) -> u64 {
        self.with(|s| s.generation)
    }

    /// Instance `generation` had every broker down at `now`; true if it had not before.
    pub fn lost_brokers(&self, generation: u64, now: Instant) -> bool {
        self.with(|s| {
            if s.generation != generation {
                return false;
            }
            s.last_down = Some(now);
            s.disconnected_since.get_or_insert(now) == &now
        })
    }

    /// Instance `generation` has a broker connection up.
    pub fn reached_brokers(&self, generation: u64) {
        if self.disconnected.load(Ordering::Relaxed) {
            self.with(|s| {
                if s.generation == generation {
                    s.disconnected_since = None;
                }
            });
        }
    }

    /// Instance `generation` has no connection and is not connecting at `now`: no longer
    /// disconnected once no broker was reported down for [`IDLE_CLEARS_AFTER`].
    pub fn idle(&self, generation: u64, now: Instant) {
        if self.disconnected.load(Ordering::Relaxed) {
            self.with(|s| {
                let quiet = s.last_down.is_none_or(|t| now.saturating_duration_since(t) >= IDLE_CLEARS_AFTER);
                if s.generation == generation && quiet {
                    s.disconnected_since = None;
                }
            });
        }
    }

    /// A message was delivered or received: the broker is reachable, whatever the instance.
    pub fn delivered(&self) {
        if self.disconnected.load(Ordering::Relaxed) {
            self.with(|s| s.disconnected_since = None);
        }
    }

    /// Instance `generation` hit a fatal error at `now`.
    pub fn broke(&self, generation: u64, now: Instant, reason: &str) {
        self.with(|s| {
            if s.generation == generation {
                s.broken_since.get_or_insert(now);
                s.last_error = Some(reason.to_string());
            }
        });
    }

    /// Records an error librdkafka reported (for the report only).
    pub fn note_error(&self, generation: u64, error: &str) {
        self.with(|s| {
            if s.generation == generation {
                s.last_error = Some(error.to_string());
            }
        });
    }

    /// A new instance is being created: from now on only its callbacks count. Returns its
    /// generation. The client stays broken (since when it broke) until [`Self::rebuilt`], so
    /// a replacement that keeps failing still ends liveness.
    pub fn replacing(&self) -> u64 {
        self.with(|s| {
            s.generation += 1;
            s.generation
        })
    }

    /// The new instance of `generation` is in use: the client is no longer broken.
    pub fn rebuilt(&self, generation: u64) {
        self.with(|s| {
            if s.generation == generation {
                s.broken_since = None;
                s.rebuilds += 1;
            }
        });
    }

    /// Whether the instance in use is broken.
    pub fn is_broken(&self) -> bool {
        self.with(|s| s.broken_since.is_some())
    }

    /// The client's line at `now`.
    pub fn status(&self, now: Instant) -> ClientStatus {
        self.with(|s| {
            let age = |t: Instant| now.saturating_duration_since(t);
            let (state, since) = match (s.broken_since, s.disconnected_since) {
                (Some(t), _) => ("broken", Some(age(t))),
                (None, Some(t)) if age(t) >= DISCONNECTED_GRACE => ("disconnected", Some(age(t))),
                _ => ("ok", None),
            };
            ClientStatus {
                client: self.name.clone(),
                state,
                for_ms: since.map(|d| d.as_millis() as u64),
                last_error: s.last_error.clone(),
                rebuilds: s.rebuilds,
            }
        })
    }
}

/// Serves a background service's probes on `listen`: `/healthz` (liveness) and `/readyz`
/// (readiness) with the report of `clients` (module docs), `/metrics` with what `metrics`
/// renders, and JSON answers for any other route or method.
pub async fn serve_probes(
    listen: std::net::SocketAddr,
    clients: Clients,
    metrics: impl Fn() -> String + Clone + Send + Sync + 'static,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use anyhow::Context;
    use axum::http::StatusCode;
    use axum::routing::get;
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("failed to listen on {listen}"))?;
    let report = move |ready: bool| {
        let r = clients.report(Instant::now());
        let ok = if ready { r.ready } else { r.live };
        (if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, axum::Json(r))
    };
    let (live, ready) = (report.clone(), report);
    let app = axum::Router::new()
        .route("/healthz", get(move || async move { live(false) }))
        .route("/readyz", get(move || async move { ready(true) }))
        .route("/metrics", get(move || async move { metrics() }));
    let app = crate::http::json_fallbacks(app);
    Ok(tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    }))
}

/// The Kafka clients a service reports on.
#[derive(Clone, Default)]
pub struct Clients(Arc<Mutex<Vec<Arc<ClientHealth>>>>);

/// A service's report on its clients: the body of `/healthz` and `/readyz`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// No client is disconnected or broken.
    pub ready: bool,
    /// No client stayed broken for [`BROKEN_LIVENESS`].
    pub live: bool,
    pub clients: Vec<ClientStatus>,
}

impl Clients {
    /// A new client named `name`, reported from now on.
    pub fn register(&self, name: impl Into<String>) -> Arc<ClientHealth> {
        let health = ClientHealth::new(name);
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(health.clone());
        health
    }

    pub fn report(&self, now: Instant) -> Report {
        let clients: Vec<ClientStatus> = self.0.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|c| c.status(now)).collect();
        let ready = clients.iter().all(|c| c.state == "ok");
        let live = clients.iter().all(|c| c.state != "broken" || c.for_ms.unwrap_or(0) < BROKEN_LIVENESS.as_millis() as u64);
        Report { ready, live, clients }
    }
}

/// What librdkafka's statistics say about a client's broker connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Connection {
    /// A broker connection is up.
    Up,
    /// librdkafka is connecting to brokers (or found them down) and none is up.
    Down,
    /// Every broker is in `INIT`: between reconnect attempts, or no connection wanted.
    Idle,
}

/// The connection from each broker's `(source, state, connects)` in librdkafka's
/// statistics, and the total of `connects` (connection attempts) to pass next time as
/// `attempts_before` (`None` the first time). The internal and logical brokers (`source`
/// `internal`, `logical`) are not connections.
pub fn connection<'a>(brokers: impl IntoIterator<Item = (&'a str, &'a str, u64)>, attempts_before: Option<u64>) -> (Connection, u64) {
    let (mut down, mut up, mut attempts) = (false, false, 0u64);
    for (source, state, connects) in brokers {
        if source == "internal" || source == "logical" {
            continue;
        }
        attempts += connects;
        match state {
            "UP" | "UPDATE" => up = true,
            "INIT" => {}
            _ => down = true,
        }
    }
    let tried = attempts_before.is_some_and(|before| attempts > before);
    let c = if up {
        Connection::Up
    } else if down || tried {
        Connection::Down
    } else {
        Connection::Idle
    };
    (c, attempts)
}

#[derive(Deserialize)]
struct Stats {
    #[serde(default)]
    brokers: HashMap<String, BrokerStats>,
}

#[derive(Deserialize)]
struct BrokerStats {
    #[serde(default)]
    source: String,
    #[serde(default)]
    state: String,
    #[serde(default)]
    connects: u64,
}

/// A client context: librdkafka's log lines go to tracing (as with
/// [`crate::consuming::KafkaLog`]), and its errors and statistics update the client's
/// [`ClientHealth`].
pub struct Watched {
    health: Arc<ClientHealth>,
    generation: u64,
    /// Set on a fatal error, for the owner of this instance (see [`crate::producing`]).
    fatal: Arc<AtomicBool>,
    /// Connection attempts as of the last statistics (`u64::MAX` before the first).
    attempts: AtomicU64,
}

impl Default for Watched {
    /// A context whose health nobody reports.
    fn default() -> Self {
        Watched::new(ClientHealth::new("unreported"))
    }
}

impl Watched {
    /// A context for the instance of `health`'s client now in use.
    pub fn new(health: Arc<ClientHealth>) -> Watched {
        let generation = health.generation();
        Watched { health, generation, fatal: Arc::new(AtomicBool::new(false)), attempts: AtomicU64::new(u64::MAX) }
    }

    /// Whether this instance hit a fatal error.
    pub fn fatal_flag(&self) -> Arc<AtomicBool> {
        self.fatal.clone()
    }

    pub fn health(&self) -> &Arc<ClientHealth> {
        &self.health
    }
}

impl ClientContext for Watched {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        crate::consuming::KafkaLog.log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let client = self.health.name();
        match error.rdkafka_error_code() {
            Some(RDKafkaErrorCode::Fatal) => {
                tracing::error!(client, reason, "kafka client hit a fatal error; it is replaced");
                self.fatal.store(true, Ordering::Relaxed);
                self.health.broke(self.generation, Instant::now(), reason);
            }
            Some(RDKafkaErrorCode::AllBrokersDown) => {
                if self.health.lost_brokers(self.generation, Instant::now()) {
                    tracing::warn!(client, reason, "kafka client lost every broker");
                }
            }
            // Each failed (re)connect; librdkafka logs it too.
            Some(RDKafkaErrorCode::BrokerTransportFailure) => {
                tracing::debug!(client, reason, "kafka broker connection failed");
                self.health.note_error(self.generation, &format!("{error}: {reason}"));
            }
            _ => {
                tracing::warn!(client, error = %error, reason, "kafka client error");
                self.health.note_error(self.generation, &format!("{error}: {reason}"));
            }
        }
    }

    fn stats_raw(&self, statistics: &[u8]) {
        let Ok(stats) = serde_json::from_slice::<Stats>(statistics) else { return };
        let before = Some(self.attempts.load(Ordering::Relaxed)).filter(|a| *a != u64::MAX);
        let (connection, attempts) = connection(stats.brokers.values().map(|b| (b.source.as_str(), b.state.as_str(), b.connects)), before);
        self.attempts.store(attempts, Ordering::Relaxed);
        match connection {
            Connection::Up => self.health.reached_brokers(self.generation),
            Connection::Idle => self.health.idle(self.generation, Instant::now()),
            Connection::Down => {
                self.health.lost_brokers(self.generation, Instant::now());
            }
        }
    }
}

impl ConsumerContext for Watched {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_is_up_with_one_broker_up_and_down_only_while_trying() {
        let c = |b: &[(&'static str, &'static str, u64)], before| connection(b.iter().copied(), before).0;
        assert_eq!(c(&[("configured", "DOWN", 3), ("learned", "UP", 1), ("internal", "UP", 0)], None), Connection::Up);
        assert_eq!(c(&[("configured", "CONNECT", 3), ("learned", "DOWN", 2), ("internal", "UP", 0)], None), Connection::Down);
        assert_eq!(c(&[("configured", "INIT", 1), ("learned", "INIT", 1), ("logical", "UP", 0)], None), Connection::Idle);
        // Between reconnect attempts: INIT, but attempts were made since the last look.
        assert_eq!(c(&[("configured", "INIT", 4), ("learned", "INIT", 3), ("logical", "UP", 9)], Some(5)), Connection::Down);
        assert_eq!(c(&[("configured", "INIT", 4), ("learned", "INIT", 3)], Some(7)), Connection::Idle);
        assert_eq!(connection([("configured", "INIT", 4), ("logical", "UP", 9)], None).1, 4);
        assert_eq!(c(&[], None), Connection::Idle);
    }

    #[test]
    fn disconnected_after_the_grace_broken_until_replaced_and_old_instances_ignored() {
        let clients = Clients::default();
        let h = clients.register("producer");
        let t0 = Instant::now();
        let g = h.generation();
        h.lost_brokers(g, t0);
        assert_eq!(h.status(t0 + Duration::from_millis(500)).state, "ok", "within the grace");
        let late = t0 + DISCONNECTED_GRACE + Duration::from_secs(1);
        assert_eq!(h.status(late).state, "disconnected");
        assert!(!clients.report(late).ready);
        h.delivered();
        assert_eq!(h.status(late).state, "ok");

        h.broke(g, t0, "ProducerFenced");
        let report = clients.report(t0 + Duration::from_secs(1));
        assert!(!report.ready && report.live);
        assert_eq!(report.clients[0].state, "broken");
        assert!(!clients.report(t0 + BROKEN_LIVENESS).live);
        // A replacement that fails keeps the client broken since it first broke.
        let failed = h.replacing();
        h.broke(failed, late, "could not create");
        assert!(!clients.report(t0 + BROKEN_LIVENESS).live, "failed replacements do not reset the broken time");
        assert_eq!(h.status(late).rebuilds, 0);
        let g2 = h.replacing();
        h.rebuilt(g2);
        assert_eq!(h.status(late).state, "ok");
        assert_eq!(h.status(late).rebuilds, 1);
        // The replaced instance's late callbacks change nothing.
        h.broke(g, late, "late");
        h.lost_brokers(g, t0);
        assert_eq!(h.status(late).state, "ok");
        h.lost_brokers(g2, t0);
        assert_eq!(h.status(late).state, "disconnected");
        h.reached_brokers(g2);
        assert!(clients.report(late).ready);
    }

    #[test]
    fn an_idle_client_is_connected_again_only_once_nothing_was_down_for_a_while() {
        let h = ClientHealth::new("consumer");
        let (g, t0) = (h.generation(), Instant::now());
        assert!(h.lost_brokers(g, t0));
        assert!(!h.lost_brokers(g, t0 + Duration::from_secs(1)), "already disconnected");
        let late = t0 + Duration::from_secs(5);
        // Between reconnect attempts every broker is in INIT: still disconnected.
        h.idle(g, late);
        assert_eq!(h.status(late).state, "disconnected");
        assert_eq!(h.status(late).for_ms, Some(5000));
        let quiet = t0 + Duration::from_secs(1) + IDLE_CLEARS_AFTER;
        h.idle(g, quiet);
        assert_eq!(h.status(quiet).state, "ok");
    }
}
