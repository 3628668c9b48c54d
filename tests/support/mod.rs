//! The black-box test harness: runs the real `tally` binary against the real broker,
//! Postgres and ClickHouse, with names of its own per test so tests never share state.
//!
//! Where the servers come from:
//! - by default, the local stack (`scripts/stack up`), at the addresses in
//!   `TALLY_KAFKA_BROKERS`, `TALLY_DATABASE_URL` and `TALLY_CLICKHOUSE_URL` (the stack's
//!   defaults when unset). Each test gets its own Postgres database, ClickHouse database,
//!   topics and consumer group, all named after a random suffix. A test that passes drops
//!   its databases at the end; a failing one keeps them, beside its logs;
//! - on a machine with Docker, `TALLY_TEST_CONTAINERS=1` with `--features containers` starts
//!   them with testcontainers instead (see `containers.rs`). Everything else is the same.
#![allow(dead_code)]

#[cfg(feature = "containers")]
mod containers;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Addresses of the servers the tests use.
#[derive(Debug, Clone)]
pub struct Servers {
    pub kafka: String,
    /// A Postgres URL on the server; its database name is replaced per test.
    pub postgres: String,
    pub clickhouse: String,
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).ok().filter(|v| !v.is_empty()).unwrap_or_else(|| default.to_string())
}

impl Servers {
    pub fn get() -> Servers {
        if std::env::var("TALLY_TEST_CONTAINERS").as_deref() == Ok("1") {
            #[cfg(feature = "containers")]
            return containers::servers();
            #[cfg(not(feature = "containers"))]
            panic!("TALLY_TEST_CONTAINERS=1 needs the tests built with `--features containers`");
        }
        Servers {
            kafka: env_or("TALLY_KAFKA_BROKERS", "127.0.0.1:9092"),
            postgres: env_or("TALLY_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres"),
            clickhouse: env_or("TALLY_CLICKHOUSE_URL", "http://127.0.0.1:8123"),
        }
    }
}

/// A free loopback port (bound and released; the service binds it right after).
///
/// Picked at random below the kernel's ephemeral range, not by binding port 0: a port from
/// that range can be taken, between this probe and the service's bind, as the local port
/// of any outgoing connection on the machine (tests open thousands), and the service then
/// fails with "address already in use". Below the range only another test's probe can
/// take it, one chance in thousands per pair of tests starting at the same instant.
pub fn free_port() -> u16 {
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (low, high) = (10_000u16, ephemeral_start.max(20_000));
    for _ in 0..1000 {
        let port = low + (uuid::Uuid::new_v4().as_u128() % u128::from(high - low)) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {low}..{high}")
}

fn with_database(url: &str, db: &str) -> String {
    let (base, _) = url.rsplit_once('/').expect("TALLY_DATABASE_URL has no database part");
    let query = url.split_once('?').map(|(_, q)| format!("?{q}")).unwrap_or_default();
    format!("{base}/{db}{query}")
}

/// One test's own Tally: names, environment and running services.
pub struct Tally {
    pub id: String,
    pub servers: Servers,
    pub database_url: String,
    pub usage_topic: String,
    pub group: String,
    pub ingest_url: String,
    pub api_url: String,
    pub aggregator_url: String,
    pub config: Option<PathBuf>,
    log_dir: PathBuf,
    children: Vec<(String, Child)>,
    /// Processes started so far, to name each one's log file uniquely.
    started: usize,
    http: reqwest::Client,
}

impl Tally {
    /// Names for a new test and `tally setup` run for them; no service started yet.
    pub fn prepare(config_yaml: Option<&str>) -> Tally {
        Tally::prepare_on(Servers::get(), config_yaml)
    }

    /// As [`Tally::prepare`], on the given servers (e.g. a broker of the test's own).
    pub fn prepare_on(servers: Servers, config_yaml: Option<&str>) -> Tally {
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
        let log_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("tally-tests").join(&id);
        std::fs::create_dir_all(&log_dir).expect("create log dir");
        let config = config_yaml.map(|yaml| {
            let path = log_dir.join("tiers.yaml");
            std::fs::write(&path, yaml).expect("write config");
            path
        });
        let tally = Tally {
            database_url: with_database(&servers.postgres, &format!("tally_test_{id}")),
            usage_topic: format!("test.{id}.usage.v1"),
            group: format!("tally-ledger-{id}"),
            ingest_url: format!("http://127.0.0.1:{}", free_port()),
            api_url: format!("http://127.0.0.1:{}", free_port()),
            aggregator_url: format!("http://127.0.0.1:{}", free_port()),
            id,
            servers,
            config,
            log_dir,
            children: Vec::new(),
            started: 0,
            http: reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("http client"),
        };
        let out = tally.command(&["setup"]).output().expect("run tally setup");
        assert!(out.status.success(), "tally setup failed: {}", String::from_utf8_lossy(&out.stderr));
        tally
    }

    /// Prepares and starts ingest, aggregator and API, and waits until they answer.
    pub async fn start(config_yaml: Option<&str>) -> Tally {
        let mut t = Tally::prepare(config_yaml);
        t.spawn("ingest");
        t.spawn("aggregator");
        t.spawn("api");
        t.wait_healthy().await;
        t
    }

    /// `tally <args>` with this test's environment.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tally"));
        cmd.args(args)
            .env("TALLY_KAFKA_BROKERS", &self.servers.kafka)
            .env("TALLY_DATABASE_URL", &self.database_url)
            .env("TALLY_CLICKHOUSE_URL", &self.servers.clickhouse)
            .env("TALLY_CLICKHOUSE_DATABASE", self.database_name())
            .env("TALLY_USAGE_TOPIC", &self.usage_topic)
            .env("TALLY_DECISIONS_TOPIC", format!("test.{}.decisions.v1", self.id))
            .env("TALLY_QUARANTINE_TOPIC", format!("test.{}.quarantine.v1", self.id))
            .env("TALLY_CONTROL_TOPIC", format!("test.{}.control.v1", self.id))
            .env("TALLY_AGGREGATOR_GROUP", &self.group)
            .env("TALLY_INGEST_LISTEN", self.ingest_url.trim_start_matches("http://"))
            .env("TALLY_API_LISTEN", self.api_url.trim_start_matches("http://"))
            .env("TALLY_AGGREGATOR_LISTEN", self.aggregator_url.trim_start_matches("http://"))
            .env("RUST_LOG", std::env::var("TALLY_TEST_RUST_LOG").unwrap_or_else(|_| "info,sqlx=warn,rdkafka=warn".into()))
            .env("TALLY_KAFKA_DEBUG", std::env::var("TALLY_TEST_KAFKA_DEBUG").unwrap_or_default());
        if let Some(config) = &self.config {
            cmd.env("TALLY_CONFIG", config);
        }
        cmd
    }

    fn new_log(&mut self, service: &str) -> std::fs::File {
        self.started += 1;
        std::fs::File::create(self.log_dir.join(format!("{:02}-{service}.log", self.started))).expect("create log")
    }

    /// Starts `tally <service>` in the background, its output in the test's log directory.
    pub fn spawn(&mut self, service: &str) {
        let log = self.new_log(service);
        let child = self
            .command(&[service])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("failed to start tally {service}: {e}"));
        self.children.push((service.to_string(), child));
    }

    /// Starts one more aggregator in this test's consumer group, with its own health port;
    /// returns its base URL.
    pub fn spawn_aggregator(&mut self) -> String {
        let url = format!("http://127.0.0.1:{}", free_port());
        let log = self.new_log("aggregator");
        let child = self
            .command(&["aggregator"])
            .env("TALLY_AGGREGATOR_LISTEN", url.trim_start_matches("http://"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("failed to start tally aggregator");
        self.children.push(("aggregator".to_string(), child));
        url
    }

    /// The pids of the running processes of `service`.
    pub fn pids(&self, service: &str) -> Vec<u32> {
        self.children.iter().filter(|(n, _)| n == service).map(|(_, c)| c.id()).collect()
    }

    /// Kills (SIGKILL) one process by pid and forgets it.
    pub fn kill_pid(&mut self, pid: u32) {
        if let Some(i) = self.children.iter().position(|(_, c)| c.id() == pid) {
            let (_, mut child) = self.children.remove(i);
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM to one process and waits up to `timeout` for it to exit; returns its
    /// exit status, or `None` if it is still running (it is then left to the caller).
    pub async fn terminate(&mut self, pid: u32, timeout: Duration) -> Option<std::process::ExitStatus> {
        let sent = Command::new("kill").args(["-TERM", &pid.to_string()]).status().map(|s| s.success()).unwrap_or(false);
        assert!(sent, "could not send SIGTERM to {pid}");
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(i) = self.children.iter().position(|(_, c)| c.id() == pid) {
                if let Ok(Some(status)) = self.children[i].1.try_wait() {
                    self.children.remove(i);
                    return Some(status);
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    /// A connection pool on this test's Postgres database.
    pub async fn pg(&self) -> sqlx::PgPool {
        sqlx::postgres::PgPoolOptions::new().max_connections(2).connect(&self.database_url).await.expect("connect to the test database")
    }

    /// Messages consumed so far by this test's aggregators: the sum of the stored next offsets.
    pub async fn consumed(&self, pool: &sqlx::PgPool) -> i64 {
        sqlx::query_scalar::<_, Option<i64>>("SELECT sum(next_offset)::bigint FROM consumer_offsets WHERE group_id = $1")
            .bind(&self.group)
            .fetch_one(pool)
            .await
            .expect("read consumer_offsets")
            .unwrap_or(0)
    }

    /// A producer on this test's broker.
    pub fn producer(&self) -> rdkafka::producer::FutureProducer {
        rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &self.servers.kafka)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .create()
            .expect("create producer")
    }

    /// Produces raw bytes to the usage topic (bypassing ingest's validation), waiting for the ack.
    pub async fn produce_raw(&self, partition: Option<i32>, key: &str, payload: &[u8]) -> (i32, i64) {
        let producer = self.producer();
        let mut record = rdkafka::producer::FutureRecord::to(&self.usage_topic).key(key).payload(payload);
        if let Some(p) = partition {
            record = record.partition(p);
        }
        let delivery = producer.send(record, Duration::from_secs(30)).await.expect("produce");
        (delivery.partition, delivery.offset)
    }

    /// Every message on `topic` (one of this test's topic names), read from the beginning
    /// until nothing new arrived for two seconds. The aggregators' heartbeats on the
    /// decisions topic are skipped (they arrive every second).
    pub async fn read_topic(&self, topic: &str) -> Vec<(String, Value)> {
        use rdkafka::consumer::{Consumer, StreamConsumer};
        use rdkafka::Message;
        let consumer: StreamConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &self.servers.kafka)
            .set("group.id", format!("test-reader-{}", uuid::Uuid::new_v4()))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .create()
            .expect("create consumer");
        consumer.subscribe(&[topic]).expect("subscribe");
        let mut out = Vec::new();
        let mut until = tokio::time::Instant::now() + Duration::from_secs(10);
        while let Ok(Ok(m)) = tokio::time::timeout_at(until, consumer.recv()).await {
            if tally_domain::heartbeat::is_heartbeat_key(m.key()) {
                continue;
            }
            let key = m.key().map(|k| String::from_utf8_lossy(k).to_string()).unwrap_or_default();
            let value = m.payload().and_then(|p| serde_json::from_slice(p).ok()).unwrap_or(Value::Null);
            out.push((key, value));
            until = tokio::time::Instant::now() + Duration::from_secs(2);
        }
        out
    }

    pub fn topic(&self, kind: &str) -> String {
        format!("test.{}.{kind}.v1", self.id)
    }

    /// Kills (SIGKILL) every running process of `service`.
    pub fn kill(&mut self, service: &str) {
        for (name, child) in self.children.iter_mut().filter(|(n, _)| n == service) {
            let _ = child.kill();
            let _ = child.wait();
            let _ = name;
        }
        self.children.retain(|(n, _)| n != service);
    }

    pub async fn wait_healthy(&self) {
        for url in [&self.ingest_url, &self.api_url, &self.aggregator_url] {
            let healthz = format!("{url}/healthz");
            let ok = wait_for(Duration::from_secs(30), || async {
                self.http.get(&healthz).send().await.map(|r| r.status().is_success()).unwrap_or(false)
            })
            .await;
            assert!(ok, "{healthz} did not answer; logs in {}", self.log_dir.display());
        }
    }

    pub async fn post_events(&self, body: &Value) -> (u16, Value) {
        let r = self.http.post(format!("{}/v1/events", self.ingest_url)).json(body).send().await.expect("post events");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn get(&self, url: &str) -> (u16, Value) {
        let r = self.http.get(url).send().await.expect("get");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn decision(&self, subject: &str) -> Option<Value> {
        let (status, body) = self.get(&format!("{}/v1/subjects/{subject}/decision", self.api_url)).await;
        (status == 200).then_some(body)
    }

    pub async fn usage(&self, subject: &str) -> Value {
        let (status, body) = self.get(&format!("{}/v1/subjects/{subject}/usage", self.api_url)).await;
        assert_eq!(status, 200, "usage of {subject}: {body}");
        body
    }

    /// The `used` of a subject's ledger row for `metric` (all scopes), summed over periods.
    pub async fn used(&self, subject: &str, metric: &str) -> i64 {
        let usage = self.usage(subject).await;
        usage["ledgers"]
            .as_array()
            .map(|rows| {
                rows.iter().filter(|r| r["metric"] == metric && r["scope"].is_null()).map(|r| r["used"].as_i64().unwrap_or(0)).sum()
            })
            .unwrap_or(0)
    }

    /// A counter or gauge value from a service's `/metrics`.
    pub async fn metric(&self, base_url: &str, name: &str) -> i64 {
        let text = self.http.get(format!("{base_url}/metrics")).send().await.expect("metrics").text().await.unwrap_or_default();
        text.lines().filter(|l| l.split([' ', '{']).next() == Some(name)).filter_map(|l| l.rsplit(' ').next()?.parse::<i64>().ok()).sum()
    }

    pub fn log_dir(&self) -> &std::path::Path {
        &self.log_dir
    }
}

impl Drop for Tally {
    /// Stops this test's services, then drops its Postgres and ClickHouse databases unless
    /// the test is failing (they are kept for a look, beside the logs in `log_dir`).
    fn drop(&mut self) {
        for (_, child) in self.children.iter_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if !std::thread::panicking() {
            drop_test_databases(&self.servers, &self.database_name());
        }
    }
}

/// Drops the database `name` on both servers, best effort. On a thread of its own with its
/// own runtime, because a test drops its `Tally` inside the test's runtime.
fn drop_test_databases(servers: &Servers, name: &str) {
    let (servers, db) = (servers.clone(), name.to_string());
    let dropped = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
        runtime.block_on(async {
            let sql = format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)");
            let mut pg = <sqlx::PgConnection as sqlx::Connection>::connect(&servers.postgres).await.map_err(|e| e.to_string())?;
            sqlx::Executor::execute(&mut pg, sql.as_str()).await.map_err(|e| e.to_string())?;
            let ch = reqwest::Client::new().post(&servers.clickhouse).body(format!("DROP DATABASE IF EXISTS {db}")).send().await;
            ch.and_then(|r| r.error_for_status()).map_err(|e| e.to_string())?;
            Ok::<(), String>(())
        })
    })
    .join();
    match dropped {
        Ok(Ok(())) => {}
        Ok(Err(e)) => eprintln!("note: could not drop the test databases {name}: {e}"),
        Err(_) => eprintln!("note: dropping the test databases {name} panicked"),
    }
}

/// Polls `check` every 100 ms until it holds or `timeout` passes; returns whether it held.
pub async fn wait_for<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// History (ClickHouse) helpers: the history writer and this test's ClickHouse database.
impl Tally {
    /// This test's ClickHouse database.
    pub fn clickhouse_database(&self) -> String {
        self.database_name()
    }

    /// The name of this test's databases, the same on Postgres and ClickHouse.
    fn database_name(&self) -> String {
        format!("tally_test_{}", self.id)
    }

    /// The key of this test's history writer progress (`history_offsets.group_id`).
    pub fn history_group(&self) -> String {
        format!("tally-history-{}", self.id)
    }

    /// Starts `tally <service>` with extra environment variables (applied last).
    pub fn spawn_env(&mut self, service: &str, env: &[(&str, String)]) {
        let log = self.new_log(service);
        let mut cmd = self.command(&[service]);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.stdout(Stdio::null()).stderr(log).spawn().unwrap_or_else(|e| panic!("failed to start tally {service}: {e}"));
        self.children.push((service.to_string(), child));
    }

    /// Starts a history writer in this test's history group with its own health port and
    /// `extra` environment; returns its base URL.
    pub fn spawn_history_writer(&mut self, extra: &[(&str, String)]) -> String {
        let url = format!("http://127.0.0.1:{}", free_port());
        let mut env = vec![
            ("TALLY_HISTORY_GROUP", self.history_group()),
            ("TALLY_HISTORY_LISTEN", url.trim_start_matches("http://").to_string()),
            ("TALLY_HISTORY_MAX_WAIT_MS", "50".to_string()),
        ];
        env.extend(extra.iter().map(|(k, v)| (*k, v.clone())));
        self.spawn_env("history-writer", &env);
        url
    }

    /// How many processes of `service` are still running (reaping those that exited).
    pub fn running(&mut self, service: &str) -> usize {
        self.children.iter_mut().filter(|(n, _)| n == service).map(|(_, c)| c.try_wait()).filter(|w| matches!(w, Ok(None))).count()
    }

    /// Runs `sql` on this test's ClickHouse server; returns the body (TabSeparated unless
    /// the query says otherwise). Panics on an error status.
    pub async fn clickhouse(&self, sql: &str) -> String {
        let r = self.http.post(&self.servers.clickhouse).body(sql.to_string()).send().await.expect("reach ClickHouse");
        let status = r.status();
        let body = r.text().await.unwrap_or_default();
        assert!(status.is_success(), "ClickHouse refused {sql}: {body}");
        body
    }

    /// A single number from ClickHouse.
    pub async fn clickhouse_i64(&self, sql: &str) -> i64 {
        let body = self.clickhouse(sql).await;
        body.trim().parse().unwrap_or_else(|_| panic!("not a number from {sql}: {body:?}"))
    }
}

/// A TCP proxy in front of a server that a test can take down and bring back, so a service
/// sees its dependency stop and restart without the shared server being touched. Taking it
/// down cuts open connections and refuses new ones.
pub struct TcpSwitch {
    pub port: u16,
    up: tokio::sync::watch::Sender<bool>,
}

impl TcpSwitch {
    /// Starts a proxy to `upstream` (`host:port`).
    pub async fn start(upstream: String) -> TcpSwitch {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let (up, watch) = tokio::sync::watch::channel(true);
        let upstream = std::sync::Arc::new(upstream);
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !*watch.borrow() {
                    continue; // dropped: connection refused-like
                }
                let mut down = watch.clone();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream.as_str()).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = down.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        TcpSwitch { port, up }
    }

    pub fn set(&self, up: bool) {
        let _ = self.up.send(up);
    }
}

/// `url` with its `host:port` replaced by `127.0.0.1:port`.
pub fn via_port(url: &str, port: u16) -> String {
    let (scheme, rest) = url.split_once("://").expect("a URL with a scheme");
    let (userinfo, hostpart) = match rest.split_once('@') {
        Some((u, h)) => (format!("{u}@"), h),
        None => (String::new(), rest),
    };
    let path = hostpart.find('/').map(|i| &hostpart[i..]).unwrap_or("");
    format!("{scheme}://{userinfo}127.0.0.1:{port}{path}")
}

/// The `host:port` of a URL.
pub fn authority(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    host.split('/').next().unwrap_or(host).to_string()
}
