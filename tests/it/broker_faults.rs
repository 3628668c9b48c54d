//! Broker faults: every service's connections to the broker are cut for longer than the
//! producers' message timeout, then restored. During the cut ingest answers 503 with
//! `Retry-After` within its ack timeout, readiness says which clients lost the broker and
//! `POST /v1/check` answers by its stale policy; afterwards ingest accepts again, the relay
//! publishes again and every event retried with its id is counted once, with no restart.
//!
//! The test runs a tansu broker of its own (memory storage) whose advertised listener is the
//! test's TCP proxy: with the shared broker, librdkafka would connect to the advertised
//! address after bootstrapping through the proxy and never see the cut.

use crate::support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{free_port, wait_for, Servers, Tally, TcpSwitch};

const TIERS: &str = "
default_tier: basic
timezone: UTC
quotas:
  - name: monthly_tokens
    metric: total_tokens
    period: month
    limit: 1000
tiers:
  - name: basic
    priority: 0
    rate_multiplier: 1
";

/// librdkafka's message timeout for every service, short so the cut outlasts it.
const MESSAGE_TIMEOUT_MS: u64 = 3000;
/// How long ingest waits for acknowledgements.
const ACK_TIMEOUT_MS: u64 = 2000;
/// The check's staleness bound.
const MAX_STALENESS_MS: u64 = 3000;

/// The tansu binary: `TALLY_STACK_TANSU`, else `tansu` on PATH, else cargo's bin directory
/// (where `scripts/stack` installs it).
fn tansu() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("TALLY_STACK_TANSU").filter(|p| !p.is_empty()) {
        return p.into();
    }
    let home = std::env::var_os("HOME").map(std::path::PathBuf::from).unwrap_or_default();
    let cargo_home = std::env::var_os("CARGO_HOME").map(std::path::PathBuf::from).unwrap_or_else(|| home.join(".cargo"));
    let on_path = std::env::var_os("PATH").into_iter().flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>()).map(|d| d.join("tansu"));
    on_path
        .chain([cargo_home.join("bin/tansu"), home.join(".cargo/bin/tansu")])
        .find(|p| p.is_file())
        .expect("no tansu binary (set TALLY_STACK_TANSU, or run scripts/stack up once to build it)")
}

/// A tansu broker of the test's own, behind a proxy the test can cut; stopped by its pid
/// when dropped.
struct OwnBroker {
    child: Child,
    proxy: TcpSwitch,
}

impl OwnBroker {
    async fn start() -> OwnBroker {
        let port = free_port();
        let proxy = TcpSwitch::start(format!("127.0.0.1:{port}")).await;
        let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("tally-tests").join(format!("broker-{port}"));
        std::fs::create_dir_all(&dir).expect("broker dir");
        let log = std::fs::File::create(dir.join("tansu.log")).expect("broker log");
        // Run from its own directory: tansu reads a .env file from its working directory.
        let child = Command::new(tansu())
            .current_dir(&dir)
            .args(["broker", "--cluster-id", "tally-faults"])
            .args(["--listener-url", &format!("tcp://127.0.0.1:{port}")])
            .args(["--advertised-listener-url", &format!("tcp://127.0.0.1:{}", proxy.port)])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start tansu");
        let up = wait_for(Duration::from_secs(20), || async { tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() }).await;
        assert!(up, "tansu did not listen on {port}; log in {}", dir.display());
        OwnBroker { child, proxy }
    }

    fn address(&self) -> String {
        format!("127.0.0.1:{}", self.proxy.port)
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn event(id: &str, subject: &str, tokens: i64) -> Value {
    json!({"id": id, "subject": subject, "time": chrono::Utc::now().to_rfc3339(), "input_tokens": tokens})
}

/// Status, `Retry-After` and body of a POST.
async fn post(http: &reqwest::Client, url: &str, body: &Value) -> (u16, Option<String>, Value) {
    match http.post(url).json(body).send().await {
        Ok(r) => {
            let status = r.status().as_u16();
            let retry = r.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_string);
            (status, retry, r.json().await.unwrap_or(Value::Null))
        }
        Err(e) => panic!("POST {url}: {e}"),
    }
}

async fn status(http: &reqwest::Client, url: &str) -> (u16, Value) {
    match http.get(url).send().await {
        Ok(r) => (r.status().as_u16(), r.json().await.unwrap_or(Value::Null)),
        Err(_) => (0, Value::Null),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_cut_longer_than_the_message_timeout_heals_without_a_restart() {
    let broker = OwnBroker::start().await;
    let servers = Servers { kafka: broker.address(), ..support::servers() };
    let mut t = Tally::prepare_on(servers, Some(TIERS));
    let short = |extra: &[(&'static str, String)]| {
        let mut env = vec![("TALLY_KAFKA_MESSAGE_TIMEOUT_MS", MESSAGE_TIMEOUT_MS.to_string())];
        env.extend(extra.iter().cloned());
        env
    };
    t.spawn_env("ingest", &short(&[("TALLY_INGEST_ACK_TIMEOUT_MS", ACK_TIMEOUT_MS.to_string())]));
    t.spawn_env("aggregator", &short(&[]));
    t.spawn_env(
        "api",
        &short(&[("TALLY_CHECK_MAX_STALENESS_MS", MAX_STALENESS_MS.to_string()), ("TALLY_CHECK_STALE_POLICY", "closed".to_string())]),
    );
    t.wait_healthy().await;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(20)).build().unwrap();
    let (events_url, check_url) = (format!("{}/v1/events", t.ingest_url), format!("{}/v1/check", t.api_url));
    let readyz = [format!("{}/readyz", t.ingest_url), format!("{}/readyz", t.aggregator_url), format!("{}/readyz", t.api_url)];

    // Before the cut: a blocked subject, a fresh view, every service ready.
    assert_eq!(post(&http, &events_url, &event("heavy-1", "heavy", 1500)).await.0, 202);
    assert_eq!(post(&http, &events_url, &event("light-1", "light", 10)).await.0, 202);
    let blocked = wait_for(Duration::from_secs(30), || async {
        let (s, _, a) = post(&http, &check_url, &json!({"subject": "heavy"})).await;
        s == 200 && a["allowed"] == false && a["stale"] == false && a["reason"] == "quota_breached"
    })
    .await;
    assert!(blocked, "heavy was never blocked by a fresh view; logs in {}", t.log_dir().display());
    for url in &readyz {
        let ready = wait_for(Duration::from_secs(20), || async { status(&http, url).await.0 == 200 }).await;
        assert!(ready, "{url} not ready before the cut: {}", status(&http, url).await.1);
    }

    // The cut, longer than the message timeout.
    broker.proxy.set(false);
    let cut_at = Instant::now();
    let started = Instant::now();
    let (s, retry_after, body) = post(&http, &events_url, &event("during-1", "light", 20)).await;
    let took = started.elapsed();
    assert_eq!(s, 503, "ingest during the cut: {body}");
    assert!(retry_after.is_some(), "a 503 says when to retry");
    assert!(took < Duration::from_millis(ACK_TIMEOUT_MS + 3000), "ingest held the request {took:?}");
    assert!(body["error"].is_string(), "{body}");

    // The check answers by its (closed) policy once the view is staler than the bound.
    let stale = wait_for(Duration::from_secs(15), || async {
        let (s, _, a) = post(&http, &check_url, &json!({"subject": "light"})).await;
        s == 200 && a["stale"] == true && a["allowed"] == false && a["reason"] == "stale_fail_closed"
    })
    .await;
    assert!(stale, "the check never went stale during the cut: {}", post(&http, &check_url, &json!({"subject": "light"})).await.2);

    // Readiness says which clients lost the broker; liveness stays 200.
    for url in &readyz {
        let unready = wait_for(Duration::from_secs(15), || async {
            let (s, body) = status(&http, url).await;
            s == 503 && body.to_string().contains("disconnected")
        })
        .await;
        assert!(unready, "{url} stayed ready during the cut: {}", status(&http, url).await.1);
    }
    let (s, body) = status(&http, &format!("{}/healthz", t.ingest_url)).await;
    assert_eq!(s, 200, "liveness during the cut: {body}");

    // Keep it cut past the message timeout (twice over), as in the reported outage.
    let cut_for = Duration::from_millis(3 * MESSAGE_TIMEOUT_MS);
    tokio::time::sleep(cut_for.saturating_sub(cut_at.elapsed())).await;
    broker.proxy.set(true);
    let restored_at = Instant::now();

    // Ingest accepts again: the retry of the refused request, same id, is a 202.
    let accepted =
        wait_for(Duration::from_secs(20), || async { post(&http, &events_url, &event("during-1", "light", 20)).await.0 == 202 }).await;
    assert!(accepted, "ingest never accepted again after the cut; logs in {}", t.log_dir().display());
    eprintln!("ingest accepted again {:?} after the cut ended", restored_at.elapsed());

    // The relay publishes again: a new block reaches the view (fresh, not by policy).
    assert_eq!(post(&http, &events_url, &event("light-2", "light", 2000)).await.0, 202);
    let published = wait_for(Duration::from_secs(30), || async {
        let (s, _, a) = post(&http, &check_url, &json!({"subject": "light"})).await;
        s == 200 && a["stale"] == false && a["reason"] == "quota_breached"
    })
    .await;
    assert!(
        published,
        "no decision was published after the cut: {}; logs in {}",
        post(&http, &check_url, &json!({"subject": "light"})).await.2,
        t.log_dir().display()
    );
    eprintln!("decisions flowed again {:?} after the cut ended", restored_at.elapsed());
    for url in &readyz {
        let ready = wait_for(Duration::from_secs(30), || async { status(&http, url).await.0 == 200 }).await;
        assert!(ready, "{url} not ready after the cut: {}", status(&http, url).await.1);
    }

    // Counted once each: 10 + 20 + 2000 for light, whatever was delivered late or resent.
    assert!(wait_for(Duration::from_secs(20), || async { t.used("light", "total_tokens").await == 2030 }).await);
    assert_eq!(t.used("light", "total_tokens").await, 2030);
    assert_eq!(t.used("heavy", "total_tokens").await, 1500);
    for (name, url) in [("ingest", &t.ingest_url), ("aggregator", &t.aggregator_url)] {
        eprintln!("{name}: producer rebuilds {}", t.metric(url, "tally_kafka_producer_rebuilds_total").await);
    }
    drop(t);
    drop(broker);
}
