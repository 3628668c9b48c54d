//! Billing: closing a period and exporting its lines.
//!
//! Contract:
//! - A billing line is (subject, model, metric) with a quantity over the subject's billing
//!   window and its cost. The window is the subject's `month` ledger row over all scopes
//!   (local midnight in the subject's timezone), or the UTC month when it has none.
//! - Metrics billed: `requests`, `input_tokens`, `output_tokens`, `cached_tokens`, priced
//!   from the tier configuration's price table (micro-dollars per 1M tokens, rounded per
//!   line, ties to even). A model without a price gets one `cost_micros` line carrying the
//!   cost the events reported.
//! - `tally close-period` may close a month only after its last window ended and the grace
//!   time passed, and only with zero reconciliation drift (unless forced). Closing freezes
//!   the lines in Postgres (`billing_periods`, `billing_lines`; triggers refuse any update or
//!   delete). Usage counted for the month afterwards (late events) is exported as
//!   `adjustment` lines: current minus frozen.
//! - Every export checks its totals per subject against the ledger's `month` rows over all
//!   scopes (`total_tokens` = input + output); [`Export::ledger_mismatches`] lists any
//!   difference.
//! - Budgets get lines of their own beside the subjects' ([`Export::budget_lines`]): a
//!   budget line is (budget owner, model, metric) over the events that met the budget (an
//!   API key's, a group's, i.e. a team's, or a tier pool's; the raw rows' `budgets`, as the
//!   ledger counted them), within the budget's billing window: its `month` ledger row over
//!   all scopes and models (local midnight in the budget's timezone), or the UTC month. They
//!   are priced, frozen, adjusted and checked against that ledger row the same way, per
//!   owner ([`Export::budget_totals`]); a member's usage is in its subject's lines and in
//!   each of its budgets' lines. Frozen, a budget line's subject is its budget subject
//!   (`__tally_budget__/<kind>/<name>`, which no subject can take).

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tally_domain::budget::BudgetOwner;
use tally_domain::config::Config;

use clickhouse::Row;

use crate::client::Ch;
use crate::reconcile::{self, Month};

/// Hours after a month's last UTC midnight by which every timezone's month has ended.
const EAST_HOURS: i64 = 14;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Frozen when the period was closed.
    Closed,
    /// Counted after the period was closed.
    Adjustment,
    /// The period is still open: a preview, not a bill.
    Preview,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Closed => "closed",
            Kind::Adjustment => "adjustment",
            Kind::Preview => "preview",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    pub kind: Kind,
    /// For a budget's line, its owner (`group:eng`, `api_key:<hex>`, `tier:pro`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<String>,
    /// The subject billed; for a budget's line, its budget subject.
    pub subject: String,
    pub model: String,
    pub metric: String,
    pub window_start: DateTime<Utc>,
    pub window_end: DateTime<Utc>,
    pub quantity: i64,
    /// Micro-dollars per 1 000 000 units; `null` when the line is not priced.
    pub unit_price_per_million: Option<i64>,
    pub cost_micros: i64,
}

/// A subject's or budget's totals compared with one of its ledger rows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mismatch {
    /// For a budget's ledger row, its owner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<String>,
    pub subject: String,
    pub metric: String,
    pub ledger: i64,
    pub export: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Export {
    pub period: String,
    /// `closed` or `open` (a preview).
    pub status: String,
    pub closed_at: Option<DateTime<Utc>>,
    pub currency: &'static str,
    /// The subjects' lines.
    pub lines: Vec<Line>,
    /// Per subject and metric: the quantity over every line (closed + adjustments).
    pub totals: BTreeMap<String, BTreeMap<String, i64>>,
    /// The cost of the subjects' lines.
    pub total_cost_micros: i64,
    /// The budgets' lines (see the module docs).
    #[serde(default)]
    pub budget_lines: Vec<Line>,
    /// Per budget owner (`group:eng`) and metric: the quantity over every budget line.
    #[serde(default)]
    pub budget_totals: BTreeMap<String, BTreeMap<String, i64>>,
    pub ledger_rows_compared: usize,
    pub ledger_mismatches: Vec<Mismatch>,
}

impl Export {
    /// The subjects' lines as CSV.
    pub fn to_csv(&self) -> String {
        csv("subject", &self.period, &self.lines, |l| &l.subject)
    }

    /// The budgets' lines as CSV, each named by its owner (`group:eng`).
    pub fn to_budget_csv(&self) -> String {
        csv("budget", &self.period, &self.budget_lines, |l| l.budget.as_deref().unwrap_or_default())
    }
}

/// `lines` as CSV, the third column (`who`) given by `name`.
fn csv(who: &str, period: &str, lines: &[Line], name: impl Fn(&Line) -> &str) -> String {
    let mut out = format!("period,kind,{who},model,metric,window_start,window_end,quantity,unit_price_per_million,cost_micros\n");
    for l in lines {
        out.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{}\n",
            period,
            l.kind.as_str(),
            csv_field(name(l)),
            csv_field(&l.model),
            l.metric,
            l.window_start.to_rfc3339(),
            l.window_end.to_rfc3339(),
            l.quantity,
            l.unit_price_per_million.map(|p| p.to_string()).unwrap_or_default(),
            l.cost_micros
        ));
    }
    out
}

/// A CSV field, quoted when it holds a comma, quote or line break. A leading `=`, `+`, `-`
/// or `@` is prefixed with `'` so spreadsheets do not run it as a formula.
fn csv_field(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@']) { format!("'{s}") } else { s.to_string() };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

/// A billing window: start inclusive, end exclusive.
type Window = (DateTime<Utc>, DateTime<Utc>);

/// The billing windows of a month: each subject's and each budget's (by budget subject),
/// for those with usage or a ledger row in it.
#[derive(Debug, Default)]
struct Windows {
    subjects: BTreeMap<String, Window>,
    budgets: BTreeMap<String, Window>,
}

/// The billing windows of `month` (see the module docs).
async fn windows(pool: &PgPool, ch: &Ch, month: Month) -> anyhow::Result<Windows> {
    let mut windows = Windows::default();
    #[derive(Deserialize, Row)]
    struct Subject {
        subject: String,
    }
    let query = ch
        .query("SELECT DISTINCT subject FROM usage_daily FINAL WHERE day >= toDateTime({from:Int64}, 'UTC') AND day < toDateTime({to:Int64}, 'UTC')")
        .param("from", (month.start() - Duration::days(1)).timestamp())
        .param("to", (month.end() + Duration::days(1)).timestamp());
    let in_history: Vec<Subject> = ch.fetch_all(query).await?;
    for s in in_history {
        windows.subjects.insert(s.subject, (month.start(), month.end()));
    }
    // The budgets met: a row's budgets are the same in any copy of it, so no FINAL.
    let query = ch
        .query(
            "SELECT DISTINCT arrayJoin(budgets) AS subject FROM usage_events \
             WHERE time >= toDateTime({from:Int64}, 'UTC') AND time < toDateTime({to:Int64}, 'UTC')",
        )
        .param("from", (month.start() - Duration::days(1)).timestamp())
        .param("to", (month.end() + Duration::days(1)).timestamp());
    let budgets: Vec<Subject> = ch.fetch_all(query).await?;
    for b in budgets {
        windows.budgets.insert(b.subject, (month.start(), month.end()));
    }
    for reconcile::LedgerRow { subject, scope, period, period_start: start, period_end: end, .. } in
        reconcile::ledger_rows(pool, month, None).await?
    {
        if scope == "*" && period == "month" {
            let side = if reconcile::is_budget_subject(&subject) { &mut windows.budgets } else { &mut windows.subjects };
            side.insert(subject, (start, end));
        }
    }
    Ok(windows)
}

#[derive(Deserialize, Row)]
struct ModelSums {
    subject: String,
    model: String,
    requests: i64,
    input_tokens: i64,
    output_tokens: i64,
    cached_tokens: i64,
    cost_micros: i64,
}

/// The current billing lines of `month` from history, priced with `config`: the subjects'
/// lines, then the budgets'.
pub async fn current_lines(pool: &PgPool, ch: &Ch, config: &Config, month: Month, kind: Kind) -> anyhow::Result<Vec<Line>> {
    let windows = windows(pool, ch, month).await?;
    let mut lines = Vec::new();
    for (budgets, windows) in [(false, &windows.subjects), (true, &windows.budgets)] {
        for s in sums_in_windows(ch, windows, budgets).await? {
            let Some((start, end)) = windows.get(&s.subject).copied() else { continue };
            lines.extend(lines_for(&s, config, kind, start, end));
        }
    }
    Ok(lines)
}

/// The sums per model of each subject within its window; with `budgets`, of each budget
/// subject over the rows that met its budget.
async fn sums_in_windows(ch: &Ch, windows: &BTreeMap<String, Window>, budgets: bool) -> anyhow::Result<Vec<ModelSums>> {
    let (who, from) =
        if budgets { ("budget", "usage_events FINAL ARRAY JOIN budgets AS budget") } else { ("subject", "usage_events FINAL") };
    let entries: Vec<(&String, &Window)> = windows.iter().collect();
    let mut sums = Vec::new();
    for chunk in entries.chunks(100) {
        // Each one's window, its values as parameters `s{i}`, `a{i}`, `b{i}`.
        let conds: Vec<String> = (0..chunk.len())
            .map(|i| {
                format!(
                    "({who} = {{s{i}:String}} AND time >= toDateTime({{a{i}:Int64}}, 'UTC') AND time < toDateTime({{b{i}:Int64}}, 'UTC'))"
                )
            })
            .collect();
        let sql = format!(
            "SELECT {who} AS subject, toString(model) AS model, sum(requests) AS requests, sum(input_tokens) AS input_tokens, \
             sum(output_tokens) AS output_tokens, sum(cached_tokens) AS cached_tokens, sum(cost_micros) AS cost_micros \
             FROM {from} WHERE {who} IN {{subjects:Array(String)}} \
             AND time >= toDateTime({{min:Int64}}, 'UTC') AND time < toDateTime({{max:Int64}}, 'UTC') AND ({}) \
             GROUP BY subject, model ORDER BY subject, model",
            conds.join(" OR ")
        );
        let min = chunk.iter().map(|(_, (start, _))| start.timestamp()).min().unwrap_or(0);
        let max = chunk.iter().map(|(_, (_, end))| end.timestamp()).max().unwrap_or(0);
        let mut query =
            ch.query(&sql).param("subjects", chunk.iter().map(|(s, _)| s.as_str()).collect::<Vec<_>>()).param("min", min).param("max", max);
        for (i, (s, (start, end))) in chunk.iter().enumerate() {
            query = query
                .param(&format!("s{i}"), s.as_str())
                .param(&format!("a{i}"), start.timestamp())
                .param(&format!("b{i}"), end.timestamp());
        }
        sums.extend(ch.fetch_all::<ModelSums>(query).await?);
    }
    Ok(sums)
}

fn lines_for(s: &ModelSums, config: &Config, kind: Kind, start: DateTime<Utc>, end: DateTime<Utc>) -> Vec<Line> {
    let budget = BudgetOwner::from_ledger_subject(&s.subject).map(|o| o.spec());
    let line = |metric: &str, quantity: i64, price: Option<u64>, cost: i64| Line {
        kind,
        budget: budget.clone(),
        subject: s.subject.clone(),
        model: s.model.clone(),
        metric: metric.to_string(),
        window_start: start,
        window_end: end,
        quantity,
        unit_price_per_million: price.map(|p| i64::try_from(p).unwrap_or(i64::MAX)),
        cost_micros: cost,
    };
    match config.price(&s.model) {
        Some(p) => vec![
            line("requests", s.requests, None, 0),
            line("input_tokens", s.input_tokens, Some(p.input), p.cost_micros(s.input_tokens, 0, 0)),
            line("output_tokens", s.output_tokens, Some(p.output), p.cost_micros(0, s.output_tokens, 0)),
            line("cached_tokens", s.cached_tokens, Some(p.cached), p.cost_micros(0, 0, s.cached_tokens)),
        ],
        None => vec![
            line("requests", s.requests, None, 0),
            line("input_tokens", s.input_tokens, None, 0),
            line("output_tokens", s.output_tokens, None, 0),
            line("cached_tokens", s.cached_tokens, None, 0),
            line("cost_micros", s.cost_micros, None, s.cost_micros),
        ],
    }
}

/// When a month may be closed: after every timezone's month ended, plus the grace time.
pub fn closable_at(month: Month, grace_hours: i64) -> DateTime<Utc> {
    month.end() + Duration::hours(EAST_HOURS + grace_hours)
}

type FrozenLine = (String, String, String, DateTime<Utc>, DateTime<Utc>, i64, Option<i64>, i64);

/// The export of `month`: frozen lines and adjustments when closed, else a preview (only
/// when `allow_open`).
pub async fn export(pool: &PgPool, ch: &Ch, config: &Config, month: Month, allow_open: bool) -> anyhow::Result<Export> {
    let closed: Option<(DateTime<Utc>,)> =
        sqlx::query_as("SELECT closed_at FROM billing_periods WHERE period = $1").bind(month.name()).fetch_optional(pool).await?;
    let lines = match closed {
        None if !allow_open => anyhow::bail!(
            "period {} is not closed for billing; close it with `tally close-period --period {}` or pass --preview",
            month.name(),
            month.name()
        ),
        None => current_lines(pool, ch, config, month, Kind::Preview).await?,
        Some(_) => {
            let frozen: Vec<FrozenLine> = sqlx::query_as(
                "SELECT subject, model, metric, window_start, window_end, quantity, unit_price_per_million, cost_micros
                 FROM billing_lines WHERE period = $1 ORDER BY subject, model, metric",
            )
            .bind(month.name())
            .fetch_all(pool)
            .await?;
            let frozen: Vec<Line> = frozen
                .into_iter()
                .map(|(subject, model, metric, window_start, window_end, quantity, unit_price_per_million, cost_micros)| Line {
                    kind: Kind::Closed,
                    budget: BudgetOwner::from_ledger_subject(&subject).map(|o| o.spec()),
                    subject,
                    model,
                    metric,
                    window_start,
                    window_end,
                    quantity,
                    unit_price_per_million,
                    cost_micros,
                })
                .collect();
            let current = current_lines(pool, ch, config, month, Kind::Adjustment).await?;
            let mut all = frozen.clone();
            all.extend(adjustments(&frozen, &current));
            all
        }
    };
    let (budget_lines, lines): (Vec<Line>, Vec<Line>) = lines.into_iter().partition(|l| l.budget.is_some());
    let totals = totals_of(&lines, |l| &l.subject);
    let budget_totals = totals_of(&budget_lines, |l| l.budget.as_deref().unwrap_or_default());
    let mut compared = 0;
    let mut mismatches = Vec::new();
    for reconcile::LedgerRow { subject, metric, scope, period, used, .. } in reconcile::ledger_rows(pool, month, None).await? {
        if scope != "*" || period != "month" || metric == "cost_micros" {
            continue;
        }
        compared += 1;
        let budget = BudgetOwner::from_ledger_subject(&subject).map(|o| o.spec());
        let exported = match &budget {
            Some(owner) => budget_totals.get(owner),
            None => totals.get(&subject),
        };
        let exported = exported.and_then(|t| t.get(&metric)).copied().unwrap_or(0);
        if exported != used {
            mismatches.push(Mismatch { budget, subject, metric, ledger: used, export: exported });
        }
    }
    Ok(Export {
        period: month.name(),
        status: if closed.is_some() { "closed" } else { "open" }.to_string(),
        closed_at: closed.map(|(t,)| t),
        currency: "USD micro-dollars",
        total_cost_micros: lines.iter().map(|l| l.cost_micros).sum(),
        lines,
        totals,
        budget_lines,
        budget_totals,
        ledger_rows_compared: compared,
        ledger_mismatches: mismatches,
    })
}

/// Per `who` and metric, the quantity over `lines`, with `total_tokens` (input + output).
fn totals_of(lines: &[Line], who: impl Fn(&Line) -> &str) -> BTreeMap<String, BTreeMap<String, i64>> {
    let mut totals: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
    for l in lines {
        *totals.entry(who(l).to_string()).or_default().entry(l.metric.clone()).or_default() += l.quantity;
    }
    for t in totals.values_mut() {
        let total = t.get("input_tokens").copied().unwrap_or(0) + t.get("output_tokens").copied().unwrap_or(0);
        t.insert("total_tokens".to_string(), total);
    }
    totals
}

/// Current minus frozen, per (subject, model, metric), for the lines that changed. Costs are
/// the difference of the priced totals, so frozen + adjustments price exactly as current.
pub fn adjustments(frozen: &[Line], current: &[Line]) -> Vec<Line> {
    let key = |l: &Line| (l.subject.clone(), l.model.clone(), l.metric.clone());
    let before: BTreeMap<_, &Line> = frozen.iter().map(|l| (key(l), l)).collect();
    let after: BTreeMap<_, &Line> = current.iter().map(|l| (key(l), l)).collect();
    let keys: BTreeSet<_> = before.keys().chain(after.keys()).cloned().collect();
    let mut out = Vec::new();
    for k in keys {
        let (b, a) = (before.get(&k), after.get(&k));
        let quantity = a.map_or(0, |l| l.quantity) - b.map_or(0, |l| l.quantity);
        let cost = a.map_or(0, |l| l.cost_micros) - b.map_or(0, |l| l.cost_micros);
        if quantity == 0 && cost == 0 {
            continue;
        }
        let Some(template) = a.or(b) else { continue };
        out.push(Line {
            kind: Kind::Adjustment,
            quantity,
            cost_micros: cost,
            window_start: b.map_or(template.window_start, |l| l.window_start),
            window_end: b.map_or(template.window_end, |l| l.window_end),
            ..(*template).clone()
        });
    }
    out
}

/// What closing a period did.
#[derive(Debug, Clone, Serialize)]
pub struct Closed {
    pub period: String,
    /// The subjects' lines frozen, and their cost.
    pub lines: usize,
    pub total_cost_micros: i64,
    /// The budgets' lines frozen beside them (the same usage, seen per budget).
    pub budget_lines: usize,
    pub reconciliation: reconcile::Report,
}

/// How to close a period.
#[derive(Debug, Clone)]
pub struct CloseOptions {
    /// Hours after the month ended everywhere before it may be closed.
    pub grace_hours: i64,
    /// Close even with reconciliation drift.
    pub force: bool,
    /// Recorded with the period.
    pub closed_by: String,
}

/// Closes `month` for billing (see the module docs).
pub async fn close(
    pool: &PgPool,
    ch: &Ch,
    config: &Config,
    month: Month,
    options: &CloseOptions,
    now: DateTime<Utc>,
) -> anyhow::Result<Closed> {
    let CloseOptions { grace_hours, force, closed_by } = options;
    let (grace_hours, force) = (*grace_hours, *force);
    let at = closable_at(month, grace_hours);
    if now < at {
        anyhow::bail!(
            "period {} can be closed from {} on (its last window ends, plus {grace_hours} h of grace)",
            month.name(),
            at.to_rfc3339()
        );
    }
    let report = reconcile::reconcile(pool, ch, month, None).await?;
    if !report.ok && !force {
        anyhow::bail!("period {} has drift; not closing it (pass --force to close anyway):\n{}", month.name(), report.to_text());
    }
    let lines = current_lines(pool, ch, config, month, Kind::Closed).await?;
    let mut tx = pool.begin().await?;
    let inserted = sqlx::query(
        "INSERT INTO billing_periods (period, closed_by, grace_hours, summary) VALUES ($1, $2, $3, $4) ON CONFLICT (period) DO NOTHING",
    )
    .bind(month.name())
    .bind(closed_by)
    .bind(i32::try_from(grace_hours).unwrap_or(i32::MAX))
    .bind(serde_json::to_value(&report)?)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if inserted == 0 {
        anyhow::bail!("period {} is already closed; later usage is exported as adjustments", month.name());
    }
    let col = |f: fn(&Line) -> String| lines.iter().map(f).collect::<Vec<String>>();
    sqlx::query(
        "INSERT INTO billing_lines (period, subject, model, metric, window_start, window_end, quantity, unit_price_per_million, cost_micros)
         SELECT $1, * FROM UNNEST($2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::timestamptz[], $7::bigint[], $8::bigint[], $9::bigint[])",
    )
    .bind(month.name())
    .bind(col(|l| l.subject.clone()))
    .bind(col(|l| l.model.clone()))
    .bind(col(|l| l.metric.clone()))
    .bind(lines.iter().map(|l| l.window_start).collect::<Vec<_>>())
    .bind(lines.iter().map(|l| l.window_end).collect::<Vec<_>>())
    .bind(lines.iter().map(|l| l.quantity).collect::<Vec<_>>())
    .bind(lines.iter().map(|l| l.unit_price_per_million).collect::<Vec<_>>())
    .bind(lines.iter().map(|l| l.cost_micros).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    let subjects = || lines.iter().filter(|l| l.budget.is_none());
    Ok(Closed {
        period: month.name(),
        lines: subjects().count(),
        total_cost_micros: subjects().map(|l| l.cost_micros).sum(),
        budget_lines: lines.len() - subjects().count(),
        reconciliation: report,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(metric: &str, quantity: i64, cost: i64) -> Line {
        let t: DateTime<Utc> = "2026-11-01T00:00:00Z".parse().unwrap();
        Line {
            kind: Kind::Closed,
            budget: None,
            subject: "a".into(),
            model: "m".into(),
            metric: metric.into(),
            window_start: t,
            window_end: t,
            quantity,
            unit_price_per_million: Some(1),
            cost_micros: cost,
        }
    }

    #[test]
    fn adjustments_are_current_minus_frozen() {
        let frozen = vec![line("input_tokens", 100, 10), line("requests", 2, 0)];
        let current = vec![line("input_tokens", 150, 15), line("requests", 2, 0), line("output_tokens", 7, 1)];
        let adj = adjustments(&frozen, &current);
        assert_eq!(adj.len(), 2);
        assert!(adj.iter().all(|l| l.kind == Kind::Adjustment));
        assert_eq!((adj[0].metric.as_str(), adj[0].quantity, adj[0].cost_micros), ("input_tokens", 50, 5));
        assert_eq!((adj[1].metric.as_str(), adj[1].quantity, adj[1].cost_micros), ("output_tokens", 7, 1));
    }

    #[test]
    fn csv_fields_are_quoted_and_defused() {
        assert_eq!(csv_field("alice"), "alice");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("=SUM(A1)"), "'=SUM(A1)");
    }

    #[test]
    fn a_month_closes_after_every_timezone_and_the_grace() {
        let m = Month::parse("2026-11").unwrap();
        assert_eq!(closable_at(m, 48), "2026-12-03T14:00:00Z".parse::<DateTime<Utc>>().unwrap());
    }
}
