//! The budgets section: the pipeline's throughput when every event meets three budgets
//! beside its subject's own quotas, against the same count without budgets and against the
//! broker's consume rate, in the same run.
//!
//! Two Tallys of their own (two run ids), each set up from scratch:
//! - **plain**: the pipeline section's configuration and events (three tiers, four quotas
//!   each);
//! - **budgeted**: the same, plus three budgets every event meets: its API key's (every
//!   tier's events come with a key), its team's (the event names one of [`TEAMS`] groups)
//!   and its tier's pool. The pools and the keys' budgets are three rows each that every
//!   batch of every lane updates: the pooled rows the counting must keep exact.
//!
//! Each count uses new event ids for the same number of subjects and events, on an
//! aggregator started for the count (see [`pipeline::Pipeline::count_timed`]); the limits
//! are far above what the count sends, so the figures are of counting, not of blocking.

use anyhow::Context;
use chrono::Utc;
use tally_domain::event::hash_api_key;

use super::broker::{self, Ceiling, Prepared};
use super::pipeline::{self, Pipeline, Timed, TIER_KEYS};
use super::report::Section;
use super::stack::{SharedServers, Stack};

/// The sizes of the section.
#[derive(Debug, Clone)]
pub struct Plan {
    pub events: usize,
    pub subjects: usize,
    /// Messages for the broker's ceiling when the section measures it itself.
    pub broker_messages: usize,
}

/// Groups the budgeted events name, one budget each.
pub const TEAMS: usize = 100;

/// The key the basic tier's events come with in the budgeted count (the pipeline section's
/// basic events have none).
const BASIC_KEY: &str = "bench-key-basic";

/// Budgets every budgeted event meets.
const BUDGETS_PER_EVENT: usize = 3;

/// Measures the section (see the module docs). `ceiling` is the broker section's, when it
/// ran; otherwise the section measures it first.
pub async fn measure(servers: &SharedServers<'_>, plan: &Plan, ceiling: Option<Ceiling>, keep: bool) -> anyhow::Result<Section> {
    let (ceiling, own_ceiling) = match ceiling {
        Some(c) => (c, false),
        None => (broker_ceiling(servers, plan, keep).await?, true),
    };
    eprintln!("[bench] budgets: {} events over {} subjects, no budgets", plan.events, plan.subjects);
    let plain = on_own_tally(servers, &pipeline::tiers_yaml(), keep, |tag| pipeline::events(tag, "s", plan.subjects, plan.events)).await?;
    eprintln!("[bench] budgets: the same count, {BUDGETS_PER_EVENT} budgets per event");
    let budgeted = on_own_tally(servers, &budgeted_yaml(), keep, |tag| budgeted_events(tag, plan.subjects, plan.events)).await?;
    let mut s = Section::default();
    s.figure("events", budgeted.events)
        .figure("budgets_per_event", BUDGETS_PER_EVENT as f64)
        .figure("broker_consume_per_s", ceiling.consume_per_s)
        .figure("plain_events_per_s", plain.events_per_s)
        .figure("budgeted_events_per_s", budgeted.events_per_s)
        .figure("plain_aggregator_cpu_us_per_event", plain.aggregator_us_per_event())
        .figure("budgeted_aggregator_cpu_us_per_event", budgeted.aggregator_us_per_event())
        .figure("plain_postgres_cpu_us_per_event", plain.postgres_us_per_event())
        .figure("budgeted_postgres_cpu_us_per_event", budgeted.postgres_us_per_event())
        .ratio("budgeted_to_broker_consume", budgeted.events_per_s, ceiling.consume_per_s)
        .ratio("budgeted_to_plain", budgeted.events_per_s, plain.events_per_s)
        .ratio(
            "budgeted_to_plain_cpu_per_event",
            budgeted.aggregator_us_per_event() + budgeted.postgres_us_per_event(),
            plain.aggregator_us_per_event() + plain.postgres_us_per_event(),
        )
        .target("budgeted events_per_s >= half the broker consume ceiling", budgeted.events_per_s >= ceiling.consume_per_s / 2.0)
        .note(format!(
            "two Tallys of their own: plain (the pipeline section's configuration and events) and budgeted (the same plus, for every event, \
             its API key's budget, one of {TEAMS} teams' budgets named by the event's group, and its tier's pool); each times {} new events \
             over {} subjects on a freshly started aggregator",
            plan.events, plan.subjects
        ))
        .note("the three pools and three key budgets are rows every batch of every lane updates; their limits are far above the count");
    if own_ceiling {
        s.note(format!(
            "broker_consume_per_s measured by this section first ({} messages), as the broker section does",
            plan.broker_messages
        ));
    }
    Timed::explain(&mut s);
    Ok(s)
}

/// The broker's consume rate, measured on topics of a Tally of its own.
async fn broker_ceiling(servers: &SharedServers<'_>, plan: &Plan, keep: bool) -> anyhow::Result<Ceiling> {
    let stack = Stack::new(servers.brokers, servers.database_url, servers.clickhouse_url, &pipeline::tiers_yaml())?;
    let extra = vec![stack.topic("broker")];
    eprintln!("[bench] budgets: the broker's ceiling first, {} messages", plan.broker_messages);
    let outcome = async {
        stack.setup(&extra).await.context("tally setup for the budgets section failed")?;
        let messages = pipeline::events(&format!("{}-broker", stack.id()), "s", plan.subjects, plan.broker_messages);
        let (kafka, topic) = (stack.kafka(), extra[0].clone());
        let (_, ceiling) = tokio::task::spawn_blocking(move || broker::measure(&kafka, &topic, &messages, 20)).await??;
        Ok(ceiling)
    }
    .await;
    if !keep {
        stack.teardown(&stack.all_topics(&extra)).await;
        let _ = std::fs::remove_dir_all(stack.log_dir());
    }
    outcome
}

/// Sets up a Tally of its own with `tiers`, times the count of `messages(tag)`, and removes
/// the Tally (unless `keep`).
async fn on_own_tally(
    servers: &SharedServers<'_>,
    tiers: &str,
    keep: bool,
    messages: impl FnOnce(&str) -> Vec<Prepared>,
) -> anyhow::Result<Timed> {
    let stack = Stack::new(servers.brokers, servers.database_url, servers.clickhouse_url, tiers)?;
    let outcome = async {
        stack.setup(&[]).await.context("tally setup for the budgets section failed")?;
        let mut p = Pipeline::new(stack.clone()).await?;
        let timed = p.count_timed(messages(&format!("{}-load", stack.id()))).await?;
        if let Some(mut agg) = p.aggregator.take() {
            agg.stop();
        }
        Ok(timed)
    }
    .await;
    if !keep {
        stack.teardown(&stack.all_topics(&[])).await;
        let _ = std::fs::remove_dir_all(stack.log_dir());
    }
    outcome
}

/// The pipeline section's configuration with a key for the basic tier and the budgets every
/// budgeted event meets.
fn budgeted_yaml() -> String {
    let keys = [Some(BASIC_KEY), TIER_KEYS[1], TIER_KEYS[2]].map(|k| hash_api_key(k.unwrap_or_default()));
    let mut yaml = pipeline::tiers_yaml().replacen("api_keys:\n", &format!("api_keys:\n  - key_sha256: {}\n    tier: basic\n", keys[0]), 1);
    yaml.push_str("budgets:\n");
    for key in &keys {
        yaml.push_str(&format!(
            "  - api_key: {key}\n    quotas: [{{name: key_day_tokens, metric: total_tokens, period: day, limit: 100000000000000}}]\n"
        ));
    }
    for team in 0..TEAMS {
        yaml.push_str(&format!(
            "  - group: team-{team}\n    quotas: [{{name: team_month_cost, metric: cost_micros, period: month, limit: 100000000000000}}]\n"
        ));
    }
    for tier in ["basic", "pro", "scale"] {
        yaml.push_str(&format!(
            "  - tier: {tier}\n    quotas: [{{name: pool_month_tokens, metric: total_tokens, period: month, limit: 100000000000000}}]\n"
        ));
    }
    yaml
}

/// `count` budgeted events over `subjects` subjects: as [`pipeline::events`], each with its
/// tier's key and its subject's team.
fn budgeted_events(tag: &str, subjects: usize, count: usize) -> Vec<Prepared> {
    let keys = [Some(BASIC_KEY), TIER_KEYS[1], TIER_KEYS[2]].map(|k| hash_api_key(k.unwrap_or_default()));
    let teams: Vec<String> = (0..TEAMS).map(|t| format!("team-{t}")).collect();
    let now = Utc::now();
    (0..count)
        .map(|i| {
            let s = i % subjects.max(1);
            let time = now - chrono::Duration::milliseconds((i % 1000) as i64);
            let (key, team) = (Some(keys[s % 3].clone()), Some(teams[s % TEAMS].clone()));
            pipeline::event_with(format!("{tag}-{i}"), format!("s{s}"), key, team, time, 300)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_domain::budget::{budgets_met, BudgetFacts};
    use tally_domain::config::Config;
    use tally_domain::precedence::{resolve, SubjectFacts};

    #[test]
    fn every_budgeted_event_meets_exactly_three_budgets() {
        let config = Config::from_yaml_str(&budgeted_yaml()).unwrap_or_else(|e| panic!("{e}"));
        for (subject, bytes) in budgeted_events("t", 30, 30) {
            let e = tally_domain::event::parse_event(&bytes).unwrap();
            let facts = SubjectFacts { subject: &subject, groups: &[], api_key_sha256: e.api_key_sha256.as_deref(), scope: &e.scope };
            let tier = resolve(&config, &facts, e.time).tier;
            let groups: Vec<String> = e.group.clone().into_iter().collect();
            let facts = BudgetFacts { subject: &subject, api_key_sha256: e.api_key_sha256.as_deref(), groups: &groups, tier: &tier };
            let met: Vec<String> = budgets_met(&config, &facts).iter().map(|b| b.owner.kind.to_string()).collect();
            assert_eq!(met, ["api_key", "group", "tier"], "{subject}");
        }
    }
}
