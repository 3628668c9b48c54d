//! The tier configuration file (YAML) and its validation.
//!
//! [`Config::from_yaml_str`] parses and validates the whole file and either returns a
//! [`Config`] in which every reference resolves, or [`ConfigErrors`] listing **every**
//! problem found, each with its location: a path such as `tiers.pro.quotas[1].period`
//! (tiers are named by their `name`, other lists by index, maps by key) and, for YAML
//! syntax and top-level shape errors, the line and column serde_yaml reports. Unknown
//! keys are rejected everywhere. Nothing is half-applied: a file with any error yields no
//! `Config`.
//!
//! [`ConfigDocument`] is the same file as written, typed but not interpreted: what an edit
//! (the admin API) changes and writes back before validating the result as a whole.
//!
//! # Format
//!
//! ```yaml
//! default_tier: free            # required: the tier of subjects nothing else matches
//! timezone: UTC                 # calendar periods' timezone when neither the subject
//!                               # nor its tier has one (default UTC)
//! quotas:                       # base quotas, multiplied by each tier's rate_multiplier
//!   - name: rpm
//!     metric: requests          # requests | input_tokens | output_tokens |
//!                               # cached_tokens | total_tokens | cost_micros
//!     rate: 10/m                # a rate (limit + window), or `period` + `limit`
//!   - name: monthly_tokens
//!     metric: total_tokens
//!     period: month             # see crate::period for the grammar
//!     limit: 100000
//!     scope: chat               # optional: count only usage in this scope
//!     models: [gpt-4o]          # optional: count only events for these models
//!     burst: 0                  # optional headroom above the limit (default 0)
//!     thresholds: [80, 95]      # warning thresholds in percent (default [80])
//!     action: degrade           # block (default) | degrade | queue | soft
//!     fallback_model: small     # required with degrade, refused otherwise
//! tiers:
//!   - name: pro
//!     priority: 10              # higher wins among a subject's groups (default 0)
//!     rate_multiplier: 10       # > 0 (default 1)
//!     timezone: America/New_York
//!     action: soft              # default action of this tier's quotas
//!     explicit_limits:          # replace a base quota outright in one scope
//!       - {scope: batch, metric: requests, rate: 5000/h}   # `quota: rpm` to name it
//!     quotas: []                # the tier's own quotas, not multiplied; one named
//!                               # like a base quota replaces it
//! groups: {engineering: pro}    # group -> tier
//! members: {alice: [engineering]}           # subject -> groups
//! subjects: {alice: {timezone: Europe/London}}
//! assignments:                  # explicit tier per subject, until expires_at (exclusive)
//!   - {subject: bob, tier: pro, expires_at: 2027-01-01T00:00:00Z, reason: trial}
//! overrides:                    # temporary limits; starts_at inclusive, expires_at exclusive
//!   - subject: carol
//!     scope: api                # optional: only requests in this scope
//!     quota: rpm                # optional: only this quota (default: every quota)
//!     limit: 1000               # or `rate: 1000/h` (which also sets the window)
//!     starts_at: 2026-11-01T00:00:00Z       # optional (default: already started)
//!     expires_at: 2026-12-01T00:00:00Z
//!     reason: launch week
//!     created_by: ops@example.com
//! api_keys:                     # keys are stored only as SHA-256 hex of the key
//!   - {key_sha256: "<64 hex>", tier: pro, label: acme-prod, subject: acme}  # subject optional
//! prices:                       # integer micro-dollars per 1 000 000 tokens
//!   gpt-4o: {input: 2500000, output: 10000000, cached: 1250000}
//! budgets:                      # beside each subject's own quotas; every budget a
//!                               # request meets must pass (see crate::budget)
//!   - group: engineering        # one pooled ledger for all members (configured, or
//!     timezone: Europe/Berlin   # named by the event's `group`); timezone optional
//!     quotas:                   # quotas as above; limits taken as written
//!       - {name: team_month, metric: cost_micros, period: month, limit: 1000000000}
//!   - api_key: "<64 hex>"       # the key's own cap, on top of its tier
//!     quotas: [{name: key_day, metric: total_tokens, period: day, limit: 2000000}]
//!   - tier: free                # one ledger shared by every subject on tier free
//!     quotas:
//!       - name: free_gpt4o
//!         metric: total_tokens
//!         period: day
//!         limit: 2000000
//!         models: [gpt-4o]      # any quota may be narrowed to models
//!         action: degrade
//!         fallback_model: gpt-4o-mini
//! ```
//!
//! A group is known when `groups` gives it a tier or a budget names it; `members` and
//! events may name only known groups.
//!
//! Prices are in micro-dollars (1e-6 USD) **per million tokens**, the unit providers
//! publish, so every real price list is an exact integer ($0.075 / 1M = 75 000). `cached`
//! defaults to the input price; cached tokens are priced separately from `input_tokens`
//! (see [`ModelPrice::cost_micros`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use indexmap::IndexMap;
use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_yaml::Value;

use crate::budget::{Budget, BudgetOwner, OwnerKind};
use crate::decision::Action;
use crate::metric::Metric;
use crate::period::PeriodSpec;
use crate::rate::{valid_multiplier, Rate};
use crate::tier::{ExplicitLimit, QuotaDef, Tier, DEFAULT_THRESHOLDS};

/// A validated configuration. Every tier, group and quota it references exists.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub default_tier: String,
    pub timezone: Tz,
    pub quotas: Vec<QuotaDef>,
    /// In file order; names are distinct.
    pub tiers: Vec<Tier>,
    /// Group name -> tier name.
    pub groups: BTreeMap<String, String>,
    /// Subject -> the groups it belongs to.
    pub members: BTreeMap<String, Vec<String>>,
    /// Subject -> its own timezone.
    pub subject_timezones: BTreeMap<String, Tz>,
    pub assignments: Vec<Assignment>,
    pub overrides: Vec<Override>,
    /// SHA-256 hex (lowercase) of the key -> the key's entry.
    pub api_keys: BTreeMap<String, ApiKey>,
    /// Model name -> price.
    pub prices: BTreeMap<String, ModelPrice>,
    /// Budgets of API keys, groups and tier pools, by owner.
    pub budgets: BTreeMap<BudgetOwner, Budget>,
}

/// An explicit tier for one subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub subject: String,
    pub tier: String,
    /// Exclusive; `None`: never expires.
    pub expires_at: Option<DateTime<Utc>>,
    pub reason: Option<String>,
}

impl Assignment {
    pub fn active_at(&self, at: DateTime<Utc>) -> bool {
        self.expires_at.is_none_or(|end| at < end)
    }
}

/// What an override sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverrideLimit {
    /// A new limit over the quota's own window.
    Limit(i64),
    /// A new limit and window.
    Rate(Rate),
}

/// A temporary limit for one subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Override {
    pub subject: String,
    /// `None`: requests in every scope.
    pub scope: Option<String>,
    /// `None`: every quota of the subject's tier.
    pub quota: Option<String>,
    pub limit: OverrideLimit,
    /// Inclusive; `None`: already started.
    pub starts_at: Option<DateTime<Utc>>,
    /// Exclusive.
    pub expires_at: DateTime<Utc>,
    pub reason: String,
    pub created_by: String,
}

impl Override {
    /// Active from `starts_at` inclusive to `expires_at` exclusive.
    pub fn active_at(&self, at: DateTime<Utc>) -> bool {
        self.starts_at.is_none_or(|start| start <= at) && at < self.expires_at
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub key_sha256: String,
    pub tier: String,
    pub label: Option<String>,
    /// The subject the key belongs to, if it is bound to one: the API's check then accepts
    /// the key alone and checks this subject.
    pub subject: Option<String>,
}

/// A model's price in micro-dollars per 1 000 000 tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelPrice {
    pub input: u64,
    pub output: u64,
    pub cached: u64,
}

impl ModelPrice {
    /// The cost of one request in micro-dollars:
    /// `(input × input_price + output × output_price + cached × cached_price) / 1e6`,
    /// rounded to the nearest micro-dollar (ties to even), saturating.
    pub fn cost_micros(&self, input_tokens: i64, output_tokens: i64, cached_tokens: i64) -> i64 {
        // Each product fits an i128 (its magnitude is below 2^127); their sum may not, at the
        // ends of i64. Adding the smallest and the largest first cannot overflow when their
        // signs differ (and when they agree, all three do), so the sum saturates only when
        // the exact sum is out of range, and then on its side.
        let mut terms = [
            i128::from(input_tokens) * i128::from(self.input),
            i128::from(output_tokens) * i128::from(self.output),
            i128::from(cached_tokens) * i128::from(self.cached),
        ];
        terms.sort_unstable();
        let total = terms[0].saturating_add(terms[2]).saturating_add(terms[1]);
        let (q, r) = (total.div_euclid(1_000_000), total.rem_euclid(1_000_000));
        let q = if r > 500_000 || (r == 500_000 && q % 2 != 0) { q + 1 } else { q };
        i64::try_from(q).unwrap_or(if q < 0 { i64::MIN } else { i64::MAX })
    }
}

impl Config {
    pub fn tier(&self, name: &str) -> Option<&Tier> {
        self.tiers.iter().find(|t| t.name == name)
    }

    /// The tier of an API key, looked up by the SHA-256 hex of the key
    /// ([`crate::event::hash_api_key`]).
    pub fn api_key_tier(&self, key_sha256: &str) -> Option<&str> {
        self.api_keys.get(key_sha256).map(|k| k.tier.as_str())
    }

    pub fn price(&self, model: &str) -> Option<&ModelPrice> {
        self.prices.get(model)
    }

    /// The budget of `owner`, if one is configured.
    pub fn budget(&self, owner: &BudgetOwner) -> Option<&Budget> {
        self.budgets.get(owner)
    }

    /// Whether `group` is a group of this configuration: one that grants a tier (`groups`)
    /// or one that has a budget.
    pub fn knows_group(&self, group: &str) -> bool {
        self.groups.contains_key(group) || self.budgets.contains_key(&BudgetOwner::new(OwnerKind::Group, group))
    }

    /// Parses and validates a configuration file; see the module docs.
    pub fn from_yaml_str(text: &str) -> Result<Config, ConfigErrors> {
        if text.trim().is_empty() {
            return Err(ConfigErrors(vec![ConfigError::at("", "the configuration is empty; `default_tier` is required")]));
        }
        let raw: RawConfig = serde_yaml::from_str(text).map_err(|e| ConfigErrors(vec![ConfigError::from_file(text, &e)]))?;
        let mut v = Validator::default();
        let config = v.config(raw);
        if v.errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(v.errors))
        }
    }
}

/// One problem in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Where, e.g. `tiers.pro.quotas[1].period`; empty for the whole file.
    pub path: String,
    /// 1-based, when the YAML parser knows it.
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

impl ConfigError {
    fn at(path: &str, message: impl Into<String>) -> ConfigError {
        ConfigError { path: path.to_string(), line: None, column: None, message: message.into() }
    }

    fn from_yaml(e: &serde_yaml::Error) -> ConfigError {
        let text = e.to_string();
        let location = e.location();
        // serde_yaml appends " at line L column C"; the location is kept apart instead.
        let message = match (location.as_ref(), text.rfind(" at line ")) {
            (Some(_), Some(i)) => text[..i].to_string(),
            _ => text,
        };
        ConfigError {
            path: String::new(),
            line: location.as_ref().map(|l| l.line()),
            column: location.as_ref().map(|l| l.column()),
            message,
        }
    }
}

impl ConfigError {
    /// A YAML error of the whole file, located. serde_yaml gives no line when the file holds
    /// more than one document, or what its parser takes for several (a mapping indented
    /// differently after its first line); the second document's own error says where, or
    /// failing that, the `---` line that starts it.
    fn from_file(text: &str, e: &serde_yaml::Error) -> ConfigError {
        let error = ConfigError::from_yaml(e);
        if error.line.is_some() {
            return error;
        }
        // Only the second document, no further: after some errors the documents never end.
        let Some(second) = serde_yaml::Deserializer::from_str(text).nth(1) else { return error };
        match serde::de::IgnoredAny::deserialize(second) {
            Err(e) if e.location().is_some() => ConfigError::from_yaml(&e),
            _ => {
                let mut markers = text.lines().enumerate().filter(|(_, l)| *l == "---" || l.starts_with("--- "));
                let starts_with_marker =
                    text.lines().map(str::trim).find(|l| !l.is_empty() && !l.starts_with('#')).is_some_and(|l| l.starts_with("---"));
                let line = markers.nth(usize::from(starts_with_marker)).map(|(i, _)| i + 1);
                ConfigError {
                    path: String::new(),
                    line,
                    column: line.map(|_| 1),
                    message: "the file holds more than one YAML document (a `---` line starts each); a configuration is one document"
                        .into(),
                }
            }
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)?;
        if let (Some(line), Some(column)) = (self.line, self.column) {
            write!(f, " (line {line}, column {column})")?;
        }
        Ok(())
    }
}

/// Every problem found in a configuration file, in file order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        write!(f, "{n} error{} in the configuration", if n == 1 { "" } else { "s" })?;
        for e in &self.0 {
            write!(f, "\n  {e}")?;
        }
        Ok(())
    }
}

// ---- the document: the file as written ----

/// The configuration file as written: each section and item with the fields and the types
/// the format allows, but nothing interpreted (times, rates, periods and metrics stay text)
/// and nothing checked across items. [`Config::from_yaml_str`] is what validates; a
/// document is what an edit changes and writes back ([`ConfigDocument::to_yaml_string`]).
/// Writing a document back keeps every item and the order of lists and mappings; it drops
/// comments and empty sections.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigDocument {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_tier: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    #[serde(default, deserialize_with = "null_as_empty", skip_serializing_if = "Vec::is_empty")]
    pub quotas: Vec<QuotaEntry>,
    #[serde(default, deserialize_with = "null_as_empty", skip_serializing_if = "Vec::is_empty")]
    pub tiers: Vec<TierEntry>,
    /// Group -> tier.
    #[serde(default, deserialize_with = "null_as_empty", skip_serializing_if = "IndexMap::is_empty")]
    pub groups: IndexMap<String, String>,
    /// Subject -> its groups.
    #[serde(default, deserialize_with = "null_as_empty", skip_serializing_if = "IndexMap::is_empty")]
    pub members: IndexMap<String, Vec<String>>,
    #[serde(default, deserialize_with = "null_as_empty", skip_serializing_if = "IndexMap::is_empty")]
    pub subjects: IndexMap<String, SubjectEntry>,
    #[serde(default, deserialize_with = "null_as_empty", skip_serializing_if = "Vec::is_empty")]
    pub assignments: Vec<AssignmentEntry>,
    #[serde(default, deserialize_with = "null_as_empty", skip_serializing_if = "Vec::is_empty")]
    pub overrides: Vec<OverrideEntry>,
    #[serde(default, deserialize_with = "null_as_empty", skip_serializing_if = "Vec::is_empty")]
    pub api_keys: Vec<ApiKeyEntry>,
    /// Model -> price.
    #[serde(default, deserialize_with = "null_as_empty", skip_serializing_if = "IndexMap::is_empty")]
    pub prices: IndexMap<String, PriceEntry>,
    #[serde(default, deserialize_with = "null_as_empty", skip_serializing_if = "Vec::is_empty")]
    pub budgets: Vec<BudgetEntry>,
}

impl ConfigDocument {
    /// Reads a document's shape (an empty file is an empty document). A valid configuration
    /// always reads; a document that reads may still be invalid.
    pub fn from_yaml_str(text: &str) -> Result<ConfigDocument, serde_yaml::Error> {
        match serde_yaml::from_str::<Option<ConfigDocument>>(text)? {
            Some(document) => Ok(document),
            None => Ok(ConfigDocument::default()),
        }
    }

    /// The document as YAML text.
    pub fn to_yaml_string(&self) -> Result<String, serde_yaml::Error> {
        serde_yaml::to_string(self)
    }

    /// The tier named `name`.
    pub fn tier(&self, name: &str) -> Option<&TierEntry> {
        self.tiers.iter().find(|t| t.name == name)
    }
}

/// A section written as `null` (a key with nothing after it) is empty.
fn null_as_empty<'de, D: Deserializer<'de>, T: Deserialize<'de> + Default>(deserializer: D) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// A quota as written (in `quotas` or a tier's `quotas`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaEntry {
    pub name: String,
    pub metric: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thresholds: Option<Vec<i64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback_model: Option<String>,
}

/// A tier as written. Validation reads its lists item by item (`Q` and `E` are then untyped
/// YAML), so that each item's error is reported on its own; a document holds them typed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierEntry<Q = QuotaEntry, E = ExplicitLimitEntry> {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<i64>,
    /// A number as written (`10` stays an integer).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_multiplier: Option<serde_yaml::Number>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback_model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub explicit_limits: Option<Vec<E>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quotas: Option<Vec<Q>>,
}

/// An explicit limit of a tier, as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExplicitLimitEntry {
    pub scope: String,
    pub metric: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<String>,
    pub rate: String,
}

/// A subject's own settings, as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubjectEntry {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
}

/// An assignment as written; `expires_at` is RFC 3339 text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AssignmentEntry {
    pub subject: String,
    pub tier: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// An override as written; `starts_at` and `expires_at` are RFC 3339 text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverrideEntry {
    pub subject: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub starts_at: Option<String>,
    pub expires_at: String,
    pub reason: String,
    pub created_by: String,
}

/// An API key as written: the SHA-256 hex of the key, never the key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyEntry {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_sha256: Option<String>,
    pub tier: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// Read only so that a plaintext key gets a clear refusal; never kept or written.
    #[serde(default, skip_serializing)]
    pub key: Option<serde::de::IgnoredAny>,
}

impl ApiKeyEntry {
    /// The entry of the key whose SHA-256 hex is `key_sha256`.
    pub fn new(key_sha256: String, tier: String, label: Option<String>, subject: Option<String>) -> ApiKeyEntry {
        ApiKeyEntry { key_sha256: Some(key_sha256), tier, label, subject, key: None }
    }
}

/// A budget as written: exactly one owner (`api_key`, `group` or `tier`) and its quotas.
/// Validation reads its quotas item by item (`Q` is then untyped YAML); a document holds
/// them typed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetEntry<Q = QuotaEntry> {
    /// The SHA-256 hex of the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    #[serde(default = "Vec::new")]
    pub quotas: Vec<Q>,
}

impl<Q> BudgetEntry<Q> {
    /// The owner as written: `None` unless exactly one of `api_key`, `group`, `tier` is set.
    pub fn owner(&self) -> Option<BudgetOwner> {
        match (&self.api_key, &self.group, &self.tier) {
            (Some(key), None, None) => Some(BudgetOwner::new(OwnerKind::ApiKey, key.trim().to_ascii_lowercase())),
            (None, Some(group), None) => Some(BudgetOwner::new(OwnerKind::Group, group.as_str())),
            (None, None, Some(tier)) => Some(BudgetOwner::new(OwnerKind::Tier, tier.as_str())),
            _ => None,
        }
    }

    /// An entry for `owner` with these quotas and no timezone.
    pub fn for_owner(owner: &BudgetOwner, quotas: Vec<Q>) -> BudgetEntry<Q> {
        let name = Some(owner.name.clone());
        let (api_key, group, tier) = match owner.kind {
            OwnerKind::ApiKey => (name, None, None),
            OwnerKind::Group => (None, name, None),
            OwnerKind::Tier => (None, None, name),
        };
        BudgetEntry { api_key, group, tier, timezone: None, quotas }
    }
}

/// A model's price as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceEntry {
    pub input: u64,
    pub output: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached: Option<u64>,
}

// ---- what validation reads first ----

/// The top level as validation reads it: the sections' items untyped, so that each item is
/// read (and its error reported) on its own, and mappings as pairs, so that a key written
/// twice is reported. Its sections are [`ConfigDocument`]'s.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    default_tier: Option<String>,
    timezone: Option<String>,
    quotas: Option<Vec<Value>>,
    tiers: Option<Vec<Value>>,
    groups: Option<Pairs<Value>>,
    members: Option<Pairs<Value>>,
    subjects: Option<Pairs<Value>>,
    assignments: Option<Vec<Value>>,
    overrides: Option<Vec<Value>>,
    api_keys: Option<Vec<Value>>,
    prices: Option<Pairs<Value>>,
    budgets: Option<Vec<Value>>,
}

/// A YAML mapping kept as ordered pairs, so duplicate keys can be reported instead of
/// silently overwriting each other.
struct Pairs<V>(Vec<(String, V)>);

impl<'de, V: Deserialize<'de>> Deserialize<'de> for Pairs<V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PairsVisitor<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for PairsVisitor<V> {
            type Value = Pairs<V>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a mapping")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Pairs<V>, A::Error> {
                let mut pairs = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, V>()? {
                    pairs.push((k, v));
                }
                Ok(Pairs(pairs))
            }
        }
        deserializer.deserialize_map(PairsVisitor(std::marker::PhantomData))
    }
}

// ---- validation ----

#[derive(Default)]
struct Validator {
    errors: Vec<ConfigError>,
}

fn item_path(list: &str, i: usize) -> String {
    format!("{list}[{i}]")
}

impl Validator {
    fn err(&mut self, path: &str, message: impl Into<String>) {
        self.errors.push(ConfigError::at(path, message));
    }

    /// Deserializes one item, recording a shape error (unknown key, wrong type) at `path`.
    fn item<T: serde::de::DeserializeOwned>(&mut self, value: Value, path: &str) -> Option<T> {
        match serde_yaml::from_value(value) {
            Ok(v) => Some(v),
            Err(e) => {
                self.err(path, ConfigError::from_yaml(&e).message);
                None
            }
        }
    }

    fn timezone(&mut self, name: &str, path: &str) -> Option<Tz> {
        match name.parse::<Tz>() {
            Ok(tz) => Some(tz),
            Err(_) => {
                self.err(path, format!("unknown timezone `{name}`: expected an IANA name such as Europe/London or UTC"));
                None
            }
        }
    }

    fn time(&mut self, text: &str, path: &str) -> Option<DateTime<Utc>> {
        match DateTime::parse_from_rfc3339(text.trim()) {
            Ok(t) => Some(t.with_timezone(&Utc)),
            Err(e) => {
                self.err(path, format!("`{text}` is not an RFC 3339 time such as 2026-12-01T00:00:00Z ({e})"));
                None
            }
        }
    }

    fn non_empty(&mut self, text: &str, path: &str) -> bool {
        if text.trim().is_empty() {
            self.err(path, "must not be empty");
            false
        } else {
            true
        }
    }

    fn action(&mut self, action: Option<&str>, fallback: Option<&str>, path: &str) -> Option<Action> {
        let fallback_path = format!("{path}.fallback_model");
        match (action, fallback) {
            (None, None) => None,
            (None, Some(_)) => {
                self.err(&fallback_path, "only allowed with `action: degrade`");
                None
            }
            (Some("degrade"), Some(model)) if !model.trim().is_empty() => Some(Action::Degrade { fallback_model: model.to_string() }),
            (Some("degrade"), _) => {
                self.err(&fallback_path, "is required with `action: degrade`: the model to fall back to");
                None
            }
            (Some(other), Some(_)) if ["block", "queue", "soft"].contains(&other) => {
                self.err(&fallback_path, "only allowed with `action: degrade`");
                None
            }
            (Some("block"), None) => Some(Action::Block),
            (Some("queue"), None) => Some(Action::Queue),
            (Some("soft"), None) => Some(Action::Soft),
            (Some(other), _) => {
                self.err(&format!("{path}.action"), format!("unknown action `{other}`: expected block, degrade, queue or soft"));
                None
            }
        }
    }

    fn metric(&mut self, text: &str, path: &str) -> Option<Metric> {
        match text.parse::<Metric>() {
            Ok(m) => Some(m),
            Err(e) => {
                self.err(path, e.to_string());
                None
            }
        }
    }

    fn rate(&mut self, text: &str, path: &str) -> Option<Rate> {
        match text.parse::<Rate>() {
            Ok(r) if i64::try_from(r.limit).is_ok() => Some(r),
            Ok(_) => {
                self.err(path, format!("limit in `{text}` is too large (at most {})", i64::MAX));
                None
            }
            Err(e) => {
                self.err(path, e.to_string());
                None
            }
        }
    }

    fn limit_and_period(&mut self, raw: &QuotaEntry, path: &str) -> Option<(i64, PeriodSpec)> {
        match (&raw.period, &raw.rate, raw.limit) {
            (Some(_), Some(_), _) => {
                self.err(path, "give `rate` or `period` with `limit`, not both");
                None
            }
            (None, Some(_), Some(_)) => {
                self.err(&format!("{path}.limit"), "not allowed with `rate`, which already sets the limit");
                None
            }
            (None, Some(rate), None) => self.rate(rate, &format!("{path}.rate")).map(|r| (r.limit as i64, r.period)),
            (Some(_), None, None) => {
                self.err(&format!("{path}.limit"), "is required with `period`");
                None
            }
            (Some(period), None, Some(limit)) => {
                let period = match period.parse::<PeriodSpec>() {
                    Ok(p) => Some(p),
                    Err(e) => {
                        self.err(&format!("{path}.period"), e.to_string());
                        None
                    }
                };
                let limit = self.count(limit, &format!("{path}.limit"));
                Some((limit?, period?))
            }
            (None, None, _) => {
                self.err(path, "needs `rate` (e.g. 10/m) or `period` and `limit`");
                None
            }
        }
    }

    fn count(&mut self, n: i64, path: &str) -> Option<i64> {
        if n < 0 {
            self.err(path, format!("must be 0 or more, got {n}"));
            None
        } else {
            Some(n)
        }
    }

    fn thresholds(&mut self, raw: Option<&[i64]>, path: &str) -> Option<Vec<u32>> {
        let Some(raw) = raw else { return Some(DEFAULT_THRESHOLDS.to_vec()) };
        let mut out = Vec::new();
        let mut ok = true;
        for (i, &t) in raw.iter().enumerate() {
            match u32::try_from(t) {
                Ok(t) if (1..=1000).contains(&t) => {
                    if out.contains(&t) {
                        self.err(&format!("{path}[{i}]"), format!("threshold {t} is listed twice"));
                        ok = false;
                    }
                    out.push(t);
                }
                _ => {
                    self.err(&format!("{path}[{i}]"), format!("threshold {t} must be a percentage from 1 to 1000"));
                    ok = false;
                }
            }
        }
        out.sort_unstable();
        ok.then_some(out)
    }

    fn quota(&mut self, value: Value, path: &str) -> Option<QuotaDef> {
        let raw: QuotaEntry = self.item(value, path)?;
        let before = self.errors.len();
        self.non_empty(&raw.name, &format!("{path}.name"));
        let metric = self.metric(&raw.metric, &format!("{path}.metric"));
        let limit_period = self.limit_and_period(&raw, path);
        let burst = self.count(raw.burst.unwrap_or(0), &format!("{path}.burst"));
        let thresholds = self.thresholds(raw.thresholds.as_deref(), &format!("{path}.thresholds"));
        let action = self.action(raw.action.as_deref(), raw.fallback_model.as_deref(), path);
        if let Some(scope) = &raw.scope {
            self.scope_name(scope, &format!("{path}.scope"));
        }
        let models = raw.models.map(|m| self.models(m, &format!("{path}.models")));
        if self.errors.len() != before {
            return None;
        }
        let (limit, period) = limit_period?;
        Some(QuotaDef {
            name: raw.name,
            metric: metric?,
            period,
            limit,
            scope: raw.scope,
            models,
            burst: burst?,
            thresholds: thresholds?,
            action,
        })
    }

    /// A configured scope: not empty, and free of `|`, which ends the scope in a ledger row's
    /// scope key ([`crate::budget::ledger_scope`]).
    fn scope_name(&mut self, scope: &str, path: &str) -> bool {
        if !self.non_empty(scope, path) {
            return false;
        }
        if scope.contains('|') {
            self.err(path, "must not contain `|`");
            return false;
        }
        true
    }

    /// A quota's models: at least one, each named once, none empty or holding `,` or `|`;
    /// sorted.
    fn models(&mut self, mut models: Vec<String>, path: &str) -> Vec<String> {
        if models.is_empty() {
            self.err(path, "must name at least one model (leave `models` out to count every model)");
        }
        for (i, model) in models.iter().enumerate() {
            let item = format!("{path}[{i}]");
            if self.non_empty(model, &item) && model.contains([',', '|']) {
                self.err(&item, format!("model `{model}` must not contain `,` or `|`"));
            }
            if models[..i].contains(model) {
                self.err(&item, format!("model `{model}` is listed twice"));
            }
        }
        models.sort_unstable();
        models
    }

    fn quotas(&mut self, values: Vec<Value>, list: &str) -> Vec<QuotaDef> {
        let mut out: Vec<QuotaDef> = Vec::new();
        let mut names = BTreeSet::new();
        for (i, value) in values.into_iter().enumerate() {
            let path = item_path(list, i);
            if let Some(name) = value.get("name").and_then(Value::as_str) {
                if !names.insert(name.to_string()) {
                    self.err(&format!("{path}.name"), format!("duplicate quota name `{name}`"));
                }
            }
            if let Some(q) = self.quota(value, &path) {
                out.push(q);
            }
        }
        out
    }

    fn explicit(&mut self, value: Value, path: &str, base: &[QuotaDef]) -> Option<ExplicitLimit> {
        let raw: ExplicitLimitEntry = self.item(value, path)?;
        let scope_ok = self.scope_name(&raw.scope, &format!("{path}.scope"));
        let metric = self.metric(&raw.metric, &format!("{path}.metric"));
        let rate = self.rate(&raw.rate, &format!("{path}.rate"));
        let metric = metric?;
        let target_ok = match &raw.quota {
            Some(name) => match base.iter().find(|b| &b.name == name) {
                None => {
                    self.err(&format!("{path}.quota"), format!("no base quota is named `{name}`"));
                    false
                }
                Some(b) if b.metric != metric => {
                    self.err(&format!("{path}.metric"), format!("base quota `{name}` measures {}, not {metric}", b.metric));
                    false
                }
                Some(_) => true,
            },
            None => {
                let matching: Vec<&str> = base.iter().filter(|b| b.metric == metric).map(|b| b.name.as_str()).collect();
                match matching.len() {
                    1 => true,
                    0 => {
                        self.err(&format!("{path}.metric"), format!("no base quota measures {metric}; an explicit limit replaces one"));
                        false
                    }
                    _ => {
                        self.err(
                            &format!("{path}.quota"),
                            format!("base quotas {} all measure {metric}: name the one to replace with `quota`", matching.join(", ")),
                        );
                        false
                    }
                }
            }
        };
        if !(scope_ok && target_ok) {
            return None;
        }
        Some(ExplicitLimit { scope: raw.scope, metric, quota: raw.quota, rate: rate? })
    }

    fn tier(&mut self, value: Value, index: usize, base: &[QuotaDef], seen: &BTreeSet<String>) -> Option<Tier> {
        let raw: TierEntry<Value, Value> = self.item(value, &item_path("tiers", index))?;
        let errors_before = self.errors.len();
        let path =
            if raw.name.trim().is_empty() || seen.contains(&raw.name) { item_path("tiers", index) } else { format!("tiers.{}", raw.name) };
        let name_ok = self.non_empty(&raw.name, &format!("{path}.name"));
        if seen.contains(&raw.name) {
            self.err(&format!("{path}.name"), format!("duplicate tier name `{}`", raw.name));
        }
        let multiplier = raw.rate_multiplier.as_ref().and_then(serde_yaml::Number::as_f64).unwrap_or(1.0);
        if !valid_multiplier(multiplier) {
            self.err(&format!("{path}.rate_multiplier"), format!("must be a number above 0, got {multiplier}"));
        }
        let timezone = raw.timezone.as_deref().map(|tz| self.timezone(tz, &format!("{path}.timezone")));
        let action = self.action(raw.action.as_deref(), raw.fallback_model.as_deref(), &path);
        let quotas = self.quotas(raw.quotas.unwrap_or_default(), &format!("{path}.quotas"));
        let mut explicit_limits: Vec<ExplicitLimit> = Vec::new();
        for (i, value) in raw.explicit_limits.unwrap_or_default().into_iter().enumerate() {
            let epath = format!("{path}.explicit_limits[{i}]");
            if let Some(e) = self.explicit(value, &epath, base) {
                let target = |x: &ExplicitLimit| (x.scope.clone(), x.metric, x.quota.clone());
                if explicit_limits.iter().any(|o| target(o) == target(&e)) {
                    self.err(&epath, format!("a second explicit limit for scope `{}` and {}", e.scope, e.metric));
                }
                if let Some(q) = quotas.iter().find(|q| {
                    e.quota.as_deref().is_none_or(|n| n == q.name) && base.iter().any(|b| b.name == q.name && b.metric == e.metric)
                }) {
                    self.err(
                        &epath,
                        format!("base quota `{}` is replaced by this tier's own quota, so this explicit limit would never apply", q.name),
                    );
                }
                explicit_limits.push(e);
            }
        }
        if !name_ok || self.errors.len() != errors_before {
            return None;
        }
        Some(Tier {
            name: raw.name,
            priority: raw.priority.unwrap_or(0),
            rate_multiplier: multiplier,
            timezone: timezone.flatten(),
            action,
            quotas,
            explicit_limits,
        })
    }

    fn tier_ref(&mut self, tier: &str, tiers: &BTreeSet<String>, path: &str) {
        if !tiers.contains(tier) {
            let known: Vec<&str> = tiers.iter().map(String::as_str).collect();
            self.err(path, format!("unknown tier `{tier}` (tiers: {})", known.join(", ")));
        }
    }

    fn unique_keys<V>(&mut self, pairs: &Pairs<V>, section: &str) {
        let mut seen = BTreeSet::new();
        for (k, _) in &pairs.0 {
            if !seen.insert(k.as_str()) {
                self.err(&format!("{section}.{k}"), format!("`{k}` appears twice"));
            }
        }
    }

    fn config(&mut self, raw: RawConfig) -> Config {
        let timezone = match raw.timezone.as_deref() {
            Some(name) => self.timezone(name, "timezone").unwrap_or(Tz::UTC),
            None => Tz::UTC,
        };
        let quotas = self.quotas(raw.quotas.unwrap_or_default(), "quotas");

        let mut tiers: Vec<Tier> = Vec::new();
        let mut tier_names = BTreeSet::new();
        for (i, value) in raw.tiers.unwrap_or_default().into_iter().enumerate() {
            // Names are collected from the raw items so that references to a tier with an
            // error elsewhere are not reported as unknown as well.
            let name = value.get("name").and_then(Value::as_str).map(str::to_string);
            if let Some(t) = self.tier(value, i, &quotas, &tier_names) {
                tiers.push(t);
            }
            if let Some(name) = name {
                tier_names.insert(name);
            }
        }
        if tier_names.is_empty() {
            self.err("tiers", "at least one tier is required");
        }

        let default_tier = match raw.default_tier {
            Some(t) => {
                self.tier_ref(&t, &tier_names, "default_tier");
                t
            }
            None => {
                self.err("default_tier", "is required: the tier of subjects nothing else matches");
                String::new()
            }
        };

        let groups = self.groups(raw.groups.unwrap_or(Pairs(Vec::new())), &tier_names);
        let budgets = self.budgets(raw.budgets.unwrap_or_default(), &tier_names);
        let known_groups: BTreeSet<&str> = groups
            .keys()
            .map(String::as_str)
            .chain(budgets.keys().filter(|o| o.kind == OwnerKind::Group).map(|o| o.name.as_str()))
            .collect();
        let members = self.members(raw.members.unwrap_or(Pairs(Vec::new())), &known_groups);
        let subject_timezones = self.subjects(raw.subjects.unwrap_or(Pairs(Vec::new())));
        let assignments = self.assignments(raw.assignments.unwrap_or_default(), &tier_names);
        let quota_names: BTreeSet<String> =
            quotas.iter().chain(tiers.iter().flat_map(|t| t.quotas.iter())).map(|q| q.name.clone()).collect();
        let overrides = self.overrides(raw.overrides.unwrap_or_default(), &quota_names);
        let api_keys = self.api_keys(raw.api_keys.unwrap_or_default(), &tier_names);
        let prices = self.prices(raw.prices.unwrap_or(Pairs(Vec::new())));

        Config {
            default_tier,
            timezone,
            quotas,
            tiers,
            groups,
            members,
            subject_timezones,
            assignments,
            overrides,
            api_keys,
            prices,
            budgets,
        }
    }

    fn groups(&mut self, pairs: Pairs<Value>, tiers: &BTreeSet<String>) -> BTreeMap<String, String> {
        self.unique_keys(&pairs, "groups");
        let mut out = BTreeMap::new();
        for (group, value) in pairs.0 {
            let path = format!("groups.{group}");
            match value {
                Value::String(tier) => {
                    self.tier_ref(&tier, tiers, &path);
                    out.insert(group, tier);
                }
                _ => self.err(&path, "must be the name of a tier"),
            }
        }
        out
    }

    fn members(&mut self, pairs: Pairs<Value>, groups: &BTreeSet<&str>) -> BTreeMap<String, Vec<String>> {
        self.unique_keys(&pairs, "members");
        let mut out = BTreeMap::new();
        for (subject, value) in pairs.0 {
            let path = format!("members.{subject}");
            let Some(list) = self.item::<Vec<String>>(value, &path) else { continue };
            for (i, group) in list.iter().enumerate() {
                if !groups.contains(group.as_str()) {
                    self.err(&format!("{path}[{i}]"), format!("unknown group `{group}` (neither in `groups` nor the owner of a budget)"));
                }
            }
            out.insert(subject, list);
        }
        out
    }

    fn subjects(&mut self, pairs: Pairs<Value>) -> BTreeMap<String, Tz> {
        self.unique_keys(&pairs, "subjects");
        let mut out = BTreeMap::new();
        for (subject, value) in pairs.0 {
            let path = format!("subjects.{subject}");
            let Some(raw) = self.item::<SubjectEntry>(value, &path) else { continue };
            if let Some(tz) = raw.timezone.and_then(|tz| self.timezone(&tz, &format!("{path}.timezone"))) {
                out.insert(subject, tz);
            }
        }
        out
    }

    fn assignments(&mut self, values: Vec<Value>, tiers: &BTreeSet<String>) -> Vec<Assignment> {
        let mut out: Vec<Assignment> = Vec::new();
        for (i, value) in values.into_iter().enumerate() {
            let path = item_path("assignments", i);
            let Some(raw) = self.item::<AssignmentEntry>(value, &path) else { continue };
            let subject_ok = self.non_empty(&raw.subject, &format!("{path}.subject"));
            self.tier_ref(&raw.tier, tiers, &format!("{path}.tier"));
            let expires_at = raw.expires_at.as_deref().map(|t| self.time(t, &format!("{path}.expires_at")));
            if out.iter().any(|a| a.subject == raw.subject) {
                self.err(&format!("{path}.subject"), format!("`{}` already has an assignment", raw.subject));
            }
            if subject_ok && expires_at.is_none_or(|t| t.is_some()) {
                out.push(Assignment { subject: raw.subject, tier: raw.tier, expires_at: expires_at.flatten(), reason: raw.reason });
            }
        }
        out
    }

    fn overrides(&mut self, values: Vec<Value>, quota_names: &BTreeSet<String>) -> Vec<Override> {
        let mut out: Vec<Override> = Vec::new();
        for (i, value) in values.into_iter().enumerate() {
            let path = item_path("overrides", i);
            let Some(raw) = self.item::<OverrideEntry>(value, &path) else { continue };
            if let Some(o) = self.override_item(raw, &path, quota_names) {
                let key = |x: &Override| (x.subject.clone(), x.scope.clone(), x.quota.clone());
                let overlapping = out.iter().find(|p| {
                    key(p) == key(&o) && p.starts_at.is_none_or(|s| s < o.expires_at) && o.starts_at.is_none_or(|s| s < p.expires_at)
                });
                if overlapping.is_some() {
                    self.err(&path, format!("overlaps another override for `{}` with the same scope and quota", o.subject));
                }
                out.push(o);
            }
        }
        out
    }

    fn override_item(&mut self, raw: OverrideEntry, path: &str, quota_names: &BTreeSet<String>) -> Option<Override> {
        let before = self.errors.len();
        self.non_empty(&raw.subject, &format!("{path}.subject"));
        self.non_empty(&raw.reason, &format!("{path}.reason"));
        self.non_empty(&raw.created_by, &format!("{path}.created_by"));
        if let Some(scope) = &raw.scope {
            self.non_empty(scope, &format!("{path}.scope"));
        }
        if let Some(q) = &raw.quota {
            if !quota_names.contains(q) {
                self.err(&format!("{path}.quota"), format!("no quota is named `{q}`"));
            }
        }
        let limit = match (&raw.rate, raw.limit) {
            (Some(_), Some(_)) => {
                self.err(path, "give `rate` or `limit`, not both");
                None
            }
            (None, None) => {
                self.err(path, "needs `limit` or `rate`: an override sets the limit itself");
                None
            }
            (Some(rate), None) => self.rate(rate, &format!("{path}.rate")).map(OverrideLimit::Rate),
            (None, Some(limit)) => self.count(limit, &format!("{path}.limit")).map(OverrideLimit::Limit),
        };
        let starts_at = raw.starts_at.as_deref().map(|t| self.time(t, &format!("{path}.starts_at")));
        let expires_at = self.time(&raw.expires_at, &format!("{path}.expires_at"));
        if let (Some(Some(start)), Some(end)) = (starts_at, expires_at) {
            if start >= end {
                self.err(&format!("{path}.expires_at"), "must be after starts_at");
            }
        }
        if self.errors.len() != before {
            return None;
        }
        Some(Override {
            subject: raw.subject,
            scope: raw.scope,
            quota: raw.quota,
            limit: limit?,
            starts_at: starts_at.flatten(),
            expires_at: expires_at?,
            reason: raw.reason,
            created_by: raw.created_by,
        })
    }

    fn api_keys(&mut self, values: Vec<Value>, tiers: &BTreeSet<String>) -> BTreeMap<String, ApiKey> {
        let mut out = BTreeMap::new();
        for (i, value) in values.into_iter().enumerate() {
            let path = item_path("api_keys", i);
            let Some(raw) = self.item::<ApiKeyEntry>(value, &path) else { continue };
            self.tier_ref(&raw.tier, tiers, &format!("{path}.tier"));
            if raw.key.is_some() {
                self.err(
                    &format!("{path}.key"),
                    "plaintext API keys are not accepted: give `key_sha256`, the SHA-256 hex of the key (e.g. `printf %s KEY | sha256sum`)",
                );
                continue;
            }
            let Some(hash) = raw.key_sha256.map(|h| h.trim().to_ascii_lowercase()) else {
                self.err(&format!("{path}.key_sha256"), "is required: the SHA-256 hex of the key");
                continue;
            };
            if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                self.err(&format!("{path}.key_sha256"), "must be 64 hex characters (a SHA-256 digest)");
                continue;
            }
            if out.contains_key(&hash) {
                self.err(&format!("{path}.key_sha256"), "the same key is listed twice");
                continue;
            }
            if let Some(subject) = &raw.subject {
                if !self.non_empty(subject, &format!("{path}.subject")) {
                    continue;
                }
            }
            out.insert(hash.clone(), ApiKey { key_sha256: hash, tier: raw.tier, label: raw.label, subject: raw.subject });
        }
        out
    }

    fn budgets(&mut self, values: Vec<Value>, tiers: &BTreeSet<String>) -> BTreeMap<BudgetOwner, Budget> {
        let mut out = BTreeMap::new();
        for (i, value) in values.into_iter().enumerate() {
            let path = item_path("budgets", i);
            let Some(raw) = self.item::<BudgetEntry<Value>>(value, &path) else { continue };
            if let Some(budget) = self.budget(raw, &path, tiers) {
                if out.contains_key(&budget.owner) {
                    self.err(&path, format!("a second budget for {}: give one budget all of its quotas", budget.owner));
                    continue;
                }
                out.insert(budget.owner.clone(), budget);
            }
        }
        out
    }

    fn budget(&mut self, raw: BudgetEntry<Value>, path: &str, tiers: &BTreeSet<String>) -> Option<Budget> {
        let before = self.errors.len();
        let Some(owner) = raw.owner() else {
            self.err(path, "needs exactly one owner: `api_key` (the SHA-256 hex of a key), `group` or `tier`");
            return None;
        };
        let owner_path = format!("{path}.{}", owner.kind);
        match owner.kind {
            OwnerKind::ApiKey if owner.name.len() != 64 || !owner.name.bytes().all(|b| b.is_ascii_hexdigit()) => {
                self.err(&owner_path, "must be 64 hex characters: the SHA-256 of the key, never the key")
            }
            OwnerKind::Tier => self.tier_ref(&owner.name, tiers, &owner_path),
            _ => {
                self.non_empty(&owner.name, &owner_path);
            }
        }
        let timezone = raw.timezone.as_deref().and_then(|tz| self.timezone(tz, &format!("{path}.timezone")));
        if raw.quotas.is_empty() {
            self.err(&format!("{path}.quotas"), "must list at least one quota");
        }
        let quotas = self.quotas(raw.quotas, &format!("{path}.quotas"));
        (self.errors.len() == before).then_some(Budget { owner, timezone, quotas })
    }

    fn prices(&mut self, pairs: Pairs<Value>) -> BTreeMap<String, ModelPrice> {
        self.unique_keys(&pairs, "prices");
        let mut out = BTreeMap::new();
        for (model, value) in pairs.0 {
            let path = format!("prices.{model}");
            if let Some(raw) = self.item::<PriceEntry>(value, &path) {
                out.insert(model, ModelPrice { input: raw.input, output: raw.output, cached: raw.cached.unwrap_or(raw.input) });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::hash_api_key;

    const EXAMPLE: &str = include_str!("../../examples/tiers.yaml");

    fn errors(yaml: &str) -> Vec<ConfigError> {
        Config::from_yaml_str(yaml).expect_err("should be refused").0
    }

    fn paths(yaml: &str) -> Vec<String> {
        errors(yaml).into_iter().map(|e| e.path).collect()
    }

    #[test]
    fn example_file_parses() {
        let config = Config::from_yaml_str(EXAMPLE).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.default_tier, "free");
        let names: Vec<&str> = config.tiers.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["free", "pro", "enterprise"]);
        assert!(config.quotas.iter().any(|q| q.metric == Metric::TotalTokens && q.period == PeriodSpec::Month));
        assert!(config.quotas.iter().any(|q| q.metric == Metric::CostMicros && q.period == PeriodSpec::Day));
        assert!(config.quotas.iter().any(|q| q.period == PeriodSpec::Fixed { seconds: 60 }));
        assert!(config.tiers.iter().any(|t| !t.explicit_limits.is_empty()));
        assert!(config.tiers.iter().any(|t| matches!(t.action, Some(Action::Degrade { .. }))));
        assert!(!config.groups.is_empty() && !config.assignments.is_empty() && !config.overrides.is_empty());
        assert_eq!(config.api_key_tier(&hash_api_key("sk-example-pro")), Some("pro"));
        assert!(config.price("gpt-4o").is_some());
    }

    #[test]
    fn minimal_config() {
        let c = Config::from_yaml_str("default_tier: free\ntiers: [{name: free}]\n").unwrap();
        assert_eq!(c.timezone, Tz::UTC);
        assert_eq!(c.tier("free").unwrap().rate_multiplier, 1.0);
        assert!(c.quotas.is_empty());
    }

    #[test]
    fn quota_forms() {
        let c = Config::from_yaml_str(
            "default_tier: free
tiers: [{name: free}]
quotas:
  - {name: rpm, metric: requests, rate: 10/m}
  - {name: tokens, metric: total_tokens, period: month@15, limit: 5, burst: 2, thresholds: [95, 50], scope: chat, action: queue}
",
        )
        .unwrap();
        assert_eq!((c.quotas[0].limit, c.quotas[0].period), (10, PeriodSpec::Fixed { seconds: 60 }));
        assert_eq!(c.quotas[0].thresholds, vec![80]);
        let t = &c.quotas[1];
        assert_eq!((t.limit, t.burst, t.period), (5, 2, PeriodSpec::MonthAnchored { day: 15 }));
        assert_eq!(t.thresholds, vec![50, 95]);
        assert_eq!((t.scope.as_deref(), &t.action), (Some("chat"), &Some(Action::Queue)));
    }

    #[test]
    fn every_error_is_reported_with_its_path() {
        let yaml = "default_tier: gold
timezone: Mars/Olympus
quotas:
  - {name: rpm, metric: requests, rate: 10/fortnight}
  - {name: rpm, metric: tokens, period: month, limit: -1}
tiers:
  - name: free
  - name: pro
    rate_multiplier: 0
    timezone: Nowhere/City
    quotas:
      - {name: a, metric: requests, rate: 1/m}
      - {name: b, metric: requests, period: 5q, limit: 3}
      - {name: c, metric: requests, rate: 1/m, action: degrade}
  - name: free
groups: {eng: platinum}
members: {alice: [eng, nosuch]}
subjects: {alice: {timezone: Bad/Zone}}
assignments:
  - {subject: bob, tier: silver, expires_at: tomorrow}
overrides:
  - {subject: carol, limit: 5, rate: 5/m, expires_at: 2026-12-01T00:00:00Z, reason: r, created_by: me}
  - {subject: carol, quota: nope, limit: 5, starts_at: 2026-12-02T00:00:00Z, expires_at: 2026-12-01T00:00:00Z, reason: r, created_by: me}
api_keys:
  - {key: sk-plaintext, tier: pro}
  - {key_sha256: abc, tier: pro}
";
        let got = paths(yaml);
        let want = [
            "timezone",
            "quotas[0].rate",
            "quotas[1].metric",
            "quotas[1].limit",
            "quotas[1].name",
            "tiers.pro.rate_multiplier",
            "tiers.pro.timezone",
            "tiers.pro.quotas[1].period",
            "tiers.pro.quotas[2].fallback_model",
            "tiers[2].name",
            "default_tier",
            "groups.eng",
            "members.alice[1]",
            "subjects.alice.timezone",
            "assignments[0].tier",
            "assignments[0].expires_at",
            "overrides[0]",
            "overrides[1].quota",
            "overrides[1].expires_at",
            "api_keys[0].key",
            "api_keys[1].key_sha256",
        ];
        for w in want {
            assert!(got.iter().any(|p| p == w), "missing error at {w}; got {got:#?}");
        }
        assert_eq!(got.len(), want.len(), "{got:#?}");
    }

    #[test]
    fn plaintext_keys_never_appear_in_errors() {
        let errs = errors("default_tier: free\ntiers: [{name: free}]\napi_keys: [{key: sk-very-secret, tier: free}]\n");
        let text = ConfigErrors(errs).to_string();
        assert!(text.contains("key_sha256"));
        assert!(!text.contains("sk-very-secret"), "{text}");
    }

    #[test]
    fn syntax_and_shape_errors_carry_the_line() {
        let errs = errors("default_tier: free\ntiers: [{name: free}]\nbogus: 1\n");
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].line, Some(3), "{:?}", errs[0]);
        assert!(errs[0].message.contains("unknown field `bogus`"), "{}", errs[0].message);
        let errs = errors("default_tier: free\ntiers: [{name: free}\n");
        assert!(errs[0].line.is_some());
    }

    #[test]
    fn unknown_keys_inside_items_are_refused() {
        let got = errors("default_tier: free\ntiers: [{name: free, quotas: [{name: q, metric: requests, rate: 1/m, perod: day}]}]\n");
        assert_eq!(got[0].path, "tiers.free.quotas[0]");
        assert!(got[0].message.contains("unknown field `perod`"), "{}", got[0].message);
    }

    #[test]
    fn duplicate_map_keys_are_reported() {
        assert_eq!(paths("default_tier: free\ntiers: [{name: free}]\ngroups: {a: free, a: free}\n"), ["groups.a"]);
    }

    #[test]
    fn quota_shape_rules() {
        let base = "default_tier: free\ntiers: [{name: free}]\nquotas:\n  - ";
        let cases = [
            ("{name: q, metric: requests}", "quotas[0]"),
            ("{name: q, metric: requests, period: day}", "quotas[0].limit"),
            ("{name: q, metric: requests, rate: 1/m, limit: 5}", "quotas[0].limit"),
            ("{name: q, metric: requests, rate: 1/m, period: day, limit: 5}", "quotas[0]"),
            ("{name: q, metric: requests, rate: 1/m, burst: -1}", "quotas[0].burst"),
            ("{name: q, metric: requests, rate: 1/m, thresholds: [0]}", "quotas[0].thresholds[0]"),
            ("{name: q, metric: requests, rate: 1/m, thresholds: [80, 80]}", "quotas[0].thresholds[1]"),
            ("{name: q, metric: requests, rate: 1/m, action: explode}", "quotas[0].action"),
            ("{name: q, metric: requests, rate: 1/m, action: block, fallback_model: m}", "quotas[0].fallback_model"),
            ("{name: '', metric: requests, rate: 1/m}", "quotas[0].name"),
        ];
        for (quota, path) in cases {
            assert_eq!(paths(&format!("{base}{quota}\n")), [path], "{quota}");
        }
    }

    #[test]
    fn explicit_limits_must_name_one_base_quota() {
        let yaml = |explicit: &str| {
            format!(
                "default_tier: free
quotas:
  - {{name: rpm, metric: requests, rate: 10/m}}
  - {{name: rpd, metric: requests, rate: 1000/d}}
  - {{name: tokens, metric: total_tokens, rate: 1000/month}}
tiers:
  - name: free
    explicit_limits: [{explicit}]
"
            )
        };
        assert!(Config::from_yaml_str(&yaml("{scope: api, metric: total_tokens, rate: 5/h}")).is_ok());
        assert!(Config::from_yaml_str(&yaml("{scope: api, metric: requests, quota: rpm, rate: 5/h}")).is_ok());
        assert_eq!(paths(&yaml("{scope: api, metric: requests, rate: 5/h}")), ["tiers.free.explicit_limits[0].quota"]);
        assert_eq!(paths(&yaml("{scope: api, metric: cost_micros, rate: 5/h}")), ["tiers.free.explicit_limits[0].metric"]);
        assert_eq!(paths(&yaml("{scope: api, metric: requests, quota: tokens, rate: 5/h}")), ["tiers.free.explicit_limits[0].metric"]);
        assert_eq!(paths(&yaml("{scope: api, metric: requests, quota: rpm, rate: 5/0s}")), ["tiers.free.explicit_limits[0].rate"]);
    }

    #[test]
    fn overlapping_overrides_for_the_same_target_are_refused() {
        let yaml = |second_start: &str| {
            format!(
                "default_tier: free
tiers: [{{name: free}}]
overrides:
  - {{subject: a, limit: 1, starts_at: 2026-01-01T00:00:00Z, expires_at: 2026-02-01T00:00:00Z, reason: r, created_by: me}}
  - {{subject: a, limit: 2, starts_at: {second_start}, expires_at: 2026-03-01T00:00:00Z, reason: r, created_by: me}}
  - {{subject: a, scope: api, limit: 3, starts_at: 2026-01-15T00:00:00Z, expires_at: 2026-03-01T00:00:00Z, reason: r, created_by: me}}
"
            )
        };
        // Back to back (end exclusive) is fine; a different scope may overlap.
        assert!(Config::from_yaml_str(&yaml("2026-02-01T00:00:00Z")).is_ok());
        assert_eq!(paths(&yaml("2026-01-31T23:59:59Z")), ["overrides[1]"]);
    }

    #[test]
    fn api_key_hashes_are_normalised_and_unique() {
        let upper = hash_api_key("k").to_ascii_uppercase();
        let c = Config::from_yaml_str(&format!(
            "default_tier: free\ntiers: [{{name: free}}]\napi_keys: [{{key_sha256: {upper}, tier: free}}]\n"
        ))
        .unwrap();
        assert_eq!(c.api_key_tier(&hash_api_key("k")), Some("free"));
        let dup = format!("default_tier: free\ntiers: [{{name: free}}]\napi_keys: [{{key_sha256: {upper}, tier: free}}, {{key_sha256: {upper}, tier: free}}]\n");
        assert_eq!(paths(&dup), ["api_keys[1].key_sha256"]);
    }

    #[test]
    fn api_keys_may_be_bound_to_a_subject() {
        let h = hash_api_key("k");
        let c = Config::from_yaml_str(&format!(
            "default_tier: free\ntiers: [{{name: free}}]\napi_keys: [{{key_sha256: {h}, tier: free, subject: acme}}]\n"
        ))
        .unwrap();
        assert_eq!(c.api_keys[&h].subject.as_deref(), Some("acme"));
        let empty = format!("default_tier: free\ntiers: [{{name: free}}]\napi_keys: [{{key_sha256: {h}, tier: free, subject: ' '}}]\n");
        assert_eq!(paths(&empty), ["api_keys[0].subject"]);
    }

    #[test]
    fn prices_are_per_million_tokens() {
        let p = ModelPrice { input: 2_500_000, output: 10_000_000, cached: 1_250_000 };
        // 1000 in × $2.50/M + 500 out × $10/M + 2000 cached × $1.25/M = $0.0025 + $0.005 + $0.0025.
        assert_eq!(p.cost_micros(1000, 500, 2000), 10_000);
        let cheap = ModelPrice { input: 75_000, output: 300_000, cached: 37_500 };
        assert_eq!(cheap.cost_micros(1, 0, 0), 0); // 0.075 micro-dollars rounds to 0
        assert_eq!(cheap.cost_micros(20, 0, 0), 2); // 1.5 -> 2 (ties to even)
        assert_eq!(cheap.cost_micros(10, 0, 0), 1); // 0.75 -> 1
        let c = Config::from_yaml_str("default_tier: f\ntiers: [{name: f}]\nprices: {m: {input: 7, output: 9}}\n").unwrap();
        assert_eq!(c.price("m"), Some(&ModelPrice { input: 7, output: 9, cached: 7 }));
    }

    #[test]
    fn a_cost_past_the_ends_of_i64_saturates_instead_of_overflowing() {
        let dear = ModelPrice { input: u64::MAX, output: u64::MAX, cached: u64::MAX };
        assert_eq!(dear.cost_micros(i64::MAX, i64::MAX, i64::MAX), i64::MAX);
        assert_eq!(dear.cost_micros(i64::MIN, i64::MIN, i64::MIN), i64::MIN);
        assert_eq!(dear.cost_micros(1, 0, 0), 18_446_744_073_710);
        // Two products that overflow together, cancelled by the third: the exact sum is
        // 2^64 - 1 millionths of a micro-dollar.
        assert_eq!(dear.cost_micros(i64::MAX, 2, i64::MIN), 18_446_744_073_710);
    }

    #[test]
    fn a_file_of_several_documents_is_refused_with_a_line() {
        let cases = [
            ("default_tier: f\ntiers: [{name: f}]\n---\nquotas: []\n", 3, "more than one YAML document"),
            ("---\ndefault_tier: f\n--- \nquotas: []\n", 3, "more than one YAML document"),
            // Indented differently after the first line: the parser sees a second document.
            (" default_tier: f\ntiers: [{name: f}]\n", 2, "document start"),
        ];
        for (yaml, line, message) in cases {
            let e = errors(yaml);
            assert_eq!(e.len(), 1, "{yaml:?}: {e:?}");
            assert_eq!(e[0].line, Some(line), "{yaml:?}: {e:?}");
            assert!(e[0].message.contains(message), "{yaml:?}: {e:?}");
        }
    }

    #[test]
    fn errors_display_one_per_line() {
        let e = Config::from_yaml_str("default_tier: nope\ntiers: [{name: free}]\n").unwrap_err();
        assert_eq!(e.to_string(), "1 error in the configuration\n  default_tier: unknown tier `nope` (tiers: free)");
    }

    #[test]
    fn a_document_written_back_validates_to_the_same_configuration() {
        let document = ConfigDocument::from_yaml_str(EXAMPLE).unwrap();
        let written = document.to_yaml_string().unwrap();
        assert_eq!(Config::from_yaml_str(&written).unwrap(), Config::from_yaml_str(EXAMPLE).unwrap(), "{written}");
        assert_eq!(ConfigDocument::from_yaml_str(&written).unwrap(), document, "writing back is stable");
    }

    #[test]
    fn a_document_keeps_what_was_written() {
        let text = "default_tier: free\ntiers:\n  - name: free\n    rate_multiplier: 10\n  - name: half\n    rate_multiplier: 0.5\ngroups: {zeta: free, alpha: half}\noverrides:\n";
        let document = ConfigDocument::from_yaml_str(text).unwrap();
        assert!(document.overrides.is_empty(), "a section written as null is empty");
        assert_eq!(document.groups.keys().collect::<Vec<_>>(), ["zeta", "alpha"], "mappings keep their order");
        let written = document.to_yaml_string().unwrap();
        assert!(written.contains("rate_multiplier: 10\n") && written.contains("rate_multiplier: 0.5\n"), "{written}");
        assert!(!written.contains("priority") && !written.contains("overrides"), "nothing absent is added: {written}");
        let json = serde_json::to_value(document.tier("free").unwrap()).unwrap();
        assert_eq!(json, serde_json::json!({"name": "free", "rate_multiplier": 10}));
    }

    #[test]
    fn a_document_refuses_what_the_format_does_not_have() {
        assert!(ConfigDocument::from_yaml_str("tiers: [{name: free, colour: red}]").is_err());
        assert_eq!(ConfigDocument::from_yaml_str("").unwrap(), ConfigDocument::default());
    }
}
