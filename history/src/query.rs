//! History queries for dashboards: time series and top subjects.
//!
//! Contract:
//! - Ranges are half-open `[from, to)`; `from` and `to` are RFC 3339 instants or dates
//!   (`2026-11-01`, local midnight in the query's timezone).
//! - Buckets are `hour`, `day` or `month` in the query's timezone (IANA name, default UTC),
//!   DST-correct. Limits: an `hour` series spans at most 31 days, `day` at most 366 days,
//!   `month` at most 5 years; at most [`MAX_SERIES`] series per answer (the largest first,
//!   `truncated` says when more existed); top-N at most [`MAX_TOP`] subjects over at most
//!   366 days.
//! - Answers come from the daily rollup when every bucket edge is a UTC midnight, from the
//!   hourly rollup when every edge is a whole UTC hour, else from the raw rows; `source`
//!   says which. All three read with `FINAL`, so replays never show. Top-N over whole UTC
//!   days without a scope or model filter reads the daily totals per subject
//!   (`usage_subject_daily`, one row per subject and day, kept by the history writer the
//!   same replay-safe way), also with `FINAL`, and answers `source: daily`: `FINAL` merges the
//!   rows it reads, so its cost follows them.
//! - Usage by API key and by budget: the filters `api_key_sha256` (the key's SHA-256 hex) and
//!   `budget` (a budget owner, `group:eng`, `api_key:<hex>`, `tier:pro`: the events that met
//!   its budget, as the ledger counted them), and the groupings `group_by=api_key` and
//!   `group_by=budget` (one series per budget met; an event in two budgets is in both, one
//!   in none in no series) read the raw rows, which alone carry them (their bloom filter
//!   indexes skip the granules without the key or budget asked for); `source` says `raw`.
//! - Bad input is a [`QueryError`] naming the field; nothing is queried.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Duration, NaiveDate, Offset, TimeZone, Timelike, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};
use tally_domain::budget::BudgetOwner;
use tally_domain::metric::Metric;
use tally_domain::period::PeriodSpec;

use clickhouse::query::Query;
use clickhouse::Row;

use crate::client::{Ch, ChError};

pub const MAX_SERIES: usize = 100;
pub const DEFAULT_SERIES: usize = 10;
pub const MAX_TOP: usize = 1000;
pub const DEFAULT_TOP: usize = 10;

/// Bad query input, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct QueryError {
    pub field: &'static str,
    pub message: String,
}

fn bad(field: &'static str, message: impl Into<String>) -> QueryError {
    QueryError { field, message: message.into() }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Granularity {
    Hour,
    Day,
    Month,
}

impl Granularity {
    fn parse(s: &str) -> Result<Self, QueryError> {
        match s {
            "hour" => Ok(Granularity::Hour),
            "day" => Ok(Granularity::Day),
            "month" => Ok(Granularity::Month),
            _ => Err(bad("granularity", format!("unknown granularity {s:?}: expected hour, day or month"))),
        }
    }
    fn max_range(self) -> Duration {
        match self {
            Granularity::Hour => Duration::days(31),
            Granularity::Day => Duration::days(366),
            Granularity::Month => Duration::days(5 * 366),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupBy {
    Model,
    Scope,
    Subject,
    /// The API key's SHA-256 hex (`""`: events without a key).
    ApiKey,
    /// Each budget the event met, named by its owner (`group:eng`).
    Budget,
}

impl GroupBy {
    fn column(self) -> &'static str {
        match self {
            GroupBy::Model => "model",
            GroupBy::Scope => "scope",
            GroupBy::Subject => "subject",
            GroupBy::ApiKey => "api_key_sha256",
            GroupBy::Budget => "budget",
        }
    }

    /// Whether only the raw rows hold its column.
    fn needs_raw(self) -> bool {
        matches!(self, GroupBy::ApiKey | GroupBy::Budget)
    }
}

/// Where an answer was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Daily,
    Hourly,
    Raw,
}

impl Source {
    fn table(self) -> &'static str {
        match self {
            Source::Daily => "usage_daily",
            Source::Hourly => "usage_hourly",
            Source::Raw => "usage_events",
        }
    }
    fn time_column(self) -> &'static str {
        match self {
            Source::Daily => "day",
            Source::Hourly => "hour",
            Source::Raw => "time",
        }
    }
}

/// Filters shared by series and top-N.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Filters {
    pub subject: Option<String>,
    pub scope: Option<String>,
    pub model: Option<String>,
    /// The SHA-256 hex of an API key (lowercase).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_key_sha256: Option<String>,
    /// A budget owner (`group:eng`): only the events that met its budget.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "owner_spec")]
    pub budget: Option<BudgetOwner>,
}

/// A budget owner as its spec (`group:eng`).
fn owner_spec<S: serde::Serializer>(owner: &Option<BudgetOwner>, s: S) -> Result<S::Ok, S::Error> {
    match owner {
        Some(o) => s.serialize_str(&o.spec()),
        None => s.serialize_none(),
    }
}

impl Filters {
    /// Whether only the raw rows hold what these filters read.
    fn need_raw(&self) -> bool {
        self.api_key_sha256.is_some() || self.budget.is_some()
    }
}

/// A validated time-series query.
#[derive(Debug, Clone, PartialEq)]
pub struct SeriesQuery {
    pub metric: Metric,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub granularity: Granularity,
    pub timezone: Tz,
    pub filters: Filters,
    pub group_by: Option<GroupBy>,
    pub limit: usize,
}

/// A validated top-N query.
#[derive(Debug, Clone, PartialEq)]
pub struct TopQuery {
    pub metric: Metric,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub filters: Filters,
    pub limit: usize,
}

/// Raw query-string parameters, as the API receives them.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Params {
    pub metric: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    pub granularity: Option<String>,
    pub tz: Option<String>,
    pub subject: Option<String>,
    pub scope: Option<String>,
    pub model: Option<String>,
    pub api_key_sha256: Option<String>,
    pub budget: Option<String>,
    pub group_by: Option<String>,
    pub limit: Option<String>,
}

fn parse_instant(field: &'static str, s: &str, tz: Tz) -> Result<DateTime<Utc>, QueryError> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return tally_domain::period::start_of_day(d, tz).ok_or_else(|| bad(field, format!("{s} has no midnight in {tz}")));
    }
    Err(bad(field, format!("{s:?} is neither an RFC 3339 instant nor a date (YYYY-MM-DD)")))
}

fn parse_limit(s: Option<&str>, default: usize, max: usize) -> Result<usize, QueryError> {
    match s {
        None => Ok(default),
        Some(s) => match s.parse::<usize>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(bad("limit", format!("must be an integer from 1 to {max}"))),
        },
    }
}

fn parse_common(p: &Params, tz: Tz, max_range: Duration) -> Result<(Metric, DateTime<Utc>, DateTime<Utc>, Filters), QueryError> {
    let metric = match p.metric.as_deref() {
        None => Metric::TotalTokens,
        Some(m) => m.parse::<Metric>().map_err(|e| bad("metric", e.to_string()))?,
    };
    let from = parse_instant("from", p.from.as_deref().ok_or_else(|| bad("from", "required"))?, tz)?;
    let to = parse_instant("to", p.to.as_deref().ok_or_else(|| bad("to", "required"))?, tz)?;
    if to <= from {
        return Err(bad("to", "must be after `from`"));
    }
    if to - from > max_range {
        return Err(bad("to", format!("the range is longer than the limit of {} days", max_range.num_days())));
    }
    let nonempty = |field: &'static str, v: &Option<String>| match v {
        Some(s) if s.is_empty() && field == "subject" => Err(bad(field, "must not be empty")),
        Some(s) if s.chars().count() > 256 => Err(bad(field, "longer than 256 characters")),
        other => Ok(other.clone()),
    };
    let api_key_sha256 = match p.api_key_sha256.as_deref() {
        None => None,
        Some(k) if k.len() == 64 && k.bytes().all(|b| b.is_ascii_hexdigit()) => Some(k.to_ascii_lowercase()),
        Some(_) => return Err(bad("api_key_sha256", "must be the 64 hex characters of the key's SHA-256, never the key")),
    };
    let budget = match p.budget.as_deref() {
        None => None,
        Some(spec) => Some(BudgetOwner::parse_spec(spec).filter(|_| spec.chars().count() <= 256).ok_or_else(|| {
            bad("budget", format!("{spec:?} names no budget owner: expected group:<name>, api_key:<sha256 hex> or tier:<name>"))
        })?),
    };
    let filters = Filters {
        subject: nonempty("subject", &p.subject)?,
        scope: nonempty("scope", &p.scope)?,
        model: nonempty("model", &p.model)?,
        api_key_sha256,
        budget,
    };
    Ok((metric, from, to, filters))
}

impl SeriesQuery {
    pub fn parse(p: &Params) -> Result<SeriesQuery, QueryError> {
        let timezone = match p.tz.as_deref() {
            None => Tz::UTC,
            Some(name) => name.parse::<Tz>().map_err(|_| bad("tz", format!("unknown timezone {name:?}")))?,
        };
        let granularity = Granularity::parse(p.granularity.as_deref().unwrap_or("day"))?;
        let (metric, from, to, filters) = parse_common(p, timezone, granularity.max_range())?;
        let group_by = match p.group_by.as_deref() {
            None | Some("") | Some("none") => None,
            Some("model") => Some(GroupBy::Model),
            Some("scope") => Some(GroupBy::Scope),
            Some("subject") => Some(GroupBy::Subject),
            Some("api_key") => Some(GroupBy::ApiKey),
            Some("budget") => Some(GroupBy::Budget),
            Some(other) => {
                return Err(bad("group_by", format!("unknown grouping {other:?}: expected model, scope, subject, api_key or budget")))
            }
        };
        let limit = parse_limit(p.limit.as_deref(), DEFAULT_SERIES, MAX_SERIES)?;
        Ok(SeriesQuery { metric, from, to, granularity, timezone, filters, group_by, limit })
    }

    /// The starts of the buckets covering `[from, to)`, plus the end of the last one.
    pub fn bucket_edges(&self) -> Vec<DateTime<Utc>> {
        bucket_edges(self.from, self.to, self.granularity, self.timezone)
    }

    /// The cheapest table whose buckets tile these query buckets exactly and that holds what
    /// the filters and grouping read.
    pub fn source(&self) -> Source {
        if self.filters.need_raw() || self.group_by.is_some_and(GroupBy::needs_raw) {
            return Source::Raw;
        }
        let mut edges = self.bucket_edges();
        edges[0] = self.from;
        if let Some(last) = edges.last_mut() {
            *last = self.to;
        }
        source_for(&edges)
    }
}

impl TopQuery {
    pub fn parse(p: &Params) -> Result<TopQuery, QueryError> {
        let (metric, from, to, filters) = parse_common(p, Tz::UTC, Duration::days(366))?;
        let limit = parse_limit(p.limit.as_deref(), DEFAULT_TOP, MAX_TOP)?;
        Ok(TopQuery { metric, from, to, filters, limit })
    }

    /// The cheapest table whose buckets tile the range and that holds what the filters read.
    pub fn source(&self) -> Source {
        if self.filters.need_raw() {
            Source::Raw
        } else {
            source_for(&[self.from, self.to])
        }
    }
}

fn source_for(edges: &[DateTime<Utc>]) -> Source {
    let aligned = |secs: i64| edges.iter().all(|t| t.timestamp().rem_euclid(secs) == 0 && t.timestamp_subsec_nanos() == 0);
    if aligned(86_400) {
        Source::Daily
    } else if aligned(3_600) {
        Source::Hourly
    } else {
        Source::Raw
    }
}

/// The start of the local hour containing `t` in `tz` (offsets need not be whole hours).
fn local_hour_start(t: DateTime<Utc>, tz: Tz) -> DateTime<Utc> {
    let local = t.with_timezone(&tz);
    t - Duration::seconds(i64::from(local.minute()) * 60 + i64::from(local.second())) - Duration::nanoseconds(i64::from(local.nanosecond()))
}

/// Bucket starts from the bucket containing `from` up to the first edge at or after `to`.
pub fn bucket_edges(from: DateTime<Utc>, to: DateTime<Utc>, g: Granularity, tz: Tz) -> Vec<DateTime<Utc>> {
    let mut edges = Vec::new();
    let mut start = match g {
        Granularity::Hour => local_hour_start(from, tz),
        Granularity::Day => PeriodSpec::Day.window(from, tz).start,
        Granularity::Month => PeriodSpec::Month.window(from, tz).start,
    };
    edges.push(start);
    while start < to {
        start = match g {
            Granularity::Hour => local_hour_start(start + Duration::hours(1), tz).max(start + Duration::minutes(1)),
            Granularity::Day => PeriodSpec::Day.window(start, tz).end,
            Granularity::Month => PeriodSpec::Month.window(start, tz).end,
        };
        edges.push(start);
    }
    edges
}

/// Whether `tz` is UTC-like (offset 0) at `t`.
pub fn utc_offset_seconds(tz: Tz, t: DateTime<Utc>) -> i32 {
    tz.offset_from_utc_datetime(&t.naive_utc()).fix().local_minus_utc()
}

fn metric_expr(m: Metric) -> &'static str {
    match m {
        Metric::Requests => "requests",
        Metric::InputTokens => "input_tokens",
        Metric::OutputTokens => "output_tokens",
        Metric::CachedTokens => "cached_tokens",
        Metric::TotalTokens => "input_tokens + output_tokens",
        Metric::CostMicros => "cost_micros",
    }
}

/// The rows a query reads: `table` under `FINAL`, and with one row per budget met (as
/// `budget`) when grouped by budget.
fn from_clause(table: &str, group_by: Option<GroupBy>) -> String {
    match group_by {
        Some(GroupBy::Budget) => format!("{table} FINAL ARRAY JOIN budgets AS budget"),
        _ => format!("{table} FINAL"),
    }
}

/// The WHERE clause of a range and filters over `column`; [`bind_where`] gives the values.
fn where_clause(column: &str, f: &Filters) -> String {
    let mut w = format!(
        "{column} >= fromUnixTimestamp64Milli({{from_ms:Int64}}, 'UTC') AND {column} < fromUnixTimestamp64Milli({{to_ms:Int64}}, 'UTC')"
    );
    if f.subject.is_some() {
        w.push_str(" AND subject = {subject:String}");
    }
    if f.scope.is_some() {
        w.push_str(" AND scope = {scope:String}");
    }
    if f.model.is_some() {
        w.push_str(" AND model = {model:String}");
    }
    if f.api_key_sha256.is_some() {
        w.push_str(" AND api_key_sha256 = {api_key:String}");
    }
    if f.budget.is_some() {
        w.push_str(" AND has(budgets, {budget:String})");
    }
    w
}

/// Milliseconds since the epoch, rounded up: raw rows keep milliseconds, so an instant `t`
/// with a finer part is compared as the first millisecond at or after it (`time >= t` and
/// `time < t` then hold for exactly the rows they hold for at full precision).
fn millis_up(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis() + i64::from(!t.timestamp_subsec_nanos().is_multiple_of(1_000_000))
}

/// The values of [`where_clause`]'s parameters.
fn bind_where(mut query: Query, from: DateTime<Utc>, to: DateTime<Utc>, f: &Filters) -> Query {
    query = query.param("from_ms", millis_up(from)).param("to_ms", millis_up(to));
    for (name, value) in [("subject", &f.subject), ("scope", &f.scope), ("model", &f.model), ("api_key", &f.api_key_sha256)] {
        if let Some(v) = value {
            query = query.param(name, v);
        }
    }
    if let Some(owner) = &f.budget {
        query = query.param("budget", owner.ledger_subject());
    }
    query
}

/// One point of a series.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Point {
    pub start: DateTime<Utc>,
    pub value: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Series {
    /// The model, scope, subject, API key hash or budget owner (`group:eng`) of this series;
    /// `null` without grouping.
    pub key: Option<String>,
    pub total: i64,
    pub points: Vec<Point>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SeriesAnswer {
    pub metric: Metric,
    pub granularity: Granularity,
    pub timezone: String,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub group_by: Option<GroupBy>,
    pub filters: Filters,
    pub source: Source,
    pub series: Vec<Series>,
    /// More series existed than `limit`; the largest are kept.
    pub truncated: bool,
}

#[derive(Deserialize, Row)]
struct BucketRow {
    b: u32,
    k: String,
    v: i64,
}

/// Runs a series query.
pub async fn series(ch: &Ch, q: &SeriesQuery) -> Result<SeriesAnswer, ChError> {
    let source = q.source();
    let col = source.time_column();
    let bucket = match q.granularity {
        Granularity::Hour => format!("toUInt32(toStartOfHour({col}, {{tz:String}}))"),
        Granularity::Day => format!("toUInt32(toStartOfDay({col}, {{tz:String}}))"),
        Granularity::Month => format!("toUInt32(toDateTime(toStartOfMonth({col}, {{tz:String}}), {{tz:String}}))"),
    };
    let key = q.group_by.map_or("''", GroupBy::column);
    let sql = format!(
        "SELECT {bucket} AS b, toString({key}) AS k, sum({m}) AS v FROM {from} WHERE {w} GROUP BY b, k",
        m = metric_expr(q.metric),
        from = from_clause(source.table(), q.group_by),
        w = where_clause(col, &q.filters),
    );
    let query = bind_where(ch.query(&sql).param("tz", q.timezone.name()), q.from, q.to, &q.filters);
    let rows: Vec<BucketRow> = ch.fetch_all(query).await?;
    let edges = q.bucket_edges();
    let by_budget = q.group_by == Some(GroupBy::Budget);
    let rows = rows.into_iter().map(|r| {
        let key = if by_budget { BudgetOwner::from_ledger_subject(&r.k).map_or(r.k, |o| o.spec()) } else { r.k };
        (i64::from(r.b), key, r.v)
    });
    let (series, truncated) = assemble(&edges, rows, q.group_by.is_some(), q.limit);
    Ok(SeriesAnswer {
        metric: q.metric,
        granularity: q.granularity,
        timezone: q.timezone.name().to_string(),
        from: q.from,
        to: q.to,
        group_by: q.group_by,
        filters: q.filters.clone(),
        source,
        series,
        truncated,
    })
}

/// Builds zero-filled series over `edges` from `(bucket start, key, value)` rows, keeping the
/// `limit` largest series by total.
fn assemble(edges: &[DateTime<Utc>], rows: impl Iterator<Item = (i64, String, i64)>, grouped: bool, limit: usize) -> (Vec<Series>, bool) {
    let starts: Vec<i64> = edges[..edges.len().saturating_sub(1)].iter().map(|t| t.timestamp()).collect();
    let mut by_key: HashMap<String, BTreeMap<usize, i64>> = HashMap::new();
    for (b, k, v) in rows {
        // The bucket whose start is the last one at or before `b`.
        let i = starts.partition_point(|s| *s <= b).saturating_sub(1);
        *by_key.entry(k).or_default().entry(i).or_default() += v;
    }
    if !grouped && by_key.is_empty() {
        by_key.insert(String::new(), BTreeMap::new());
    }
    let mut series: Vec<Series> = by_key
        .into_iter()
        .map(|(k, values)| {
            let points: Vec<Point> = edges
                .iter()
                .take(starts.len())
                .enumerate()
                .map(|(i, t)| Point { start: *t, value: values.get(&i).copied().unwrap_or(0) })
                .collect();
            Series { key: grouped.then_some(k), total: points.iter().map(|p| p.value).sum(), points }
        })
        .collect();
    series.sort_by(|a, b| b.total.cmp(&a.total).then_with(|| a.key.cmp(&b.key)));
    let truncated = series.len() > limit;
    series.truncate(limit);
    (series, truncated)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Row)]
pub struct TopSubject {
    pub subject: String,
    pub value: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct TopAnswer {
    pub metric: Metric,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub filters: Filters,
    pub source: Source,
    pub subjects: Vec<TopSubject>,
}

/// The subjects with the largest `metric` over the range.
pub async fn top(ch: &Ch, q: &TopQuery) -> Result<TopAnswer, ChError> {
    let source = q.source();
    let query = bind_where(ch.query(&top_sql(q, source)), q.from, q.to, &q.filters).param("limit", q.limit as u64);
    let subjects = ch.fetch_all(query).await?;
    Ok(TopAnswer { metric: q.metric, from: q.from, to: q.to, filters: q.filters.clone(), source, subjects })
}

/// The top-N statement. Over whole UTC days without a scope or model filter it reads the
/// daily totals per subject (one row per subject and day) rather than the daily rollup (one
/// per subject, day, scope and model): `FINAL` merges the rows it reads, so its cost follows
/// them.
fn top_sql(q: &TopQuery, source: Source) -> String {
    let name = match source {
        Source::Daily if q.filters.scope.is_none() && q.filters.model.is_none() => SUBJECT_DAILY,
        _ => source.table(),
    };
    format!(
        "SELECT subject, sum({m}) AS value FROM {name} FINAL WHERE {w} GROUP BY subject ORDER BY value DESC, subject LIMIT {{limit:UInt64}}",
        m = metric_expr(q.metric),
        w = where_clause(source.time_column(), &q.filters),
    )
}

/// Daily totals per subject over all scopes and models (kept by the history writer).
const SUBJECT_DAILY: &str = "usage_subject_daily";

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> Params {
        let v: serde_json::Map<String, serde_json::Value> = pairs.iter().map(|(k, v)| (k.to_string(), serde_json::json!(v))).collect();
        serde_json::from_value(serde_json::Value::Object(v)).unwrap()
    }

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn bad_input_names_the_field() {
        let err = |p: &[(&str, &str)]| SeriesQuery::parse(&params(p)).unwrap_err().field;
        assert_eq!(err(&[("to", "2026-11-02")]), "from");
        assert_eq!(err(&[("from", "2026-11-02"), ("to", "2026-11-01")]), "to");
        assert_eq!(err(&[("from", "yesterday"), ("to", "2026-11-01")]), "from");
        assert_eq!(err(&[("from", "2026-01-01"), ("to", "2026-03-01"), ("granularity", "hour")]), "to");
        assert_eq!(err(&[("from", "2026-11-01"), ("to", "2026-11-02"), ("metric", "tokens")]), "metric");
        assert_eq!(err(&[("from", "2026-11-01"), ("to", "2026-11-02"), ("tz", "Mars/Base")]), "tz");
        assert_eq!(err(&[("from", "2026-11-01"), ("to", "2026-11-02"), ("group_by", "colour")]), "group_by");
        assert_eq!(err(&[("from", "2026-11-01"), ("to", "2026-11-02"), ("limit", "0")]), "limit");
        assert_eq!(err(&[("from", "2026-11-01"), ("to", "2026-11-02"), ("granularity", "week")]), "granularity");
    }

    #[test]
    fn day_buckets_follow_dst_and_pick_the_rollup() {
        let p = params(&[("from", "2026-03-28"), ("to", "2026-03-31"), ("tz", "Europe/London")]);
        let q = SeriesQuery::parse(&p).unwrap();
        assert_eq!(q.from, t("2026-03-28T00:00:00Z"));
        assert_eq!(
            q.bucket_edges(),
            vec![t("2026-03-28T00:00:00Z"), t("2026-03-29T00:00:00Z"), t("2026-03-29T23:00:00Z"), t("2026-03-30T23:00:00Z")]
        );
        // London days after the change start at 23:00 UTC: whole hours, not midnights.
        assert_eq!(q.source(), Source::Hourly);
        let utc = SeriesQuery::parse(&params(&[("from", "2026-11-01"), ("to", "2026-12-01"), ("granularity", "month")])).unwrap();
        assert_eq!(utc.source(), Source::Daily);
        let kolkata = SeriesQuery::parse(&params(&[("from", "2026-11-01"), ("to", "2026-11-03"), ("tz", "Asia/Kolkata")])).unwrap();
        assert_eq!(kolkata.source(), Source::Raw);
        let odd = SeriesQuery::parse(&params(&[("from", "2026-11-01T00:30:00Z"), ("to", "2026-11-01T05:00:00Z"), ("granularity", "hour")]))
            .unwrap();
        assert_eq!(odd.source(), Source::Raw);
    }

    #[test]
    fn instants_are_compared_at_the_raw_rows_millisecond_precision() {
        assert_eq!(millis_up(t("2026-11-01T00:00:00.250Z")), t("2026-11-01T00:00:00.250Z").timestamp_millis());
        assert_eq!(millis_up(t("2026-11-01T00:00:00.250000001Z")), t("2026-11-01T00:00:00.251Z").timestamp_millis());
    }

    #[test]
    fn hour_buckets_in_a_half_hour_zone() {
        let edges = bucket_edges(t("2026-11-01T00:10:00Z"), t("2026-11-01T02:00:00Z"), Granularity::Hour, "Asia/Kolkata".parse().unwrap());
        assert_eq!(edges, vec![t("2026-10-31T23:30:00Z"), t("2026-11-01T00:30:00Z"), t("2026-11-01T01:30:00Z"), t("2026-11-01T02:30:00Z")]);
    }

    #[test]
    fn top_reads_the_subject_totals_when_no_scope_or_model_is_asked_for() {
        let top = |p: &[(&str, &str)]| {
            let q = TopQuery::parse(&params(p)).unwrap();
            top_sql(&q, source_for(&[q.from, q.to]))
        };
        let days = top(&[("from", "2026-11-01"), ("to", "2026-12-01"), ("limit", "20"), ("subject", "a")]);
        assert!(
            days.starts_with("SELECT subject, sum(input_tokens + output_tokens) AS value FROM usage_subject_daily FINAL WHERE day >= "),
            "{days}"
        );
        assert!(
            days.ends_with("AND subject = {subject:String} GROUP BY subject ORDER BY value DESC, subject LIMIT {limit:UInt64}"),
            "{days}"
        );
        let scoped = top(&[("from", "2026-11-01"), ("to", "2026-12-01"), ("scope", "chat"), ("metric", "requests")]);
        assert!(scoped.starts_with("SELECT subject, sum(requests) AS value FROM usage_daily FINAL WHERE day >= "), "{scoped}");
        let by_model = top(&[("from", "2026-11-01"), ("to", "2026-12-01"), ("model", "o3")]);
        assert!(by_model.contains("FROM usage_daily FINAL WHERE") && by_model.contains("model = {model:String}"), "{by_model}");
        let hours = top(&[("from", "2026-11-01T05:00:00Z"), ("to", "2026-11-02T00:00:00Z")]);
        assert!(hours.contains("FROM usage_hourly FINAL WHERE hour >= "), "{hours}");
        let raw = top(&[("from", "2026-11-01T05:00:30Z"), ("to", "2026-11-02T00:00:00Z")]);
        assert!(raw.contains("FROM usage_events FINAL WHERE time >= "), "{raw}");
    }

    #[test]
    fn usage_by_api_key_and_budget_reads_the_raw_rows() {
        let key = "AB".repeat(32);
        let base = [("from", "2026-11-01"), ("to", "2026-12-01")];
        let with = |extra: &[(&str, &str)]| params(&[&base[..], extra].concat());
        let q = SeriesQuery::parse(&with(&[("budget", "group:eng"), ("group_by", "model")])).unwrap();
        assert_eq!(q.filters.budget, Some(BudgetOwner::new(tally_domain::budget::OwnerKind::Group, "eng")));
        assert_eq!(q.source(), Source::Raw, "only raw rows carry budgets");
        assert_eq!(SeriesQuery::parse(&with(&[("group_by", "model")])).unwrap().source(), Source::Daily);
        let by_key = SeriesQuery::parse(&with(&[("api_key_sha256", &key)])).unwrap();
        assert_eq!(by_key.filters.api_key_sha256, Some(key.to_ascii_lowercase()), "hex compared in lower case");
        assert_eq!(by_key.source(), Source::Raw);
        let by_budget = SeriesQuery::parse(&with(&[("group_by", "budget")])).unwrap();
        assert_eq!((by_budget.group_by, by_budget.source()), (Some(GroupBy::Budget), Source::Raw));
        assert_eq!(from_clause("usage_events", by_budget.group_by), "usage_events FINAL ARRAY JOIN budgets AS budget");
        assert_eq!(SeriesQuery::parse(&with(&[("group_by", "api_key")])).unwrap().source(), Source::Raw);
        let w = where_clause("time", &by_key.filters);
        assert!(w.ends_with(" AND api_key_sha256 = {api_key:String}"), "{w}");
        assert!(where_clause("time", &q.filters).ends_with(" AND has(budgets, {budget:String})"));
        let answer = serde_json::to_value(&q.filters).unwrap();
        assert_eq!(answer["budget"], "group:eng", "an answer names the budget as asked");
        let top = TopQuery::parse(&with(&[("budget", "tier:pro")])).unwrap();
        assert_eq!(top.source(), Source::Raw);
        assert!(top_sql(&top, top.source()).contains("FROM usage_events FINAL WHERE time >= "));
        assert_eq!(TopQuery::parse(&with(&[])).unwrap().source(), Source::Daily);
        let err = |p: &[(&str, &str)]| SeriesQuery::parse(&with(p)).unwrap_err().field;
        assert_eq!(err(&[("api_key_sha256", "sk-live-123")]), "api_key_sha256");
        assert_eq!(err(&[("budget", "team:eng")]), "budget");
        assert_eq!(err(&[("budget", "group:")]), "budget");
    }

    #[test]
    fn series_are_zero_filled_and_limited() {
        let edges = vec![t("2026-11-01T00:00:00Z"), t("2026-11-02T00:00:00Z"), t("2026-11-03T00:00:00Z")];
        let day2 = t("2026-11-02T00:00:00Z").timestamp();
        let rows =
            vec![(day2, "a".to_string(), 5), (day2 + 3600, "a".to_string(), 1), (day2, "b".to_string(), 9), (day2, "c".to_string(), 1)];
        let (series, truncated) = assemble(&edges, rows.into_iter(), true, 2);
        assert!(truncated);
        assert_eq!(series.len(), 2);
        assert_eq!(series[0].key.as_deref(), Some("b"));
        assert_eq!(series[1].points.iter().map(|p| p.value).collect::<Vec<_>>(), vec![0, 6]);
        let (empty, _) = assemble(&edges, std::iter::empty(), false, 10);
        assert_eq!(empty.len(), 1);
        assert_eq!(empty[0].total, 0);
        assert_eq!(empty[0].points.len(), 2);
    }
}
