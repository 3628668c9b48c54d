//! The bench's own Tally on the local stack: names unique to the run, `tally setup` for them,
//! and the services as child processes of the current `tally` binary. The names, the
//! services' environment and their start and stop are `tally-testkit`'s, shared with the
//! black-box tests; this module adds the bench's tokens, topics and measurements.
//!
//! Contract: every child process is stopped by its pid when its [`Service`] is dropped, so an
//! error anywhere in the bench stops what it started. The shared servers (broker, Postgres,
//! ClickHouse, Redis) are only used, never started or stopped; the run's Postgres and
//! ClickHouse databases are dropped at the end unless `--keep` is given.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientConfig;
use tally_common::clickhouse::ClickHouseSettings;
use tally_common::kafka::KafkaSettings;
use tally_common::postgres::PostgresSettings;
pub use tally_testkit::{free_addr, Service};
use tally_testkit::{Instance, Names, Servers};

/// Partitions of every topic the bench creates (as `tally setup` does).
pub const PARTITIONS: i32 = 4;

/// Connections in the bench's own Postgres pool.
const POOL_SIZE: u32 = 4;

/// The shared servers as `tally bench` was given them; a section that runs Tallys of its own
/// sets them up on these.
#[derive(Debug, Clone, Copy)]
pub struct SharedServers<'a> {
    pub brokers: &'a str,
    pub database_url: &'a str,
    pub clickhouse_url: &'a str,
}

/// The run's Tally (names, servers, the services' environment) and its tokens.
#[derive(Debug, Clone)]
pub struct Stack {
    pub tally: Instance,
    /// Bearer token of the API's read routes for this run (`TALLY_READ_TOKEN`).
    pub read_token: String,
    /// Bearer token of ingest for this run (`TALLY_INGEST_TOKEN`).
    pub ingest_token: String,
}

impl Stack {
    /// A run on the servers at `brokers`, `database_url` (its database part is replaced by
    /// the run's) and `clickhouse_url`, with `tiers_yaml` as its tier configuration.
    pub fn new(brokers: &str, database_url: &str, clickhouse_url: &str, tiers_yaml: &str) -> anyhow::Result<Stack> {
        let names = Names::new("bench");
        let log_dir = std::env::temp_dir().join(format!("tally-bench-{}", names.id));
        let servers = Servers { kafka: brokers.to_string(), postgres: database_url.to_string(), clickhouse: clickhouse_url.to_string() };
        let exe = std::env::current_exe().context("failed to find the tally binary")?;
        Ok(Stack {
            tally: Instance::new(exe, servers, names, log_dir, Some(tiers_yaml))?,
            read_token: format!("bench-read-{}", uuid::Uuid::new_v4().simple()),
            ingest_token: format!("bench-ingest-{}", uuid::Uuid::new_v4().simple()),
        })
    }

    /// The run's id, in every name it uses.
    pub fn id(&self) -> &str {
        &self.tally.names.id
    }

    /// Where the services' logs go.
    pub fn log_dir(&self) -> &Path {
        &self.tally.log_dir
    }

    /// The consumer group of the run's aggregators.
    pub fn group(&self) -> String {
        self.tally.names.group()
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
        self.tally.names.topic(kind)
    }

    pub fn kafka(&self) -> KafkaSettings {
        KafkaSettings {
            brokers: self.tally.servers.kafka.clone(),
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
        self.tally.postgres(POOL_SIZE)
    }

    pub fn clickhouse(&self) -> ClickHouseSettings {
        ClickHouseSettings { clickhouse_url: self.tally.servers.clickhouse.clone(), clickhouse_database: self.tally.names.database() }
    }

    /// `tally setup` for the run's names, plus the bench's extra topics.
    pub async fn setup(&self, extra_topics: &[String]) -> anyhow::Result<()> {
        crate::setup::setup(&self.kafka(), &self.postgres(), &self.clickhouse(), false).await?;
        create_topics(&self.tally.servers.kafka, extra_topics).await
    }

    /// Drops the run's Postgres and ClickHouse databases and deletes its topics (best effort).
    pub async fn teardown(&self, topics: &[String]) {
        if let Err(e) = self.tally.drop_databases().await {
            eprintln!("[bench] could not drop the run's databases: {e:#}");
        }
        let admin: Result<AdminClient<DefaultClientContext>, _> =
            ClientConfig::new().set("bootstrap.servers", &self.tally.servers.kafka).create();
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

    /// `tally <service>` with the run's environment and tokens, its log `<name>.log` in the
    /// run's log directory; `env` is applied last.
    pub fn spawn(&self, service: &str, name: &str, env: &[(&str, String)]) -> anyhow::Result<Service> {
        let mut cmd = self.tally.command(&[service]);
        cmd.env("TALLY_READ_TOKEN", &self.read_token)
            .env("TALLY_INGEST_TOKEN", &self.ingest_token)
            .env_remove("TALLY_ADMIN_TOKEN")
            .env_remove("TALLY_API_NO_AUTH")
            .env("RUST_LOG", std::env::var("TALLY_BENCH_RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .env_remove("TALLY_KAFKA_DEBUG");
        for (key, value) in env {
            cmd.env(key, value);
        }
        Service::start(name, cmd, self.tally.log_dir.join(format!("{name}.log")))
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

/// Resident memory of a running service, in bytes.
pub fn rss_of(service: &Service) -> anyhow::Result<u64> {
    rss_bytes(service.pid().with_context(|| format!("tally {} is not running", service.name))?)
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

/// The pid of the process listening on TCP `port` on this machine (read-only look at
/// /proc: the listening socket's inode in `/proc/net/tcp{,6}`, then the process holding it).
/// `None` when no local process listens there, or it cannot be seen.
pub fn listener_pid(port: u16) -> Option<u32> {
    let inode = ["/proc/net/tcp", "/proc/net/tcp6"].iter().find_map(|table| {
        let text = std::fs::read_to_string(table).ok()?;
        text.lines().skip(1).find_map(|line| listening_inode(line, port))
    })?;
    let socket = format!("socket:[{inode}]");
    let dir = std::fs::read_dir("/proc").ok()?;
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok()).find(|pid| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|fds| fds.filter_map(Result::ok).any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == socket.as_str())))
            .unwrap_or(false)
    })
}

/// The inode of a `/proc/net/tcp` line's socket when it listens (state 0A) on `port`.
fn listening_inode(line: &str, port: u16) -> Option<u64> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let local_port = u16::from_str_radix(fields.get(1)?.rsplit_once(':')?.1, 16).ok()?;
    (local_port == port && *fields.get(3)? == "0A").then(|| fields.get(9)?.parse().ok()).flatten()
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
    use std::time::Instant;

    use super::*;

    #[test]
    fn metric_sums_every_label_set() {
        let text = "# HELP x y\nx_total{a=\"1\"} 3\nx_total{a=\"2\"} 4\nx_total_other 9\n";
        assert_eq!(metric_sum(text, "x_total"), 7.0);
    }

    #[test]
    fn a_listening_socket_is_found_by_its_port() {
        let listen =
            "   1: 0100007F:46EB 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 987654 1 0000 100 0 0 10 0";
        assert_eq!(listening_inode(listen, 18155), Some(987654));
        assert_eq!(listening_inode(listen, 18156), None);
        let connected = listen.replace(" 0A ", " 01 ");
        assert_eq!(listening_inode(&connected, 18155), None);
        // This process's own listener is found.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert_eq!(listener_pid(listener.local_addr().unwrap().port()), Some(std::process::id()));
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
