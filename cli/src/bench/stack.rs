//! The bench's own Tally on the local stack: names unique to the run, `tally setup` for them,
//! and the services as child processes of the current `tally` binary.
//!
//! Contract: every child process is stopped by its pid when its [`Service`] is dropped, so an
//! error anywhere in the bench stops what it started. The shared servers (broker, Postgres,
//! ClickHouse, Redis) are only used, never started or stopped; the run's Postgres and
//! ClickHouse databases are dropped at the end unless `--keep` is given.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientConfig;
use tally_common::clickhouse::ClickHouseSettings;
use tally_common::kafka::KafkaSettings;
use tally_common::postgres::PostgresSettings;

/// Partitions of every topic the bench creates (as `tally setup` does).
pub const PARTITIONS: i32 = 4;

/// The run's names and server addresses.
#[derive(Debug, Clone)]
pub struct Stack {
    pub id: String,
    pub brokers: String,
    /// Postgres URL of the run's own database.
    pub database_url: String,
    pub clickhouse_url: String,
    pub clickhouse_database: String,
    pub group: String,
    pub config: PathBuf,
    pub log_dir: PathBuf,
    /// Bearer token of the API's read routes for this run (`TALLY_READ_TOKEN`).
    pub read_token: String,
    /// Bearer token of ingest for this run (`TALLY_INGEST_TOKEN`).
    pub ingest_token: String,
}

/// `url` with its database part replaced by `db` (query string kept).
pub fn with_database(url: &str, db: &str) -> anyhow::Result<String> {
    let (head, query) = match url.split_once('?') {
        Some((h, q)) => (h, format!("?{q}")),
        None => (url, String::new()),
    };
    let Some((base, _)) = head.rsplit_once('/') else { bail!("the Postgres URL {head:?} has no database part") };
    if base.ends_with('/') || !base.contains("://") {
        bail!("the Postgres URL {head:?} has no database part");
    }
    Ok(format!("{base}/{db}{query}"))
}

impl Stack {
    pub fn new(brokers: &str, database_url: &str, clickhouse_url: &str, tiers_yaml: &str) -> anyhow::Result<Stack> {
        let id = uuid::Uuid::new_v4().simple().to_string()[..10].to_string();
        let log_dir = std::env::temp_dir().join(format!("tally-bench-{id}"));
        std::fs::create_dir_all(&log_dir).with_context(|| format!("failed to create {}", log_dir.display()))?;
        let config = log_dir.join("tiers.yaml");
        std::fs::write(&config, tiers_yaml).context("failed to write the bench tier configuration")?;
        Ok(Stack {
            database_url: with_database(database_url, &format!("tally_bench_{id}"))?,
            brokers: brokers.to_string(),
            clickhouse_url: clickhouse_url.to_string(),
            clickhouse_database: format!("tally_bench_{id}"),
            group: format!("tally-bench-ledger-{id}"),
            config,
            log_dir,
            read_token: format!("bench-read-{}", uuid::Uuid::new_v4().simple()),
            ingest_token: format!("bench-ingest-{}", uuid::Uuid::new_v4().simple()),
            id,
        })
    }

    /// An HTTP client that presents the run's read token.
    pub fn http(&self, timeout: Duration) -> anyhow::Result<reqwest::Client> {
        let mut headers = reqwest::header::HeaderMap::new();
        let value = reqwest::header::HeaderValue::from_str(&format!("Bearer {}", self.read_token)).context("bad read token")?;
        headers.insert(reqwest::header::AUTHORIZATION, value);
        Ok(reqwest::Client::builder().timeout(timeout).default_headers(headers).pool_max_idle_per_host(64).build()?)
    }

    /// A topic name of this run: `bench.<id>.<kind>.v1`.
    pub fn topic(&self, kind: &str) -> String {
        format!("bench.{}.{kind}.v1", self.id)
    }

    pub fn kafka(&self) -> KafkaSettings {
        KafkaSettings {
            brokers: self.brokers.clone(),
            usage_topic: self.topic("usage"),
            decisions_topic: self.topic("decisions"),
            quarantine_topic: self.topic("quarantine"),
            control_topic: self.topic("control"),
            debug: None,
            partitions: PARTITIONS,
            fetch_wait_ms: tally_common::kafka::DEFAULT_FETCH_WAIT_MS,
            message_timeout_ms: tally_common::kafka::DEFAULT_MESSAGE_TIMEOUT_MS,
        }
    }

    pub fn postgres(&self) -> PostgresSettings {
        PostgresSettings { database_url: self.database_url.clone(), pool_size: 4 }
    }

    pub fn clickhouse(&self) -> ClickHouseSettings {
        ClickHouseSettings { clickhouse_url: self.clickhouse_url.clone(), clickhouse_database: self.clickhouse_database.clone() }
    }

    /// `tally setup` for the run's names, plus the bench's extra topics.
    pub async fn setup(&self, extra_topics: &[String]) -> anyhow::Result<()> {
        crate::setup::setup(&self.kafka(), &self.postgres(), &self.clickhouse(), false).await?;
        create_topics(&self.brokers, extra_topics).await
    }

    /// Drops the run's Postgres and ClickHouse databases and deletes its topics (best effort).
    pub async fn teardown(&self, topics: &[String]) {
        if let Err(e) = self.postgres().drop_database().await {
            eprintln!("[bench] could not drop Postgres database of the run: {e:#}");
        }
        let sql = format!("DROP DATABASE IF EXISTS `{}`", self.clickhouse_database);
        if let Err(e) = reqwest::Client::new().post(&self.clickhouse_url).body(sql).send().await {
            eprintln!("[bench] could not drop ClickHouse database of the run: {e}");
        }
        let admin: Result<AdminClient<DefaultClientContext>, _> = ClientConfig::new().set("bootstrap.servers", &self.brokers).create();
        if let Ok(admin) = admin {
            let names: Vec<&str> = topics.iter().map(String::as_str).collect();
            let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
            let _ = admin.delete_topics(&names, &opts).await;
        }
    }

    /// Every topic of the run (for teardown).
    pub fn all_topics(&self, extra: &[String]) -> Vec<String> {
        let k = self.kafka();
        let mut t = vec![k.usage_topic, k.decisions_topic, k.quarantine_topic, k.control_topic];
        t.extend(extra.iter().cloned());
        t
    }

    /// `tally <service>` with the run's environment; `env` is applied last.
    pub fn spawn(&self, service: &str, name: &str, env: &[(&str, String)]) -> anyhow::Result<Service> {
        let exe = std::env::current_exe().context("failed to find the tally binary")?;
        let log_path = self.log_dir.join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path).with_context(|| format!("failed to create {}", log_path.display()))?;
        let k = self.kafka();
        let mut cmd = Command::new(exe);
        cmd.arg(service)
            .env("TALLY_KAFKA_BROKERS", &self.brokers)
            .env("TALLY_DATABASE_URL", &self.database_url)
            .env("TALLY_CLICKHOUSE_URL", &self.clickhouse_url)
            .env("TALLY_CLICKHOUSE_DATABASE", &self.clickhouse_database)
            .env("TALLY_USAGE_TOPIC", &k.usage_topic)
            .env("TALLY_DECISIONS_TOPIC", &k.decisions_topic)
            .env("TALLY_QUARANTINE_TOPIC", &k.quarantine_topic)
            .env("TALLY_CONTROL_TOPIC", &k.control_topic)
            .env("TALLY_AGGREGATOR_GROUP", &self.group)
            .env("TALLY_CONFIG", &self.config)
            .env("TALLY_READ_TOKEN", &self.read_token)
            .env("TALLY_INGEST_TOKEN", &self.ingest_token)
            .env_remove("TALLY_ADMIN_TOKEN")
            .env_remove("TALLY_API_NO_AUTH")
            .env("RUST_LOG", std::env::var("TALLY_BENCH_RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .env_remove("TALLY_KAFKA_DEBUG");
        for (key, value) in env {
            cmd.env(key, value);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("failed to start tally {service}"))?;
        Ok(Service { name: name.to_string(), child: Some(child), log: log_path })
    }
}

/// Creates `topics` with [`PARTITIONS`] partitions if they do not exist.
pub async fn create_topics(brokers: &str, topics: &[String]) -> anyhow::Result<()> {
    if topics.is_empty() {
        return Ok(());
    }
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", brokers).create().context("failed to create the Kafka admin client")?;
    let new: Vec<NewTopic> = topics.iter().map(|t| NewTopic::new(t, PARTITIONS, TopicReplication::Fixed(1))).collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin.create_topics(&new, &opts).await.context("failed to create the bench topics")? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => bail!("failed to create topic {topic}: {code}"),
        }
    }
    Ok(())
}

/// A free loopback address (bound and released; the service binds it right after).
pub fn free_addr() -> anyhow::Result<String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("no free loopback port")?;
    Ok(l.local_addr()?.to_string())
}

/// A running child process; stopped (SIGKILL, by pid) when dropped.
pub struct Service {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Service {
    /// The process id; `None` once the service was stopped.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Fails if the process has exited, pointing at its log.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        if let Some(child) = self.child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                bail!("tally {} exited ({status}); its log: {}", self.name, self.log.display());
            }
        }
        Ok(())
    }

    /// Resident memory in bytes (VmRSS of /proc/<pid>/status).
    pub fn rss_bytes(&self) -> anyhow::Result<u64> {
        rss_bytes(self.pid().with_context(|| format!("tally {} is not running", self.name))?)
    }

    /// Waits until `GET http://<addr>/healthz` answers 2xx.
    pub async fn wait_healthy(&mut self, addr: &str, timeout: Duration) -> anyhow::Result<()> {
        let client = reqwest::Client::builder().timeout(Duration::from_secs(2)).build()?;
        let deadline = Instant::now() + timeout;
        loop {
            self.ensure_running()?;
            if let Ok(r) = client.get(format!("http://{addr}/healthz")).send().await {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("tally {} did not answer on {addr} within {timeout:?}; its log: {}", self.name, self.log.display());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the process now.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop();
    }
}

/// VmRSS of a process, in bytes.
pub fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| format!("no process {pid}"))?;
    let kib = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .with_context(|| format!("no VmRSS for process {pid}"))?;
    Ok(kib * 1024)
}

/// CPU time (user + system) a process has used so far, in seconds; 0 when it is gone.
/// Assumes the kernel's usual 100 clock ticks a second.
pub fn cpu_seconds(pid: u32) -> f64 {
    cpu_seconds_in(&format!("/proc/{pid}/stat"))
}

/// CPU time of the calling thread so far, in seconds, as [`cpu_seconds`] counts it.
pub fn thread_cpu_seconds() -> f64 {
    cpu_seconds_in("/proc/thread-self/stat")
}

/// User + system time in a `stat` file of procfs (a process's or a thread's).
fn cpu_seconds_in(path: &str) -> f64 {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (ticks(11) + ticks(12)) as f64 / 100.0
}

/// CPU time the processes `pids` have used so far, in seconds ([`cpu_seconds`] summed).
pub fn cpu_seconds_of(pids: &[u32]) -> f64 {
    pids.iter().map(|p| cpu_seconds(*p)).sum()
}

/// The machine's CPU time in clock ticks, summed over all cores, from the first line of
/// `/proc/stat`: all of it, and the part no process used (idle and waiting for I/O).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MachineTicks {
    pub total: u64,
    pub idle: u64,
}

impl MachineTicks {
    pub fn now() -> Self {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        stat.lines().next().map(MachineTicks::parse).unwrap_or_default()
    }

    /// Parses `cpu  user nice system idle iowait irq softirq steal guest guest_nice`; the
    /// guest columns are already counted in user and nice.
    fn parse(line: &str) -> Self {
        if !line.starts_with("cpu ") {
            return MachineTicks::default();
        }
        let ticks: Vec<u64> = line.split_whitespace().skip(1).take(8).filter_map(|v| v.parse().ok()).collect();
        let at = |i: usize| ticks.get(i).copied().unwrap_or(0);
        MachineTicks { total: ticks.iter().sum(), idle: at(3) + at(4) }
    }
}

/// Where the machine's CPU went over an interval: the share of all cores each named group
/// of processes used, and the share nobody used. Shares are of the whole machine (all cores
/// for the interval), so with every group named they and `idle` add up to about 1.
pub struct CpuWatch {
    machine: MachineTicks,
    groups: Vec<(&'static str, Vec<u32>, f64)>,
}

impl CpuWatch {
    /// Starts watching the processes of each group.
    pub fn start(groups: Vec<(&'static str, Vec<u32>)>) -> Self {
        let groups = groups.into_iter().map(|(name, pids)| {
            let used = cpu_seconds_of(&pids);
            (name, pids, used)
        });
        CpuWatch { groups: groups.collect(), machine: MachineTicks::now() }
    }

    /// The idle share and each group's share since [`CpuWatch::start`].
    pub fn shares(&self) -> (f64, Vec<(&'static str, f64)>) {
        let machine = MachineTicks::now();
        let total = machine.total.saturating_sub(self.machine.total) as f64 / 100.0;
        let share = |seconds: f64| if total > 0.0 { seconds / total } else { 0.0 };
        let idle = share(machine.idle.saturating_sub(self.machine.idle) as f64 / 100.0);
        let groups = self.groups.iter().map(|(name, pids, before)| (*name, share(cpu_seconds_of(pids) - before)));
        (idle, groups.collect())
    }
}

/// Pids of processes whose command name is `comm` (read-only look at /proc).
pub fn pids_named(comm: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).map(|c| c.trim() == comm).unwrap_or(false))
        .collect()
}

/// The sum of the values of metric `name` (all label sets) in a Prometheus text page.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split([' ', '{']).next() == Some(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Reads metric `name` from `http://<addr>/metrics`.
pub async fn scrape(client: &reqwest::Client, addr: &str, name: &str) -> anyhow::Result<f64> {
    let text = client.get(format!("http://{addr}/metrics")).send().await?.error_for_status()?.text().await?;
    Ok(metric_sum(&text, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_part_is_replaced() {
        assert_eq!(with_database("postgres://u@h:5432/tally", "b").unwrap(), "postgres://u@h:5432/b");
        assert_eq!(with_database("postgres://u@h/tally?sslmode=disable", "b").unwrap(), "postgres://u@h/b?sslmode=disable");
        assert!(with_database("tally", "b").is_err());
    }

    #[test]
    fn metric_sums_every_label_set() {
        let text = "# HELP x y\nx_total{a=\"1\"} 3\nx_total{a=\"2\"} 4\nx_total_other 9\n";
        assert_eq!(metric_sum(text, "x_total"), 7.0);
    }

    #[test]
    fn machine_ticks_count_idle_and_iowait_as_unused_and_guests_once() {
        let t = MachineTicks::parse("cpu  100 5 40 800 20 3 7 2 50 0");
        assert_eq!(t, MachineTicks { total: 100 + 5 + 40 + 800 + 20 + 3 + 7 + 2, idle: 820 });
        assert_eq!(MachineTicks::parse("intr 1 2"), MachineTicks::default());
    }

    #[test]
    fn a_watched_process_that_spins_has_a_share_of_the_machine() {
        let me = std::process::id();
        let watch = CpuWatch::start(vec![("me", vec![me]), ("nobody", vec![])]);
        // Spins until the process has used a tenth of a second of CPU (ten clock ticks),
        // however busy the machine is.
        let (spin, used) = (Instant::now(), cpu_seconds(me));
        let mut x = 0u64;
        while cpu_seconds(me) - used < 0.1 && spin.elapsed() < Duration::from_secs(20) {
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        }
        let (idle, groups) = watch.shares();
        assert_eq!(groups.iter().map(|(name, _)| *name).collect::<Vec<_>>(), ["me", "nobody"]);
        assert!(groups[0].1 > 0.0 && groups[0].1 <= 1.0, "{groups:?}");
        assert_eq!(groups[1].1, 0.0);
        assert!((0.0..=1.0).contains(&idle), "{idle}");
    }
}
