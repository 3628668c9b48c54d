//! A closed-loop HTTP/1.1 load generator on loopback, and the Redis baseline.
//!
//! Each of `connections` tasks holds one keep-alive connection (plain hyper, no pooling
//! layer) and sends its next request as soon as the previous answer's body is read, cycling
//! through the prepared requests. Requests in the first `warmup` are not recorded. The
//! generator runs in the bench process, on the same two cores as the server it measures;
//! the baselines (the server's `/healthz`, `redis-benchmark -t get`) pay the same price.

use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper::Request;
use hyper_util::rt::TokioIo;

use super::report::Latencies;

/// One prepared request.
#[derive(Debug, Clone)]
pub struct Req {
    pub method: hyper::Method,
    pub path: String,
    pub body: Option<Bytes>,
}

/// What a load run measured.
#[derive(Debug, Clone, Default)]
pub struct LoadResult {
    pub requests: u64,
    pub errors: u64,
    pub seconds: f64,
    pub latencies: Latencies,
}

impl LoadResult {
    pub fn per_s(&self) -> f64 {
        if self.seconds > 0.0 {
            self.requests as f64 / self.seconds
        } else {
            0.0
        }
    }
}

async fn connection(addr: String, auth: Option<String>, requests: Vec<Req>, offset: usize, warmup: Instant, end: Instant) -> anyhow::Result<(u64, u64, Latencies)> {
    let stream = tokio::net::TcpStream::connect(&addr).await.with_context(|| format!("failed to connect to {addr}"))?;
    stream.set_nodelay(true)?;
    let (mut sender, conn) = http1::handshake(TokioIo::new(stream)).await.context("HTTP handshake failed")?;
    let driver = tokio::spawn(conn);
    let mut latencies = Latencies::default();
    let (mut ok, mut errors) = (0u64, 0u64);
    let mut i = offset;
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        let r = &requests[i % requests.len()];
        i += 1;
        let mut builder = Request::builder().method(r.method.clone()).uri(r.path.as_str()).header(hyper::header::HOST, addr.as_str());
        if let Some(token) = &auth {
            builder = builder.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        if r.body.is_some() {
            builder = builder.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let request = builder.body(Full::new(r.body.clone().unwrap_or_default())).context("bad request")?;
        sender.ready().await.context("connection closed")?;
        let started = Instant::now();
        let response = sender.send_request(request).await.context("request failed")?;
        let status = response.status();
        response.into_body().collect().await.context("failed to read a response body")?;
        let took = started.elapsed();
        if started >= warmup {
            if status.is_success() {
                ok += 1;
                latencies.push(took);
            } else {
                errors += 1;
            }
        }
    }
    driver.abort();
    Ok((ok, errors, latencies))
}

/// Runs `connections` closed loops against `addr` for `warmup + duration`, presenting
/// `token` as a bearer token when given.
pub async fn run(addr: &str, token: Option<&str>, requests: Vec<Req>, connections: usize, warmup: Duration, duration: Duration) -> anyhow::Result<LoadResult> {
    anyhow::ensure!(!requests.is_empty(), "no requests to send");
    let start = Instant::now();
    let (warm, end) = (start + warmup, start + warmup + duration);
    let step = (requests.len() / connections.max(1)).max(1);
    let tasks: Vec<_> = (0..connections)
        .map(|c| tokio::spawn(connection(addr.to_string(), token.map(str::to_string), requests.clone(), c * step, warm, end)))
        .collect();
    let mut result = LoadResult::default();
    for t in tasks {
        let (ok, errors, latencies) = t.await.context("a load connection panicked")??;
        result.requests += ok;
        result.errors += errors;
        result.latencies.extend(latencies);
    }
    result.seconds = (Instant::now().min(end + Duration::from_secs(5)) - warm).as_secs_f64().max(duration.as_secs_f64());
    Ok(result)
}

/// `redis-benchmark -t get` against `host:port`: requests per second, p50 and p99 in ms.
/// `None` when redis-benchmark or the server is missing.
pub fn redis_get(host: &str, port: u16, requests: u64, connections: usize) -> Option<(f64, f64, f64)> {
    let out = std::process::Command::new("redis-benchmark")
        .args(["-h", host, "-p", &port.to_string(), "-t", "get", "-n", &requests.to_string(), "-c", &connections.to_string(), "--csv"])
        .stdin(std::process::Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    parse_redis_csv(&String::from_utf8_lossy(&out.stdout))
}

/// The GET line of `redis-benchmark --csv` (7.x: test, rps, avg, min, p50, p95, p99, max).
fn parse_redis_csv(text: &str) -> Option<(f64, f64, f64)> {
    let header: Vec<String> = text.lines().next()?.split(',').map(|f| f.trim_matches('"').to_string()).collect();
    let line = text.lines().find(|l| l.starts_with("\"GET\""))?;
    let fields: Vec<f64> = line.split(',').map(|f| f.trim_matches('"').parse::<f64>().unwrap_or(f64::NAN)).collect();
    let col = |name: &str| header.iter().position(|h| h == name).and_then(|i| fields.get(i).copied()).filter(|v| v.is_finite());
    Some((col("rps")?, col("p50_latency_ms")?, col("p99_latency_ms")?))
}

#[cfg(test)]
mod tests {
    #[test]
    fn redis_csv_is_read_by_column_name() {
        let text = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\",\"p50_latency_ms\",\"p95_latency_ms\",\"p99_latency_ms\",\"max_latency_ms\"\n\"GET\",\"59347.18\",\"0.498\",\"0.120\",\"0.479\",\"0.775\",\"1.095\",\"5.743\"\n";
        assert_eq!(super::parse_redis_csv(text), Some((59347.18, 0.479, 1.095)));
        assert_eq!(super::parse_redis_csv("nothing"), None);
    }
}
