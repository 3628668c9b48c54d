//! Operator commands over the domain rules: `tally explain …` and `tally validate-config`.
//!
//! - `tally explain period <PERIOD> --at <RFC3339> [--tz <IANA>] [--anchor-day <D>]`
//!   prints `{"start", "end"}`: the period containing the instant, as RFC 3339 UTC
//!   instants, end exclusive (for `rolling Nd`: start exclusive, end = `--at`).
//! - `tally explain rate <RATE> [--multiplier <X>] [--explicit <SCOPE>=<RATE>]... [--scope <S>]`
//!   prints `{"limit", "window_seconds"}` after applying the tier: the explicit rate for
//!   `--scope` if given, else the limit × multiplier (nearest, ties to even, at least 1).
//! - `tally explain subject <ID> --config <FILE> [--at <RFC3339>] [--group <G>]...
//!   [--api-key <K> | --api-key-sha256 <HEX>] [--scope <S>]` prints the effective tier, the
//!   precedence level that decided it, the effective quotas with their current windows, and
//!   every budget a request of the subject with that key and those groups would meet (its
//!   key's, its groups', its tier's pool), each with its timezone and quotas (limits, models,
//!   current windows).
//!
//! Each prints one JSON object on stdout. Bad input gives a one-line error on stderr and
//! exit code 2 ([`ExplainError::EXIT_CODE`]). `tally validate-config FILE` prints a
//! summary and exits 0, or prints every error with its location on stderr and exits 1.
//!
//! The only I/O here is reading the configuration file, the clock (for a missing `--at`)
//! and printing; the rules live in `tally_domain`.

use std::fmt::{self, Write as _};
use std::path::{Path, PathBuf};

use chrono::{DateTime, SecondsFormat, Utc};
use chrono_tz::Tz;
use serde_json::{json, Value};
use tally_domain::budget::{budget_timezone, budgets_met, Budget, BudgetFacts, OwnerKind};
use tally_domain::config::{Config, ConfigErrors, OverrideLimit};
use tally_domain::decision::Action;
use tally_domain::event::hash_api_key;
use tally_domain::period::PeriodSpec;
use tally_domain::precedence::{next_change_after, resolve, EffectiveQuota, SubjectFacts};
use tally_domain::rate::{tiered_rate, valid_multiplier, Rate};
use tally_domain::tier::tier_quotas;

/// `tally explain …`
#[derive(Debug, Clone, clap::Subcommand)]
pub enum ExplainCommand {
    /// The period (start, end) containing an instant.
    Period {
        /// day, week, month, month@15, year, minute, hour, 30s, 5m, 2h, 1d, rolling 7d
        #[arg(allow_hyphen_values = true)]
        period: String,
        /// The instant, RFC 3339 (e.g. 2026-03-08T10:00:00Z).
        #[arg(long)]
        at: String,
        /// IANA timezone of calendar periods.
        #[arg(long, default_value = "UTC")]
        tz: String,
        /// Billing day (1-31) of a `month` period; 29-31 clamp to the month's last day.
        #[arg(long)]
        anchor_day: Option<u8>,
    },
    /// A rate's limit and window after applying a tier.
    Rate {
        /// e.g. 10/m, 5000/h, 5/30s, 100000/month
        #[arg(allow_hyphen_values = true)]
        rate: String,
        /// The tier's rate_multiplier.
        #[arg(long, allow_negative_numbers = true)]
        multiplier: Option<f64>,
        /// An explicit limit for a scope, SCOPE=RATE (repeatable).
        #[arg(long = "explicit", value_name = "SCOPE=RATE")]
        explicit: Vec<String>,
        /// The request's scope.
        #[arg(long)]
        scope: Option<String>,
    },
    /// A subject's effective tier, the precedence level that decided it, and its quotas.
    Subject {
        /// The subject id.
        id: String,
        /// The tier configuration file (YAML).
        #[arg(long)]
        config: PathBuf,
        /// The instant, RFC 3339; default now.
        #[arg(long)]
        at: Option<String>,
        /// A group the subject belongs to (repeatable), besides the configured ones.
        #[arg(long = "group", value_name = "G")]
        groups: Vec<String>,
        /// The API key the request came with (hashed before lookup, never printed).
        #[arg(long, conflicts_with = "api_key_sha256")]
        api_key: Option<String>,
        /// The SHA-256 hex of the API key the request came with, as the configuration
        /// names keys.
        #[arg(long, value_name = "HEX")]
        api_key_sha256: Option<String>,
        /// The request's scope.
        #[arg(long, default_value = "")]
        scope: String,
    },
}

/// `tally validate-config FILE`
#[derive(Debug, Clone, clap::Args)]
pub struct ValidateConfigArgs {
    /// The tier configuration file (YAML).
    pub file: PathBuf,
}

/// Why an explain command could not answer. Displays as one line.
#[derive(Debug)]
pub enum ExplainError {
    /// An argument is malformed; names the argument.
    BadArgument { arg: String, message: String },
    /// The configuration file could not be read.
    ReadConfig { path: PathBuf, source: std::io::Error },
    /// The configuration file is invalid.
    InvalidConfig { path: PathBuf, errors: ConfigErrors },
}

impl ExplainError {
    /// The process exit code for any explain error.
    pub const EXIT_CODE: i32 = 2;

    pub fn exit_code(&self) -> i32 {
        Self::EXIT_CODE
    }

    fn arg(arg: &str, message: impl fmt::Display) -> ExplainError {
        ExplainError::BadArgument { arg: arg.to_string(), message: message.to_string() }
    }
}

impl fmt::Display for ExplainError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExplainError::BadArgument { arg, message } => write!(f, "{arg}: {message}"),
            ExplainError::ReadConfig { path, source } => write!(f, "cannot read {}: {source}", path.display()),
            ExplainError::InvalidConfig { path, errors } => {
                let n = errors.0.len();
                write!(f, "{} is invalid ({n} error{})", path.display(), if n == 1 { "" } else { "s" })?;
                if let Some(first) = errors.0.first() {
                    write!(f, ": {first}")?;
                }
                write!(f, "; run `tally validate-config {}` for the full list", path.display())
            }
        }
    }
}

impl std::error::Error for ExplainError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ExplainError::ReadConfig { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Runs an explain command and returns the JSON object it prints.
pub fn run_explain(cmd: ExplainCommand) -> Result<Value, ExplainError> {
    match cmd {
        ExplainCommand::Period { period, at, tz, anchor_day } => explain_period(&period, &at, &tz, anchor_day),
        ExplainCommand::Rate { rate, multiplier, explicit, scope } => explain_rate(&rate, multiplier, &explicit, scope.as_deref()),
        ExplainCommand::Subject { id, config, at, groups, api_key, api_key_sha256, scope } => {
            let at = match at {
                Some(text) => parse_at(&text)?,
                None => Utc::now(),
            };
            let key_hash = match (api_key, api_key_sha256) {
                (Some(key), _) => Some(hash_api_key(&key)),
                (None, Some(hex)) => Some(parse_key_hash(&hex)?),
                (None, None) => None,
            };
            explain_subject(&id, &config, at, &groups, key_hash.as_deref(), &scope)
        }
    }
}

/// Runs an explain command the way `main` should: prints the JSON object on stdout, or a
/// one-line error on stderr, and returns the exit code (0 or 2).
pub fn run_explain_cli(cmd: ExplainCommand) -> i32 {
    match run_explain(cmd) {
        Ok(value) => {
            let text = serde_json::to_string_pretty(&value).unwrap_or_else(|_| value.to_string());
            print_stdout(&format!("{text}\n"));
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            e.exit_code()
        }
    }
}

/// Writes to stdout, ignoring a closed pipe (`tally … | head`) instead of panicking.
fn print_stdout(text: &str) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

fn parse_at(text: &str) -> Result<DateTime<Utc>, ExplainError> {
    DateTime::parse_from_rfc3339(text.trim())
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| ExplainError::arg("--at", format!("`{text}` is not an RFC 3339 time such as 2026-03-08T10:00:00Z ({e})")))
}

fn parse_tz(text: &str) -> Result<Tz, ExplainError> {
    text.parse::<Tz>()
        .map_err(|_| ExplainError::arg("--tz", format!("unknown timezone `{text}`: expected an IANA name such as Europe/London")))
}

fn parse_key_hash(text: &str) -> Result<String, ExplainError> {
    let hex = text.trim().to_ascii_lowercase();
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ExplainError::arg("--api-key-sha256", "must be 64 hex characters: the SHA-256 of the key, never the key"));
    }
    Ok(hex)
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

fn explain_period(period: &str, at: &str, tz: &str, anchor_day: Option<u8>) -> Result<Value, ExplainError> {
    let spec: PeriodSpec = period.parse().map_err(|e| ExplainError::arg("<PERIOD>", e))?;
    let spec = match (anchor_day, spec) {
        (None, spec) => spec,
        (Some(day), PeriodSpec::Month) if (1..=31).contains(&day) => PeriodSpec::MonthAnchored { day },
        (Some(day), PeriodSpec::Month) => return Err(ExplainError::arg("--anchor-day", format!("{day} is not a day of the month (1-31)"))),
        (Some(_), other) => {
            return Err(ExplainError::arg("--anchor-day", format!("applies only to `month`, not `{other}`")));
        }
    };
    let at = parse_at(at)?;
    let tz = parse_tz(tz)?;
    let w = spec.window(at, tz);
    Ok(json!({ "start": rfc3339(w.start), "end": rfc3339(w.end) }))
}

fn parse_explicit(items: &[String]) -> Result<Vec<(String, Rate)>, ExplainError> {
    let mut out: Vec<(String, Rate)> = Vec::new();
    for item in items {
        let Some((scope, rate)) = item.split_once('=') else {
            return Err(ExplainError::arg("--explicit", format!("`{item}` should be SCOPE=RATE, e.g. api=5000/h")));
        };
        let scope = scope.trim();
        if scope.is_empty() {
            return Err(ExplainError::arg("--explicit", format!("`{item}` has an empty scope")));
        }
        if out.iter().any(|(s, _)| s == scope) {
            return Err(ExplainError::arg("--explicit", format!("scope `{scope}` is given twice")));
        }
        let rate: Rate = rate.parse().map_err(|e| ExplainError::arg("--explicit", format!("scope `{scope}`: {e}")))?;
        out.push((scope.to_string(), rate));
    }
    Ok(out)
}

fn explain_rate(rate: &str, multiplier: Option<f64>, explicit: &[String], scope: Option<&str>) -> Result<Value, ExplainError> {
    let base: Rate = rate.parse().map_err(|e| ExplainError::arg("<RATE>", e))?;
    if let Some(m) = multiplier {
        if !valid_multiplier(m) {
            return Err(ExplainError::arg("--multiplier", format!("must be a number above 0, got {m}")));
        }
    }
    let explicit = parse_explicit(explicit)?;
    let effective = tiered_rate(&base, multiplier, &explicit, scope);
    Ok(json!({ "limit": effective.limit, "window_seconds": effective.window_seconds() }))
}

fn load_config(path: &Path) -> Result<Config, ExplainError> {
    let text = std::fs::read_to_string(path).map_err(|source| ExplainError::ReadConfig { path: path.to_path_buf(), source })?;
    Config::from_yaml_str(&text).map_err(|errors| ExplainError::InvalidConfig { path: path.to_path_buf(), errors })
}

fn quota_json(q: &EffectiveQuota, at: DateTime<Utc>, tz: Tz) -> Value {
    let w = q.window(at, tz);
    json!({
        "name": q.name,
        "metric": q.metric.as_str(),
        "period": q.period.to_string(),
        "limit": q.limit,
        "burst": q.burst,
        "scope": q.scope,
        "models": q.models,
        "thresholds": q.thresholds,
        "action": serde_json::to_value(&q.action).unwrap_or(Value::Null),
        "window": { "start": rfc3339(w.start), "end": rfc3339(w.end) },
    })
}

/// A budget as `explain subject` shows it: its owner, timezone and quotas with their
/// current windows.
fn budget_json(config: &Config, budget: &Budget, at: DateTime<Utc>) -> Value {
    let tz = budget_timezone(config, budget);
    let mut owner = json!({ "kind": budget.owner.kind.as_str(), "name": budget.owner.name });
    match budget.owner.kind {
        OwnerKind::ApiKey => {
            if let Some(key) = config.api_keys.get(&budget.owner.name) {
                owner["label"] = json!(key.label);
            }
        }
        OwnerKind::Group => {
            let members: Vec<&str> =
                config.members.iter().filter(|(_, gs)| gs.contains(&budget.owner.name)).map(|(s, _)| s.as_str()).collect();
            owner["members"] = json!(members);
        }
        OwnerKind::Tier => {}
    }
    owner["ledger_subject"] = json!(budget.owner.ledger_subject());
    owner["timezone"] = json!(tz.name());
    owner["quotas"] = budget.effective_quotas().iter().map(|q| quota_json(q, at, tz)).collect();
    owner
}

fn explain_subject(
    id: &str,
    config_path: &Path,
    at: DateTime<Utc>,
    groups: &[String],
    key_hash: Option<&str>,
    scope: &str,
) -> Result<Value, ExplainError> {
    if id.trim().is_empty() {
        return Err(ExplainError::arg("<ID>", "the subject id must not be empty"));
    }
    let config = load_config(config_path)?;
    let facts = SubjectFacts { subject: id, groups, api_key_sha256: key_hash, scope };
    let r = resolve(&config, &facts, at);
    let budget_facts = BudgetFacts { subject: id, api_key_sha256: key_hash, groups, tier: &r.tier };
    let budgets: Vec<Value> = budgets_met(&config, &budget_facts).into_iter().map(|b| budget_json(&config, b, at)).collect();
    let overrides: Vec<Value> = r
        .overrides
        .iter()
        .map(|o| {
            json!({
                "quota": o.quota,
                "scope": o.scope,
                "starts_at": o.starts_at.map(rfc3339),
                "expires_at": rfc3339(o.expires_at),
                "reason": o.reason,
                "created_by": o.created_by,
            })
        })
        .collect();
    Ok(json!({
        "subject": id,
        "at": rfc3339(at),
        "scope": scope,
        "tier": r.tier,
        "level": r.level.as_str(),
        "tier_level": r.tier_level.as_str(),
        "timezone": r.timezone.name(),
        "quotas": r.quotas.iter().map(|q| quota_json(q, at, r.timezone)).collect::<Vec<_>>(),
        "overrides": overrides,
        "budgets": budgets,
        "next_change_at": next_change_after(&config, id, at).map(rfc3339),
    }))
}

/// Validates a configuration file: prints a summary on stdout and returns 0, or prints
/// every error with its location on stderr and returns 1.
pub fn run_validate_config(args: ValidateConfigArgs) -> i32 {
    let name = args.file.display().to_string();
    let text = match std::fs::read_to_string(&args.file) {
        Ok(text) => text,
        Err(e) => {
            eprintln!("error: cannot read {name}: {e}");
            return 1;
        }
    };
    match validate_report(&text, &name) {
        Ok(summary) => {
            print_stdout(&summary);
            0
        }
        Err(errors) => {
            eprint!("{errors}");
            1
        }
    }
}

/// The text `validate-config` prints: `Ok(summary)` or `Err(error list)`.
pub fn validate_report(text: &str, name: &str) -> Result<String, String> {
    match Config::from_yaml_str(text) {
        Ok(config) => Ok(summary(&config, name)),
        Err(ConfigErrors(errors)) => {
            let mut out = format!("{name}: {} error{}\n", errors.len(), if errors.len() == 1 { "" } else { "s" });
            for e in &errors {
                let _ = writeln!(out, "  {e}");
            }
            Err(out)
        }
    }
}

fn quota_line(q: &EffectiveQuota) -> String {
    let mut line = format!("{:<18} {:<14} {:>14} per {:<12}", q.name, q.metric.as_str(), q.limit, q.period.to_string());
    if q.burst > 0 {
        let _ = write!(line, " burst {}", q.burst);
    }
    if let Some(scope) = &q.scope {
        let _ = write!(line, " scope {scope}");
    }
    if let Some(models) = &q.models {
        let _ = write!(line, " models {}", models.join(","));
    }
    let thresholds: Vec<String> = q.thresholds.iter().map(|t| format!("{t}%")).collect();
    let _ = write!(line, " warn at {}", thresholds.join(","));
    let action = match &q.action {
        Action::Block => "block".to_string(),
        Action::Degrade { fallback_model } => format!("degrade to {fallback_model}"),
        Action::Queue => "queue".to_string(),
        Action::Soft => "soft".to_string(),
    };
    let _ = write!(line, " on breach {action}");
    line.trim_end().to_string()
}

fn summary(config: &Config, name: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{name}: valid");
    let _ = writeln!(out, "default tier: {}; timezone: {}", config.default_tier, config.timezone.name());
    let _ = writeln!(out, "\ntiers ({}), with their quotas in the default scope:", config.tiers.len());
    for tier in &config.tiers {
        let tz = tier.timezone.map(|t| format!(", timezone {}", t.name())).unwrap_or_default();
        let _ = writeln!(out, "  {} (priority {}, rate_multiplier {}{tz})", tier.name, tier.priority, tier.rate_multiplier);
        for q in tier_quotas(&config.quotas, Some(tier), "") {
            let _ = writeln!(out, "    {}", quota_line(&q));
        }
        for e in &tier.explicit_limits {
            let target = e.quota.as_deref().unwrap_or(e.metric.as_str());
            let _ = writeln!(out, "    in scope {}: {target} = {}", e.scope, e.rate);
        }
    }
    if !config.groups.is_empty() {
        let _ = writeln!(out, "\ngroups:");
        for (group, tier) in &config.groups {
            let members: Vec<&str> = config.members.iter().filter(|(_, gs)| gs.contains(group)).map(|(s, _)| s.as_str()).collect();
            let _ =
                writeln!(out, "  {group} -> {tier} (members: {})", if members.is_empty() { "-".to_string() } else { members.join(", ") });
        }
    }
    if !config.assignments.is_empty() {
        let _ = writeln!(out, "\nassignments:");
        for a in &config.assignments {
            let until = a.expires_at.map(|t| format!(" until {}", rfc3339(t))).unwrap_or_else(|| " (no expiry)".into());
            let reason = a.reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default();
            let _ = writeln!(out, "  {} -> {}{until}{reason}", a.subject, a.tier);
        }
    }
    if !config.overrides.is_empty() {
        let _ = writeln!(out, "\noverrides:");
        for o in &config.overrides {
            let what = match o.limit {
                OverrideLimit::Limit(n) => format!("limit {n}"),
                OverrideLimit::Rate(r) => format!("rate {r}"),
            };
            let from = o.starts_at.map(|t| format!(" from {}", rfc3339(t))).unwrap_or_default();
            let _ = writeln!(
                out,
                "  {} {} {what}{from} until {} scope {}: {} (by {})",
                o.subject,
                o.quota.as_deref().unwrap_or("all quotas"),
                rfc3339(o.expires_at),
                o.scope.as_deref().unwrap_or("all"),
                o.reason,
                o.created_by
            );
        }
    }
    if !config.api_keys.is_empty() {
        let _ = writeln!(out, "\napi keys ({}):", config.api_keys.len());
        for k in config.api_keys.values() {
            let label = k.label.as_deref().map(|l| format!(" ({l})")).unwrap_or_default();
            let _ = writeln!(out, "  sha256 {}… -> {}{label}", &k.key_sha256[..12.min(k.key_sha256.len())], k.tier);
        }
    }
    if !config.budgets.is_empty() {
        let _ = writeln!(
            out,
            "\nbudgets ({}), beside each subject's own quotas; every budget a request meets must pass:",
            config.budgets.len()
        );
        for budget in config.budgets.values() {
            let tz = budget_timezone(config, budget).name();
            let name = &budget.owner.name;
            let whom = match budget.owner.kind {
                OwnerKind::ApiKey => {
                    let key = config.api_keys.get(name);
                    let label = key.and_then(|k| k.label.as_deref()).map(|l| format!(" ({l})")).unwrap_or_default();
                    let bound = key.and_then(|k| k.subject.as_deref()).map(|s| format!(", subject {s}")).unwrap_or_default();
                    format!("api key sha256 {}…{label}: the key's own cap{bound}", &name[..12.min(name.len())])
                }
                OwnerKind::Group => {
                    let members: Vec<&str> = config.members.iter().filter(|(_, gs)| gs.contains(name)).map(|(s, _)| s.as_str()).collect();
                    let members = if members.is_empty() { "-".to_string() } else { members.join(", ") };
                    format!("group {name}: one pool for its members ({members}) and requests naming it")
                }
                OwnerKind::Tier => format!("tier {name}: one pool for every subject on tier {name}"),
            };
            let _ = writeln!(out, "  {whom}; timezone {tz}");
            for q in budget.effective_quotas() {
                let _ = writeln!(out, "    {}", quota_line(&q));
            }
        }
    }
    if !config.prices.is_empty() {
        let models: Vec<&str> = config.prices.keys().map(String::as_str).collect();
        let _ = writeln!(out, "\nprices (micro-dollars per 1M tokens) for: {}", models.join(", "));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../examples/tiers.yaml");

    #[test]
    fn period_and_anchor_day() {
        let v = explain_period("month", "2026-03-14T12:00:00Z", "UTC", Some(15)).unwrap();
        assert_eq!(v, json!({"start": "2026-02-15T00:00:00Z", "end": "2026-03-15T00:00:00Z"}));
        assert!(explain_period("week", "2026-03-14T12:00:00Z", "UTC", Some(15)).is_err());
        assert!(explain_period("month", "2026-03-14T12:00:00Z", "UTC", Some(32)).is_err());
        assert!(explain_period("day", "yesterday", "UTC", None).is_err());
        assert!(explain_period("day", "2026-03-14T12:00:00Z", "Mars/Base", None).is_err());
    }

    #[test]
    fn rate_examples_from_the_issue() {
        assert_eq!(explain_rate("10/m", Some(3.0), &[], None).unwrap(), json!({"limit": 30, "window_seconds": 60}));
        let explicit = vec!["api=5000/h".to_string()];
        assert_eq!(explain_rate("10/m", Some(3.0), &explicit, Some("api")).unwrap(), json!({"limit": 5000, "window_seconds": 3600}));
        assert_eq!(explain_rate("10/m", None, &[], None).unwrap(), json!({"limit": 10, "window_seconds": 60}));
        assert!(explain_rate("10/m", Some(0.0), &[], None).is_err());
        assert!(explain_rate("10/m", None, &["api".to_string()], None).is_err());
    }

    #[test]
    fn errors_are_one_line() {
        let e = explain_rate("5/0s", None, &[], None).unwrap_err();
        assert!(!e.to_string().contains('\n'));
        assert_eq!(e.exit_code(), 2);
        let invalid = ExplainError::InvalidConfig {
            path: PathBuf::from("c.yaml"),
            errors: Config::from_yaml_str("default_tier: x\ntiers: []\n").unwrap_err(),
        };
        assert!(!invalid.to_string().contains('\n'), "{invalid}");
    }

    /// Team eng pools alice's and bob's month; alice's capped key has its own cap; every
    /// free subject shares a gpt-4o pool in Paris time.
    fn budgets_yaml() -> String {
        let key = hash_api_key("sk-capped");
        format!(
            "default_tier: free\n\
             quotas: [{{name: monthly_tokens, metric: total_tokens, period: month, limit: 1000}}]\n\
             tiers: [{{name: free, timezone: Europe/Paris}}, {{name: pro}}]\n\
             groups: {{vip: pro}}\n\
             members: {{alice: [eng], bob: [eng], vera: [vip]}}\n\
             api_keys: [{{key_sha256: {key}, tier: free, label: alice-laptop, subject: alice}}]\n\
             budgets:\n\
             \x20 - group: eng\n    timezone: America/New_York\n    quotas: [{{name: team_month, metric: cost_micros, period: month, limit: 1000000}}]\n\
             \x20 - api_key: {key}\n    quotas: [{{name: key_day, metric: total_tokens, period: day, limit: 500}}]\n\
             \x20 - tier: free\n    quotas:\n      - {{name: free_gpt4o, metric: total_tokens, period: day, limit: 2000, models: [gpt-4o], action: degrade, fallback_model: gpt-4o-mini}}\n"
        )
    }

    fn with_config<T>(yaml: &str, f: impl FnOnce(&Path) -> T) -> T {
        let path = std::env::temp_dir().join(format!("tally-explain-{}.yaml", uuid::Uuid::new_v4()));
        std::fs::write(&path, yaml).unwrap();
        let out = f(&path);
        let _ = std::fs::remove_file(&path);
        out
    }

    fn owners(v: &Value) -> Vec<String> {
        v["budgets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| format!("{} {}", b["kind"].as_str().unwrap(), b["name"].as_str().unwrap()))
            .collect()
    }

    #[test]
    fn explain_subject_lists_every_budget_a_request_meets() {
        let at: DateTime<Utc> = "2026-11-22T10:00:00Z".parse().unwrap();
        let key = hash_api_key("sk-capped");
        with_config(&budgets_yaml(), |path| {
            let alice = explain_subject("alice", path, at, &[], Some(&key), "").unwrap();
            assert_eq!(owners(&alice), [format!("api_key {key}"), "group eng".into(), "tier free".into()]);
            let team = &alice["budgets"][1];
            assert_eq!(team["timezone"], "America/New_York");
            assert_eq!(team["members"], json!(["alice", "bob"]));
            assert_eq!(team["ledger_subject"], "__tally_budget__/group/eng");
            let month = &team["quotas"][0];
            assert_eq!((month["name"].as_str(), month["limit"].as_i64()), (Some("team_month"), Some(1_000_000)));
            assert_eq!(month["window"]["end"], "2026-12-01T05:00:00Z", "the budget's own timezone");
            assert_eq!(alice["budgets"][0]["label"], "alice-laptop");
            let pool = &alice["budgets"][2];
            assert_eq!(pool["timezone"], "Europe/Paris", "a pool takes its tier's timezone");
            assert_eq!(pool["quotas"][0]["models"], json!(["gpt-4o"]));
            assert_eq!(pool["quotas"][0]["action"], json!({"type": "degrade", "fallback_model": "gpt-4o-mini"}));
            assert_eq!(pool["quotas"][0]["window"]["end"], "2026-11-22T23:00:00Z");

            // Without the key, only the team and the pool; a request naming a group meets its budget.
            assert_eq!(owners(&explain_subject("alice", path, at, &[], None, "").unwrap()), ["group eng", "tier free"]);
            assert_eq!(owners(&explain_subject("carol", path, at, &["eng".into()], None, "").unwrap()), ["group eng", "tier free"]);
            // A pro subject is in no pool.
            let vera = explain_subject("vera", path, at, &[], None, "").unwrap();
            assert_eq!((vera["tier"].as_str(), owners(&vera)), (Some("pro"), Vec::<String>::new()));
        });
    }

    #[test]
    fn a_key_is_named_by_itself_or_by_its_hash() {
        let key = hash_api_key("sk-capped");
        let yaml = budgets_yaml();
        let run = |api_key: Option<&str>, api_key_sha256: Option<String>| {
            with_config(&yaml, |path| {
                run_explain(ExplainCommand::Subject {
                    id: "alice".into(),
                    config: path.to_path_buf(),
                    at: Some("2026-11-22T10:00:00Z".into()),
                    groups: vec![],
                    api_key: api_key.map(str::to_string),
                    api_key_sha256,
                    scope: String::new(),
                })
            })
        };
        let by_key = run(Some("sk-capped"), None).unwrap();
        let by_hash = run(None, Some(key.to_ascii_uppercase())).unwrap();
        assert_eq!(owners(&by_key), owners(&by_hash));
        assert_eq!(owners(&by_hash)[0], format!("api_key {key}"));
        let e = run(None, Some("sk-capped".into())).unwrap_err();
        assert!(e.to_string().starts_with("--api-key-sha256:"), "{e}");
    }

    #[test]
    fn a_key_and_its_hash_are_not_given_together() {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(subcommand)]
            explain: ExplainCommand,
        }
        fn args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
            [&["tally", "subject", "alice", "--config", "c.yaml"], extra].concat()
        }
        let hex = hash_api_key("k");
        let parsed = Cli::try_parse_from(args(&["--api-key-sha256", &hex, "--group", "eng"])).unwrap();
        assert!(matches!(parsed.explain, ExplainCommand::Subject { api_key_sha256: Some(h), groups, .. } if h == hex && groups == ["eng"]));
        let e = Cli::try_parse_from(args(&["--api-key", "k", "--api-key-sha256", &hex])).err().unwrap();
        assert_eq!(e.kind(), clap::error::ErrorKind::ArgumentConflict);
    }

    #[test]
    fn validate_report_summarises_budgets() {
        let summary = validate_report(&budgets_yaml(), "budgets.yaml").unwrap();
        assert!(summary.contains("budgets (3)"), "{summary}");
        assert!(
            summary.contains("group eng: one pool for its members (alice, bob) and requests naming it; timezone America/New_York"),
            "{summary}"
        );
        assert!(summary.contains("(alice-laptop): the key's own cap, subject alice; timezone UTC"), "{summary}");
        assert!(summary.contains("tier free: one pool for every subject on tier free; timezone Europe/Paris"), "{summary}");
        assert!(summary.contains("models gpt-4o") && summary.contains("degrade to gpt-4o-mini"), "{summary}");
        assert!(!validate_report(EXAMPLE, "tiers.yaml").unwrap().contains("budgets ("), "no section without budgets");
    }

    #[test]
    fn validate_report_summarises_or_lists_every_error() {
        let summary = validate_report(EXAMPLE, "tiers.yaml").unwrap();
        assert!(summary.contains("tiers.yaml: valid"));
        assert!(summary.contains("enterprise"));
        assert!(summary.contains("bob -> enterprise"));
        let errors = validate_report("default_tier: x\ntiers: [{name: a, rate_multiplier: -1}]\n", "bad.yaml").unwrap_err();
        assert!(errors.starts_with("bad.yaml: 2 errors"), "{errors}");
        assert!(errors.contains("tiers.a.rate_multiplier") && errors.contains("default_tier"), "{errors}");
    }
}
