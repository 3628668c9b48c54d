//! The black-box test harness: runs the real `tally` binary against the real broker,
//! Postgres and ClickHouse, with names of its own per test so tests never share state. The
//! names, the services' environment, their start and stop and the databases' removal are
//! `tally-testkit`'s, shared with `tally bench`; this module adds what tests assert with.
//!
//! Where the servers come from:
//! - by default, the local stack (`scripts/stack up`), at the addresses in
//!   `TALLY_KAFKA_BROKERS`, `TALLY_DATABASE_URL` and `TALLY_CLICKHOUSE_URL` (the stack's
//!   defaults when unset). Each test gets its own Postgres database, ClickHouse database,
//!   topics and consumer group, all named after a random suffix. A test that passes drops
//!   its databases at the end; a failing one keeps them, beside its logs;
//! - on a machine with Docker, `TALLY_TEST_CONTAINERS=1` with `--features containers` starts
//!   them with testcontainers instead (see `containers.rs`). Everything else is the same.

#[cfg(feature = "containers")]
mod containers;
pub mod fixtures;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
pub use tally_testkit::Servers;
use tally_testkit::{Instance, Names, Service};

/// How long a started service has to answer its health check.
const HEALTHY_WITHIN: Duration = Duration::from_secs(30);

/// The servers the tests use: the local stack's ([`Servers::from_env`]), or containers of
/// their own with `TALLY_TEST_CONTAINERS=1`.
pub fn servers() -> Servers {
    if std::env::var("TALLY_TEST_CONTAINERS").as_deref() == Ok("1") {
        #[cfg(feature = "containers")]
        return containers::servers();
        #[cfg(not(feature = "containers"))]
        panic!("TALLY_TEST_CONTAINERS=1 needs the tests built with `--features containers`");
    }
    Servers::from_env()
}

/// A free loopback port ([`tally_testkit::free_port`]).
pub fn free_port() -> u16 {
    tally_testkit::free_port().expect("a free loopback port")
}

/// One test's own Tally: names, environment and running services. The public fields are
/// the test's names and addresses, for the tests to read.
pub struct Tally {
    pub id: String,
    pub servers: Servers,
    pub database_url: String,
    pub usage_topic: String,
    pub group: String,
    pub ingest_url: String,
    pub api_url: String,
    pub aggregator_url: String,
    instance: Instance,
    /// Every process started and not yet killed, oldest first; each stops when dropped.
    children: Vec<Service>,
    /// Processes started so far, to name each one's log file uniquely.
    started: usize,
    http: reqwest::Client,
}

impl Tally {
    /// Names for a new test and `tally setup` run for them; no service started yet.
    pub fn prepare(config_yaml: Option<&str>) -> Tally {
        Tally::prepare_on(servers(), config_yaml)
    }

    /// As [`Tally::prepare`], on the given servers (e.g. a broker of the test's own).
    pub fn prepare_on(servers: Servers, config_yaml: Option<&str>) -> Tally {
        let names = Names::new("test");
        let log_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("tally-tests").join(&names.id);
        let exe = PathBuf::from(env!("CARGO_BIN_EXE_tally"));
        let instance = Instance::new(exe, servers, names, log_dir, config_yaml).unwrap_or_else(|e| panic!("{e:#}"));
        let tally = Tally {
            id: instance.names.id.clone(),
            servers: instance.servers.clone(),
            database_url: instance.database_url.clone(),
            usage_topic: instance.names.topic("usage"),
            group: instance.names.group(),
            ingest_url: format!("http://127.0.0.1:{}", free_port()),
            api_url: format!("http://127.0.0.1:{}", free_port()),
            aggregator_url: format!("http://127.0.0.1:{}", free_port()),
            instance,
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
        let mut cmd = self.instance.command(args);
        cmd.env("TALLY_INGEST_LISTEN", self.ingest_url.trim_start_matches("http://"))
            .env("TALLY_API_LISTEN", self.api_url.trim_start_matches("http://"))
            .env("TALLY_AGGREGATOR_LISTEN", self.aggregator_url.trim_start_matches("http://"))
            .env("RUST_LOG", std::env::var("TALLY_TEST_RUST_LOG").unwrap_or_else(|_| "info,sqlx=warn,rdkafka=warn".into()))
            .env("TALLY_KAFKA_DEBUG", std::env::var("TALLY_TEST_KAFKA_DEBUG").unwrap_or_default());
        cmd
    }

    /// Starts `cmd` as a process of `service`, its standard error in the test's log directory.
    fn start_process(&mut self, service: &str, cmd: Command) {
        self.started += 1;
        let log = self.instance.log_dir.join(format!("{:02}-{service}.log", self.started));
        let process = Service::start(service, cmd, log).unwrap_or_else(|e| panic!("failed to start tally {service}: {e:#}"));
        self.children.push(process);
    }

    /// Starts `tally <service>` in the background, its output in the test's log directory.
    pub fn spawn(&mut self, service: &str) {
        self.start_process(service, self.command(&[service]));
    }

    /// Starts one more aggregator in this test's consumer group, with its own health port;
    /// returns its base URL.
    pub fn spawn_aggregator(&mut self) -> String {
        let url = format!("http://127.0.0.1:{}", free_port());
        let mut cmd = self.command(&["aggregator"]);
        cmd.env("TALLY_AGGREGATOR_LISTEN", url.trim_start_matches("http://"));
        self.start_process("aggregator", cmd);
        url
    }

    /// The pids of the running processes of `service`.
    pub fn pids(&self, service: &str) -> Vec<u32> {
        self.children.iter().filter(|c| c.name == service).filter_map(Service::pid).collect()
    }

    /// Kills (SIGKILL) one process by pid and forgets it.
    pub fn kill_pid(&mut self, pid: u32) {
        self.children.retain(|c| c.pid() != Some(pid));
    }

    /// Sends SIGTERM to one process and waits up to `timeout` for it to exit; returns its
    /// exit status, or `None` if it is still running (it is then left to the caller).
    pub async fn terminate(&mut self, pid: u32, timeout: Duration) -> Option<std::process::ExitStatus> {
        let sent = Command::new("kill").args(["-TERM", &pid.to_string()]).status().map(|s| s.success()).unwrap_or(false);
        assert!(sent, "could not send SIGTERM to {pid}");
        self.exited_within(pid, timeout).await
    }

    /// Waits up to `timeout` for one process to exit by itself; returns its exit status (the
    /// process is then forgotten), or `None` if it is still running.
    pub async fn exited_within(&mut self, pid: u32, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(i) = self.children.iter().position(|c| c.pid() == Some(pid)) {
                if let Some(status) = self.children[i].exit_status() {
                    self.children.remove(i);
                    return Some(status);
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    /// The log (standard error) of the process `pid`.
    pub fn log_of(&self, pid: u32) -> std::path::PathBuf {
        self.children.iter().find(|c| c.pid() == Some(pid)).map(|c| c.log.clone()).unwrap_or_else(|| panic!("no process {pid}"))
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
        self.children.retain(|c| c.name != service);
    }

    /// Waits until the latest ingest, API and aggregator started answer on their default
    /// addresses; fails at once, naming the log, when one of them exits.
    pub async fn wait_healthy(&mut self) {
        let urls = [("ingest", self.ingest_url.clone()), ("api", self.api_url.clone()), ("aggregator", self.aggregator_url.clone())];
        for (service, url) in urls {
            let process = self.children.iter_mut().rev().find(|c| c.name == service);
            let process = process.unwrap_or_else(|| panic!("no tally {service} was started"));
            process.wait_healthy(&url, HEALTHY_WITHIN).await.unwrap_or_else(|e| panic!("{e:#}"));
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
        &self.instance.log_dir
    }
}

impl Drop for Tally {
    /// Stops this test's services, then drops its Postgres and ClickHouse databases unless
    /// the test is failing (they are kept for a look, beside the logs in `log_dir`).
    fn drop(&mut self) {
        self.children.clear();
        if !std::thread::panicking() {
            drop_test_databases(&self.instance);
        }
    }
}

/// Drops the test's databases, best effort. On a thread of its own with its own runtime,
/// because a test drops its `Tally` inside the test's runtime.
fn drop_test_databases(instance: &Instance) {
    let (instance, name) = (instance.clone(), instance.names.database());
    let dropped = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        runtime.block_on(instance.drop_databases())
    })
    .join();
    match dropped {
        Ok(Ok(())) => {}
        Ok(Err(e)) => eprintln!("note: could not drop the test databases {name}: {e:#}"),
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
    /// This test's ClickHouse database (its Postgres database has the same name).
    pub fn clickhouse_database(&self) -> String {
        self.instance.names.database()
    }

    /// The key of this test's history writer progress (`history_offsets.group_id`).
    pub fn history_group(&self) -> String {
        format!("tally-history-{}", self.id)
    }

    /// Starts `tally <service>` with extra environment variables (applied last).
    pub fn spawn_env(&mut self, service: &str, env: &[(&str, String)]) {
        let mut cmd = self.command(&[service]);
        for (k, v) in env {
            cmd.env(k, v);
        }
        self.start_process(service, cmd);
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
        self.children.iter_mut().filter(|c| c.name == service).map(Service::is_running).filter(|running| *running).count()
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
