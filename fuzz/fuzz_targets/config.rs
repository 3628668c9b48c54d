//! The YAML tier configuration: any text.
//!
//! - `Config::from_yaml_str` never panics;
//! - every error says where: a path, or a line and column (only the empty file's error,
//!   about the whole file, has neither);
//! - a valid configuration resolves, for every tier, subject with an override or
//!   assignment, and scope it names, to quotas whose limit and burst are 0 or more, and
//!   deciding them with usage up to a few times MAX_AMOUNT never panics.
#![no_main]

use chrono::{DateTime, Utc};
use libfuzzer_sys::fuzz_target;
use tally_domain::config::Config;
use tally_domain::decision::{quota_state, remaining, thresholds_reached};
use tally_domain::metric::MAX_AMOUNT;
use tally_domain::precedence::{resolve, SubjectFacts};
use tally_domain::tier::{tier_quotas, EffectiveQuota};

const USED: [i64; 7] = [0, 1, MAX_AMOUNT, 2 * MAX_AMOUNT, 4 * MAX_AMOUNT, i64::MAX, -MAX_AMOUNT];

fn check_quotas(quotas: &[EffectiveQuota]) {
    for q in quotas {
        assert!(q.limit >= 0 && q.burst >= 0, "{q:?}");
        for used in USED {
            let _ = quota_state(used, q.limit, q.burst, &q.thresholds);
            let _ = thresholds_reached(used, q.limit, &q.thresholds);
            let left = remaining(used, q.limit, q.burst);
            assert!(left >= 0, "{q:?} with {used} used leaves {left}");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let config = match Config::from_yaml_str(text) {
        Ok(config) => config,
        Err(errors) => {
            assert!(!errors.0.is_empty(), "refused without an error");
            for e in &errors.0 {
                let whole_file = e.message.contains("configuration is empty");
                assert!(!e.path.is_empty() || e.line.is_some() || whole_file, "no location: {e:?}");
            }
            return;
        }
    };
    let mut scopes = vec![String::new()];
    let mut subjects = vec!["nobody".to_string()];
    for t in &config.tiers {
        scopes.extend(t.explicit_limits.iter().map(|e| e.scope.clone()));
        scopes.extend(t.quotas.iter().filter_map(|q| q.scope.clone()));
    }
    scopes.extend(config.quotas.iter().filter_map(|q| q.scope.clone()));
    for o in &config.overrides {
        scopes.extend(o.scope.clone());
        subjects.push(o.subject.clone());
    }
    subjects.extend(config.assignments.iter().map(|a| a.subject.clone()));
    subjects.extend(config.members.keys().cloned());
    scopes.truncate(16);
    subjects.truncate(16);
    for scope in &scopes {
        check_quotas(&tier_quotas(&config.quotas, None, scope));
        for tier in &config.tiers {
            check_quotas(&tier_quotas(&config.quotas, Some(tier), scope));
        }
        let mut instants: Vec<DateTime<Utc>> = vec![DateTime::<Utc>::UNIX_EPOCH];
        instants.extend(config.overrides.iter().flat_map(|o| o.starts_at.into_iter().chain([o.expires_at])));
        instants.truncate(8);
        for subject in &subjects {
            for &at in &instants {
                let r = resolve(&config, &SubjectFacts { subject, groups: &[], api_key_sha256: None, scope }, at);
                check_quotas(&r.quotas);
                for q in &r.quotas {
                    let _ = r.resets_at(q, at);
                }
            }
        }
    }
    for price in config.prices.values() {
        let _ = price.cost_micros(MAX_AMOUNT, MAX_AMOUNT, MAX_AMOUNT);
        let _ = price.cost_micros(i64::MAX, i64::MAX, i64::MAX);
        let _ = price.cost_micros(i64::MIN, i64::MIN, i64::MIN);
    }
});
