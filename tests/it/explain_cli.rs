//! Black-box tests of `tally explain …`, `tally validate-config` and refused settings, run
//! against the built binary the way an operator or a script would.

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;

fn tally(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tally")).args(args).output().expect("the tally binary runs")
}

fn example_config() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples").join("tiers.yaml").display().to_string()
}

/// Runs a command that must succeed and print one JSON object.
fn json(args: &[&str]) -> Value {
    let out = tally(args);
    assert_eq!(out.status.code(), Some(0), "{args:?}: stderr {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

/// Runs a command that must fail with exit code 2 and a one-line error on stderr.
fn bad_input(args: &[&str]) -> String {
    let out = tally(args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(2), "{args:?}: stdout {} stderr {stderr}", String::from_utf8_lossy(&out.stdout));
    assert!(out.stdout.is_empty(), "{args:?} printed to stdout");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: not one line: {stderr}");
    stderr
}

fn window(period: &str, at: &str, extra: &[&str]) -> (String, String) {
    let mut args = vec!["explain", "period", period, "--at", at];
    args.extend_from_slice(extra);
    let v = json(&args);
    (v["start"].as_str().unwrap().to_string(), v["end"].as_str().unwrap().to_string())
}

#[test]
fn explain_period_gives_utc_bounds() {
    let cases: &[(&str, &str, &[&str], &str, &str)] = &[
        ("day", "2026-03-08T12:00:00Z", &["--tz", "America/Los_Angeles"], "2026-03-08T08:00:00Z", "2026-03-09T07:00:00Z"),
        ("day", "2026-10-25T12:00:00Z", &["--tz", "Europe/London"], "2026-10-24T23:00:00Z", "2026-10-26T00:00:00Z"),
        ("day", "2026-04-05T05:00:00Z", &["--tz", "Australia/Lord_Howe"], "2026-04-04T13:00:00Z", "2026-04-05T13:30:00Z"),
        ("day", "2026-09-06T12:00:00Z", &["--tz", "America/Santiago"], "2026-09-06T04:00:00Z", "2026-09-07T03:00:00Z"),
        ("week", "2026-03-15T23:59:59Z", &[], "2026-03-09T00:00:00Z", "2026-03-16T00:00:00Z"),
        ("month", "2026-03-14T12:00:00Z", &["--anchor-day", "15"], "2026-02-15T00:00:00Z", "2026-03-15T00:00:00Z"),
        ("month", "2026-02-28T12:00:00Z", &["--anchor-day", "31"], "2026-02-28T00:00:00Z", "2026-03-31T00:00:00Z"),
        ("year", "2028-12-31T23:59:59Z", &[], "2028-01-01T00:00:00Z", "2029-01-01T00:00:00Z"),
        ("5m", "2026-03-08T10:17:00+01:00", &["--tz", "Asia/Tokyo"], "2026-03-08T09:15:00Z", "2026-03-08T09:20:00Z"),
        ("rolling 7d", "2026-03-08T10:00:00Z", &[], "2026-03-01T10:00:00Z", "2026-03-08T10:00:00Z"),
    ];
    for (period, at, extra, start, end) in cases {
        assert_eq!(window(period, at, extra), (start.to_string(), end.to_string()), "{period} at {at} {extra:?}");
    }
}

#[test]
fn explain_rate_applies_the_tier() {
    let cases: &[(&[&str], u64, u64)] = &[
        (&["10/m"], 10, 60),
        (&["10/m", "--multiplier", "3"], 30, 60),
        (&["10/m", "--multiplier", "3", "--explicit", "api=5000/h", "--scope", "api"], 5000, 3600),
        (&["10/m", "--multiplier", "3", "--explicit", "api=5000/h", "--scope", "chat"], 30, 60),
        (&["10/m", "--multiplier", "0.25"], 2, 60),
        (&["1/m", "--multiplier", "0.1"], 1, 60),
        (&["5/30s"], 5, 30),
        (&["2/3h"], 2, 10_800),
        (&["100000/month"], 100_000, 2_592_000),
        (&["1000/day"], 1000, 86_400),
    ];
    for (extra, limit, seconds) in cases {
        let mut args = vec!["explain", "rate"];
        args.extend_from_slice(extra);
        let v = json(&args);
        assert_eq!((v["limit"].as_u64(), v["window_seconds"].as_u64()), (Some(*limit), Some(*seconds)), "{extra:?}");
    }
}

#[test]
fn explain_subject_reports_tier_level_and_quotas() {
    let config = example_config();
    let at = "2026-11-22T10:00:00Z";
    let subject = |extra: &[&str]| {
        let mut args = vec!["explain", "subject"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--config", &config, "--at", at]);
        json(&args)
    };
    let default = subject(&["nobody"]);
    assert_eq!((default["tier"].as_str(), default["level"].as_str()), (Some("free"), Some("default")));
    let rpm = default["quotas"].as_array().unwrap().iter().find(|q| q["name"] == "rpm").unwrap();
    assert_eq!((rpm["limit"].as_i64(), rpm["period"].as_str()), (Some(20), Some("1m")));

    let by_key = subject(&["someone", "--api-key", "sk-example-pro"]);
    assert_eq!((by_key["tier"].as_str(), by_key["level"].as_str()), (Some("pro"), Some("api_key")));

    let by_group = subject(&["alice"]);
    assert_eq!((by_group["tier"].as_str(), by_group["level"].as_str()), (Some("pro"), Some("group")));
    assert_eq!(by_group["timezone"].as_str(), Some("Europe/London"));

    let given_group = subject(&["zed", "--group", "staff"]);
    assert_eq!(given_group["tier"].as_str(), Some("enterprise"));

    let assigned = subject(&["bob", "--group", "startups"]);
    assert_eq!((assigned["tier"].as_str(), assigned["level"].as_str()), (Some("enterprise"), Some("assignment")));

    let overridden = subject(&["carol"]);
    assert_eq!(overridden["level"].as_str(), Some("override"));
    let tokens = overridden["quotas"].as_array().unwrap().iter().find(|q| q["name"] == "monthly_tokens").unwrap();
    assert_eq!(tokens["limit"].as_i64(), Some(5_000_000));
    assert_eq!(overridden["overrides"][0]["reason"].as_str(), Some("hackathon month"));

    // The raw key is never echoed.
    let out = tally(&["explain", "subject", "k", "--config", &config, "--at", at, "--api-key", "sk-example-pro"]);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("sk-example-pro"));
}

#[test]
fn bad_input_is_one_line_on_stderr_with_exit_code_2() {
    let config = example_config();
    let cases: &[(&[&str], &str)] = &[
        (&["explain", "rate", "5/0s"], "zero"),
        (&["explain", "rate", "-5/m"], "negative limit"),
        (&["explain", "period", "-5m", "--at", "2026-03-08T00:00:00Z"], "negative window"),
        (&["explain", "rate", "5/-30s"], "negative"),
        (&["explain", "rate", "/m"], "missing number"),
        (&["explain", "rate", "5/fortnight"], "unknown unit"),
        (&["explain", "rate", "5/m junk"], "trailing"),
        (&["explain", "rate", "10/m", "--multiplier", "-1"], "--multiplier"),
        (&["explain", "rate", "10/m", "--explicit", "api"], "--explicit"),
        (&["explain", "period", "fortnight", "--at", "2026-03-08T00:00:00Z"], "unknown unit"),
        (&["explain", "period", "day", "--at", "yesterday"], "--at"),
        (&["explain", "period", "day", "--at", "2026-03-08T00:00:00Z", "--tz", "Mars/Olympus"], "--tz"),
        (&["explain", "period", "week", "--at", "2026-03-08T00:00:00Z", "--anchor-day", "3"], "--anchor-day"),
        (&["explain", "subject", "a", "--config", "/nonexistent/tiers.yaml"], "cannot read"),
        (&["explain", "subject", "a", "--config", &config, "--at", "noon"], "--at"),
    ];
    for (args, needle) in cases {
        let stderr = bad_input(args);
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}

#[test]
fn validate_config_summarises_a_good_file() {
    let out = tally(&["validate-config", &example_config()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout} {}", String::from_utf8_lossy(&out.stderr));
    for needle in ["valid", "free", "pro", "enterprise", "monthly_tokens", "bob -> enterprise"] {
        assert!(stdout.contains(needle), "missing {needle}: {stdout}");
    }
}

#[test]
fn validate_config_lists_every_error_with_its_location() {
    let path = std::env::temp_dir().join(format!("tally-bad-{}.yaml", uuid::Uuid::new_v4()));
    std::fs::write(
        &path,
        "default_tier: gold
tiers:
  - name: pro
    rate_multiplier: 0
    quotas:
      - {name: q, metric: requests, period: fortnight, limit: 5}
groups: {eng: platinum}
",
    )
    .unwrap();
    let out = tally(&["validate-config", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    for location in ["default_tier", "tiers.pro.rate_multiplier", "tiers.pro.quotas[0].period", "groups.eng"] {
        assert!(stderr.contains(location), "missing {location}: {stderr}");
    }

    let path = std::env::temp_dir().join(format!("tally-syntax-{}.yaml", uuid::Uuid::new_v4()));
    std::fs::write(&path, "default_tier: free\ntiers: [{name: free}\n").unwrap();
    let out = tally(&["validate-config", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&path);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("line "), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn aggregator_batch_settings_below_one_are_refused_naming_the_setting() {
    for (flag, value) in [("--max-batch", "0"), ("--max-batch-subjects", "0"), ("--lanes", "0"), ("--max-batch", "many")] {
        let out = tally(&["aggregator", flag, value]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: {stderr}");
        assert!(stderr.contains(&format!("'{flag} <")), "{flag} {value}: the error does not name the setting: {stderr}");
    }
}

#[test]
fn an_aggregator_with_more_lanes_than_its_pool_can_serve_is_refused_before_it_connects() {
    let out = Command::new(env!("CARGO_BIN_EXE_tally"))
        .arg("aggregator")
        .env("TALLY_AGGREGATOR_LANES", "6")
        .env("TALLY_DATABASE_POOL_SIZE", "8")
        // Nothing listens here: the refusal must come before any connection.
        .env("TALLY_DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
        .output()
        .expect("the tally binary runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("TALLY_AGGREGATOR_LANES=6") && stderr.contains("at least 11"), "{stderr}");
    assert!(stderr.contains("TALLY_DATABASE_POOL_SIZE is 8"), "{stderr}");
}
