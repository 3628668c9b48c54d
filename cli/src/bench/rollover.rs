//! The rollover storm: every blocked subject decided again at once when its period ends.
//!
//! Contract:
//! - The section runs a Tally of its own (names, databases and topics of a second run id,
//!   dropped at the end unless `--keep`), configured by [`storm_yaml`]: subjects whose events
//!   carry the storm API key are on a tier with one quota of one request per fixed window of
//!   `window_seconds` (aligned to the epoch), so one event blocks them until the window ends;
//!   every other subject is on a tier whose daily quota is never reached.
//! - It waits, when the current window has less than `lead` left, for the next window, so
//!   the block phase and the background load's lead-in fit before the boundary. In the window
//!   it first measures the baseline (single events at rest, produced one at a time, until the
//!   API answers `allowed: false`), then produces one event for each of `subjects` storm
//!   subjects and waits until the decisions topic holds a blocking snapshot for every one of
//!   them and the API answers `allowed: false` for the last of them on every partition. A
//!   block phase that does not finish before the boundary fails the section (the window is
//!   too short for the machine), rather than measuring something else.
//! - A background load of other subjects' events (`load_per_s`) starts a few seconds before
//!   the boundary and runs until the storm is over; the aggregator's counted-events metric is
//!   sampled every 100 ms throughout.
//! - From the boundary, the bench's own consumer of the decisions topic records, per storm
//!   subject, when the first allowing snapshot arrived (wall clock of this machine, the same
//!   clock as the boundary) and its produce timestamp. Once every subject arrived, the API is
//!   asked for the last unblocked subject of each partition (its feeder applies a partition
//!   in order, so the rest of the partition is visible before): the instant it answers
//!   `allowed: true` for all of them is the figure against the 2 s target, an upper bound by
//!   the few milliseconds of polling. A sweep over every storm subject at the API afterwards
//!   counts any still refused.
//! - Nothing here changes the services' behaviour; a missed target is a finding.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use rdkafka::consumer::BaseConsumer;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset};
use tally_common::kafka::KafkaSettings;
use tally_domain::decision::DecisionSnapshot;
use tally_domain::event::{hash_api_key, UsageEvent};
use tally_domain::heartbeat::is_heartbeat_key;

use super::broker::{self, Prepared};
use super::pipeline::{self, TIER_KEYS};
use super::report::{Latencies, Section};
use super::stack::{free_addr, scrape, Service, SharedServers, Stack};

/// The raw API key of the storm subjects' events (the configuration holds its SHA-256).
const STORM_KEY: &str = "bench-key-storm";

/// How long the background load runs before the boundary; its rate before the boundary is
/// taken over the last [`BEFORE_SPAN`] of it.
const LOAD_LEAD: Duration = Duration::from_secs(4);
const BEFORE_SPAN: Duration = Duration::from_secs(2);

/// The shortest span the storm's counting rate is taken over (a storm shorter than the
/// aggregator's batch interval would give a rate of noise).
const MIN_STORM_SPAN: Duration = Duration::from_secs(1);

/// Connections of the final sweep over every storm subject at the API.
const SWEEP_CONNECTIONS: usize = 32;

/// The sizes of one rollover section.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Subjects blocked before the boundary and unblocked by it.
    pub subjects: usize,
    /// The quota's fixed window.
    pub window_seconds: u64,
    /// The least time left in the window at which the block phase starts; otherwise it
    /// waits for the next window.
    pub lead: Duration,
    /// The background load's rate (events/s) and subjects.
    pub load_per_s: f64,
    pub load_subjects: usize,
    /// Single events at rest for the baseline (after one warm-up left out).
    pub rest_probes: usize,
    /// How long after the boundary the storm may take before the section gives up waiting.
    pub storm_timeout: Duration,
}

/// The storm's tier configuration: a storm tier (chosen by [`STORM_KEY`]) with a limit of
/// one request per window, and a default tier (also chosen by the pipeline's keys) whose
/// daily quota the background load never reaches.
pub fn storm_yaml(window_seconds: u64) -> String {
    let load_keys: String = TIER_KEYS.iter().flatten().map(|k| format!("  - key_sha256: {}\n    tier: load\n", hash_api_key(k))).collect();
    format!(
        "# tally bench rollover: one request per {window_seconds}s window blocks a storm subject.
default_tier: load
timezone: UTC
quotas: []
tiers:
  - name: load
    quotas:
      - name: daily_requests
        metric: requests
        period: day
        limit: 1000000000000
  - name: storm
    quotas:
      - name: storm
        metric: requests
        period: {window_seconds}s
        limit: 1
api_keys:
  - key_sha256: {storm}
    tier: storm
{load_keys}",
        storm = hash_api_key(STORM_KEY),
    )
}

/// One event of a storm subject (the storm key chooses its tier), keyed by subject.
fn storm_event(id: String, subject: String, time: DateTime<Utc>) -> Prepared {
    let e = UsageEvent {
        id,
        subject,
        time,
        api_key_sha256: Some(hash_api_key(STORM_KEY)),
        scope: "chat".into(),
        model: None,
        group: None,
        requests: 1,
        input_tokens: 10,
        output_tokens: 10,
        cached_tokens: 0,
        cost_micros: Some(0),
        attributes: Default::default(),
        corrects: None,
    };
    let bytes = e.to_canonical_json();
    (e.subject, bytes)
}

fn storm_subject(i: usize) -> String {
    format!("storm{i}")
}

/// When the block phase starts and which boundary ends its window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    pub start_at: DateTime<Utc>,
    pub boundary: DateTime<Utc>,
}

/// Windows are multiples of `window_seconds` since the epoch: the block phase starts now if
/// at least `lead` is left before the current window ends, else at the next window's start.
pub fn schedule(now: DateTime<Utc>, window_seconds: u64, lead: Duration) -> Schedule {
    let window = window_seconds.max(1) as i64 * 1000;
    let ms = now.timestamp_millis();
    let end = ms - ms.rem_euclid(window) + window;
    let at = |ms: i64| DateTime::from_timestamp_millis(ms).unwrap_or(now);
    if end - ms >= lead.as_millis() as i64 {
        Schedule { start_at: now, boundary: at(end) }
    } else {
        Schedule { start_at: at(end), boundary: at(end + window) }
    }
}

/// Each instant's delay after `boundary` (0 for an instant before it).
pub fn delays_after(boundary: DateTime<Utc>, instants: impl IntoIterator<Item = DateTime<Utc>>) -> Latencies {
    let mut l = Latencies::default();
    for at in instants {
        l.push((at - boundary).to_std().unwrap_or(Duration::ZERO));
    }
    l
}

/// A reading of a counter at an instant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub at: DateTime<Utc>,
    pub value: f64,
}

/// The counter's rate per second between the first sample at or after `from` and the last
/// at or before `to`; `None` without two such samples.
pub fn rate_between(samples: &[Sample], from: DateTime<Utc>, to: DateTime<Utc>) -> Option<f64> {
    let first = samples.iter().find(|s| s.at >= from)?;
    let last = samples.iter().rev().find(|s| s.at <= to)?;
    let seconds = (last.at - first.at).num_microseconds()? as f64 / 1e6;
    (seconds > 0.0).then(|| (last.value - first.value) / seconds)
}

/// When a storm subject's first allowing snapshot reached the bench.
#[derive(Debug, Clone, Copy)]
struct Unblock {
    seen_at: DateTime<Utc>,
    /// The record's produce timestamp (the relay's), when the broker kept one.
    published_at: Option<DateTime<Utc>>,
}

/// What the bench's consumer of the decisions topic has seen of the storm subjects.
#[derive(Default)]
struct Seen {
    blocked: HashSet<String>,
    /// Per partition, the storm subject whose blocking snapshot came last.
    last_blocked: HashMap<i32, String>,
    unblocks: HashMap<String, Unblock>,
    /// Per partition, the storm subject whose allowing snapshot came last.
    last_unblocked: HashMap<i32, String>,
}

impl Seen {
    /// Takes in one snapshot of a storm subject from `partition`.
    fn offer(&mut self, partition: i32, snapshot: &DecisionSnapshot, published_at: Option<DateTime<Utc>>) {
        let subject = &snapshot.subject;
        if !snapshot.allowed {
            self.blocked.insert(subject.clone());
            self.last_blocked.insert(partition, subject.clone());
        } else if self.blocked.contains(subject) && !self.unblocks.contains_key(subject) {
            self.unblocks.insert(subject.clone(), Unblock { seen_at: Utc::now(), published_at });
            self.last_unblocked.insert(partition, subject.clone());
        }
    }
}

/// The bench's consumer of the decisions topic, on a thread of its own.
struct Watcher {
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    thread: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Watcher {
    fn start(kafka: &KafkaSettings) -> anyhow::Result<Watcher> {
        let consumer = broker::assigned_consumer(kafka, &kafka.decisions_topic, Offset::Beginning)?;
        let (seen, stop) = (Arc::new(Mutex::new(Seen::default())), Arc::new(AtomicBool::new(false)));
        let (s, st) = (seen.clone(), stop.clone());
        let thread = tokio::task::spawn_blocking(move || watch(&consumer, &s, &st));
        Ok(Watcher { seen, stop, thread })
    }

    fn read<T>(&self, f: impl FnOnce(&Seen) -> T) -> T {
        f(&self.seen.lock().unwrap_or_else(|e| e.into_inner()))
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.await?
    }
}

fn watch(consumer: &BaseConsumer, seen: &Mutex<Seen>, stop: &AtomicBool) -> anyhow::Result<()> {
    while !stop.load(Ordering::Relaxed) {
        let message = match consumer.poll(Duration::from_millis(50)) {
            Some(Ok(m)) => m,
            Some(Err(e)) => bail!("failed to consume the decisions topic: {e}"),
            None => continue,
        };
        if is_heartbeat_key(message.key()) || !message.key().is_some_and(|k| k.starts_with(b"storm")) {
            continue;
        }
        let Some(Ok(snapshot)) = message.payload().map(serde_json::from_slice::<DecisionSnapshot>) else { continue };
        let published_at = message.timestamp().to_millis().and_then(DateTime::from_timestamp_millis);
        seen.lock().unwrap_or_else(|e| e.into_inner()).offer(message.partition(), &snapshot, published_at);
    }
    Ok(())
}

/// The section's Tally: its aggregator and API.
struct Storm {
    stack: Stack,
    kafka: KafkaSettings,
    http: reqwest::Client,
    aggregator: Service,
    aggregator_addr: String,
    api: Service,
    api_addr: String,
}

/// Runs the section on a Tally of its own and removes it afterwards (unless `keep`).
pub async fn measure(servers: &SharedServers<'_>, plan: &Plan, keep: bool) -> anyhow::Result<Section> {
    let stack = Stack::new(servers.brokers, servers.database_url, servers.clickhouse_url, &storm_yaml(plan.window_seconds))?;
    eprintln!("[bench] rollover: run {} (service logs in {})", stack.id(), stack.log_dir().display());
    let outcome = async {
        stack.setup(&[]).await.context("tally setup for the rollover section failed")?;
        Storm::start(stack.clone()).await?.run(plan).await
    }
    .await;
    if !keep {
        stack.teardown(&stack.all_topics(&[])).await;
        if outcome.is_ok() {
            let _ = std::fs::remove_dir_all(stack.log_dir());
        }
    }
    outcome
}

impl Storm {
    async fn start(stack: Stack) -> anyhow::Result<Storm> {
        let (aggregator_addr, api_addr) = (free_addr()?, free_addr()?);
        let mut aggregator = stack.spawn("aggregator", "aggregator", &[("TALLY_AGGREGATOR_LISTEN", aggregator_addr.clone())])?;
        let mut api = stack.spawn("api", "api", &[("TALLY_API_LISTEN", api_addr.clone())])?;
        aggregator.wait_healthy(&format!("http://{aggregator_addr}"), Duration::from_secs(30)).await?;
        api.wait_healthy(&format!("http://{api_addr}"), Duration::from_secs(30)).await?;
        Ok(Storm { kafka: stack.kafka(), http: stack.http(Duration::from_secs(10))?, stack, aggregator, aggregator_addr, api, api_addr })
    }

    async fn run(mut self, plan: &Plan) -> anyhow::Result<Section> {
        let schedule = schedule(Utc::now(), plan.window_seconds, plan.lead);
        sleep_until(schedule.start_at).await;
        let boundary = schedule.boundary;
        eprintln!("[bench] rollover: {} subjects blocked in the window ending {boundary}", plan.subjects);
        let watcher = Watcher::start(&self.kafka)?;
        let rest = self.rest_latency(plan.rest_probes).await?;
        let blocking = Instant::now();
        self.block(plan.subjects, boundary, &watcher).await?;
        let block_seconds = blocking.elapsed().as_secs_f64();

        sleep_until(boundary - LOAD_LEAD).await;
        let load = self.start_load(plan, boundary);
        let sampler = Sampler::start(self.http.clone(), self.aggregator_addr.clone());
        let checks_before = scrape(&self.http, &self.aggregator_addr, "tally_aggregator_scheduled_checks_total").await.unwrap_or(0.0);
        sleep_until(boundary).await;
        eprintln!("[bench] rollover: the boundary passed; waiting for {} unblocks", plan.subjects);

        let storm = self.wait_unblocked(plan, boundary, &watcher).await?;
        tokio::time::sleep(MIN_STORM_SPAN.saturating_sub((Utc::now() - boundary).to_std().unwrap_or_default())).await;
        load.stop.store(true, Ordering::Relaxed);
        let samples = sampler.stop().await;
        let load_sent = load.thread.await??;
        let checks =
            scrape(&self.http, &self.aggregator_addr, "tally_aggregator_scheduled_checks_total").await.unwrap_or(0.0) - checks_before;
        let still_blocked = self.sweep(plan.subjects).await;
        let unblocks: Vec<Unblock> = watcher.read(|s| s.unblocks.values().copied().collect());
        watcher.stop().await?;
        self.aggregator.ensure_running()?;
        self.api.ensure_running()?;

        let counting = Counting::of(&samples, boundary, storm.api_visible_at.unwrap_or_else(Utc::now));
        let measured = Measured { plan, boundary, block_seconds, rest, storm, unblocks, counting, load_sent, checks, still_blocked };
        Ok(measured.section())
    }

    /// Single storm events at rest, one at a time: produce to `allowed: false` at the API.
    /// The first warms the producer up and is left out.
    async fn rest_latency(&self, probes: usize) -> anyhow::Result<Latencies> {
        let producer: FutureProducer = self.kafka.producer_config().create().context("failed to create the probe producer")?;
        let mut rest = Latencies::default();
        for k in 0..=probes {
            let subject = format!("rest{k}");
            let (key, payload) = storm_event(format!("{}-rest-{k}", self.stack.id()), subject.clone(), Utc::now());
            let started = Instant::now();
            producer
                .send(FutureRecord::to(&self.kafka.usage_topic).key(&key).payload(&payload), Duration::from_secs(10))
                .await
                .map_err(|(e, _)| anyhow::anyhow!("failed to produce a rest probe: {e}"))?;
            let visible = self.poll_until(&subject, false, started + Duration::from_secs(10), Duration::from_millis(2)).await;
            match visible {
                Some(()) if k > 0 => rest.push(started.elapsed()),
                Some(()) => {}
                None => bail!("a rest probe was not refused at the API within 10 s"),
            }
        }
        Ok(rest)
    }

    /// Polls the API every `pause` until it answers `allowed == want` for `subject`, or `deadline`.
    async fn poll_until(&self, subject: &str, want: bool, deadline: Instant, pause: Duration) -> Option<()> {
        while Instant::now() < deadline {
            if self.allowed(subject).await == Some(want) {
                return Some(());
            }
            tokio::time::sleep(pause).await;
        }
        None
    }

    async fn allowed(&self, subject: &str) -> Option<bool> {
        allowed_at(&self.http, &self.api_addr, subject).await
    }

    /// One event for each storm subject, then waits until every one is blocked on the topic
    /// and at the API, all before `boundary`.
    async fn block(&mut self, subjects: usize, boundary: DateTime<Utc>, watcher: &Watcher) -> anyhow::Result<()> {
        let now = Utc::now();
        let messages: Vec<Prepared> =
            (0..subjects).map(|i| storm_event(format!("{}-storm-{i}", self.stack.id()), storm_subject(i), now)).collect();
        let kafka = self.kafka.clone();
        tokio::task::spawn_blocking(move || broker::produce_all(&kafka, &kafka.usage_topic, &messages)).await??;
        let too_late = boundary - chrono::Duration::from_std(LOAD_LEAD).unwrap_or_default();
        while watcher.read(|s| s.blocked.len()) < subjects {
            self.aggregator.ensure_running()?;
            if Utc::now() >= too_late {
                let n = watcher.read(|s| s.blocked.len());
                bail!("only {n} of {subjects} subjects were blocked {LOAD_LEAD:?} before the boundary: the window is too short for this machine");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let last: Vec<String> = watcher.read(|s| s.last_blocked.values().cloned().collect());
        let deadline = Instant::now() + (too_late - Utc::now()).to_std().unwrap_or_default();
        for subject in &last {
            if self.poll_until(subject, false, deadline, Duration::from_millis(10)).await.is_none() {
                bail!("the API did not refuse {subject} {LOAD_LEAD:?} before the boundary");
            }
        }
        Ok(())
    }

    /// The background load, from now until stopped (or the window after the boundary).
    fn start_load(&self, plan: &Plan, boundary: DateTime<Utc>) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let (kafka, tag, st) = (self.kafka.clone(), format!("{}-load", self.stack.id()), stop.clone());
        let (rate, subjects) = (plan.load_per_s, plan.load_subjects);
        let longest = LOAD_LEAD + plan.storm_timeout + (boundary - Utc::now()).to_std().unwrap_or_default();
        let thread = tokio::task::spawn_blocking(move || pipeline::background_load(&kafka, &tag, subjects, rate, longest, &st));
        Load { stop, thread }
    }

    /// Waits until every storm subject's unblock is on the topic, then until the API allows
    /// the last unblocked subject of every partition.
    async fn wait_unblocked(&mut self, plan: &Plan, boundary: DateTime<Utc>, watcher: &Watcher) -> anyhow::Result<StormEnd> {
        let deadline = Instant::now() + plan.storm_timeout;
        while watcher.read(|s| s.unblocks.len()) < plan.subjects {
            self.aggregator.ensure_running()?;
            if Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let topic_done_at = Utc::now();
        let last: Vec<String> = watcher.read(|s| s.last_unblocked.values().cloned().collect());
        let mut all = !last.is_empty();
        for subject in &last {
            all &= self
                .poll_until(subject, true, deadline.max(Instant::now() + Duration::from_secs(5)), Duration::from_millis(1))
                .await
                .is_some();
        }
        let api_visible_at = all.then(Utc::now);
        Ok(StormEnd { topic_done_at: topic_done_at.max(boundary), api_visible_at })
    }

    /// Storm subjects the API still refuses, asked once each after the storm.
    async fn sweep(&self, subjects: usize) -> usize {
        let (http, addr) = (&self.http, &self.api_addr);
        futures::stream::iter(0..subjects)
            .map(|i| async move { allowed_at(http, addr, &storm_subject(i)).await })
            .buffer_unordered(SWEEP_CONNECTIONS)
            .filter(|a| std::future::ready(*a != Some(true)))
            .count()
            .await
    }
}

/// `allowed` of `subject`'s decision at the API (`None` when there is none or it failed).
async fn allowed_at(http: &reqwest::Client, api_addr: &str, subject: &str) -> Option<bool> {
    let r = http.get(format!("http://{api_addr}/v1/subjects/{subject}/decision")).send().await.ok()?;
    if !r.status().is_success() {
        return None;
    }
    r.json::<serde_json::Value>().await.ok()?["allowed"].as_bool()
}

async fn sleep_until(at: DateTime<Utc>) {
    if let Ok(wait) = (at - Utc::now()).to_std() {
        tokio::time::sleep(wait).await;
    }
}

/// The running background load.
struct Load {
    stop: Arc<AtomicBool>,
    thread: tokio::task::JoinHandle<anyhow::Result<u64>>,
}

/// Reads the aggregator's counted-events metric every 100 ms until stopped.
struct Sampler {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<Sample>>,
}

impl Sampler {
    fn start(http: reqwest::Client, addr: String) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let task = tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            while !st.load(Ordering::Relaxed) {
                tick.tick().await;
                if let Ok(value) = scrape(&http, &addr, "tally_aggregator_events_counted_total").await {
                    samples.push(Sample { at: Utc::now(), value });
                }
            }
            samples
        });
        Sampler { stop, task }
    }

    async fn stop(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap_or_default()
    }
}

/// When the storm ended: on the topic, and at the API (`None` if the API never allowed the
/// last subjects within the timeout).
struct StormEnd {
    topic_done_at: DateTime<Utc>,
    api_visible_at: Option<DateTime<Utc>>,
}

/// The pipeline's counting rate before the boundary and during the storm.
struct Counting {
    before_per_s: Option<f64>,
    storm_per_s: Option<f64>,
    storm_span: Duration,
}

impl Counting {
    fn of(samples: &[Sample], boundary: DateTime<Utc>, storm_end: DateTime<Utc>) -> Counting {
        let span = |d: Duration| chrono::Duration::from_std(d).unwrap_or_default();
        let end = storm_end.max(boundary + span(MIN_STORM_SPAN));
        Counting {
            before_per_s: rate_between(samples, boundary - span(BEFORE_SPAN), boundary),
            storm_per_s: rate_between(samples, boundary, end),
            storm_span: (end - boundary).to_std().unwrap_or_default(),
        }
    }
}

/// Everything the section measured, made into its report.
struct Measured<'a> {
    plan: &'a Plan,
    boundary: DateTime<Utc>,
    block_seconds: f64,
    rest: Latencies,
    storm: StormEnd,
    unblocks: Vec<Unblock>,
    counting: Counting,
    load_sent: u64,
    checks: f64,
    still_blocked: usize,
}

/// The storm's counting rate must stay at or above this share of the rate before it.
const COUNTING_FLOOR: f64 = 0.5;

impl Measured<'_> {
    fn section(&self) -> Section {
        let seen = delays_after(self.boundary, self.unblocks.iter().map(|u| u.seen_at));
        let published = delays_after(self.boundary, self.unblocks.iter().filter_map(|u| u.published_at));
        let ms = |at: DateTime<Utc>| (at - self.boundary).num_microseconds().unwrap_or(0) as f64 / 1000.0;
        let last_at_api_ms = self.storm.api_visible_at.map(ms);
        let (before, during) = (self.counting.before_per_s.unwrap_or(0.0), self.counting.storm_per_s.unwrap_or(0.0));
        let mut s = Section::default();
        s.figure("subjects", self.plan.subjects as f64)
            .figure("window_seconds", self.plan.window_seconds as f64)
            .figure("block_phase_seconds", self.block_seconds)
            .figure("unblocks_seen", self.unblocks.len() as f64)
            .latencies("unblock_seen", &seen)
            .latencies("unblock_published", &published)
            .figure("last_unblock_on_topic_ms", ms(self.storm.topic_done_at))
            .figure("last_unblock_at_api_ms", last_at_api_ms.unwrap_or(0.0))
            .figure("still_blocked_at_api_after", self.still_blocked as f64)
            .figure("scheduled_checks", self.checks)
            .latencies("rest_decision", &self.rest)
            .figure("load_target_per_s", self.plan.load_per_s)
            .figure("load_events_sent", self.load_sent as f64)
            .figure("counted_per_s_before", before)
            .figure("counted_per_s_during_storm", during)
            .figure("storm_span_ms", self.counting.storm_span.as_secs_f64() * 1000.0)
            .ratio("last_unblock_at_api_to_rest_decision_p50", last_at_api_ms.unwrap_or(0.0), self.rest.p50_ms())
            .ratio("unblock_seen_p50_to_rest_decision_p50", seen.p50_ms(), self.rest.p50_ms())
            .ratio("counted_during_storm_to_before", during, before)
            .target("last unblock visible at the API within 2 s of the boundary", last_at_api_ms.is_some_and(|ms| ms <= 2000.0))
            .target(
                &format!("the pipeline counts at least {COUNTING_FLOOR} of its rate before the boundary during the storm"),
                before > 0.0 && during >= COUNTING_FLOOR * before,
            );
        self.notes(&mut s);
        s
    }

    fn notes(&self, s: &mut Section) {
        let missing = self.plan.subjects.saturating_sub(self.unblocks.len());
        s.note(format!(
            "{} subjects on a tier of one request per fixed {}s window, each blocked by one event well before the boundary; \
             delays from the boundary (wall clock of this machine, as the aggregator's)",
            self.plan.subjects, self.plan.window_seconds
        ))
        .note(
            "unblock_seen: the first allowing snapshot of each subject read by the bench's own consumer of the decisions topic \
             (what the API's feeder reads); unblock_published: the record's produce timestamp (the relay's)",
        )
        .note(
            "last_unblock_at_api_ms: after the topic held every unblock, the API's decision route was polled (every 1 ms) for the \
             last unblocked subject of each partition until it allowed all of them: an upper bound by the polling. The feeder applies \
             a partition in order, so every earlier unblock was visible then; a sweep over every subject counts still_blocked_at_api_after",
        )
        .note(
            "POST /v1/check already counts a quota whose resets_at passed as reset, so a gateway that checks sees the unblock at the \
             boundary itself; the figure here is the published decision (GET /v1/subjects/{subject}/decision, the decisions topic)",
        )
        .note(format!(
            "rest_decision: {} single storm events at rest, produced one at a time, until the API refused the subject (after one \
             warm-up left out): the baseline; their subjects unblock at the same boundary, a handful beside the storm's",
            self.rest.len()
        ))
        .note(format!(
            "background load: {} events/s over {} other subjects from {}s before the boundary; counted_per_s from the aggregator's \
             tally_aggregator_events_counted_total sampled every 100 ms, before = the {}s before the boundary, during = from the \
             boundary to the last unblock at the API (at least {}s)",
            self.plan.load_per_s,
            self.plan.load_subjects,
            LOAD_LEAD.as_secs(),
            BEFORE_SPAN.as_secs(),
            MIN_STORM_SPAN.as_secs()
        ));
        if missing > 0 {
            s.note(format!("{missing} subjects' unblocks were not on the topic within {:?} of the boundary", self.plan.storm_timeout));
        }
        if self.storm.api_visible_at.is_none() {
            s.note("the API did not allow the last unblocked subjects within the timeout: last_unblock_at_api_ms is left at 0");
        }
    }
}

#[cfg(test)]
mod tests {
    use tally_domain::config::Config;

    use super::*;

    fn t(text: &str) -> DateTime<Utc> {
        text.parse().unwrap()
    }

    #[test]
    fn the_block_phase_starts_now_when_the_window_has_the_lead_left_else_at_the_next_window() {
        let lead = Duration::from_secs(20);
        let now = t("2026-12-07T10:00:30Z");
        assert_eq!(schedule(now, 60, lead), Schedule { start_at: now, boundary: t("2026-12-07T10:01:00Z") });
        // Exactly the lead left still fits.
        let now = t("2026-12-07T10:00:40Z");
        assert_eq!(schedule(now, 60, lead).boundary, t("2026-12-07T10:01:00Z"));
        let now = t("2026-12-07T10:00:40.001Z");
        assert_eq!(schedule(now, 60, lead), Schedule { start_at: t("2026-12-07T10:01:00Z"), boundary: t("2026-12-07T10:02:00Z") });
        // Windows are multiples of their length since the epoch, not of the minute.
        let now = t("2026-12-07T10:00:05Z");
        assert_eq!(schedule(now, 7, Duration::from_secs(1)).boundary, DateTime::from_timestamp((now.timestamp() / 7 + 1) * 7, 0).unwrap());
    }

    #[test]
    fn delays_count_from_the_boundary_and_an_instant_before_it_is_zero() {
        let boundary = t("2026-12-07T10:01:00Z");
        let at = |ms: i64| boundary + chrono::Duration::milliseconds(ms);
        let d = delays_after(boundary, [at(300), at(-5), at(1200), at(40)]);
        assert_eq!(d.len(), 4);
        assert_eq!(d.max_ms(), 1200.0);
        assert_eq!(d.p50_ms(), 40.0);
        assert_eq!(d.quantile_ms(0.25), 0.0);
    }

    #[test]
    fn the_rate_is_taken_between_the_samples_inside_the_span() {
        let base = t("2026-12-07T10:00:00Z");
        let s = |ms: i64, value: f64| Sample { at: base + chrono::Duration::milliseconds(ms), value };
        let samples = [s(0, 0.0), s(100, 50.0), s(1100, 1050.0), s(2100, 1100.0)];
        let at = |ms: i64| base + chrono::Duration::milliseconds(ms);
        assert_eq!(rate_between(&samples, at(50), at(1100)), Some(1000.0));
        assert_eq!(rate_between(&samples, at(1100), at(2200)), Some(50.0));
        // One sample (or none) inside the span is no rate.
        assert_eq!(rate_between(&samples, at(1500), at(2200)), None);
        assert_eq!(rate_between(&samples, at(3000), at(4000)), None);
    }

    #[test]
    fn the_storm_configuration_blocks_storm_keys_after_one_request_per_window() {
        let config = Config::from_yaml_str(&storm_yaml(30)).expect("the storm configuration is valid");
        let storm = config.tiers.iter().find(|t| t.name == "storm").expect("a storm tier");
        let quota = &storm.quotas[0];
        assert_eq!((quota.limit, quota.period.to_string()), (1, "30s".to_string()));
        assert_eq!(config.api_keys.get(&hash_api_key(STORM_KEY)).map(|k| k.tier.as_str()), Some("storm"));
        for key in TIER_KEYS.iter().flatten() {
            assert_eq!(config.api_keys.get(&hash_api_key(key)).map(|k| k.tier.as_str()), Some("load"), "{key}");
        }
        assert_eq!(config.default_tier, "load");
    }

    #[test]
    fn a_storm_subject_unblocks_once_and_only_after_it_was_blocked() {
        let snapshot = |subject: &str, allowed: bool| DecisionSnapshot {
            subject: subject.into(),
            allowed,
            version: 1,
            calculated_at: Utc::now(),
            tier: "storm".into(),
            budget: None,
            quotas: Vec::new(),
        };
        let mut seen = Seen::default();
        seen.offer(0, &snapshot("storm1", true), None);
        assert!(seen.unblocks.is_empty(), "allowed before being blocked is no unblock");
        seen.offer(0, &snapshot("storm1", false), None);
        seen.offer(1, &snapshot("storm2", false), None);
        assert_eq!(seen.last_blocked.get(&1).map(String::as_str), Some("storm2"));
        seen.offer(0, &snapshot("storm1", true), None);
        let first = seen.unblocks["storm1"].seen_at;
        seen.offer(0, &snapshot("storm1", true), None);
        assert_eq!(seen.unblocks.len(), 1);
        assert_eq!(seen.unblocks["storm1"].seen_at, first, "a later allowing snapshot does not move the unblock");
        assert_eq!(seen.last_unblocked.get(&0).map(String::as_str), Some("storm1"));
    }
}
