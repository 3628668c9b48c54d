//! A closed-loop HTTP/1.1 load generator on loopback, and the Redis baseline.
//!
//! Each of `connections` tasks holds one keep-alive connection and sends its next request as
//! soon as the previous answer's body is read, cycling through the prepared requests.
//! Requests in the first `warmup` are not recorded; the generator's CPU time
//! ([`LoadResult::generator_cpu_seconds`]) and [`LoadResult::answered`] include them.
//!
//! The generator is built to cost the machine as little as `redis-benchmark`, the baseline
//! it is compared with, because it runs on the same two cores as the server it measures:
//! - every request is encoded into bytes once, before the run, and written with one call;
//! - an answer is read with one parse of its head (`httparse`) and its `Content-Length`;
//! - all connections run on one thread of their own (a current-thread runtime), as
//!   `redis-benchmark` runs on one.
//!
//! A generator on hyper's client (a task per connection plus hyper's connection task, two
//! wake-ups through channels per request) costs nearly as much CPU as the API it measures,
//! and on shared cores that tilts the comparison with Redis (cli/src/DESIGN.md).
//!
//! Answers must carry a `Content-Length` (axum's do); a chunked or close-delimited answer,
//! or a closed connection, fails the run with an error that says so.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::report::Latencies;
use super::stack::thread_cpu_seconds;

/// One prepared request.
#[derive(Debug, Clone)]
pub struct Req {
    pub method: &'static str,
    pub path: String,
    pub body: Option<Bytes>,
}

impl Req {
    /// The request's bytes on the wire: HTTP/1.1, keep-alive, with `Host`, the bearer
    /// `token` when given, and a JSON body when there is one.
    pub fn encode(&self, host: &str, token: Option<&str>) -> Vec<u8> {
        let mut head = format!("{} {} HTTP/1.1\r\nhost: {host}\r\n", self.method, self.path);
        if let Some(token) = token {
            head.push_str(&format!("authorization: Bearer {token}\r\n"));
        }
        if let Some(body) = &self.body {
            head.push_str(&format!("content-type: application/json\r\ncontent-length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        out.extend_from_slice(self.body.as_deref().unwrap_or_default());
        out
    }
}

/// What the start of a read buffer holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// A whole answer of `len` bytes with this status.
    Complete { status: u16, len: usize },
    /// Not all of it yet.
    Partial,
}

/// Looks for one whole HTTP/1.1 answer at the start of `buf`.
pub fn parse_answer(buf: &[u8]) -> anyhow::Result<Answer> {
    const MAX_HEADERS: usize = 32;
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let parsed = response.parse(buf).map_err(|e| match e {
        httparse::Error::TooManyHeaders => anyhow::anyhow!("an HTTP answer with more than {MAX_HEADERS} headers"),
        e => anyhow::anyhow!("malformed HTTP answer: {e}"),
    })?;
    let head_len = match parsed {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => return Ok(Answer::Partial),
    };
    let status = response.code.unwrap_or_default();
    let length = response.headers.iter().find(|h| h.name.eq_ignore_ascii_case("content-length"));
    let Some(length) = length else {
        bail!("an answer with status {status} has no Content-Length (chunked or close-delimited answers are not supported)");
    };
    let body_len: usize = std::str::from_utf8(length.value).ok().and_then(|v| v.trim().parse().ok()).context("bad Content-Length")?;
    let len = head_len.checked_add(body_len).context("Content-Length too large")?;
    Ok(if buf.len() >= len { Answer::Complete { status, len } } else { Answer::Partial })
}

/// What a load run measured.
#[derive(Debug, Clone, Default)]
pub struct LoadResult {
    /// Successful answers after the warm-up.
    pub requests: u64,
    pub errors: u64,
    /// Every answer, the warm-up's included (for CPU per request).
    pub answered: u64,
    pub seconds: f64,
    pub latencies: Latencies,
    /// CPU time of the generator's thread over the whole run, warm-up included.
    pub generator_cpu_seconds: f64,
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

/// How long a connection may go on after the end of the run before it counts as hung.
const GRACE: Duration = Duration::from_secs(10);

/// Runs `connections` closed loops against `addr` for `warmup + duration`, presenting
/// `token` as a bearer token when given. The loops run on a thread of their own.
pub async fn run(
    addr: &str,
    token: Option<&str>,
    requests: Vec<Req>,
    connections: usize,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<LoadResult> {
    anyhow::ensure!(!requests.is_empty(), "no requests to send");
    let encoded: Vec<Vec<u8>> = requests.iter().map(|r| r.encode(addr, token)).collect();
    let addr = addr.to_string();
    let (done, result) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("bench-load".into())
        .spawn(move || {
            let measured = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("failed to start the load generator's runtime")
                .and_then(|rt| rt.block_on(drive(addr, encoded, connections.max(1), warmup, duration)))
                .map(|measured| LoadResult { generator_cpu_seconds: thread_cpu_seconds(), ..measured });
            let _ = done.send(measured);
        })
        .context("failed to start the load generator's thread")?;
    result.await.context("the load generator's thread ended without a result")?
}

/// The closed loops of [`run`], on the current runtime.
async fn drive(
    addr: String,
    requests: Vec<Vec<u8>>,
    connections: usize,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<LoadResult> {
    let requests = std::sync::Arc::new(requests);
    let start = Instant::now();
    let (warm, end) = (start + warmup, start + warmup + duration);
    let step = (requests.len() / connections).max(1);
    let tasks: Vec<_> = (0..connections)
        .map(|c| {
            let looped = connection(addr.clone(), requests.clone(), c * step, warm, end);
            tokio::spawn(tokio::time::timeout_at((end + GRACE).into(), looped))
        })
        .collect();
    let mut result = LoadResult::default();
    for t in tasks {
        let looped = t.await.context("a load connection panicked")?;
        let done =
            looped.map_err(|_| anyhow::anyhow!("a load connection had no answer {} s after the end of the run", GRACE.as_secs()))??;
        result.requests += done.ok;
        result.errors += done.errors;
        result.answered += done.answered;
        result.latencies.extend(done.latencies);
    }
    result.seconds = (Instant::now().min(end + Duration::from_secs(5)) - warm).as_secs_f64().max(duration.as_secs_f64());
    Ok(result)
}

/// What one closed loop measured.
#[derive(Default)]
struct ConnectionCounts {
    /// Successful answers after the warm-up, and their latencies.
    ok: u64,
    latencies: Latencies,
    /// Failed answers after the warm-up.
    errors: u64,
    /// Every answer.
    answered: u64,
}

/// One closed loop on one connection.
async fn connection(
    addr: String,
    requests: std::sync::Arc<Vec<Vec<u8>>>,
    offset: usize,
    warmup: Instant,
    end: Instant,
) -> anyhow::Result<ConnectionCounts> {
    let mut stream = tokio::net::TcpStream::connect(&addr).await.with_context(|| format!("failed to connect to {addr}"))?;
    stream.set_nodelay(true)?;
    let mut buf: Vec<u8> = Vec::with_capacity(16 * 1024);
    let mut counts = ConnectionCounts::default();
    let mut i = offset;
    loop {
        let started = Instant::now();
        if started >= end {
            break;
        }
        let request = &requests[i % requests.len()];
        i += 1;
        stream.write_all(request).await.context("failed to send a request")?;
        let status = read_answer(&mut stream, &mut buf).await?;
        let took = started.elapsed();
        counts.answered += 1;
        if started >= warmup {
            if (200..300).contains(&status) {
                counts.ok += 1;
                counts.latencies.push(took);
            } else {
                counts.errors += 1;
            }
        }
    }
    Ok(counts)
}

/// Reads one whole answer into `buf` and takes it out again; returns its status.
async fn read_answer(stream: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> anyhow::Result<u16> {
    loop {
        if let Answer::Complete { status, len } = parse_answer(buf)? {
            buf.drain(..len);
            return Ok(status);
        }
        if stream.read_buf(buf).await.context("failed to read an answer")? == 0 {
            bail!("the server closed the connection before a whole answer came");
        }
    }
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
    use super::*;

    #[test]
    fn redis_csv_is_read_by_column_name() {
        let text = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\",\"p50_latency_ms\",\"p95_latency_ms\",\"p99_latency_ms\",\"max_latency_ms\"\n\"GET\",\"59347.18\",\"0.498\",\"0.120\",\"0.479\",\"0.775\",\"1.095\",\"5.743\"\n";
        assert_eq!(super::parse_redis_csv(text), Some((59347.18, 0.479, 1.095)));
        assert_eq!(super::parse_redis_csv("nothing"), None);
    }

    #[test]
    fn a_request_is_encoded_once_with_its_token_and_body() {
        let post = Req { method: "POST", path: "/v1/check".into(), body: Some(Bytes::from_static(b"{\"subject\":\"s1\"}")) };
        let wire = String::from_utf8(post.encode("127.0.0.1:8081", Some("t0123456789abcdef"))).unwrap();
        assert_eq!(
            wire,
            "POST /v1/check HTTP/1.1\r\nhost: 127.0.0.1:8081\r\nauthorization: Bearer t0123456789abcdef\r\n\
             content-type: application/json\r\ncontent-length: 16\r\n\r\n{\"subject\":\"s1\"}"
        );
        let get = Req { method: "GET", path: "/healthz".into(), body: None };
        assert_eq!(get.encode("h:1", None), b"GET /healthz HTTP/1.1\r\nhost: h:1\r\n\r\n");
    }

    #[test]
    fn an_answer_is_complete_only_with_its_whole_body() {
        let answer = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nContent-Length: 11\r\n\r\n{\"ok\":true}";
        assert_eq!(parse_answer(answer).unwrap(), Answer::Complete { status: 200, len: answer.len() });
        // Cut anywhere before the end, it is partial: in the head or in the body.
        for cut in [0, 10, answer.len() - 12, answer.len() - 1] {
            assert_eq!(parse_answer(&answer[..cut]).unwrap(), Answer::Partial, "cut at {cut}");
        }
        // Bytes after it (the next answer) are not part of it.
        let mut two = answer.to_vec();
        two.extend_from_slice(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n");
        assert_eq!(parse_answer(&two).unwrap(), Answer::Complete { status: 200, len: answer.len() });
        assert_eq!(parse_answer(&two[answer.len()..]).unwrap(), Answer::Complete { status: 403, len: two.len() - answer.len() });
    }

    #[test]
    fn an_answer_without_a_length_or_with_a_bad_one_is_an_error() {
        let chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
        assert!(parse_answer(chunked).unwrap_err().to_string().contains("no Content-Length"));
        assert!(parse_answer(b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n").is_err());
        assert!(parse_answer(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
        let huge = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", usize::MAX);
        assert!(parse_answer(huge.as_bytes()).unwrap_err().to_string().contains("too large"));
        let crowded = format!("HTTP/1.1 200 OK\r\n{}content-length: 0\r\n\r\n", "x-a: 1\r\n".repeat(40));
        assert!(parse_answer(crowded.as_bytes()).unwrap_err().to_string().contains("more than 32 headers"));
    }
}
