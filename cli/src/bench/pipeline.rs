//! The ledger path under load: pipeline throughput, decision latency and memory.
//!
//! - Throughput: N usage events (subjects on three tiers, four quotas each) are produced to
//!   the run's usage topic first; then the aggregator starts, with exactly-once on as always
//!   (dedupe records, ledgers, offsets and decision snapshots in one transaction per batch).
//!   The clock runs from the first committed batch to the batch that makes the stored next
//!   offsets (`consumer_offsets`) sum to N, so start-up is left out; the wall time from the
//!   process start is reported too.
//! - Decision latency: while a background load runs at half the measured throughput (or the
//!   fraction `--decision-load` gives), probe
//!   events push probe subjects (which already have a snapshot) over their monthly token
//!   limit; the latency is from just before the probe is produced until the API answers
//!   `allowed: false` for that subject (polled every 2 ms for the first 100 ms, then every
//!   20 ms, so slow probes do not load the API they wait on). Before the load starts, a
//!   fifth as many probes, one at a time, measure the unloaded floor (after one more that
//!   warms the probe producer up and is left out).
//! - Memory: events for fresh subjects until the aggregator has counted and the API's view
//!   holds the requested number of subjects; then VmRSS of both processes, against the same
//!   services' VmRSS when idle (no subjects) measured earlier in the run.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use rdkafka::producer::{BaseProducer, BaseRecord, FutureProducer, FutureRecord, Producer};
use sqlx::PgPool;
use tally_common::kafka::KafkaSettings;
use tally_domain::event::{hash_api_key, UsageEvent};

use super::broker::{self, Ceiling, Prepared};
use super::report::{Latencies, Section};
use super::stack::{cpu_seconds, cpu_seconds_of, free_addr, pids_named, rss_of, scrape, CpuWatch, Service, Stack};

/// The three tiers' API keys (raw; the configuration holds their SHA-256).
pub const TIER_KEYS: [Option<&str>; 3] = [None, Some("bench-key-pro"), Some("bench-key-scale")];

/// The bench's tier configuration: three tiers, four base quotas (a rate, two calendar day
/// quotas, a monthly token budget), API keys choosing the tier.
pub fn tiers_yaml() -> String {
    format!(
        "# tally bench: three tiers, four quotas each; the API key chooses the tier.
default_tier: basic
timezone: UTC
quotas:
  - name: rpm
    metric: requests
    rate: 600/m
  - name: daily_requests
    metric: requests
    period: day
    limit: 20000
    thresholds: [80, 100]
  - name: monthly_tokens
    metric: total_tokens
    period: month
    limit: 50000000
    thresholds: [80, 95, 100]
  - name: daily_cost
    metric: cost_micros
    period: day
    limit: 5000000
    thresholds: [50, 80]
tiers:
  - name: basic
    priority: 0
    rate_multiplier: 1
  - name: pro
    priority: 10
    rate_multiplier: 10
    action: degrade
    fallback_model: gpt-4o-mini
  - name: scale
    priority: 20
    rate_multiplier: 100
    action: soft
api_keys:
  - key_sha256: {pro}
    tier: pro
  - key_sha256: {scale}
    tier: scale
prices:
  gpt-4o-mini:
    input: 150000
    output: 600000
",
        pro = hash_api_key(TIER_KEYS[1].unwrap_or_default()),
        scale = hash_api_key(TIER_KEYS[2].unwrap_or_default()),
    )
}

/// The SHA-256 of each of [`TIER_KEYS`], hashed once: the background load makes tens of
/// thousands of events a second on the same cores as the services it measures.
static TIER_KEY_HASHES: std::sync::LazyLock<[Option<String>; 3]> = std::sync::LazyLock::new(|| TIER_KEYS.map(|k| k.map(hash_api_key)));

/// One usage event in canonical form, keyed by subject. `tier` picks the API key.
pub fn event(id: String, subject: String, tier: usize, time: DateTime<Utc>, input_tokens: i64) -> Prepared {
    event_with(id, subject, TIER_KEY_HASHES[tier % 3].clone(), None, time, input_tokens)
}

/// One usage event in canonical form as [`event`] makes it, with the given API key hash and
/// group.
pub fn event_with(
    id: String,
    subject: String,
    api_key_sha256: Option<String>,
    group: Option<String>,
    time: DateTime<Utc>,
    input_tokens: i64,
) -> Prepared {
    let e = UsageEvent {
        id,
        subject,
        time,
        api_key_sha256,
        scope: "chat".into(),
        model: Some("gpt-4o-mini".into()),
        group,
        requests: 1,
        input_tokens,
        output_tokens: 100,
        cached_tokens: 0,
        cost_micros: None,
        attributes: Default::default(),
        corrects: None,
    };
    let bytes = e.to_canonical_json();
    (e.subject, bytes)
}

/// `count` events over `subjects` subjects named `<prefix><n>`, ids unique to `tag`.
pub fn events(tag: &str, prefix: &str, subjects: usize, count: usize) -> Vec<Prepared> {
    let now = Utc::now();
    (0..count)
        .map(|i| {
            let s = i % subjects.max(1);
            event(format!("{tag}-{i}"), format!("{prefix}{s}"), s, now - chrono::Duration::milliseconds((i % 1000) as i64), 300)
        })
        .collect()
}

/// The ledger path of the run: the aggregator, the API, and what was produced so far.
pub struct Pipeline {
    pub stack: Stack,
    pub kafka: KafkaSettings,
    pub pool: PgPool,
    pub http: reqwest::Client,
    pub aggregator: Option<Service>,
    pub aggregator_addr: String,
    pub api: Option<Service>,
    pub api_addr: String,
    /// Messages produced to the usage topic so far.
    pub produced: u64,
    /// Subjects with at least one counted event so far.
    pub subjects: u64,
    /// The probe subjects (each one has a snapshot before its probe).
    pub probes: Vec<String>,
    /// Probe subjects for the floor: probed one at a time with no background load.
    pub idle_probes: Vec<String>,
}

/// One timed count of pre-produced events by a freshly started aggregator.
#[derive(Debug, Clone)]
pub struct Timed {
    pub events: f64,
    /// Events counted between the first committed batch and the last (the rate's numerator).
    pub events_timed: f64,
    pub events_per_s: f64,
    /// From the aggregator's start to its last commit.
    pub wall: Duration,
    /// The aggregator's own counters over its life.
    pub counted: f64,
    pub commit_us: f64,
    pub batches: f64,
    /// CPU seconds over the aggregator's life: its own, its Postgres backends', and the
    /// broker's when it is a local tansu process.
    pub aggregator_cpu: f64,
    pub postgres_cpu: f64,
    pub broker_cpu: Option<f64>,
}

impl Timed {
    pub fn aggregator_us_per_event(&self) -> f64 {
        self.aggregator_cpu * 1e6 / self.events
    }

    pub fn postgres_us_per_event(&self) -> f64 {
        self.postgres_cpu * 1e6 / self.events
    }

    /// The figures of a timed count, under their pipeline-section names.
    pub fn report(&self, s: &mut Section) {
        let per_batch = |v: f64| if self.batches > 0.0 { v / self.batches } else { 0.0 };
        let wall = self.wall.as_secs_f64();
        s.figure("events", self.events)
            .figure("events_per_s", self.events_per_s)
            .figure("events_timed", self.events_timed)
            .figure("wall_seconds_from_process_start", wall)
            .figure("events_per_s_from_process_start", self.events / wall)
            .figure("events_counted_metric", self.counted)
            .figure("batches", self.batches)
            .figure("events_per_batch", per_batch(self.counted))
            .figure("commit_ms_per_batch", per_batch(self.commit_us) / 1000.0)
            .figure("commit_share_of_wall", self.commit_us / 1e6 / wall)
            .figure("aggregator_cpu_us_per_event", self.aggregator_us_per_event())
            .figure("postgres_cpu_us_per_event", self.postgres_us_per_event())
            .figure("cpu_share_of_wall", (self.aggregator_cpu + self.postgres_cpu + self.broker_cpu.unwrap_or(0.0)) / wall);
        if let Some(broker_cpu) = self.broker_cpu {
            s.figure("broker_cpu_us_per_event", broker_cpu * 1e6 / self.events);
        }
    }

    /// The notes that say how a timed count is measured.
    pub fn explain(s: &mut Section) {
        s.note("timed from the first committed batch to the last; consumer_offsets next offsets sum to the events produced")
            .note("CPU per event from /proc/<pid>/stat over the aggregator's life: the aggregator, its Postgres backends, and the broker when it is a local tansu process (broker_cpu_us_per_event); noise-proof where rates are not");
    }
}

impl Pipeline {
    pub async fn new(stack: Stack) -> anyhow::Result<Pipeline> {
        let pool = stack.postgres().connect().await?;
        Ok(Pipeline {
            kafka: stack.kafka(),
            pool,
            http: stack.http(Duration::from_secs(10))?,
            aggregator: None,
            aggregator_addr: free_addr()?,
            api: None,
            api_addr: free_addr()?,
            produced: 0,
            subjects: 0,
            probes: Vec::new(),
            idle_probes: Vec::new(),
            stack,
        })
    }

    /// The sum of the aggregator's stored next offsets: messages consumed and committed.
    pub async fn consumed(&self) -> anyhow::Result<u64> {
        let sum: Option<i64> =
            sqlx::query_scalar("SELECT sum(next_offset)::bigint FROM consumer_offsets WHERE group_id = $1 AND topic = $2")
                .bind(self.stack.group())
                .bind(&self.kafka.usage_topic)
                .fetch_one(&self.pool)
                .await
                .context("failed to read consumer_offsets")?;
        Ok(sum.unwrap_or(0).max(0) as u64)
    }

    async fn produce(&mut self, messages: Vec<Prepared>) -> anyhow::Result<Duration> {
        let kafka = self.kafka.clone();
        let n = messages.len() as u64;
        let took = tokio::task::spawn_blocking(move || broker::produce_all(&kafka, &kafka.usage_topic, &messages)).await??;
        self.produced += n;
        Ok(took)
    }

    fn aggregator_mut(&mut self) -> anyhow::Result<&mut Service> {
        self.aggregator.as_mut().context("the aggregator is not running")
    }

    /// Waits until the aggregator committed everything produced so far.
    async fn wait_consumed(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.consumed().await? >= self.produced {
                return Ok(());
            }
            self.aggregator_mut()?.ensure_running()?;
            if Instant::now() > deadline {
                bail!("the aggregator consumed {} of {} messages within {timeout:?}", self.consumed().await?, self.produced);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Section 2. Pre-produces `count` events over `subjects` subjects plus one event per probe
    /// subject, then starts the aggregator and times it.
    pub async fn throughput(&mut self, subjects: usize, count: usize, probes: usize, ceiling: &Ceiling) -> anyhow::Result<(Section, f64)> {
        let mut messages = events(&format!("{}-load", self.stack.id()), "s", subjects, count);
        let now = Utc::now();
        self.probes = (0..probes).map(|k| format!("probe{k}")).collect();
        self.idle_probes = (0..idle_probe_count(probes)).map(|k| format!("idleprobe{k}")).collect();
        for (k, subject) in self.probes.iter().chain(&self.idle_probes).enumerate() {
            messages.push(event(format!("{}-probe-pre-{k}", self.stack.id()), subject.clone(), 0, now, 10));
        }
        let all_subjects = subjects + self.probes.len() + self.idle_probes.len();
        eprintln!("[bench] pipeline: producing {} events for {all_subjects} subjects", messages.len());
        let timed = self.count_timed(messages).await?;
        self.subjects = all_subjects as u64;
        let rate = timed.events_per_s;
        let mut s = Section::default();
        timed.report(&mut s);
        s.figure("subjects", self.subjects as f64)
            .ratio("to_broker_consume", rate, ceiling.consume_per_s)
            .ratio("to_broker_produce", rate, ceiling.produce_per_s)
            .target("events_per_s >= 100000", rate >= 100_000.0)
            .target("events_per_s >= half the broker consume ceiling", rate >= ceiling.consume_per_s / 2.0)
            .note("three tiers (basic, pro by API key, scale by API key), four quotas each (rate, daily requests, monthly tokens, daily cost)");
        Timed::explain(&mut s);
        Ok((s, rate))
    }

    /// Produces `messages`, then starts an aggregator and times it until it committed them
    /// all (see the module docs). The aggregator keeps running.
    pub async fn count_timed(&mut self, messages: Vec<Prepared>) -> anyhow::Result<Timed> {
        let total = messages.len() as f64;
        let before = self.consumed().await?;
        self.produce(messages).await?;

        // CPU accounting: the broker (when it is a local tansu process) before the run.
        let brokers = pids_named("tansu");
        let broker_cpu_before = cpu_seconds_of(&brokers);
        eprintln!("[bench] pipeline: starting the aggregator");
        let spawned = Instant::now();
        let aggregator = self.stack.spawn("aggregator", "aggregator", &[("TALLY_AGGREGATOR_LISTEN", self.aggregator_addr.clone())])?;
        self.aggregator = Some(aggregator);
        let mut first: Option<(Instant, u64)> = None;
        let deadline = Instant::now() + Duration::from_secs(60) + Duration::from_secs_f64(total / 1000.0);
        let end = loop {
            let consumed = self.consumed().await?.saturating_sub(before);
            let now = Instant::now();
            if consumed > 0 && first.is_none() {
                first = Some((now, consumed));
            }
            if consumed as f64 >= total {
                break now;
            }
            self.aggregator_mut()?.ensure_running()?;
            if now > deadline {
                bail!("the aggregator counted {consumed} of {total} events in {:?}", spawned.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let wall = end - spawned;
        let aggregator_cpu = self.aggregator.as_ref().and_then(Service::pid).map_or(0.0, cpu_seconds);
        let broker_cpu = cpu_seconds_of(&brokers) - broker_cpu_before;
        let postgres_cpu = cpu_seconds_of(&self.backend_pids().await);
        let (events_per_s, timed) = match first {
            Some((t0, c0)) if (c0 as f64) < total * 0.9 && end > t0 => ((total - c0 as f64) / (end - t0).as_secs_f64(), total - c0 as f64),
            _ => (total / wall.as_secs_f64(), total),
        };
        Ok(Timed {
            events: total,
            events_timed: timed,
            events_per_s,
            wall,
            counted: scrape(&self.http, &self.aggregator_addr, "tally_aggregator_events_counted_total").await.unwrap_or(0.0),
            // Where the time went: the aggregator's own batch commit timing over the whole run.
            commit_us: scrape(&self.http, &self.aggregator_addr, "tally_aggregator_batch_micros_total").await.unwrap_or(0.0),
            batches: scrape(&self.http, &self.aggregator_addr, "tally_aggregator_batches_total").await.unwrap_or(0.0),
            aggregator_cpu,
            postgres_cpu,
            broker_cpu: (!brokers.is_empty()).then_some(broker_cpu),
        })
    }

    /// Starts the API and waits until its view holds every subject so far.
    pub async fn start_api(&mut self) -> anyhow::Result<()> {
        let mut api = self.stack.spawn("api", "api", &[("TALLY_API_LISTEN", self.api_addr.clone())])?;
        api.wait_healthy(&format!("http://{}", self.api_addr), Duration::from_secs(30)).await?;
        self.api = Some(api);
        self.wait_view(Duration::from_secs(120)).await
    }

    /// Waits until the API's view holds `self.subjects` subjects.
    async fn wait_view(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let n = scrape(&self.http, &self.api_addr, "tally_api_view_subjects").await.unwrap_or(0.0);
            if n >= self.subjects as f64 {
                return Ok(());
            }
            if let Some(api) = self.api.as_mut() {
                api.ensure_running()?;
            }
            if Instant::now() > deadline {
                bail!("the API's view holds {n} of {} subjects after {timeout:?}", self.subjects);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn allowed(&self, subject: &str) -> Option<bool> {
        let url = format!("http://{}/v1/subjects/{subject}/decision", self.api_addr);
        let r = self.http.get(url).send().await.ok()?;
        if !r.status().is_success() {
            return None;
        }
        let v: serde_json::Value = r.json().await.ok()?;
        v["allowed"].as_bool()
    }

    /// Section 3: background load at `fraction` of the measured `throughput` (events/s) over
    /// the known subjects for `duration`, and the probes spread over it.
    pub async fn decision_latency(
        &mut self,
        throughput: f64,
        fraction: f64,
        duration: Duration,
        load_subjects: usize,
        ceiling: &Ceiling,
    ) -> anyhow::Result<Section> {
        let rate = throughput * fraction;
        let probes = self.probes.clone();
        for p in probes.iter().chain(&self.idle_probes) {
            if self.allowed(p).await != Some(true) {
                bail!("probe subject {p} has no allowing decision before its probe");
            }
        }
        let probe_producer: FutureProducer = self.kafka.producer_config().create().context("failed to create the probe producer")?;
        // The floor first: one probe at a time, nothing else running.
        let (mut floor, mut floor_missing) = (Latencies::default(), 0);
        for (k, subject) in self.idle_probes.clone().iter().enumerate() {
            let timing = self.probe(&probe_producer, &format!("idle-{k}"), subject)?.await;
            match timing {
                // The first send of a new idempotent producer waits for its start-up (about
                // half a second on tansu): that probe only warms the producer up.
                Ok(Some(t)) if k == 0 => {
                    eprintln!("[bench] decision latency: warm-up probe {} ms (left out of the floor)", t.total.as_millis())
                }
                Ok(Some(t)) => floor.push(t.total),
                _ => floor_missing += 1,
            }
        }
        let snapshots_before = scrape(&self.http, &self.aggregator_addr, "tally_aggregator_snapshots_total").await.unwrap_or(0.0);
        let fast_before = scrape(&self.http, &self.aggregator_addr, "tally_aggregator_fast_commits_total").await.unwrap_or(0.0);
        let cpu = CpuWatch::start(self.cpu_groups().await);
        let phase = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let kafka = self.kafka.clone();
        let tag = format!("{}-bg", self.stack.id());
        let stop_bg = stop.clone();
        let background = tokio::task::spawn_blocking(move || background_load(&kafka, &tag, load_subjects, rate, duration, &stop_bg));

        let interval = duration / (probes.len().max(1) as u32 + 1);
        let mut tasks = Vec::new();
        for (k, subject) in probes.iter().enumerate() {
            tokio::time::sleep(interval).await;
            tasks.push(self.probe(&probe_producer, &k.to_string(), subject)?);
        }
        let (mut latencies, mut queued, mut after_start) = (Latencies::default(), Latencies::default(), Latencies::default());
        let mut missing = 0;
        for t in tasks {
            match t.await {
                Ok(Some(t)) => {
                    latencies.push(t.total);
                    if let Some((q, a)) = t.split {
                        queued.push(q);
                        after_start.push(a);
                    }
                }
                _ => missing += 1,
            }
        }
        let (idle, shares) = cpu.shares();
        stop.store(true, Ordering::Relaxed);
        let sent = background.await??;
        self.produced += sent + (probes.len() + self.idle_probes.len()) as u64;
        let _ = probe_producer.flush(Duration::from_secs(10));
        let snapshots =
            scrape(&self.http, &self.aggregator_addr, "tally_aggregator_snapshots_total").await.unwrap_or(0.0) - snapshots_before;
        let fast_commits =
            scrape(&self.http, &self.aggregator_addr, "tally_aggregator_fast_commits_total").await.unwrap_or(0.0) - fast_before;
        let phase = phase.elapsed().as_secs_f64();
        if latencies.is_empty() {
            bail!("no probe decision became visible at the API");
        }
        let mut s = Section::default();
        s.figure("background_events_per_s", sent as f64 / duration.as_secs_f64())
            .figure("background_share_of_throughput", fraction)
            .figure("probes", latencies.len() as f64)
            .figure("snapshots_published_per_s", snapshots.max(0.0) / phase)
            .figure("fast_commits", fast_commits.max(0.0))
            .latencies("decision", &latencies)
            .figure("split_probes", queued.len() as f64)
            .latencies("decision_queued", &queued)
            .latencies("decision_from_batch_start", &after_start)
            .ratio("p50_to_broker_round_trip_p50", latencies.p50_ms(), ceiling.round_trip_p50_ms)
            .ratio("p99_to_broker_round_trip_p99", latencies.p99_ms(), ceiling.round_trip_p99_ms)
            .target("decision p99 <= 500 ms", latencies.p99_ms() <= 500.0)
            .figure("machine_idle_share", idle);
        for (group, share) in shares {
            s.figure(&format!("cpu_share_{group}"), share);
        }
        s.note(format!(
                "background load at {fraction} of the measured throughput ({rate:.0}/s target; the target below is set at 0.5) over {load_subjects} subjects; each probe pushes a subject \
                 with a snapshot over its monthly token limit; latency = produce call until GET /v1/subjects/{{s}}/decision says allowed=false (polled every 2 ms for 100 ms, then every 20 ms)"
            ))
            .note(
                "decision_queued (over split_probes, the probes whose snapshot named the start of its commit): produce call until the start of the \
                 commit that counted the probe (the snapshot's calculated_at): a fast commit when the aggregator knew the probe would breach, else \
                 the probe's batch, after the lane's commit in flight; so the broker hop, the loop, and any wait for a fast commit or batch before; \
                 decision_from_batch_start: from then until visible (that commit, the publish, decisions topic, API)",
            )
            .note(
                "fast_commits: transactions that committed urgent events (which may change a decision: the probes, and any background event \
                 that reached a threshold) at once, ahead of their batches, during the loaded phase",
            )
            .note(
                "machine_idle_share and cpu_share_*: of all cores, from the start of the background load until the last probe was visible \
                 (/proc/stat and /proc/<pid>/stat); cpu_share_bench is this process: the background load and the probes, which stand in for \
                 gateways on other machines",
            );
        // The floor is left out rather than reported as 0 ms when no unloaded probe came back.
        if !floor.is_empty() {
            s.latencies("unloaded_decision", &floor)
                .ratio("unloaded_p50_to_broker_round_trip_p50", floor.p50_ms(), ceiling.round_trip_p50_ms)
                .note(format!(
                    "unloaded_decision: {} probes one at a time before the background load starts, after one that warms the probe producer up: \
                     the floor of two broker hops (usage topic, decisions topic) plus one commit",
                    floor.len()
                ));
        }
        if floor_missing > 0 {
            s.note(format!("{floor_missing} unloaded probes (the warm-up included) never became visible within 30 s"));
        }
        if missing > 0 {
            s.note(format!("{missing} probes never became visible within 30 s (left out of the percentiles)"));
        }
        self.wait_consumed(Duration::from_secs(120)).await?;
        Ok(s)
    }

    /// Pids of the Postgres backends serving the run's database (the bench's own query's
    /// left out).
    async fn backend_pids(&self) -> Vec<u32> {
        let pids: Vec<i32> =
            sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()")
                .fetch_all(&self.pool)
                .await
                .unwrap_or_default();
        pids.into_iter().map(|p| p as u32).collect()
    }

    /// The processes whose CPU the decision section reports, by group.
    async fn cpu_groups(&self) -> Vec<(&'static str, Vec<u32>)> {
        let pid = |service: &Option<Service>| service.as_ref().and_then(Service::pid).into_iter().collect();
        vec![
            ("aggregator", pid(&self.aggregator)),
            ("postgres", self.backend_pids().await),
            ("api", pid(&self.api)),
            ("broker", pids_named("tansu")),
            ("bench", vec![std::process::id()]),
        ]
    }

    /// Produces one probe event pushing `subject` over its monthly token limit, and returns a
    /// task that polls the API until it refuses the subject (`None` after 30 s): the time from
    /// just before the produce call, split at the refusing snapshot's `calculated_at`.
    fn probe(&self, producer: &FutureProducer, tag: &str, subject: &str) -> anyhow::Result<tokio::task::JoinHandle<Option<ProbeTiming>>> {
        let (key, payload) = event(format!("{}-probe-{tag}", self.stack.id()), subject.to_string(), 0, Utc::now(), 60_000_000);
        let (started, produced_at) = (Instant::now(), Utc::now());
        if producer.send_result(FutureRecord::to(&self.kafka.usage_topic).key(&key).payload(&payload)).is_err() {
            bail!("failed to queue a probe event");
        }
        let (http, url) = (self.http.clone(), format!("http://{}/v1/subjects/{subject}/decision", self.api_addr));
        Ok(tokio::spawn(async move {
            let deadline = started + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(r) = http.get(&url).send().await {
                    if let Ok(v) = r.json::<serde_json::Value>().await {
                        if v["allowed"] == serde_json::Value::Bool(false) {
                            let calculated_at = v["calculated_at"].as_str().and_then(|t| t.parse::<DateTime<Utc>>().ok());
                            return Some(ProbeTiming::split(started.elapsed(), produced_at, calculated_at));
                        }
                    }
                }
                // Poll fast at first, then back off so waiting probes do not load the API.
                let pause = if started.elapsed() < Duration::from_millis(100) { 2 } else { 20 };
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
            None
        }))
    }

    /// Section 6: grows the run to `target` active subjects, then reads both processes' VmRSS.
    pub async fn memory(&mut self, target: usize, idle: (u64, u64)) -> anyhow::Result<Section> {
        let fresh = target.saturating_sub(self.subjects as usize);
        if fresh > 0 {
            eprintln!("[bench] memory: {fresh} events for fresh subjects, to {target} active subjects");
            let messages = events(&format!("{}-mem", self.stack.id()), "m", fresh, fresh);
            self.produce(messages).await?;
            self.subjects += fresh as u64;
            self.wait_consumed(Duration::from_secs(300)).await?;
            self.wait_view(Duration::from_secs(300)).await?;
        }
        // Let deferred snapshots and allocator caches settle before reading.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let agg = rss_of(self.aggregator.as_ref().context("the aggregator is not running")?)?;
        let api = rss_of(self.api.as_ref().context("the API is not running")?)?;
        let mib = |b: u64| b as f64 / 1024.0 / 1024.0;
        let mut s = Section::default();
        s.figure("active_subjects", self.subjects as f64)
            .figure("aggregator_rss_mib", mib(agg))
            .figure("api_rss_mib", mib(api))
            .figure("aggregator_idle_rss_mib", mib(idle.0))
            .figure("api_idle_rss_mib", mib(idle.1))
            .figure("aggregator_bytes_per_subject", agg.saturating_sub(idle.0) as f64 / self.subjects.max(1) as f64)
            .figure("api_bytes_per_subject", api.saturating_sub(idle.1) as f64 / self.subjects.max(1) as f64)
            .ratio("aggregator_to_idle", agg as f64, idle.0 as f64)
            .ratio("api_to_idle", api as f64, idle.1 as f64)
            .target("aggregator < 256 MiB", mib(agg) < 256.0)
            .note("VmRSS from /proc/<pid>/status; idle = the same service started on empty topics earlier in the run");
        Ok(s)
    }
}

/// How long one probe took to become visible at the API.
struct ProbeTiming {
    total: Duration,
    /// `total` split at the refusing snapshot's `calculated_at` (the start of the batch that
    /// counted the probe): before and after. `None` if the snapshot has no such instant or it
    /// lies outside the probe (both processes read the same system clock).
    split: Option<(Duration, Duration)>,
}

impl ProbeTiming {
    fn split(total: Duration, produced_at: DateTime<Utc>, calculated_at: Option<DateTime<Utc>>) -> ProbeTiming {
        let queued = calculated_at.and_then(|at| (at - produced_at).to_std().ok()).filter(|q| *q <= total);
        ProbeTiming { total, split: queued.map(|q| (q, total - q)) }
    }
}

/// The background load's events, serialized once per subject. Each event is a copy of its
/// subject's template with the id's counter and the time written in place; both keep their
/// width (a zero-padded counter, a time in whole seconds), so a copy is byte for byte what
/// [`event`] gives for the same id and time, for a fraction of the CPU. The generator runs on
/// the cores it measures, standing in for gateways that would run elsewhere.
struct Templates {
    subjects: Vec<Template>,
    /// The width of every template's time.
    time_len: usize,
}

/// One subject's serialized event: where the id's counter and the time are.
struct Template {
    key: String,
    bytes: Vec<u8>,
    counter_at: usize,
    time_at: usize,
}

/// Digits of the counter in a background event's id (`<tag>-<counter>`).
const COUNTER_DIGITS: usize = 12;

impl Templates {
    fn new(tag: &str, subjects: usize, time: DateTime<Utc>) -> anyhow::Result<Templates> {
        let time = whole_seconds(time);
        let time_text = time_text(time);
        let id = Templates::id(tag, 0);
        let subjects = (0..subjects.max(1))
            .map(|s| {
                let (key, bytes) = event(id.clone(), format!("s{s}"), s, time, 300);
                let find = |needle: &str| bytes.windows(needle.len()).position(|w| w == needle.as_bytes());
                let counter_at = find(&format!("\"{id}\"")).context("the template has no id")? + 1 + tag.len() + 1;
                let time_at = find(&format!("\"{time_text}\"")).context("the template has no time")? + 1;
                Ok(Template { key, bytes, counter_at, time_at })
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Templates { subjects, time_len: time_text.len() })
    }

    fn id(tag: &str, n: u64) -> String {
        let mut counter = [0u8; COUNTER_DIGITS];
        write_counter(&mut counter, n);
        format!("{tag}-{}", String::from_utf8_lossy(&counter))
    }

    /// The `n`th event at `time` (whole seconds, as [`time_text`] writes them): its subject
    /// is the `n`th modulo the subjects. `None` when the counter or the time would not fit.
    fn event(&self, n: u64, time: &str) -> Option<(&str, Vec<u8>)> {
        let t = &self.subjects[(n % self.subjects.len() as u64) as usize];
        if time.len() != self.time_len {
            return None;
        }
        let mut bytes = t.bytes.clone();
        if !write_counter(&mut bytes[t.counter_at..t.counter_at + COUNTER_DIGITS], n) {
            return None;
        }
        bytes[t.time_at..t.time_at + time.len()].copy_from_slice(time.as_bytes());
        Some((&t.key, bytes))
    }
}

/// Writes `n` zero-padded into all of `digits`, with no allocation (the generator's hot
/// path); `false` when it has more digits than that.
fn write_counter(digits: &mut [u8], mut n: u64) -> bool {
    for d in digits.iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
    n == 0
}

fn whole_seconds(time: DateTime<Utc>) -> DateTime<Utc> {
    chrono::SubsecRound::trunc_subsecs(time, 0)
}

/// `time` (whole seconds) as the canonical form writes it, without the quotes.
fn time_text(time: DateTime<Utc>) -> String {
    serde_json::to_string(&time).unwrap_or_default().trim_matches('"').to_string()
}

/// Produces events at `rate` per second over `subjects` subjects until `duration` passed or
/// `stop` is set; returns how many were acknowledged.
pub(super) fn background_load(
    kafka: &KafkaSettings,
    tag: &str,
    subjects: usize,
    rate: f64,
    duration: Duration,
    stop: &AtomicBool,
) -> anyhow::Result<u64> {
    // A paced producer sends what each tick released; with the default 5 ms linger every
    // request is that small, and the broker's ~100 ms acknowledgement of five requests in
    // flight caps the rate near 14k/s. 50 ms lets each request carry five ticks.
    let producer: BaseProducer =
        kafka.producer_config().set("linger.ms", "50").create().context("failed to create the background producer")?;
    let templates = Templates::new(tag, subjects, Utc::now())?;
    let started = Instant::now();
    let tick = Duration::from_millis(10);
    let mut sent = 0u64;
    while started.elapsed() < duration && !stop.load(Ordering::Relaxed) {
        let due = (rate * started.elapsed().as_secs_f64()) as u64;
        let now = time_text(whole_seconds(Utc::now()));
        while sent < due {
            let (key, payload) = templates.event(sent, &now).context("a background event does not fit its template")?;
            match producer.send(BaseRecord::to(&kafka.usage_topic).key(key).payload(payload.as_slice())) {
                Ok(()) => sent += 1,
                Err(_) => break,
            }
        }
        producer.poll(Duration::ZERO);
        std::thread::sleep(tick);
    }
    producer.flush(Duration::from_secs(60)).context("the background load was not acknowledged")?;
    Ok(sent)
}

/// Probes for the unloaded floor of the decision latency: a fifth of the loaded ones, plus
/// the first, which warms the probe producer up and is left out.
fn idle_probe_count(probes: usize) -> usize {
    (probes / 5).max(1) + 1
}

/// Starts an aggregator and an API on empty topics of their own and reads their VmRSS once
/// they are up and settled: the memory baseline.
pub async fn idle_rss(stack: &Stack, idle_usage: &str, idle_decisions: &str) -> anyhow::Result<(u64, u64)> {
    let (agg_addr, api_addr) = (free_addr()?, free_addr()?);
    let env_agg = [
        ("TALLY_AGGREGATOR_LISTEN", agg_addr.clone()),
        ("TALLY_USAGE_TOPIC", idle_usage.to_string()),
        ("TALLY_DECISIONS_TOPIC", idle_decisions.to_string()),
        ("TALLY_AGGREGATOR_GROUP", format!("{}-idle", stack.group())),
    ];
    let mut agg = stack.spawn("aggregator", "aggregator-idle", &env_agg)?;
    let mut api =
        stack.spawn("api", "api-idle", &[("TALLY_API_LISTEN", api_addr.clone()), ("TALLY_DECISIONS_TOPIC", idle_decisions.to_string())])?;
    agg.wait_healthy(&format!("http://{agg_addr}"), Duration::from_secs(30)).await?;
    api.wait_healthy(&format!("http://{api_addr}"), Duration::from_secs(30)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok((rss_of(&agg)?, rss_of(&api)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_background_event_from_its_template_is_the_canonical_event() {
        let start: DateTime<Utc> = "2026-11-23T10:00:00.123456Z".parse().unwrap();
        let templates = Templates::new("run-bg", 3, start).unwrap();
        for (n, later) in [(0, 0), (1, 1), (5, 59), (123_456_789_012, 3661)] {
            let time = whole_seconds(start + chrono::Duration::seconds(later));
            let (key, bytes) = templates.event(n, &time_text(time)).unwrap();
            let subject = (n % 3) as usize;
            let expected = event(Templates::id("run-bg", n), format!("s{subject}"), subject, time, 300);
            assert_eq!((key.to_string(), bytes), expected, "event {n}");
        }
        // A counter or a time that would change the width is refused, not written over.
        assert!(templates.event(1_000_000_000_000, &time_text(whole_seconds(start))).is_none());
        assert!(templates.event(1, "2026-11-23T10:00:00.5Z").is_none());
    }

    #[test]
    fn a_probe_splits_at_the_snapshot_batch_start_only_when_it_lies_inside_the_probe() {
        let produced: DateTime<Utc> = "2026-11-23T10:00:00Z".parse().unwrap();
        let total = Duration::from_millis(900);
        let at = |ms: i64| Some(produced + chrono::Duration::milliseconds(ms));
        let t = ProbeTiming::split(total, produced, at(600));
        assert_eq!(t.split, Some((Duration::from_millis(600), Duration::from_millis(300))));
        assert_eq!(t.total, total);
        // A batch start before the produce call or after the answer is no split.
        assert_eq!(ProbeTiming::split(total, produced, at(-5)).split, None);
        assert_eq!(ProbeTiming::split(total, produced, at(901)).split, None);
        assert_eq!(ProbeTiming::split(total, produced, None).split, None);
    }
}
