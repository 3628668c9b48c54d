//! The history writer under the ledger's load: its events/s into ClickHouse while the
//! aggregator counts the same topic, how far history trails the ledger meanwhile, and the
//! whole pipeline (ledger and history both done) against the broker's consume rate.
//!
//! On a Tally of its own (a run id of its own), set up from scratch:
//! - N usage events (the pipeline section's events: subjects on three tiers) are produced to
//!   the run's usage topic first; then the aggregator and the history writer start at the
//!   same moment, each with its defaults (the writer in a group of the run's own).
//! - Every 20 ms one Postgres query reads both stored progresses: the sum of the
//!   aggregator's next offsets (`consumer_offsets`) and of the writer's (`history_offsets`).
//!   Each process is timed from its first committed batch to the batch that makes its sum
//!   reach N, as the pipeline section times the aggregator; the whole pipeline from the
//!   aggregator's first committed batch until both sums reach N.
//! - History lag, at each sample from the aggregator's first commit until the writer has
//!   everything: the age of the oldest message the ledger has committed and history has
//!   not, i.e. now minus the first sample at which the ledger's sum passed the writer's
//!   (0 when history has all the ledger has); also the same gap in messages. The writer
//!   writes only what the ledger has counted, so this is the delay history adds to the
//!   ledger, at full load.
//! - CPU per event from /proc over both processes' lives: the writer, the aggregator, the
//!   run database's Postgres backends (both processes'), the ClickHouse server (the process
//!   listening on the ClickHouse URL's port, when it is on this machine) and the broker
//!   (local tansu processes). The writer's own per-phase timing of its batches comes from its
//!   metrics (`tally_history_batch_phase_micros_total`).
//! - After the run, history must hold exactly what was produced: raw rows under `FINAL` and
//!   the daily rollups, counted and summed to the token. Anything else fails the bench (an
//!   exactness failure, not a slow figure).
//!
//! The broker's consume rate is the broker section's when the whole bench runs; alone
//! (`--only history-writer`) the section measures it first on a topic of its own.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use sqlx::PgPool;

use super::broker::{self, Ceiling};
use super::pipeline;
use super::report::{Latencies, Section};
use super::stack::{cpu_seconds, cpu_seconds_of, free_addr, listener_pid, pids_named, Service, SharedServers, Stack};

/// The sizes of the section.
#[derive(Debug, Clone)]
pub struct Plan {
    pub events: usize,
    pub subjects: usize,
    /// Messages for the broker's ceiling when the section measures it itself.
    pub broker_messages: usize,
}

/// How often both progresses are read.
const SAMPLE_EVERY: Duration = Duration::from_millis(20);

/// The writer's batch phases, in the order a batch goes through them (see its metrics).
const PHASES: [&str; 6] = ["ledger", "counted", "lookup", "insert", "rollups", "progress"];

/// Measures the section (see the module docs), on a Tally of its own removed afterwards
/// (unless `keep`). `ceiling` is the broker section's, when it ran.
pub async fn measure(servers: &SharedServers<'_>, plan: &Plan, ceiling: Option<Ceiling>, keep: bool) -> anyhow::Result<Section> {
    let stack = Stack::new(servers.brokers, servers.database_url, servers.clickhouse_url, &pipeline::tiers_yaml())?;
    let extra = if ceiling.is_none() { vec![stack.topic("broker")] } else { Vec::new() };
    eprintln!("[bench] history writer: run {} (service logs in {})", stack.id(), stack.log_dir().display());
    let outcome = async {
        stack.setup(&extra).await.context("tally setup for the history writer section failed")?;
        let (ceiling, own_ceiling) = match ceiling {
            Some(c) => (c, false),
            None => {
                eprintln!("[bench] history writer: the broker's ceiling first, {} messages", plan.broker_messages);
                let messages = pipeline::events(&format!("{}-broker", stack.id()), "s", plan.subjects, plan.broker_messages);
                let (kafka, topic) = (stack.kafka(), extra[0].clone());
                let (_, c) = tokio::task::spawn_blocking(move || broker::measure(&kafka, &topic, &messages, 20)).await??;
                (c, true)
            }
        };
        let mut s = run(&stack, plan, &ceiling).await?;
        if own_ceiling {
            s.note(format!(
                "broker_consume_per_s measured by this section first ({} messages), as the broker section does",
                plan.broker_messages
            ));
        }
        Ok(s)
    }
    .await;
    if !keep {
        stack.teardown(&stack.all_topics(&extra)).await;
        if outcome.is_ok() {
            let _ = std::fs::remove_dir_all(stack.log_dir());
        }
    }
    outcome
}

/// One process's progress: its first committed batch and the moment it had everything.
#[derive(Debug, Default, Clone, Copy)]
struct Progress {
    first: Option<(Instant, u64)>,
    done: Option<Instant>,
}

impl Progress {
    fn see(&mut self, now: Instant, consumed: u64, total: u64) {
        if consumed > 0 && self.first.is_none() {
            self.first = Some((now, consumed));
        }
        if consumed >= total && self.done.is_none() {
            self.done = Some(now);
        }
    }

    /// Events/s from the first committed batch to the last (over the whole life from
    /// `spawned` when the first batch already held nearly everything), and the events timed.
    fn rate(&self, spawned: Instant, total: u64) -> (f64, f64) {
        let end = self.done.unwrap_or(spawned);
        let total = total as f64;
        match self.first {
            Some((t0, c0)) if (c0 as f64) < total * 0.9 && end > t0 => ((total - c0 as f64) / (end - t0).as_secs_f64(), total - c0 as f64),
            _ => (total / (end - spawned).as_secs_f64().max(1e-9), total),
        }
    }
}

/// The ledger's progress over time, to tell how old the oldest message history lacks is.
#[derive(Debug, Default)]
struct LedgerCurve {
    /// (moment, ledger's offset sum), the sums strictly growing.
    points: Vec<(Instant, u64)>,
}

impl LedgerCurve {
    fn see(&mut self, now: Instant, ledger: u64) {
        if self.points.last().is_none_or(|(_, l)| ledger > *l) {
            self.points.push((now, ledger));
        }
    }

    /// How long ago (at `now`) the ledger first had more than `written` messages: the age of
    /// the oldest message counted but not yet in history. Zero when history has all of them.
    fn lag(&self, now: Instant, written: u64) -> Duration {
        let i = self.points.partition_point(|(_, l)| *l <= written);
        self.points.get(i).map_or(Duration::ZERO, |(t, _)| now.saturating_duration_since(*t))
    }
}

/// Both stored progresses, in one query.
async fn progresses(pool: &PgPool, ledger_group: &str, history_group: &str, topic: &str) -> anyhow::Result<(u64, u64)> {
    let (ledger, history): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT coalesce(sum(next_offset), 0)::bigint FROM consumer_offsets WHERE group_id = $1 AND topic = $3),
                (SELECT coalesce(sum(next_offset), 0)::bigint FROM history_offsets WHERE group_id = $2 AND topic = $3)",
    )
    .bind(ledger_group)
    .bind(history_group)
    .bind(topic)
    .fetch_one(pool)
    .await
    .context("failed to read consumer_offsets and history_offsets")?;
    Ok((ledger.max(0) as u64, history.max(0) as u64))
}

/// The value of `name{<label>="<value>"}` in a Prometheus text page (0 when absent).
fn labelled(text: &str, name: &str, label: &str, value: &str) -> f64 {
    let wanted = format!("{name}{{{label}=\"{value}\"}}");
    text.lines().filter_map(|l| l.strip_prefix(&wanted)).filter_map(|rest| rest.trim().parse::<f64>().ok()).sum()
}

/// The `q` quantile (nearest rank) of `values`.
fn quantile(values: &mut [u64], q: f64) -> u64 {
    if values.is_empty() {
        return 0;
    }
    values.sort_unstable();
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    values[rank - 1]
}

async fn run(stack: &Stack, plan: &Plan, ceiling: &Ceiling) -> anyhow::Result<Section> {
    let pool = stack.postgres().connect().await?;
    let kafka = stack.kafka();
    let messages = pipeline::events(&format!("{}-load", stack.id()), "s", plan.subjects, plan.events);
    let total = messages.len() as u64;
    eprintln!("[bench] history writer: producing {total} events for {} subjects", plan.subjects);
    let k = kafka.clone();
    tokio::task::spawn_blocking(move || broker::produce_all(&k, &k.usage_topic, &messages)).await??;

    let (ledger_group, history_group) = (stack.group(), format!("{}-history", stack.group()));
    let brokers = pids_named("tansu");
    let clickhouse =
        reqwest::Url::parse(&stack.tally.servers.clickhouse).ok().and_then(|u| u.port_or_known_default()).and_then(listener_pid);
    let (broker_before, clickhouse_before) = (cpu_seconds_of(&brokers), clickhouse.map_or(0.0, cpu_seconds));

    eprintln!("[bench] history writer: starting the aggregator and the history writer together");
    let (agg_addr, writer_addr) = (free_addr()?, free_addr()?);
    let spawned = Instant::now();
    let mut aggregator = stack.spawn("aggregator", "aggregator", &[("TALLY_AGGREGATOR_LISTEN", agg_addr.clone())])?;
    let mut writer = stack.spawn(
        "history-writer",
        "history-writer",
        &[("TALLY_HISTORY_GROUP", history_group.clone()), ("TALLY_HISTORY_LISTEN", writer_addr.clone())],
    )?;

    let (mut ledger, mut history) = (Progress::default(), Progress::default());
    let mut curve = LedgerCurve::default();
    let (mut lag, mut lag_messages) = (Latencies::default(), Vec::new());
    let deadline = spawned + Duration::from_secs(120) + Duration::from_secs_f64(total as f64 / 500.0);
    loop {
        let (counted, written) = progresses(&pool, &ledger_group, &history_group, &kafka.usage_topic).await?;
        let now = Instant::now();
        ledger.see(now, counted, total);
        history.see(now, written, total);
        curve.see(now, counted);
        if ledger.first.is_some() && history.done.is_none() {
            lag.push(curve.lag(now, written));
            lag_messages.push(counted.saturating_sub(written));
        }
        if ledger.done.is_some() && history.done.is_some() {
            break;
        }
        aggregator.ensure_running()?;
        writer.ensure_running()?;
        if now > deadline {
            bail!("in {:?} the aggregator counted {counted} and the history writer wrote {written} of {total} events", spawned.elapsed());
        }
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
    let (ledger_done, history_done) = (ledger.done.unwrap_or(spawned), history.done.unwrap_or(spawned));
    let both_done = ledger_done.max(history_done);

    // CPU and metrics before anything stops (the backends go with their pools).
    let pid_cpu = |s: &Service| s.pid().map_or(0.0, cpu_seconds);
    let (aggregator_cpu, writer_cpu) = (pid_cpu(&aggregator), pid_cpu(&writer));
    let backends: Vec<i32> =
        sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()")
            .fetch_all(&pool)
            .await
            .unwrap_or_default();
    let postgres_cpu = cpu_seconds_of(&backends.into_iter().map(|p| p as u32).collect::<Vec<_>>());
    let broker_cpu = cpu_seconds_of(&brokers) - broker_before;
    let clickhouse_cpu = clickhouse.map(|pid| cpu_seconds(pid) - clickhouse_before);
    let http = stack.http(Duration::from_secs(10))?;
    let page = |addr: String| {
        let http = http.clone();
        async move { http.get(format!("http://{addr}/metrics")).send().await?.error_for_status()?.text().await }
    };
    let writer_metrics = page(writer_addr).await.context("failed to read the history writer's metrics")?;
    let aggregator_metrics = page(agg_addr).await.context("failed to read the aggregator's metrics")?;
    aggregator.stop();
    writer.stop();

    let exact = converged(stack, total).await?;

    let n = total as f64;
    let (aggregator_rate, aggregator_timed) = ledger.rate(spawned, total);
    let (writer_rate, writer_timed) = history.rate(spawned, total);
    let (pipeline_rate, pipeline_timed) = match ledger.first {
        Some((t0, c0)) if (c0 as f64) < n * 0.9 && both_done > t0 => ((n - c0 as f64) / (both_done - t0).as_secs_f64(), n - c0 as f64),
        _ => (n / (both_done - spawned).as_secs_f64().max(1e-9), n),
    };
    let metric = |text: &str, name: &str| super::stack::metric_sum(text, name);
    let batches = metric(&writer_metrics, "tally_history_batches_total");
    let batch_us = metric(&writer_metrics, "tally_history_batch_micros_total");
    let per_batch_ms = |us: f64| if batches > 0.0 { us / batches / 1000.0 } else { 0.0 };
    let writer_wall = (history_done - spawned).as_secs_f64();
    let per_event = |cpu: f64| cpu * 1e6 / n;

    let mut s = Section::default();
    s.figure("events", n)
        .figure("subjects", plan.subjects as f64)
        .figure("history_writer_events_per_s", writer_rate)
        .figure("aggregator_events_per_s", aggregator_rate)
        .figure("pipeline_events_per_s", pipeline_rate)
        .figure("broker_consume_per_s", ceiling.consume_per_s)
        .figure("history_writer_events_timed", writer_timed)
        .figure("aggregator_events_timed", aggregator_timed)
        .figure("pipeline_events_timed", pipeline_timed)
        .figure("aggregator_done_s_from_process_start", (ledger_done - spawned).as_secs_f64())
        .figure("history_writer_done_s_from_process_start", writer_wall)
        .figure("history_after_ledger_done_ms", history_done.saturating_duration_since(ledger_done).as_secs_f64() * 1000.0)
        .latencies("history_lag", &lag)
        .figure("history_lag_samples", lag.len() as f64)
        .figure("history_lag_messages_p50", quantile(&mut lag_messages, 0.5) as f64)
        .figure("history_lag_messages_p99", quantile(&mut lag_messages, 0.99) as f64)
        .figure("history_writer_batches", batches)
        .figure("history_writer_events_per_batch", if batches > 0.0 { n / batches } else { 0.0 })
        .figure("history_writer_batch_ms", per_batch_ms(batch_us))
        .figure("history_writer_busy_share_of_wall", batch_us / 1e6 / writer_wall.max(1e-9))
        .figure("history_writer_waits_for_ledger", metric(&writer_metrics, "tally_history_waits_for_ledger_total"))
        .figure("history_writer_rows_inserted", metric(&writer_metrics, "tally_history_events_written_total"))
        .figure("aggregator_batches", metric(&aggregator_metrics, "tally_aggregator_batches_total"))
        .figure("history_writer_cpu_us_per_event", per_event(writer_cpu))
        .figure("aggregator_cpu_us_per_event", per_event(aggregator_cpu))
        .figure("postgres_cpu_us_per_event", per_event(postgres_cpu))
        .figure("history_rows_exact", exact as f64);
    let mut phases: Vec<(&str, f64)> = Vec::new();
    for phase in PHASES {
        let us = labelled(&writer_metrics, "tally_history_batch_phase_micros_total", "phase", phase);
        phases.push((phase, us));
        s.figure(&format!("history_writer_{phase}_ms_per_batch"), per_batch_ms(us));
    }
    let other = (batch_us - phases.iter().map(|(_, us)| us).sum::<f64>()).max(0.0);
    s.figure("history_writer_other_ms_per_batch", per_batch_ms(other));
    phases.push(("other", other));
    phases.sort_by(|a, b| b.1.total_cmp(&a.1));
    let shares: Vec<String> = phases.iter().map(|(phase, us)| format!("{phase} {:.0}%", 100.0 * us / batch_us.max(1.0))).collect();
    s.note(format!(
        "where the writer's time went this run: busy writing batches {:.0}% of its wall; of a batch: {}; CPU per event: writer {:.1} µs, \
         ClickHouse server {}, aggregator {:.1} µs, Postgres {:.1} µs",
        100.0 * batch_us / 1e6 / writer_wall.max(1e-9),
        shares.join(", "),
        per_event(writer_cpu),
        clickhouse_cpu.map_or("not measured (not local)".to_string(), |cpu| format!("{:.1} µs", per_event(cpu))),
        per_event(aggregator_cpu),
        per_event(postgres_cpu),
    ));
    if let Some(cpu) = clickhouse_cpu {
        s.figure("clickhouse_cpu_us_per_event", per_event(cpu));
    }
    if !brokers.is_empty() {
        s.figure("broker_cpu_us_per_event", per_event(broker_cpu));
    }
    s.ratio("history_writer_to_aggregator", writer_rate, aggregator_rate)
        .ratio("pipeline_to_broker_consume", pipeline_rate, ceiling.consume_per_s)
        .ratio("aggregator_to_broker_consume", aggregator_rate, ceiling.consume_per_s)
        .target("history_writer events_per_s >= aggregator events_per_s", writer_rate >= aggregator_rate)
        .target("pipeline events_per_s >= half the broker consume ceiling", pipeline_rate >= ceiling.consume_per_s / 2.0)
        .note(format!(
            "a Tally of its own: {total} events over {} subjects pre-produced, then the aggregator and the history writer (defaults, a group of its own) \
             started together on the same topic",
            plan.subjects
        ))
        .note(
            "each process timed from its first committed batch to the one that makes its stored next offsets (consumer_offsets, history_offsets) \
             sum to the events produced, sampled every 20 ms; pipeline_events_per_s from the aggregator's first committed batch until both have everything",
        )
        .note(
            "history_lag: at every sample from the aggregator's first commit until history has everything, the age of the oldest message the ledger \
             has committed and history has not (0 when history has all the ledger has); history_lag_messages the same gap in messages. The writer \
             writes only what the ledger counted, so this is the delay history adds to the ledger at full load (20 ms resolution)",
        )
        .note(
            "CPU per event from /proc over both processes' lives: writer, aggregator, the run database's Postgres backends (both processes'), \
             the ClickHouse server (the process listening on its port, when local) and local tansu brokers",
        )
        .note(
            "history_writer_<phase>_ms_per_batch from the writer's tally_history_batch_phase_micros_total: ledger offsets read, processed_events \
             lookup (counted), ClickHouse lookup of rows already present, raw insert, rollups recomputed, progress stored; other = the rest of a batch",
        )
        .note("history_rows_exact: raw rows under FINAL and the daily rollups hold exactly the events produced, to the token (the bench fails otherwise)");
    Ok(s)
}

/// Checks that history holds exactly the `total` events produced (each `pipeline::events`
/// event carries 300 input and 100 output tokens): raw rows under `FINAL`, the daily
/// rollups and the daily totals per subject. Returns 1 when it does; fails otherwise.
async fn converged(stack: &Stack, total: u64) -> anyhow::Result<u8> {
    let ch = stack.clickhouse().client();
    let expected = (total, 300 * total as i64, 100 * total as i64);
    for table in ["usage_events", "usage_daily", "usage_subject_daily"] {
        let events = if table == "usage_events" { "count()" } else { "sum(events)" };
        let sql = format!("SELECT toUInt64({events}), sum(input_tokens), sum(output_tokens) FROM {table} FINAL");
        let got: (u64, i64, i64) =
            ch.query(&sql).fetch_one().await.with_context(|| format!("failed to read {table} after the history writer's run"))?;
        if got != expected {
            bail!("history is not exact: {table} holds (events, input tokens, output tokens) {got:?}, the run produced {expected:?}");
        }
    }
    Ok(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lag_is_the_age_of_the_oldest_counted_message_history_lacks() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut curve = LedgerCurve::default();
        for (ms, ledger) in [(0, 0), (20, 100), (40, 100), (60, 250), (80, 400)] {
            curve.see(at(ms), ledger);
        }
        assert_eq!(curve.points.len(), 4, "only growth is kept: {:?}", curve.points.len());
        // History has 0: the oldest it lacks (the 1st) was counted at 20 ms.
        assert_eq!(curve.lag(at(100), 0), Duration::from_millis(80));
        // History has 100: the 101st was counted at 60 ms.
        assert_eq!(curve.lag(at(100), 100), Duration::from_millis(40));
        assert_eq!(curve.lag(at(100), 399), Duration::from_millis(20));
        assert_eq!(curve.lag(at(100), 400), Duration::ZERO, "history has all the ledger has");
    }

    #[test]
    fn a_process_is_timed_from_its_first_commit_unless_that_held_nearly_everything() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut p = Progress::default();
        p.see(at(500), 0, 1000);
        p.see(at(1000), 200, 1000);
        p.see(at(2000), 1000, 1000);
        p.see(at(3000), 1000, 1000);
        assert_eq!(p.rate(t0, 1000), (800.0, 800.0));
        let mut all_at_once = Progress::default();
        all_at_once.see(at(2000), 1000, 1000);
        assert_eq!(all_at_once.rate(t0, 1000), (500.0, 1000.0));
    }

    #[test]
    fn labelled_metrics_are_read_by_their_label() {
        let text = "# HELP x y\nx_total{phase=\"insert\"} 30\nx_total{phase=\"rollups\"} 12\nx_total_other{phase=\"insert\"} 9\n";
        assert_eq!(labelled(text, "x_total", "phase", "insert"), 30.0);
        assert_eq!(labelled(text, "x_total", "phase", "lookup"), 0.0);
        assert_eq!(quantile(&mut [5, 1, 3, 2, 4], 0.5), 3);
        assert_eq!(quantile(&mut [5, 1, 3, 2, 4], 0.99), 5);
        assert_eq!(quantile(&mut [], 0.99), 0);
    }
}
