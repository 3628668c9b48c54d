//! History queries over a large synthetic history.
//!
//! Rows are generated on the ClickHouse server (`INSERT ... SELECT ... FROM numbers(N)`) into
//! the run's own ClickHouse database, in the tables the history writer fills: raw rows in
//! `usage_events` over the last 35 days for `subjects` subjects, two scopes and three models,
//! then the hourly and daily rollups computed from them the way the writer does (one row
//! per bucket, subject, scope and model) and the daily totals per subject from the daily
//! rollup. The queries go through the API's history routes, one at a time: a 30-day daily
//! series for one subject (rotating over subjects) and a top-20 over 30 days. The baseline
//! is a `SELECT 1` sent straight to ClickHouse through the same client the API uses: the
//! floor of any ClickHouse round trip on this machine.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chrono::Utc;
use tally_common::clickhouse::ClickHouseSettings;

use super::report::{Latencies, Section};

async fn execute(ch: &clickhouse::Client, sql: &str) -> anyhow::Result<()> {
    ch.query(sql).execute().await.with_context(|| format!("ClickHouse refused a bench statement: {sql}"))
}

async fn count(ch: &clickhouse::Client, table: &str) -> anyhow::Result<u64> {
    Ok(ch.query(&format!("SELECT count() FROM {table}")).fetch_one::<u64>().await?)
}

/// Fills the run's ClickHouse database (the client's) with `rows` raw rows and their rollups.
pub async fn generate(ch: &clickhouse::Client, rows: u64, subjects: u64) -> anyhow::Result<(f64, u64, u64)> {
    let started = Instant::now();
    let span = 35 * 86_400u64;
    let base = (Utc::now().timestamp() as u64).saturating_sub(span);
    let raw = format!(
        "INSERT INTO usage_events (event_id, event_day, subject, time, scope, model, api_key_sha256, requests, input_tokens,
                                   output_tokens, cached_tokens, cost_micros, fingerprint, inserted_at)
         SELECT concat('bench-', toString(number)), toDate(t), concat('h', toString(number % {subjects})), t,
                arrayElement(['chat', 'batch'], (number % 2) + 1),
                arrayElement(['gpt-4o', 'gpt-4o-mini', 'o3'], (intHash32(number + 1) % 3) + 1),
                '', toInt64(1), toInt64(100 + number % 900), toInt64(50 + number % 300), toInt64(0),
                toInt64(number % 5000), '', now()
         FROM (SELECT number, fromUnixTimestamp64Milli(toInt64({base} + intHash32(number) % {span}) * 1000 + number % 1000, 'UTC') AS t
               FROM numbers({rows}))"
    );
    execute(ch, &raw).await?;
    for (table, bucket) in [("usage_hourly", "toStartOfHour(time)"), ("usage_daily", "toStartOfDay(time)")] {
        let sql = format!(
            "INSERT INTO {table}
             SELECT {bucket} AS b, subject, scope, model, count(), sum(requests), sum(input_tokens),
                    sum(output_tokens), sum(cached_tokens), sum(cost_micros), toUInt64(1)
             FROM usage_events GROUP BY b, subject, scope, model"
        );
        execute(ch, &sql).await?;
    }
    let totals = "INSERT INTO usage_subject_daily
         SELECT day, subject, sum(events), sum(requests), sum(input_tokens), sum(output_tokens),
                sum(cached_tokens), sum(cost_micros), toUInt64(1)
         FROM usage_daily GROUP BY day, subject";
    execute(ch, totals).await?;
    let hourly = count(ch, "usage_hourly").await?;
    let daily = count(ch, "usage_daily").await?;
    Ok((started.elapsed().as_secs_f64(), hourly, daily))
}

async fn timed(http: &reqwest::Client, url: &str) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let r = http.get(url).send().await.with_context(|| format!("failed to reach {url}"))?;
    let status = r.status();
    let body = r.bytes().await?;
    if !status.is_success() {
        bail!("{url} answered {status}: {}", String::from_utf8_lossy(&body));
    }
    Ok(started.elapsed())
}

/// Section 5: generates the history, then times the queries through the API at `api`.
pub async fn measure(
    http: &reqwest::Client,
    clickhouse_url: &str,
    db: &str,
    api: &str,
    rows: u64,
    subjects: u64,
    queries: usize,
) -> anyhow::Result<Section> {
    let settings = ClickHouseSettings { clickhouse_url: clickhouse_url.to_string(), clickhouse_database: db.to_string() };
    let ch = settings.client();
    eprintln!("[bench] history: generating {rows} usage rows and their rollups in ClickHouse");
    let (insert_seconds, hourly, daily) = generate(&ch, rows, subjects).await?;
    let today = Utc::now().date_naive();
    let (from, to) = (today - chrono::Duration::days(30), today);
    let series_url = |k: usize| {
        format!(
            "http://{api}/v1/history/series?metric=total_tokens&from={from}&to={to}&granularity=day&subject=h{}",
            (k * 7919) as u64 % subjects
        )
    };
    let top_url = format!("http://{api}/v1/history/top?metric=total_tokens&from={from}&to={to}&limit=20");
    // One warm-up of each, so the first query does not pay for cold caches alone.
    timed(http, &series_url(0)).await?;
    timed(http, &top_url).await?;
    let (mut series, mut top, mut floor) = (Latencies::default(), Latencies::default(), Latencies::default());
    for k in 0..queries {
        series.push(timed(http, &series_url(k + 1)).await?);
    }
    for _ in 0..queries {
        top.push(timed(http, &top_url).await?);
    }
    let server = settings.server_client();
    for _ in 0..queries {
        let started = Instant::now();
        server.query("SELECT 1").fetch_one::<u8>().await.context("SELECT 1 on ClickHouse")?;
        floor.push(started.elapsed());
    }
    let mut s = Section::default();
    s.figure("raw_rows", rows as f64)
        .figure("hourly_rows", hourly as f64)
        .figure("daily_rows", daily as f64)
        .figure("subjects", subjects as f64)
        .figure("generate_seconds", insert_seconds)
        .figure("queries_each", queries as f64)
        .latencies("series_30d_daily", &series)
        .latencies("top20_30d", &top)
        .latencies("clickhouse_select1", &floor)
        .ratio("series_p50_to_select1_p50", series.p50_ms(), floor.p50_ms())
        .ratio("series_p99_to_select1_p99", series.p99_ms(), floor.p99_ms())
        .ratio("top_p50_to_select1_p50", top.p50_ms(), floor.p50_ms())
        .ratio("top_p99_to_select1_p99", top.p99_ms(), floor.p99_ms())
        .target("series p99 <= 100 ms", series.p99_ms() <= 100.0)
        .target("top-20 p99 <= 100 ms", top.p99_ms() <= 100.0)
        .target("at least 10 million rows", rows >= 10_000_000)
        .note("queries through the API (GET /v1/history/series, /v1/history/top), one at a time; baseline SELECT 1 straight to ClickHouse over HTTP");
    Ok(s)
}
