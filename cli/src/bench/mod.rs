//! `tally bench`: Tally's figures on the local stack, each beside a baseline from the same run.
//!
//! Contract:
//! - It uses the servers named by `TALLY_KAFKA_BROKERS`, `TALLY_DATABASE_URL` and
//!   `TALLY_CLICKHOUSE_URL`, with topics, a Postgres database, a ClickHouse database and
//!   consumer groups of its own (named after a random run id), prepared by `tally setup`.
//!   It never touches another run's or the services' default names, and drops its databases
//!   and topics at the end (`--keep` keeps them). Service logs go to a temporary directory,
//!   removed after a successful run without `--keep`.
//! - The services it measures are child processes of the current `tally` binary with the
//!   run's environment; each is stopped by its pid when the bench is done with it, on error
//!   too. Everything is on loopback.
//! - The sections run in this order, so the broker's ceiling is known before anything is set
//!   against it: broker, pipeline, decision_latency, memory, check, ingest, history,
//!   history_writer, budgets, steady_state, rollover. The last four run on Tallys of their
//!   own (other run ids; budgets and rollover with tier configurations of their own) after
//!   the others' services are stopped; `--only history-writer`, `--only budgets`, `--only
//!   steady-state` and `--only rollover` run one of them alone (history_writer and budgets
//!   then measure the broker's ceiling themselves).
//! - The report (table on stdout, JSON with `--json`) has per section `figures`, `ratios`
//!   against a baseline of the same run, `targets` (met or missed) and `notes`. A missed
//!   target is a finding, not a failure: the exit status is non-zero only when the bench
//!   could not measure.

mod broker;
mod budgets;
mod calibrate;
mod history;
mod history_writer;
mod http;
mod load;
mod pipeline;
mod report;
mod rollover;
mod stack;
mod steady;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;

use report::{Machine, Report};
use stack::{free_addr, SharedServers, Stack};

/// `tally bench --help`: what each section measures (the long help of the command).
pub const LONG_ABOUT: &str = "Measure Tally on the local stack: every figure beside a baseline from the same run.

Sections, in the order they run:

1. broker: raw produce and consume rates of the broker for usage-event-shaped messages
   (keyed, 4 partitions, idempotent lz4 producer; consumer with partitions assigned by
   hand), and its produce-to-consume round trip. The ceiling the later sections are set
   against.

2. pipeline: events/s through the aggregator with exactly-once on (subjects on three
   tiers, four quotas each), events pre-produced, timed from the first to the last
   committed batch; ratio to the broker's consume rate.

3. decision_latency: event produced to changed snapshot visible at the API, p50/p99/max,
   under a background load at half the pipeline's throughput (`--decision-load`), also
   split at the start of the batch that counted the probe (queued / from batch start);
   ratio to the broker round trip. Also where the machine's CPU went meanwhile: the idle
   share, and the aggregator's, Postgres', the API's, the broker's and the bench's own.

4. check: POST /v1/check requests/s and p50/p99 from a closed-loop generator on loopback
   (the decision read when the build has no check route); baselines GET /healthz of the
   same server and `redis-benchmark -t get` when Redis is present. Also the CPU the API
   and the generator (one thread, like redis-benchmark) spend per request.

5. history: p50/p99 of a 30-day daily series for one subject and a top-20 through the
   API, over synthetic rows generated in ClickHouse (10 million; `--quick` far fewer);
   baseline a `SELECT 1` straight to ClickHouse.

6. memory: aggregator and API VmRSS with 100k active subjects (`--quick` fewer); baseline
   the same services idle.

7. ingest: POST /v1/events events/s with batches of 100; ratio to the broker's produce
   rate.

8. history_writer: the history writer's events/s into ClickHouse while the aggregator
   counts the same pre-produced events (the pipeline section's) at the same time, both
   started together and each timed from its first to its last committed batch; ratio
   writer / aggregator. History lag p50/p99 under that load: the age of the oldest message
   the ledger has committed and history has not, sampled every 20 ms. The whole pipeline
   (ledger and history both done) as a ratio to the broker's consume rate. CPU per event of
   the writer, the aggregator, Postgres, ClickHouse and the broker, and the time per phase
   of a writer batch. Fails if history does not hold exactly the events produced. Runs on
   a Tally of its own; `--only history-writer` runs it alone (measuring the broker first).

9. steady_state: the pipeline count of section 2 on a database holding a month of past
   (`--past-records` dedupe records spread over the days the lateness window keeps, 100
   million by default; `--past-subjects` subjects with ledgers and decisions, a million),
   against the same count on a fresh database; ratio steady / fresh, and the CPU per event
   of both. Loading 100 million records takes about 10 minutes and 35 GB of disk;
   the section checks the room first. Runs on Tallys of its own; `--only steady-state`
   runs it alone.

10. rollover: 100k subjects (`--rollover-subjects`; `--quick` fewer) blocked by one event
   each in a short fixed window (60 s; quick 10 s), then the boundary: from it until the
   last unblock is visible at the API (GET decision), with p50/p99/max of each subject's
   unblock on the decisions topic, while a background load of other subjects runs
   (`--rollover-load` events/s); its counted events/s during the storm against before the
   boundary. Ratio to a single event's decision latency at rest in the same section. Runs
   on a Tally of its own, last; `--only rollover` runs it alone.

11. budgets: the pipeline count of section 2 where every event meets three budgets beside
   its subject's own quotas (its API key's, its team's, its tier's pool: pooled rows every
   batch of every lane updates), against the same count without budgets and against the
   broker's consume rate. Runs on Tallys of its own, after history_writer; `--only
   budgets` runs it alone (measuring the broker first).";

/// The command line of `tally bench` (see [`LONG_ABOUT`]).
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// A short run (well under a minute) with small sizes: proves the harness, not the targets.
    #[arg(long)]
    pub quick: bool,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Bootstrap brokers.
    #[arg(long = "kafka-brokers", env = "TALLY_KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub brokers: String,
    /// A Postgres URL on the server; the bench uses a database of its own on it.
    #[arg(long = "database-url", env = "TALLY_DATABASE_URL", default_value = "postgres://postgres@127.0.0.1:5432/tally")]
    pub database_url: String,
    /// ClickHouse HTTP URL; the bench uses a database of its own on it.
    #[arg(long = "clickhouse-url", env = "TALLY_CLICKHOUSE_URL", default_value = "http://127.0.0.1:8123")]
    pub clickhouse_url: String,
    /// Redis for the check baseline (skipped when it does not answer).
    #[arg(long, env = "TALLY_BENCH_REDIS", default_value = "127.0.0.1:6379")]
    pub redis: String,
    /// Events through the pipeline (default 600000, quick 10000).
    #[arg(long)]
    pub events: Option<usize>,
    /// Subjects of the pipeline load (default 10000, quick 1000).
    #[arg(long)]
    pub subjects: Option<usize>,
    /// Active subjects for the memory section (default 100000, quick 3000).
    #[arg(long)]
    pub memory_subjects: Option<usize>,
    /// Raw usage rows generated in ClickHouse (default 10000000, quick 100000).
    #[arg(long)]
    pub history_rows: Option<u64>,
    /// Keep the run's databases and topics.
    #[arg(long)]
    pub keep: bool,
    /// The decision section's background load, as a fraction of the measured pipeline
    /// throughput (more than 0, at most 1). The target is set at 0.5; other
    /// fractions show how the latency grows with the load.
    #[arg(long, default_value_t = 0.5, value_parser = load_fraction)]
    pub decision_load: f64,
    /// Subjects blocked before the rollover section's boundary (default 100000, quick 2000).
    #[arg(long)]
    pub rollover_subjects: Option<usize>,
    /// The rollover section's background load in events/s (default 10000, quick 1000).
    #[arg(long)]
    pub rollover_load: Option<f64>,
    /// Dedupe records of the past the steady-state section loads (default 100000000, quick
    /// 100000). About 350 bytes each at rest: 100 million take about 35 GB (42 GB free are
    /// asked for) and about 10 minutes to load on 2 cores.
    #[arg(long)]
    pub past_records: Option<u64>,
    /// Subjects of the past the steady-state section loads, each with its ledgers and
    /// decision (default 1000000, quick 2000).
    #[arg(long)]
    pub past_subjects: Option<usize>,
    /// Run only this section (only sections that stand alone can be named).
    #[arg(long, value_enum)]
    pub only: Option<Standalone>,
}

/// The sections that can run alone (`--only`): they need no figure of another section.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Standalone {
    HistoryWriter,
    Budgets,
    SteadyState,
    Rollover,
}

/// Parses `--decision-load`: a fraction in (0, 1].
fn load_fraction(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(f) if f > 0.0 && f <= 1.0 => Ok(f),
        Ok(f) => Err(format!("{f} is not a fraction of the throughput: give more than 0 and at most 1 (0.5 is half)")),
        Err(e) => Err(format!("{text:?} is not a number: {e}")),
    }
}

/// The lateness window of the bench's aggregators: the services' default.
const LATENESS_DAYS: i64 = tally_aggregator::DEFAULT_LATENESS_DAYS;

/// The sizes of one run.
struct Sizes {
    broker_messages: usize,
    round_trips: usize,
    events: usize,
    subjects: usize,
    probes: usize,
    decision_seconds: u64,
    memory_subjects: usize,
    http_warmup: Duration,
    http_seconds: u64,
    check_connections: usize,
    ingest_connections: usize,
    history_rows: u64,
    history_subjects: u64,
    history_queries: usize,
    history_writer: history_writer::Plan,
    steady: steady::Plan,
    rollover: rollover::Plan,
    budgets: budgets::Plan,
}

impl Sizes {
    fn of(args: &BenchArgs) -> Sizes {
        let q = args.quick;
        Sizes {
            broker_messages: if q { 10_000 } else { 200_000 },
            round_trips: if q { 20 } else { 200 },
            events: args.events.unwrap_or(if q { 10_000 } else { 600_000 }),
            subjects: args.subjects.unwrap_or(if q { 1_000 } else { 10_000 }),
            probes: if q { 10 } else { 100 },
            decision_seconds: if q { 2 } else { 20 },
            memory_subjects: args.memory_subjects.unwrap_or(if q { 3_000 } else { 100_000 }),
            http_warmup: Duration::from_millis(if q { 200 } else { 1000 }),
            http_seconds: if q { 1 } else { 10 },
            check_connections: if q { 16 } else { 64 },
            ingest_connections: if q { 4 } else { 16 },
            history_rows: args.history_rows.unwrap_or(if q { 100_000 } else { 10_000_000 }),
            history_subjects: if q { 1_000 } else { 10_000 },
            history_queries: if q { 5 } else { 100 },
            history_writer: history_writer::Plan {
                events: args.events.unwrap_or(if q { 10_000 } else { 600_000 }),
                subjects: args.subjects.unwrap_or(if q { 1_000 } else { 10_000 }),
                broker_messages: if q { 10_000 } else { 200_000 },
            },
            steady: steady::Plan {
                events: args.events.unwrap_or(if q { 10_000 } else { 600_000 }),
                subjects: args.subjects.unwrap_or(if q { 1_000 } else { 10_000 }),
                past_records: args.past_records.unwrap_or(if q { 100_000 } else { 100_000_000 }),
                past_subjects: args.past_subjects.unwrap_or(if q { 2_000 } else { 1_000_000 }),
                lateness_days: LATENESS_DAYS,
            },
            budgets: budgets::Plan {
                events: args.events.unwrap_or(if q { 10_000 } else { 600_000 }),
                subjects: args.subjects.unwrap_or(if q { 1_000 } else { 10_000 }),
                broker_messages: if q { 10_000 } else { 200_000 },
            },
            rollover: rollover::Plan {
                subjects: args.rollover_subjects.unwrap_or(if q { 2_000 } else { 100_000 }),
                window_seconds: if q { 10 } else { 60 },
                lead: Duration::from_secs(if q { 8 } else { 45 }),
                load_per_s: args.rollover_load.unwrap_or(if q { 1_000.0 } else { 10_000.0 }),
                load_subjects: args.subjects.unwrap_or(if q { 1_000 } else { 10_000 }),
                rest_probes: if q { 3 } else { 20 },
                storm_timeout: Duration::from_secs(60),
            },
        }
    }
}

/// Runs the bench; exit 0 when every section was measured.
pub async fn run(args: BenchArgs) -> anyhow::Result<std::process::ExitCode> {
    let sizes = Sizes::of(&args);
    let started = Instant::now();
    let mut report = Report {
        quick: args.quick,
        started_at: chrono::Utc::now().to_rfc3339(),
        seconds: 0.0,
        machine: Machine::detect(),
        sections: Default::default(),
        order: Vec::new(),
    };
    eprintln!("[bench] calibration: the machine's own speed");
    report.machine.calibration = calibrate::measure(&args.database_url).await;
    let ceiling = if args.only.is_none() { Some(measure_on_one_stack(&args, &sizes, &mut report).await?) } else { None };
    // With the other sections' services stopped: each runs Tallys of its own.
    let servers = SharedServers { brokers: &args.brokers, database_url: &args.database_url, clickhouse_url: &args.clickhouse_url };
    if args.only.is_none_or(|only| only == Standalone::HistoryWriter) {
        report.add("history_writer", history_writer::measure(&servers, &sizes.history_writer, ceiling, args.keep).await?);
    }
    if args.only.is_none_or(|only| only == Standalone::Budgets) {
        report.add("budgets", budgets::measure(&servers, &sizes.budgets, ceiling, args.keep).await?);
    }
    if args.only.is_none_or(|only| only == Standalone::SteadyState) {
        report.add("steady_state", steady::measure(&servers, &sizes.steady, args.keep).await?);
    }
    if args.only.is_none_or(|only| only == Standalone::Rollover) {
        report.add("rollover", rollover::measure(&servers, &sizes.rollover, args.keep).await?);
    }
    report.seconds = started.elapsed().as_secs_f64();
    print!("{}", report.table());
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, json).with_context(|| format!("failed to write {}", path.display()))?;
        eprintln!("[bench] report written to {}", path.display());
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// The sections up to history, on one Tally set up for the run and removed afterwards;
/// returns the broker's ceiling.
async fn measure_on_one_stack(args: &BenchArgs, sizes: &Sizes, report: &mut Report) -> anyhow::Result<broker::Ceiling> {
    let stack = Stack::new(&args.brokers, &args.database_url, &args.clickhouse_url, &pipeline::tiers_yaml())?;
    let extra = vec![stack.topic("broker"), stack.topic("ingest"), stack.topic("idle-usage"), stack.topic("idle-decisions")];
    eprintln!("[bench] run {} (service logs in {})", stack.id(), stack.log_dir().display());
    let outcome = async {
        stack.setup(&extra).await.context("tally setup for the bench failed")?;
        measure(args, sizes, &stack, &extra, report).await
    }
    .await;
    if !args.keep {
        stack.teardown(&stack.all_topics(&extra)).await;
    }
    let ceiling = outcome?;
    if !args.keep {
        // Logs are kept only when something failed (or with --keep).
        let _ = std::fs::remove_dir_all(stack.log_dir());
    }
    Ok(ceiling)
}

async fn measure(args: &BenchArgs, sizes: &Sizes, stack: &Stack, extra: &[String], report: &mut Report) -> anyhow::Result<broker::Ceiling> {
    let kafka = stack.kafka();

    eprintln!("[bench] broker: {} messages", sizes.broker_messages);
    let messages = pipeline::events(&format!("{}-broker", stack.id()), "s", sizes.subjects, sizes.broker_messages);
    let (k, topic, rt) = (kafka.clone(), extra[0].clone(), sizes.round_trips);
    let (section, ceiling) = tokio::task::spawn_blocking(move || broker::measure(&k, &topic, &messages, rt)).await??;
    report.add("broker", section);

    eprintln!("[bench] memory baseline: idle aggregator and API");
    let idle = pipeline::idle_rss(stack, &extra[2], &extra[3]).await?;

    let mut p = pipeline::Pipeline::new(stack.clone()).await?;
    let (section, rate) = p.throughput(sizes.subjects, sizes.events, sizes.probes, &ceiling).await?;
    report.add("pipeline", section);

    eprintln!("[bench] decision latency: starting the API");
    p.start_api().await?;
    let section =
        p.decision_latency(rate, args.decision_load, Duration::from_secs(sizes.decision_seconds), sizes.subjects, &ceiling).await?;
    report.add("decision_latency", section);

    let section = p.memory(sizes.memory_subjects, idle).await?;
    report.add("memory", section);

    let plan = http::CheckPlan {
        api: p.api_addr.clone(),
        read_token: stack.read_token.clone(),
        subjects: sizes.subjects,
        connections: sizes.check_connections,
        warmup: sizes.http_warmup,
        duration: Duration::from_secs(sizes.http_seconds),
        redis: Some(args.redis.clone()),
        api_pid: p.api.as_ref().and_then(stack::Service::pid),
    };
    report.add("check", http::check(&plan).await?);

    let ingest_addr = free_addr()?;
    let mut ingest =
        stack.spawn("ingest", "ingest", &[("TALLY_INGEST_LISTEN", ingest_addr.clone()), ("TALLY_USAGE_TOPIC", extra[1].clone())])?;
    ingest.wait_healthy(&format!("http://{ingest_addr}"), Duration::from_secs(30)).await?;
    let section = http::ingest(
        &ingest_addr,
        &stack.ingest_token,
        100,
        sizes.ingest_connections,
        sizes.http_warmup,
        Duration::from_secs(sizes.http_seconds),
        &ceiling,
    )
    .await?;
    ingest.stop();
    report.add("ingest", section);

    // The aggregator is done; history queries share the machine with the API only.
    if let Some(mut agg) = p.aggregator.take() {
        agg.stop();
    }
    let section = history::measure(
        &stack.http(Duration::from_secs(600))?,
        &stack.tally.servers.clickhouse,
        &stack.tally.names.database(),
        &p.api_addr,
        sizes.history_rows,
        sizes.history_subjects,
        sizes.history_queries,
    )
    .await?;
    report.add("history", section);
    Ok(ceiling)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_decision_load_is_a_fraction_of_the_throughput() {
        assert_eq!(load_fraction("0.25"), Ok(0.25));
        assert_eq!(load_fraction("1"), Ok(1.0));
        for bad in ["0", "1.5", "-0.5"] {
            let e = load_fraction(bad).unwrap_err();
            assert!(e.contains("more than 0 and at most 1"), "{bad}: {e}");
        }
        assert!(load_fraction("half").unwrap_err().contains("\"half\" is not a number"));
    }

    #[derive(Debug, clap::Parser)]
    struct Command {
        #[command(flatten)]
        bench: BenchArgs,
    }

    #[test]
    fn only_a_section_that_stands_alone_can_run_alone() {
        use clap::Parser;
        let only = |value: &str| Command::try_parse_from(["bench", "--only", value]).map(|c| c.bench.only);
        assert_eq!(only("rollover").unwrap(), Some(Standalone::Rollover));
        assert_eq!(only("steady-state").unwrap(), Some(Standalone::SteadyState));
        assert_eq!(only("history-writer").unwrap(), Some(Standalone::HistoryWriter));
        assert_eq!(only("budgets").unwrap(), Some(Standalone::Budgets));
        let e = only("pipeline").unwrap_err().to_string();
        assert!(e.contains("invalid value 'pipeline'") && e.contains("rollover"), "{e}");
        assert_eq!(Command::try_parse_from(["bench"]).unwrap().bench.only, None);
    }
}
