//! `tally bench --quick`, black box: the harness runs end to end against the local stack and
//! its JSON report has every section with positive figures and ratios. No timing is asserted:
//! the figures of a quick run on a shared machine prove only that each section measured.

use crate::support;

use serde_json::Value;

const SECTIONS: [&str; 10] =
    ["broker", "pipeline", "decision_latency", "check", "history", "memory", "ingest", "history_writer", "steady_state", "rollover"];

/// Figures that must be positive in every run (others, such as error counts, may be zero).
const POSITIVE: [(&str, &str); 31] = [
    ("broker", "produce_per_s"),
    ("broker", "consume_per_s"),
    ("broker", "round_trip_p99_ms"),
    ("pipeline", "events_per_s"),
    ("decision_latency", "decision_p50_ms"),
    ("decision_latency", "decision_p99_ms"),
    ("decision_latency", "cpu_share_aggregator"),
    // Each probe breaches a subject the aggregator has decided before: a fast commit counts it.
    ("decision_latency", "fast_commits"),
    ("check", "requests_per_s"),
    ("check", "check_p99_ms"),
    // The API's and the load generator's CPU were read around the check's run.
    ("check", "api_cpu_us_per_check"),
    ("check", "generator_cpu_us_per_check"),
    ("history", "series_30d_daily_p99_ms"),
    ("history", "top20_30d_p99_ms"),
    ("memory", "aggregator_rss_mib"),
    ("memory", "api_rss_mib"),
    ("ingest", "events_per_s"),
    ("ingest", "request_p99_ms"),
    // Both processes wrote everything, history trailed the ledger measurably, and the
    // writer's batches were timed phase by phase.
    ("history_writer", "history_writer_events_per_s"),
    ("history_writer", "aggregator_events_per_s"),
    ("history_writer", "pipeline_events_per_s"),
    ("history_writer", "history_lag_p99_ms"),
    ("history_writer", "history_writer_insert_ms_per_batch"),
    ("history_writer", "history_writer_cpu_us_per_event"),
    // Both counts ran, and the past was on disk while the second one did.
    ("steady_state", "fresh_events_per_s"),
    ("steady_state", "steady_events_per_s"),
    ("steady_state", "dedupe_bytes_at_rest"),
    // Every blocked subject's unblock reached the topic and the API after the boundary,
    // while the background load was counted.
    ("rollover", "unblocks_seen"),
    ("rollover", "last_unblock_at_api_ms"),
    ("rollover", "rest_decision_p50_ms"),
    ("rollover", "counted_per_s_during_storm"),
];

#[test]
fn quick_bench_reports_every_section_with_figures_and_ratios() {
    let servers = support::servers();
    let dir =
        std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("tally-tests").join(format!("bench-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("create the report directory");
    let json_path = dir.join("bench.json");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["bench", "--quick", "--json"])
        .arg(&json_path)
        .env("TALLY_KAFKA_BROKERS", &servers.kafka)
        .env("TALLY_DATABASE_URL", &servers.postgres)
        .env("TALLY_CLICKHOUSE_URL", &servers.clickhouse)
        .output()
        .expect("run tally bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "tally bench --quick failed:\n{stderr}");
    let table = String::from_utf8_lossy(&out.stdout);
    for section in SECTIONS {
        assert!(table.contains(&format!("== {section}")), "the table has no {section} section:\n{table}");
    }

    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).expect("read the JSON report")).expect("the report is JSON");
    assert_eq!(report["quick"], true);
    assert!(report["machine"]["cpus"].as_u64().unwrap_or(0) > 0, "machine: {}", report["machine"]);
    for speed in ["cpu_sha256_mib_per_s", "postgres_sum_ms", "postgres_insert_rows_per_s"] {
        let v = report["machine"]["calibration"][speed].as_f64().unwrap_or(0.0);
        assert!(v > 0.0, "the machine's speed {speed} = {v}: {}", report["machine"]);
    }
    for section in SECTIONS {
        let s = &report["sections"][section];
        let figures = s["figures"].as_object().unwrap_or_else(|| panic!("{section} has no figures: {s}"));
        assert!(!figures.is_empty(), "{section} has no figures");
        for (name, value) in figures {
            let v = value.as_f64().unwrap_or_else(|| panic!("{section}.{name} is not a number: {value}"));
            assert!(v.is_finite() && v >= 0.0, "{section}.{name} = {v}");
        }
        let ratios = s["ratios"].as_object().unwrap_or_else(|| panic!("{section} has no ratios: {s}"));
        assert!(!ratios.is_empty(), "{section} has no ratio against a baseline: {s}");
        for (name, value) in ratios {
            let v = value.as_f64().unwrap_or_else(|| panic!("{section} ratio {name} is not a number: {value}"));
            assert!(v.is_finite() && v > 0.0, "{section} ratio {name} = {v}");
        }
        assert!(s["targets"].is_array() && s["notes"].is_array(), "{section}: {s}");
    }
    for (section, name) in POSITIVE {
        let v = report["sections"][section]["figures"][name].as_f64().unwrap_or(0.0);
        assert!(v > 0.0, "{section}.{name} = {v}; report: {}", report["sections"][section]);
    }
    // The CPU shares are of the whole machine: with the idle share they cannot add up to
    // much more than all of it (clock ticks are read a moment apart).
    let decision = &report["sections"]["decision_latency"]["figures"];
    let shares: f64 =
        decision.as_object().into_iter().flatten().filter(|(k, _)| k.starts_with("cpu_share_")).filter_map(|(_, v)| v.as_f64()).sum();
    let idle = decision["machine_idle_share"].as_f64().unwrap_or(-1.0);
    assert!((0.0..=1.0).contains(&idle) && shares + idle <= 1.1, "idle {idle}, shares {shares}: {decision}");
    // The steady state's past is the quick default, and a record takes room on disk.
    let steady = &report["sections"]["steady_state"]["figures"];
    assert_eq!(steady["past_dedupe_records"].as_f64(), Some(100_000.0), "{steady}");
    assert!(steady["dedupe_bytes_per_record"].as_f64().unwrap_or(0.0) > 100.0, "{steady}");
    // History holds exactly the events produced (the bench fails otherwise), every one of
    // them inserted by this run's writer.
    let writer = &report["sections"]["history_writer"]["figures"];
    assert_eq!(writer["history_rows_exact"].as_f64(), Some(1.0), "{writer}");
    assert_eq!(writer["history_writer_rows_inserted"], writer["events"], "{writer}");
    // The rollover saw every blocked subject unblocked, and the API refuses none of them after.
    let rollover = &report["sections"]["rollover"]["figures"];
    assert_eq!(rollover["unblocks_seen"], rollover["subjects"], "{rollover}");
    assert_eq!(rollover["still_blocked_at_api_after"].as_f64(), Some(0.0), "{rollover}");
}
