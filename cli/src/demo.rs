//! `tally demo`: a short load from a few users on different tiers, printed as it goes, until
//! one user crosses a limit and the API shows them blocked.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chrono::Utc;
use serde_json::{json, Value};

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Ingest service base URL.
    #[arg(long, env = "TALLY_INGEST_URL", default_value = "http://127.0.0.1:8080")]
    pub ingest_url: String,
    /// API service base URL.
    #[arg(long, env = "TALLY_API_URL", default_value = "http://127.0.0.1:8081")]
    pub api_url: String,
    /// Prefix for the demo's user names, so that runs do not add to each other's usage.
    #[arg(long, default_value_t = default_prefix())]
    pub prefix: String,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 60)]
    pub timeout_seconds: u64,
}

fn default_prefix() -> String {
    format!("demo-{}", Utc::now().format("%H%M%S"))
}

/// The demo's users: (name suffix, tokens per request, API key). The tier comes from
/// examples/demo.yaml: users are on free unless they send the pro API key.
const USERS: [(&str, i64, Option<&str>); 3] = [("ana", 1500, None), ("ben", 1500, Some("sk-demo-pro")), ("cy", 200, None)];

pub async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
    let started = Instant::now();
    let mut round = 0u32;
    println!("sending usage for {} users, one request each per round:", USERS.len());
    loop {
        round += 1;
        let batch: Vec<Value> = USERS
            .iter()
            .map(|(user, tokens, api_key)| {
                let mut event = json!({
                    "id": format!("{}-{user}-{round}", args.prefix),
                    "subject": format!("{}-{user}", args.prefix),
                    "time": Utc::now().to_rfc3339(),
                    "model": "gpt-4o-mini",
                    "input_tokens": tokens * 2 / 3,
                    "output_tokens": tokens - tokens * 2 / 3,
                });
                if let Some(key) = api_key {
                    event["api_key"] = json!(key);
                }
                event
            })
            .collect();
        post_events(&client, &args.ingest_url, &batch).await?;
        tokio::time::sleep(Duration::from_millis(400)).await;
        let mut line = format!("round {round:>2}:");
        let mut blocked = None;
        for (user, _, _) in USERS {
            let subject = format!("{}-{user}", args.prefix);
            match decision(&client, &args.api_url, &subject).await? {
                Some(d) => {
                    let q = &d["quotas"][0];
                    let allowed = d["allowed"].as_bool().unwrap_or(true);
                    line.push_str(&format!(
                        "  {user} [{}] {}/{} {}",
                        d["tier"].as_str().unwrap_or("?"),
                        q["used"],
                        q["limit"],
                        if allowed { q["state"].as_str().unwrap_or("?").to_string() } else { "BLOCKED".to_string() }
                    ));
                    if !allowed && blocked.is_none() {
                        blocked = Some((subject, d));
                    }
                }
                None => line.push_str(&format!("  {user} (no decision yet)")),
            }
        }
        println!("{line}");
        if let Some((subject, d)) = blocked {
            println!("\n{subject} crossed a limit and is blocked. The API says:");
            println!("GET {}/v1/subjects/{subject}/decision", args.api_url);
            println!("{}", serde_json::to_string_pretty(&d)?);
            return Ok(ExitCode::SUCCESS);
        }
        if started.elapsed() > Duration::from_secs(args.timeout_seconds) {
            bail!("no user was blocked within {} s: is the aggregator running with examples/demo.yaml?", args.timeout_seconds);
        }
    }
}

async fn post_events(client: &reqwest::Client, ingest: &str, batch: &[Value]) -> anyhow::Result<()> {
    let url = format!("{ingest}/v1/events");
    let response = client.post(&url).json(batch).send().await.with_context(|| format!("failed to reach ingest at {url}"))?;
    if response.status() != reqwest::StatusCode::ACCEPTED {
        let status = response.status();
        bail!("ingest answered {status}: {}", response.text().await.unwrap_or_default());
    }
    Ok(())
}

async fn decision(client: &reqwest::Client, api: &str, subject: &str) -> anyhow::Result<Option<Value>> {
    let url = format!("{api}/v1/subjects/{subject}/decision");
    let response = client.get(&url).send().await.with_context(|| format!("failed to reach the API at {url}"))?;
    if response.status() == reqwest::StatusCode::NOT_FOUND {
        return Ok(None);
    }
    Ok(Some(response.error_for_status()?.json().await?))
}
