//! Month-end reconciliation: the Postgres ledger against the ClickHouse history and against
//! the events the ledger accepted (`processed_events`).
//!
//! For a billing period `YYYY-MM`:
//! - every ledger row (subject, metric, scope, period, period start) whose window belongs to
//!   the month is compared with the sum of its metric over the same window (and scope) in the
//!   raw history; calendar windows start at local midnight in the subject's timezone, so a
//!   row belongs to the month when it starts no earlier than 14 hours before the month's
//!   first UTC midnight and before its last UTC midnight plus 12 hours, and ends by that
//!   midnight plus 14 hours (a rolling quota's buckets are compared like any row while they
//!   are kept; the aggregator removes those that left their window, so a past month's
//!   reconciliation compares the ones still there);
//! - every ledger row of a budget (a budget subject's, `__tally_budget__/<kind>/<name>`) is
//!   compared with the sum of its metric over the raw rows that counted in that very ledger
//!   (their `budget_ledgers` name it: budget subject, metric, scope key with its models,
//!   period; see `tally_domain::budget::ledger_name`) within the row's window. The writer
//!   computed those names with the aggregator's own rule under the configuration version
//!   each event was counted under, so the sum is exactly the events the ledger row counted,
//!   even when the budget's quotas, members or tiers changed within the period. Drift is
//!   reported per budget owner ([`Report::budget_drifts`]);
//! - for every subject, the events the ledger accepted with an event time in the UTC month
//!   are compared with the distinct events in history, and history's row count with its
//!   distinct events (a duplicate would show there). An event is its id and the UTC day of
//!   its time, in history as in the ledger's dedupe record: the same id on two days is two. A counted correction is an accepted event at
//!   the time of the event it reverted, where history writes its negated row.
//!
//!
//! The accepted events are the dedupe records, which are kept only for the lateness window
//! (partitions by UTC day, dropped when the day left it): events are compared only from the
//! first day still kept ([`Report::events_checked_from`], said in the text report), and a
//! month or its part before that day is checked on its ledger rows only, never reported as
//! event drift. A counted correction whose reverted event's record is gone is left out too.
//!
//! The report lists every drift with its size; [`Report::ok`] is true only with zero drift.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use clickhouse::Row;
use tally_domain::budget::{ledger_name, BudgetOwner, BUDGET_SUBJECT_PREFIX};

use crate::client::Ch;

/// Whether `subject` is a budget subject: its ledger rows are a budget's.
pub fn is_budget_subject(subject: &str) -> bool {
    subject.starts_with(BUDGET_SUBJECT_PREFIX)
}

/// A billing period: a calendar month named `YYYY-MM`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Month {
    pub year: i32,
    pub month: u32,
}

impl Month {
    pub fn parse(s: &str) -> Result<Month, String> {
        let bad = || format!("period {s:?} is not a month: expected YYYY-MM, e.g. 2026-11");
        let (y, m) = s.split_once('-').ok_or_else(bad)?;
        if y.len() != 4 || m.len() != 2 {
            return Err(bad());
        }
        let year: i32 = y.parse().map_err(|_| bad())?;
        let month: u32 = m.parse().map_err(|_| bad())?;
        NaiveDate::from_ymd_opt(year, month, 1).ok_or_else(bad)?;
        Ok(Month { year, month })
    }

    pub fn name(&self) -> String {
        format!("{:04}-{:02}", self.year, self.month)
    }

    /// The month's first UTC midnight.
    pub fn start(&self) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(self.year, self.month, 1, 0, 0, 0).single().unwrap_or_default()
    }

    /// The next month's first UTC midnight.
    pub fn end(&self) -> DateTime<Utc> {
        let (y, m) = if self.month == 12 { (self.year + 1, 1) } else { (self.year, self.month + 1) };
        Utc.with_ymd_and_hms(y, m, 1, 0, 0, 0).single().unwrap_or_default()
    }

    /// The month containing `t` (UTC).
    pub fn of(t: DateTime<Utc>) -> Month {
        Month { year: t.year(), month: t.month() }
    }
}

/// Largest timezone offsets east and west of UTC, in hours.
const EAST: i64 = 14;
const WEST: i64 = 12;

/// What to reconcile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Only<'a> {
    /// Every ledger row, every subject's events.
    All,
    /// One subject's ledger rows and events.
    Subject(&'a str),
    /// One budget's ledger rows.
    Budget(&'a BudgetOwner),
}

/// One ledger row compared with history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerCheck {
    /// For a budget's row, its owner (`group:eng`, `api_key:<hex>`, `tier:pro`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<String>,
    /// The row's subject: for a budget's row, its budget subject.
    pub subject: String,
    pub quota: String,
    pub metric: String,
    /// `*` for all scopes.
    pub scope: String,
    pub period: String,
    pub period_start: DateTime<Utc>,
    pub period_end: DateTime<Utc>,
    pub ledger: i64,
    pub history: i64,
    /// `history - ledger`.
    pub drift: i64,
}

/// One subject's events in the UTC month: accepted by the ledger vs in history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventCheck {
    pub subject: String,
    pub accepted_events: i64,
    pub history_rows: i64,
    pub history_distinct_ids: i64,
    /// `history_distinct_ids - accepted_events`.
    pub drift: i64,
    /// `history_rows - history_distinct_ids`.
    pub duplicates: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub period: String,
    pub month_start: DateTime<Utc>,
    pub month_end: DateTime<Utc>,
    pub subject: Option<String>,
    /// The budget reconciled alone (`group:eng`), if one was asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<String>,
    /// Subjects' ledger rows compared.
    pub ledger_rows: usize,
    pub subjects: usize,
    /// Subjects' ledger rows whose history differs.
    pub ledger_drifts: Vec<LedgerCheck>,
    /// Budgets' ledger rows compared, and the budgets they belong to.
    #[serde(default)]
    pub budget_ledger_rows: usize,
    #[serde(default)]
    pub budgets: usize,
    /// Budgets' ledger rows whose history differs, by owner.
    #[serde(default)]
    pub budget_drifts: Vec<LedgerCheck>,
    /// Subjects whose accepted events and history differ, or with duplicates in history.
    pub event_drifts: Vec<EventCheck>,
    pub accepted_events: i64,
    pub history_events: i64,
    /// Accepted events and history were compared from this instant (the later of the month's
    /// start and the first day whose dedupe records are still kept) to the month's end.
    #[serde(default)]
    pub events_checked_from: DateTime<Utc>,
    pub ok: bool,
}

impl Report {
    /// A human summary: one line per drift, then the verdict.
    pub fn to_text(&self) -> String {
        let mut out = format!(
            "reconciliation of {} ({} .. {}){}{}: {} ledger rows, {} subjects, {} accepted events, {} in history, \
             {} budget ledger rows of {} budgets\n",
            self.period,
            self.month_start.to_rfc3339(),
            self.month_end.to_rfc3339(),
            self.subject.as_ref().map(|s| format!(" for subject {s}")).unwrap_or_default(),
            self.budget.as_ref().map(|b| format!(" for budget {b}")).unwrap_or_default(),
            self.ledger_rows,
            self.subjects,
            self.accepted_events,
            self.history_events,
            self.budget_ledger_rows,
            self.budgets,
        );
        if self.events_checked_from > self.month_start {
            out.push_str(&format!(
                "events compared from {} only: dedupe records of earlier days are no longer kept (lateness window)\n",
                self.events_checked_from.to_rfc3339()
            ));
        }
        for d in &self.ledger_drifts {
            out.push_str(&ledger_drift_line("ledger  subject", &d.subject, d));
        }
        for d in &self.budget_drifts {
            out.push_str(&ledger_drift_line("budget  owner", d.budget.as_deref().unwrap_or_default(), d));
        }
        for d in &self.event_drifts {
            out.push_str(&format!(
                "DRIFT events  subject={} accepted={} history_ids={} history_rows={} drift={:+} duplicates={}\n",
                d.subject, d.accepted_events, d.history_distinct_ids, d.history_rows, d.drift, d.duplicates
            ));
        }
        out.push_str(if self.ok { "ok: zero drift\n" } else { "FAILED: drift found\n" });
        out
    }
}

/// One ledger row of a month, as reconciliation and the billing export compare it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct LedgerRow {
    pub subject: String,
    pub metric: String,
    pub scope: String,
    pub period: String,
    pub period_start: DateTime<Utc>,
    pub period_end: DateTime<Utc>,
    pub used: i64,
    pub quota: String,
}

/// One `DRIFT` line of a ledger row, its owner named by `who` (`ledger  subject`, `budget  owner`).
fn ledger_drift_line(who: &str, owner: &str, d: &LedgerCheck) -> String {
    format!(
        "DRIFT {who}={owner} quota={} metric={} scope={} period={} start={} ledger={} history={} drift={:+}\n",
        d.quota,
        d.metric,
        d.scope,
        d.period,
        d.period_start.to_rfc3339(),
        d.ledger,
        d.history,
        d.drift
    )
}

/// The ledger rows of `month` (see the module docs), optionally for one subject.
pub async fn ledger_rows(pool: &PgPool, month: Month, subject: Option<&str>) -> Result<Vec<LedgerRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT subject, metric, scope, period, period_start, period_end, used, quota FROM ledgers
         WHERE period_start >= $1 AND period_start < $2 AND period_end <= $3 AND ($4::text IS NULL OR subject = $4)
         ORDER BY subject, metric, scope, period, period_start",
    )
    .bind(month.start() - Duration::hours(EAST))
    .bind(month.end() + Duration::hours(WEST))
    .bind(month.end() + Duration::hours(EAST))
    .bind(subject)
    .fetch_all(pool)
    .await
}

fn metric_expr(metric: &str) -> Option<&'static str> {
    Some(match metric {
        "requests" => "requests",
        "input_tokens" => "input_tokens",
        "output_tokens" => "output_tokens",
        "cached_tokens" => "cached_tokens",
        "total_tokens" => "input_tokens + output_tokens",
        "cost_micros" => "cost_micros",
        _ => return None,
    })
}

#[derive(Deserialize, Row)]
struct Sums {
    values: Vec<i64>,
}

/// Ledger rows per ClickHouse query in [`history_for`].
const ROWS_PER_QUERY: usize = 100;

/// History sums for each ledger row, in the order given ([`ROWS_PER_QUERY`] rows per query:
/// one `sumIf` per row, its subject, window and scope passed as parameters `s{i}`, `a{i}`,
/// `b{i}`, `c{i}`).
async fn history_for(ch: &Ch, rows: &[LedgerRow]) -> anyhow::Result<Vec<i64>> {
    let mut out = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(ROWS_PER_QUERY) {
        let subjects: BTreeSet<&String> = chunk.iter().map(|r| &r.subject).collect();
        let min = chunk.iter().map(|r| r.period_start.timestamp()).min().unwrap_or(0);
        let max = chunk.iter().map(|r| r.period_end.timestamp()).max().unwrap_or(0);
        let columns: Vec<String> = chunk
            .iter()
            .enumerate()
            .map(|(i, LedgerRow { metric, scope, .. })| {
                let expr = metric_expr(metric).unwrap_or("0");
                let scope_cond = if scope == "*" { String::new() } else { format!(" AND scope = {{c{i}:String}}") };
                format!(
                    "toInt64(sumIf({expr}, subject = {{s{i}:String}} AND time >= toDateTime({{a{i}:Int64}}, 'UTC') \
                     AND time < toDateTime({{b{i}:Int64}}, 'UTC'){scope_cond}))"
                )
            })
            .collect();
        let sql = format!(
            "SELECT [{}] AS values FROM usage_events FINAL WHERE subject IN {{subjects:Array(String)}} \
             AND time >= toDateTime({{min:Int64}}, 'UTC') AND time < toDateTime({{max:Int64}}, 'UTC')",
            columns.join(", ")
        );
        let mut query = ch.query(&sql).param("subjects", &subjects).param("min", min).param("max", max);
        for (i, r) in chunk.iter().enumerate() {
            query = query
                .param(&format!("s{i}"), &r.subject)
                .param(&format!("a{i}"), r.period_start.timestamp())
                .param(&format!("b{i}"), r.period_end.timestamp());
            if r.scope != "*" {
                query = query.param(&format!("c{i}"), &r.scope);
            }
        }
        let answer: Vec<Sums> = ch.fetch_all(query).await?;
        let values = answer.into_iter().next().map(|s| s.values).unwrap_or_default();
        out.extend((0..chunk.len()).map(|i| values.get(i).copied().unwrap_or(0)));
    }
    Ok(out)
}

#[derive(Deserialize, Row)]
struct HistoryCount {
    subject: String,
    rows: i64,
    ids: i64,
}

/// The rows of `rows` whose history differs, as checks.
fn drifts(rows: &[LedgerRow], history: Vec<i64>) -> Vec<LedgerCheck> {
    rows.iter()
        .zip(history)
        .filter(|(r, h)| r.used != *h)
        .map(|(r, h)| LedgerCheck {
            budget: BudgetOwner::from_ledger_subject(&r.subject).map(|o| o.spec()),
            subject: r.subject.clone(),
            quota: r.quota.clone(),
            metric: r.metric.clone(),
            scope: r.scope.clone(),
            period: r.period.clone(),
            period_start: r.period_start,
            period_end: r.period_end,
            ledger: r.used,
            history: h,
            drift: h - r.used,
        })
        .collect()
}

/// History sums for each budget ledger row, in the order given: the metric summed over the
/// raw rows that name the row's ledger in `budget_ledgers`, within its window
/// ([`ROWS_PER_QUERY`] rows per query, parameters `n{i}`, `a{i}`, `b{i}`). Rows come sorted
/// by ledger and start, so a query's rows are few ledgers over a short span.
async fn budget_history_for(ch: &Ch, rows: &[LedgerRow]) -> anyhow::Result<Vec<i64>> {
    let mut out = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(ROWS_PER_QUERY) {
        let names: Vec<String> = chunk.iter().map(|r| ledger_name(&r.subject, &r.metric, &r.scope, &r.period)).collect();
        let distinct: BTreeSet<&String> = names.iter().collect();
        let min = chunk.iter().map(|r| r.period_start.timestamp()).min().unwrap_or(0);
        let max = chunk.iter().map(|r| r.period_end.timestamp()).max().unwrap_or(0);
        let columns: Vec<String> = chunk
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let expr = metric_expr(&r.metric).unwrap_or("0");
                format!(
                    "toInt64(sumIf({expr}, has(budget_ledgers, {{n{i}:String}}) AND time >= toDateTime({{a{i}:Int64}}, 'UTC') \
                     AND time < toDateTime({{b{i}:Int64}}, 'UTC')))"
                )
            })
            .collect();
        let sql = format!(
            "SELECT [{}] AS values FROM usage_events FINAL WHERE hasAny(budget_ledgers, {{names:Array(String)}}) \
             AND time >= toDateTime({{min:Int64}}, 'UTC') AND time < toDateTime({{max:Int64}}, 'UTC')",
            columns.join(", ")
        );
        let mut query = ch.query(&sql).param("names", &distinct).param("min", min).param("max", max);
        for (i, (r, name)) in chunk.iter().zip(&names).enumerate() {
            query = query
                .param(&format!("n{i}"), name)
                .param(&format!("a{i}"), r.period_start.timestamp())
                .param(&format!("b{i}"), r.period_end.timestamp());
        }
        let answer: Vec<Sums> = ch.fetch_all(query).await?;
        let values = answer.into_iter().next().map(|s| s.values).unwrap_or_default();
        out.extend((0..chunk.len()).map(|i| values.get(i).copied().unwrap_or(0)));
    }
    Ok(out)
}

/// Reconciles `month` (optionally one subject).
pub async fn reconcile(pool: &PgPool, ch: &Ch, month: Month, subject: Option<&str>) -> anyhow::Result<Report> {
    reconcile_only(pool, ch, month, subject.map_or(Only::All, Only::Subject)).await
}

/// Reconciles `month`: everything, one subject or one budget ([`Only`]).
pub async fn reconcile_only(pool: &PgPool, ch: &Ch, month: Month, only: Only<'_>) -> anyhow::Result<Report> {
    let budget_subject = match only {
        Only::Budget(owner) => Some(owner.ledger_subject()),
        _ => None,
    };
    let row_filter = match only {
        Only::All => None,
        Only::Subject(s) => Some(s),
        Only::Budget(_) => budget_subject.as_deref(),
    };
    let (budget_rows, rows): (Vec<LedgerRow>, Vec<LedgerRow>) =
        ledger_rows(pool, month, row_filter).await?.into_iter().partition(|r| is_budget_subject(&r.subject));
    let history = history_for(ch, &rows).await?;
    let ledger_drifts = drifts(&rows, history);
    let budget_history = budget_history_for(ch, &budget_rows).await?;
    let budget_drifts = drifts(&budget_rows, budget_history);
    let budgets = budget_rows.iter().map(|r| r.subject.as_str()).collect::<BTreeSet<_>>().len();
    let subject = match only {
        Only::Subject(s) => Some(s),
        Only::All => None,
        Only::Budget(owner) => {
            return Ok(Report {
                period: month.name(),
                month_start: month.start(),
                month_end: month.end(),
                subject: None,
                budget: Some(owner.spec()),
                ledger_rows: 0,
                subjects: 0,
                ledger_drifts: Vec::new(),
                budget_ledger_rows: budget_rows.len(),
                budgets,
                ok: budget_drifts.is_empty(),
                budget_drifts,
                event_drifts: Vec::new(),
                accepted_events: 0,
                history_events: 0,
                events_checked_from: month.end(),
            });
        }
    };

    let checked_from = events_checked_from(pool, month).await?;
    let accepted: Vec<(String, i64)> = sqlx::query_as(
        "SELECT p.subject, count(*) FROM processed_events p
         LEFT JOIN processed_events t ON p.corrects IS NOT NULL AND t.event_id = p.corrects AND t.corrected_by = p.event_id
         WHERE COALESCE(t.event_time, p.event_time) >= $1 AND COALESCE(t.event_time, p.event_time) < $2
           AND (p.corrects IS NULL OR t.event_id IS NOT NULL)
           AND ($3::text IS NULL OR p.subject = $3)
         GROUP BY p.subject",
    )
    .bind(checked_from)
    .bind(month.end())
    .bind(subject)
    .fetch_all(pool)
    .await?;
    // An event is its id and UTC day, as in the ledger's dedupe record.
    let subject_filter = if subject.is_some() { " AND subject = {subject:String}" } else { "" };
    let mut query = ch
        .query(&format!(
            "SELECT subject, toInt64(count()) AS rows, toInt64(uniqExact(event_id, event_day)) AS ids FROM usage_events FINAL \
             WHERE time >= toDateTime({{from:Int64}}, 'UTC') AND time < toDateTime({{to:Int64}}, 'UTC'){subject_filter} GROUP BY subject"
        ))
        .param("from", checked_from.timestamp())
        .param("to", month.end().timestamp());
    if let Some(s) = subject {
        query = query.param("subject", s);
    }
    let in_history: Vec<HistoryCount> = ch.fetch_all(query).await?;
    let mut by_subject: BTreeMap<String, EventCheck> = BTreeMap::new();
    let blank = |s: &str| EventCheck {
        subject: s.to_string(),
        accepted_events: 0,
        history_rows: 0,
        history_distinct_ids: 0,
        drift: 0,
        duplicates: 0,
    };
    for (s, n) in &accepted {
        by_subject.entry(s.clone()).or_insert_with(|| blank(s)).accepted_events = *n;
    }
    for h in &in_history {
        let e = by_subject.entry(h.subject.clone()).or_insert_with(|| blank(&h.subject));
        e.history_rows = h.rows;
        e.history_distinct_ids = h.ids;
    }
    for e in by_subject.values_mut() {
        e.drift = e.history_distinct_ids - e.accepted_events;
        e.duplicates = e.history_rows - e.history_distinct_ids;
    }
    let accepted_events = by_subject.values().map(|e| e.accepted_events).sum();
    let history_events = by_subject.values().map(|e| e.history_distinct_ids).sum();
    let subjects = by_subject.len();
    let event_drifts: Vec<EventCheck> = by_subject.into_values().filter(|e| e.drift != 0 || e.duplicates != 0).collect();
    Ok(Report {
        period: month.name(),
        month_start: month.start(),
        month_end: month.end(),
        subject: subject.map(str::to_string),
        budget: None,
        ledger_rows: rows.len(),
        subjects,
        ok: ledger_drifts.is_empty() && event_drifts.is_empty() && budget_drifts.is_empty(),
        ledger_drifts,
        budget_ledger_rows: budget_rows.len(),
        budgets,
        budget_drifts,
        event_drifts,
        accepted_events,
        history_events,
        events_checked_from: checked_from,
    })
}

/// Where the event comparison of `month` starts: the month's start, or the first UTC day
/// whose dedupe partition is still kept if that is later (the end of the month if none is).
async fn events_checked_from(pool: &PgPool, month: Month) -> Result<DateTime<Utc>, sqlx::Error> {
    let first_kept = crate::progress::first_kept_day(pool).await?;
    let first_kept = first_kept.map_or(month.end(), |day| day.and_time(chrono::NaiveTime::MIN).and_utc());
    Ok(first_kept.clamp(month.start(), month.end()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_parse_and_bound() {
        let m = Month::parse("2026-12").unwrap();
        assert_eq!(m.start(), "2026-12-01T00:00:00Z".parse::<DateTime<Utc>>().unwrap());
        assert_eq!(m.end(), "2027-01-01T00:00:00Z".parse::<DateTime<Utc>>().unwrap());
        assert_eq!(m.name(), "2026-12");
        for bad in ["2026-13", "2026-1", "26-11", "2026/11", "", "2026-11-01"] {
            assert!(Month::parse(bad).is_err(), "{bad}");
        }
    }
}
