//! The budget ledgers the aggregator counts an event in are exactly those the domain says it
//! counted in (`tally_domain::budget::event_budgets` and `ledgers_counted`), which the history
//! writer records on each raw row and reconciliation relies on: for a varied set of events
//! (API keys with and without a budget, configured and named groups, a tier pool reached
//! through an assignment that expires, model-narrowed, scoped, rolling and calendar quotas in
//! another timezone), the budget rows of `plan::ledger_deltas` name the same ledgers. No
//! server is needed.

use std::collections::BTreeSet;

use serde_json::{json, Value};
use tally_aggregator::plan::ledger_deltas;
use tally_aggregator::policy::Policy;
use tally_domain::budget::{event_budgets, is_reserved_subject, ledger_name, ledgers_counted, EventFacts};
use tally_domain::config::Config;
use tally_domain::event::{hash_api_key, parse_event, UsageEvent};

fn config_text() -> String {
    let capped = hash_api_key("sk-capped");
    let pro_key = hash_api_key("sk-pro");
    format!(
        "default_tier: free
timezone: UTC
quotas:
  - {{name: monthly, metric: total_tokens, period: month, limit: 1000000}}
tiers:
  - {{name: free}}
  - {{name: pro, priority: 10, timezone: Asia/Kolkata}}
groups: {{staff: pro}}
members: {{alice: [eng], bob: [eng, staff]}}
assignments:
  - {{subject: carol, tier: pro, expires_at: 2026-11-20T12:00:00Z}}
api_keys:
  - {{key_sha256: \"{pro_key}\", tier: pro}}
budgets:
  - group: eng
    timezone: America/New_York
    quotas:
      - {{name: team_month, metric: cost_micros, period: month, limit: 100000000}}
      - {{name: team_gpt, metric: total_tokens, period: day, limit: 1000000, models: [gpt-4o, o1]}}
  - group: research
    quotas:
      - {{name: research_chat, metric: requests, period: hour, limit: 1000, scope: chat}}
  - api_key: \"{capped}\"
    quotas:
      - {{name: key_day, metric: total_tokens, period: day, limit: 500000}}
      - {{name: key_rolling, metric: requests, period: 7 days, limit: 100000}}
  - tier: pro
    quotas:
      - {{name: pool, metric: total_tokens, period: week, limit: 10000000}}
      - {{name: pool_o1, metric: output_tokens, period: month, limit: 1000000, models: [o1]}}
"
    )
}

fn events() -> Vec<UsageEvent> {
    let keys = [None, Some("sk-capped"), Some("sk-pro")];
    let subjects = ["alice", "bob", "carol", "dave"];
    let groups = [None, Some("research"), Some("eng"), Some("staff")];
    let models = [None, Some("gpt-4o"), Some("o1"), Some("small")];
    let scopes = ["", "chat", "batch"];
    let times = ["2026-11-20T11:59:59Z", "2026-11-20T12:00:00Z", "2026-11-30T23:30:00Z", "2026-12-01T03:00:00Z"];
    let mut out = Vec::new();
    for i in 0..(keys.len() * subjects.len() * groups.len() * 4) {
        let mut e = json!({
            "id": format!("e{i}"),
            "subject": subjects[i % subjects.len()],
            "time": times[(i / 3) % times.len()],
            "scope": scopes[(i / 5) % scopes.len()],
            "input_tokens": 10 + i,
            "output_tokens": 3,
            "cost_micros": 7,
        });
        let fields = e.as_object_mut().expect("an object");
        if let Some(key) = keys[(i / 4) % keys.len()] {
            fields.insert("api_key".into(), Value::from(key));
        }
        if let Some(group) = groups[(i / 12) % groups.len()] {
            fields.insert("group".into(), Value::from(group));
        }
        if let Some(model) = models[(i / 7) % models.len()] {
            fields.insert("model".into(), Value::from(model));
        }
        out.push(parse_event(&serde_json::to_vec(&e).expect("JSON")).expect("a valid event"));
    }
    out
}

#[test]
fn the_aggregator_counts_each_event_in_exactly_the_budget_ledgers_the_domain_names() {
    let text = config_text();
    let config = Config::from_yaml_str(&text).unwrap_or_else(|e| panic!("{e}"));
    let policy = Policy::from_yaml(&text, "(test)").expect("a valid configuration");
    let mut ledgers_seen = BTreeSet::new();
    for event in events() {
        let counted: BTreeSet<String> = ledger_deltas(&[&event], &policy)
            .into_keys()
            .filter(|k| is_reserved_subject(&k.subject))
            .map(|k| ledger_name(&k.subject, &k.metric, &k.scope, &k.period))
            .collect();
        let facts = EventFacts { subject: &event.subject, api_key_sha256: event.api_key_sha256.as_deref(), group: event.group.as_deref() };
        let budgets = event_budgets(&config, &facts, event.time);
        let named: BTreeSet<String> = ledgers_counted(&budgets, &event.scope, event.model.as_deref()).into_iter().collect();
        assert_eq!(counted, named, "event {event:?}");
        ledgers_seen.extend(named);
    }
    // The events reach every ledger of every budget, so the comparison covered each kind.
    assert_eq!(ledgers_seen.len(), 7, "{ledgers_seen:#?}");
}
