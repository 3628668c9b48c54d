//! Usage events: parsing, validation and the canonical form.
//!
//! Accepted shapes (JSON objects):
//! - the plain Tally event: required `id` (1..128 chars, the dedupe key), `subject`, `time`
//!   (RFC 3339 event time); optional `api_key`, `scope` (default ""), `model`, `requests`
//!   (default 1), `input_tokens`, `output_tokens`, `cached_tokens` (default 0),
//!   `cost_micros`, `attributes` (string map) and `corrects` (the id of an event this one
//!   reverts);
//! - a CloudEvents 1.0 envelope (`specversion`, `id`, `source`, `type`, `subject`, `time`,
//!   `data`), whose `data` holds the optional fields above. Its dedupe key is `source`+`id`.
//!   `data_base64` (the base64 of the same JSON object) may replace `data`, never both.
//!   Extension attributes (`traceparent`, `tracestate`, `partitionkey`, any name of lowercase
//!   letters and digits, at most 20 characters) are kept: each goes into `attributes` as
//!   `ce.<name>`, a boolean or integer value as its JSON text, so the canonical form (and the
//!   fingerprint) carries it. A CloudEvent sent in binary content mode (attributes in
//!   transport headers, the data as the body) becomes this envelope first
//!   ([`cloudevent_from_binary`]).
//!
//! Unknown fields are rejected: a misspelt `input_token` must not silently count zero.
//! A raw `api_key` never leaves [`parse_event`]: the canonical form carries only its SHA-256
//! (`api_key_sha256`), so keys are not stored or logged in clear anywhere downstream.

use std::collections::BTreeMap;

use chrono::{DateTime, Datelike, Duration, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::metric::{Amounts, MAX_AMOUNT};

mod canonical;

/// Longest accepted `id`, in characters.
pub const MAX_ID_CHARS: usize = 128;
/// Longest accepted `subject`, `scope`, `model`, in characters.
pub const MAX_NAME_CHARS: usize = 256;
/// Longest accepted `corrects` (the id of the event a correction reverts), in characters.
const MAX_CORRECTS_CHARS: usize = 1024;
/// How far in the future an event time may be.
pub const MAX_FUTURE: Duration = Duration::minutes(5);

/// A validated usage event in canonical form. Serializing it gives the bytes Tally's own
/// ingest produces to `tally.usage.v1`; parsing those bytes gives the same event back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageEvent {
    /// The dedupe key: the event's `id`, or for a CloudEvent a key built from `source`+`id`.
    pub id: String,
    pub subject: String,
    pub time: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_sha256: Option<String>,
    #[serde(default)]
    pub scope: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// A group (team, organisation) the request was made for, beside the subject's
    /// configured ones: its budget counts the event. Sent as `group` or `org`; the
    /// aggregator quarantines an event naming a group its configuration does not know.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    pub requests: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cached_tokens: i64,
    /// `None` when the sender gave no cost; the aggregator may price it from the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_micros: Option<i64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
    /// The dedupe key of the event this one reverts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub corrects: Option<String>,
}

impl UsageEvent {
    pub fn amounts(&self) -> Amounts {
        Amounts {
            requests: self.requests,
            input_tokens: self.input_tokens,
            output_tokens: self.output_tokens,
            cached_tokens: self.cached_tokens,
            cost_micros: self.cost_micros.unwrap_or(0),
        }
    }

    /// The canonical JSON bytes of this event.
    pub fn to_canonical_json(&self) -> Vec<u8> {
        // Serializing a struct of strings, integers and a BTreeMap into memory cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// A digest of the canonical form. Two deliveries with the same `id` and the same
    /// fingerprint are one event; the same `id` with another fingerprint is a conflict.
    pub fn fingerprint(&self) -> String {
        sha256_hex(&self.to_canonical_json())
    }

    /// Whether this event passes every check [`parse_event`] makes, so that its canonical
    /// form parses back to it.
    fn is_valid(&self) -> bool {
        let chars_within = |s: &str, max: usize| s.chars().count() <= max;
        let name_ok = |s: &str| !s.is_empty() && chars_within(s, MAX_NAME_CHARS);
        let counts = [self.requests, self.input_tokens, self.output_tokens, self.cached_tokens, self.cost_micros.unwrap_or(0)];
        let corrects_ok = |c: &str| !c.is_empty() && chars_within(c, MAX_CORRECTS_CHARS) && c != self.id;
        // RFC 3339 has four-digit years; chrono writes others with a sign, which
        // `parse_event` refuses.
        (0..=9999).contains(&self.time.year())
            && !self.id.is_empty()
            && chars_within(&self.id, MAX_ID_CHARS)
            && name_ok(&self.subject)
            && self.api_key_sha256.as_deref().is_none_or(is_sha256_hex)
            && chars_within(&self.scope, MAX_NAME_CHARS)
            && self.model.as_deref().is_none_or(|m| chars_within(m, MAX_NAME_CHARS))
            && self.group.as_deref().is_none_or(name_ok)
            && counts.iter().all(|n| (0..=MAX_AMOUNT).contains(n))
            && self.corrects.as_deref().is_none_or(corrects_ok)
            && refuse_nul_and_reserved(self, "").is_ok()
    }
}

/// SHA-256, lowercase hex: an event's fingerprint (of its canonical bytes) and an API key's
/// stored form.
fn sha256_hex(bytes: &[u8]) -> String {
    let mut hex = [0u8; 64];
    // 32 digest bytes always fit 64 hex characters, all ASCII.
    hex::encode_to_slice(Sha256::digest(bytes), &mut hex).unwrap_or_default();
    std::str::from_utf8(&hex).unwrap_or_default().to_owned()
}

/// Parses one event and computes its fingerprint: the same result as [`parse_event`]
/// followed by [`UsageEvent::fingerprint`], for every input.
///
/// Bytes that are already the canonical form of a valid event (what Tally's ingest writes)
/// take a fast path: one pass over the bytes that reads the event only if they are its
/// canonical form ([`canonical`]), whose digest is then the fingerprint. Anything else
/// (other field order, spacing, escaped strings, a raw `api_key`, a CloudEvent, an invalid
/// event) takes [`parse_event`], which names the bad field.
pub fn parse_event_with_fingerprint(bytes: &[u8]) -> Result<(UsageEvent, String), EventError> {
    if let Some(event) = canonical::read(bytes).filter(UsageEvent::is_valid) {
        return Ok((event, sha256_hex(bytes)));
    }
    let event = parse_event(bytes)?;
    let fingerprint = event.fingerprint();
    Ok((event, fingerprint))
}

/// Why an event was refused, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field `{field}`: {message}")]
pub struct EventError {
    pub field: String,
    pub message: String,
    pub kind: EventErrorKind,
}

/// What kind of refusal an [`EventError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventErrorKind {
    /// The event is malformed: a missing, mistyped, unknown or too long field.
    Invalid,
    /// An amount is an integer past [`MAX_AMOUNT`]: counting it would overflow a ledger row.
    /// The aggregator quarantines such an event as `overflow`.
    OutOfRange,
}

fn err(field: &str, message: impl Into<String>) -> EventError {
    EventError { field: field.to_string(), message: message.into(), kind: EventErrorKind::Invalid }
}

fn out_of_range(field: &str, message: impl Into<String>) -> EventError {
    EventError { kind: EventErrorKind::OutOfRange, ..err(field, message) }
}

/// The SHA-256 of an API key, hex encoded: the only form in which Tally stores a key.
pub fn hash_api_key(key: &str) -> String {
    sha256_hex(key.as_bytes())
}

/// Parses one event from JSON bytes.
pub fn parse_event(bytes: &[u8]) -> Result<UsageEvent, EventError> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| err("$", format!("not valid JSON: {e}")))?;
    event_from_value(value)
}

/// Validates one event already parsed as JSON.
pub fn event_from_value(value: Value) -> Result<UsageEvent, EventError> {
    let Value::Object(obj) = value else {
        return Err(err("$", "an event must be a JSON object"));
    };
    let (event, data_prefix) = if obj.contains_key("specversion") { (from_cloudevent(obj)?, "data.") } else { (from_plain(obj)?, "") };
    refuse_nul_and_reserved(&event, data_prefix)?;
    Ok(event)
}

/// The starts of subjects Tally keeps for itself: the keys of the aggregators' heartbeat
/// records on the decisions topic (`crate::heartbeat`; a subject under it would have its
/// decisions read as heartbeats and never be blocked) and the budget subjects that hold
/// budgets' ledgers (`crate::budget`; a subject under it would count into a budget).
const RESERVED_SUBJECT_PREFIXES: [&str; 2] = [crate::heartbeat::HEARTBEAT_KEY_PREFIX, crate::budget::BUDGET_SUBJECT_PREFIX];

/// Refuses text Postgres cannot store (U+0000 in any string: its `text` and `jsonb` hold no
/// NUL) and a subject under the reserved heartbeat prefix. Every shape ends here, so ingest
/// refuses what the aggregator could not count.
fn refuse_nul_and_reserved(e: &UsageEvent, data_prefix: &str) -> Result<(), EventError> {
    if let Some(prefix) = RESERVED_SUBJECT_PREFIXES.into_iter().find(|p| e.subject.starts_with(p)) {
        return Err(err("subject", format!("must not start with {prefix:?}, which Tally reserves for its own records")));
    }
    let nul = |s: &str| s.as_bytes().contains(&0);
    let texts = [
        e.id.as_str(),
        e.subject.as_str(),
        e.scope.as_str(),
        e.model.as_deref().unwrap_or_default(),
        e.group.as_deref().unwrap_or_default(),
        e.corrects.as_deref().unwrap_or_default(),
    ];
    if !texts.into_iter().any(nul) && !e.attributes.iter().any(|(k, v)| nul(k) || nul(v)) {
        return Ok(());
    }
    // Only now name the field: every event is checked, few are refused.
    let data = |name: &str| format!("{data_prefix}{name}");
    let named = [("id".to_string(), e.id.as_str()), ("subject".to_string(), e.subject.as_str()), (data("scope"), e.scope.as_str())]
        .into_iter()
        .chain(e.model.as_deref().map(|m| (data("model"), m)))
        .chain(e.group.as_deref().map(|g| (data("group"), g)))
        .chain(e.corrects.as_deref().map(|c| (data("corrects"), c)));
    let attributes = e.attributes.iter().flat_map(|(k, v)| {
        let field = match k.strip_prefix("ce.") {
            Some(extension) if !data_prefix.is_empty() => extension.to_string(),
            _ => data(&format!("attributes.{k}")),
        };
        [(field.clone(), k.as_str()), (field, v.as_str())]
    });
    match named.chain(attributes).find(|(_, text)| nul(text)) {
        Some((field, _)) => Err(err(&field, "must not contain the NUL character (U+0000)")),
        None => Ok(()),
    }
}

/// The fields of a plain event; the first three are the envelope's in a CloudEvent.
const PLAIN_FIELDS: &[&str] = &[
    "id",
    "subject",
    "time",
    "api_key",
    "api_key_sha256",
    "scope",
    "model",
    "group",
    "org",
    "requests",
    "input_tokens",
    "output_tokens",
    "cached_tokens",
    "cost_micros",
    "attributes",
    "corrects",
];
/// The fields a CloudEvent's `data` may hold: the plain event's, less the three the envelope
/// itself carries (`id`, `subject`, `time`).
const DATA_FIELDS: &[&str] = PLAIN_FIELDS.split_at(3).1;
const CLOUDEVENT_FIELDS: &[&str] =
    &["specversion", "id", "source", "type", "subject", "time", "data", "data_base64", "datacontenttype", "dataschema"];
/// Longest CloudEvents extension attribute name (the specification's limit).
const MAX_EXTENSION_NAME_CHARS: usize = 20;
/// The prefix of a CloudEvents extension attribute's key in [`UsageEvent::attributes`].
pub const EXTENSION_PREFIX: &str = "ce.";

fn reject_unknown(obj: &Map<String, Value>, allowed: &[&str], prefix: &str) -> Result<(), EventError> {
    match obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(err(&format!("{prefix}{k}"), "unknown field")),
        None => Ok(()),
    }
}

fn from_plain(obj: Map<String, Value>) -> Result<UsageEvent, EventError> {
    reject_unknown(&obj, PLAIN_FIELDS, "")?;
    let id = required_str(&obj, "id", "id", MAX_ID_CHARS)?;
    let subject = required_str(&obj, "subject", "subject", MAX_NAME_CHARS)?;
    let time = required_time(&obj, "time")?;
    build(id, subject, time, &obj, "")
}

fn from_cloudevent(obj: Map<String, Value>) -> Result<UsageEvent, EventError> {
    let extensions = extensions(&obj)?;
    match obj.get("specversion") {
        Some(Value::String(v)) if v == "1.0" => {}
        _ => return Err(err("specversion", "must be \"1.0\"")),
    }
    let ce_id = required_str(&obj, "id", "id", MAX_ID_CHARS)?;
    let source = required_str(&obj, "source", "source", 1024)?;
    required_str(&obj, "type", "type", 1024)?;
    let subject = required_str(&obj, "subject", "subject", MAX_NAME_CHARS)?;
    let time = required_time(&obj, "time")?;
    let (data, prefix) = match (obj.get("data"), obj.get("data_base64")) {
        (Some(_), Some(_)) => return Err(err("data_base64", "give `data` or `data_base64`, not both")),
        (Some(Value::Object(d)), None) => (d.clone(), "data."),
        (Some(_), None) => return Err(err("data", "must be a JSON object")),
        (None, Some(encoded)) => (decoded_data(encoded)?, "data_base64."),
        (None, None) => (Map::new(), "data."),
    };
    reject_unknown(&data, DATA_FIELDS, prefix)?;
    // Length-prefixed so that no (source, id) pair can collide with another.
    let id = format!("ce:{}:{}:{}", source.len(), source, ce_id);
    // The key is the event's id from here on (the canonical form carries it), so it must
    // fit the same limit: else ingest would accept what the aggregator then refuses.
    let key_chars = id.chars().count();
    if key_chars > MAX_ID_CHARS {
        let message = format!("with `source` it makes a dedupe key of {key_chars} characters; the limit is {MAX_ID_CHARS}");
        return Err(err("id", message));
    }
    let mut event = build(id, subject, time, &data, prefix)?;
    for (name, value) in extensions {
        let key = format!("{EXTENSION_PREFIX}{name}");
        if event.attributes.contains_key(&key) {
            let message = format!("is also the CloudEvents extension `{name}`, which Tally keeps under this key; give it once");
            return Err(err(&format!("{prefix}attributes.{key}"), message));
        }
        event.attributes.insert(key, value);
    }
    Ok(event)
}

/// The extension attributes of a CloudEvent (every member that is not one of
/// [`CLOUDEVENT_FIELDS`]), their values as text. A member whose name cannot be an extension
/// is refused as an unknown field.
fn extensions(obj: &Map<String, Value>) -> Result<Vec<(String, String)>, EventError> {
    let mut out = Vec::new();
    for (name, value) in obj.iter().filter(|(k, _)| !CLOUDEVENT_FIELDS.contains(&k.as_str())) {
        if !is_extension_name(name) {
            let message = format!(
                "unknown field; a CloudEvents extension attribute's name is lowercase letters a-z and digits 0-9, at most {MAX_EXTENSION_NAME_CHARS} characters"
            );
            return Err(err(name, message));
        }
        let text = match value {
            // The JSON format writes an absent attribute as null.
            Value::Null => continue,
            Value::String(s) => s.clone(),
            Value::Bool(b) => b.to_string(),
            Value::Number(n) if n.is_i64() || n.is_u64() => n.to_string(),
            _ => return Err(err(name, "a CloudEvents extension attribute must be a string, a boolean or an integer")),
        };
        out.push((name.clone(), text));
    }
    Ok(out)
}

/// Whether `name` may name a CloudEvents extension attribute.
fn is_extension_name(name: &str) -> bool {
    (1..=MAX_EXTENSION_NAME_CHARS).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// The JSON object a CloudEvent's `data_base64` encodes.
fn decoded_data(encoded: &Value) -> Result<Map<String, Value>, EventError> {
    use base64::Engine;
    const BASE64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new().with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    let Value::String(text) = encoded else {
        return Err(err("data_base64", "must be a base64 string (of the JSON object the data would be)"));
    };
    let bytes = BASE64.decode(text.trim()).map_err(|e| err("data_base64", format!("is not valid base64: {e}")))?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(data)) => Ok(data),
        Ok(_) => Err(err("data_base64", "must decode to a JSON object (the event's data), not another JSON value")),
        Err(e) => Err(err("data_base64", format!("must decode to a JSON object (the event's data): {e}"))),
    }
}

/// The structured form of a CloudEvent sent in binary content mode: its context attributes
/// come from transport headers (`ce-id` over HTTP, `ce_id` over Kafka; give their names here
/// without the prefix), its data is the body. The result goes to [`event_from_value`] like
/// any envelope. A body that is JSON becomes `data`; anything else `data_base64`, so that
/// [`event_from_value`] refuses it naming that field and no byte is lost; an empty body is
/// no data.
pub fn cloudevent_from_binary(attributes: impl IntoIterator<Item = (String, String)>, content_type: Option<&str>, body: &[u8]) -> Value {
    use base64::Engine;
    let mut envelope: Map<String, Value> = attributes.into_iter().map(|(k, v)| (k.to_ascii_lowercase(), Value::String(v))).collect();
    if let Some(ct) = content_type {
        envelope.entry("datacontenttype").or_insert_with(|| Value::String(ct.to_string()));
    }
    envelope.remove("data");
    envelope.remove("data_base64");
    if !body.trim_ascii().is_empty() {
        match serde_json::from_slice::<Value>(body) {
            Ok(data) => envelope.insert("data".into(), data),
            Err(_) => envelope.insert("data_base64".into(), Value::String(base64::engine::general_purpose::STANDARD.encode(body))),
        };
    }
    Value::Object(envelope)
}

fn build(id: String, subject: String, time: DateTime<Utc>, obj: &Map<String, Value>, prefix: &str) -> Result<UsageEvent, EventError> {
    let f = |name: &str| format!("{prefix}{name}");
    let api_key_sha256 = match (obj.get("api_key"), obj.get("api_key_sha256")) {
        (Some(_), Some(_)) => return Err(err(&f("api_key"), "give api_key or api_key_sha256, not both")),
        (Some(Value::String(k)), None) if !k.is_empty() => Some(hash_api_key(k)),
        (Some(_), None) => return Err(err(&f("api_key"), "must be a non-empty string")),
        (None, Some(Value::String(h))) if is_sha256_hex(h) => Some(h.clone()),
        (None, Some(_)) => return Err(err(&f("api_key_sha256"), "must be 64 lowercase hex characters")),
        (None, None) => None,
    };
    let scope = optional_str(obj, "scope", &f("scope"))?.unwrap_or_default();
    let model = optional_str(obj, "model", &f("model"))?;
    let group = match (optional_str(obj, "group", &f("group"))?, optional_str(obj, "org", &f("org"))?) {
        (Some(_), Some(_)) => return Err(err(&f("org"), "give group or org, not both")),
        (Some(g), None) | (None, Some(g)) if g.is_empty() => return Err(err(&f("group"), "must not be empty")),
        (group, org) => group.or(org),
    };
    let requests = optional_count(obj, "requests", &f("requests"))?.unwrap_or(1);
    let input_tokens = optional_count(obj, "input_tokens", &f("input_tokens"))?.unwrap_or(0);
    let output_tokens = optional_count(obj, "output_tokens", &f("output_tokens"))?.unwrap_or(0);
    let cached_tokens = optional_count(obj, "cached_tokens", &f("cached_tokens"))?.unwrap_or(0);
    let cost_micros = optional_count(obj, "cost_micros", &f("cost_micros"))?;
    let attributes = attributes(obj, &f("attributes"))?;
    let corrects = match obj.get("corrects") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if !s.is_empty() && s.chars().count() <= MAX_CORRECTS_CHARS => Some(s.clone()),
        Some(_) => return Err(err(&f("corrects"), "must be the non-empty id of the event to revert")),
    };
    if corrects.as_deref() == Some(id.as_str()) {
        return Err(err(&f("corrects"), "an event cannot correct itself"));
    }
    Ok(UsageEvent {
        id,
        subject,
        time,
        api_key_sha256,
        scope,
        model,
        group,
        requests,
        input_tokens,
        output_tokens,
        cached_tokens,
        cost_micros,
        attributes,
        corrects,
    })
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn required_str(obj: &Map<String, Value>, key: &str, field: &str, max: usize) -> Result<String, EventError> {
    match obj.get(key) {
        None | Some(Value::Null) => Err(err(field, "is required")),
        Some(Value::String(s)) => check_len(s, field, max),
        Some(_) => Err(err(field, "must be a string")),
    }
}

fn optional_str(obj: &Map<String, Value>, key: &str, field: &str) -> Result<Option<String>, EventError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(Some(String::new())),
        Some(Value::String(s)) => check_len(s, field, MAX_NAME_CHARS).map(Some),
        Some(_) => Err(err(field, "must be a string")),
    }
}

fn check_len(s: &str, field: &str, max: usize) -> Result<String, EventError> {
    let n = s.chars().count();
    if n == 0 {
        Err(err(field, "must not be empty"))
    } else if n > max {
        Err(err(field, format!("is {n} characters long; the limit is {max}")))
    } else {
        Ok(s.to_string())
    }
}

fn required_time(obj: &Map<String, Value>, field: &str) -> Result<DateTime<Utc>, EventError> {
    match obj.get(field) {
        None | Some(Value::Null) => {
            Err(err(field, "is required: Tally meters by event time; set `time` to when the usage happened (RFC 3339)"))
        }
        Some(Value::String(s)) => match DateTime::parse_from_rfc3339(s).map(|t| t.with_timezone(&Utc)) {
            // RFC 3339 writes years 0000 to 9999: an offset can take a time written in range
            // out of it in UTC, where the canonical form could not write it.
            Ok(t) if (0..=9999).contains(&t.year()) => Ok(t),
            Ok(_) => Err(err(field, "must be from 0000-01-01T00:00:00Z to 9999-12-31T23:59:59Z once in UTC")),
            Err(e) => Err(err(field, format!("must be an RFC 3339 time such as 2026-11-22T10:00:00Z ({e})"))),
        },
        Some(_) => Err(err(field, "must be an RFC 3339 string")),
    }
}

fn optional_count(obj: &Map<String, Value>, key: &str, field: &str) -> Result<Option<i64>, EventError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match (n.as_i64(), n.as_u64()) {
            (Some(v), _) if (0..=MAX_AMOUNT).contains(&v) => Ok(Some(v)),
            (Some(v), _) if v > MAX_AMOUNT => Err(above_bound(field, n)),
            (None, Some(_)) => Err(above_bound(field, n)),
            _ => Err(err(field, format!("must be a non-negative integer, got {n}"))),
        },
        Some(_) => Err(err(field, "must be a non-negative integer")),
    }
}

fn above_bound(field: &str, n: &serde_json::Number) -> EventError {
    out_of_range(field, format!("{n} is above the largest amount Tally counts, {MAX_AMOUNT} (10^15)"))
}

fn attributes(obj: &Map<String, Value>, field: &str) -> Result<BTreeMap<String, String>, EventError> {
    match obj.get("attributes") {
        None | Some(Value::Null) => Ok(BTreeMap::new()),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| match v {
                Value::String(s) => Ok((k.clone(), s.clone())),
                _ => Err(err(&format!("{field}.{k}"), "attribute values must be strings")),
            })
            .collect(),
        Some(_) => Err(err(field, "must be an object of strings")),
    }
}

/// Where an event's time stands against the lateness window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timeliness {
    OnTime,
    /// Older than the lateness window allows.
    TooLate,
    /// More than [`MAX_FUTURE`] ahead of `now`.
    InFuture,
}

/// The UTC day of an event time, which keys the event's dedupe record together with its id:
/// two copies of an id are the same event only if they fall on the same day. It is the day of
/// the time as Postgres stores it (whole microseconds, a fraction cut toward 2000-01-01, as
/// sqlx and the aggregator's `COPY` send it), so it always equals
/// `(event_time AT TIME ZONE 'UTC')::date` of the stored row.
pub fn event_day(time: DateTime<Utc>) -> chrono::NaiveDate {
    let postgres_epoch = DateTime::from_timestamp(946_684_800, 0).unwrap_or_default();
    // Every `DateTime` is less than 2^63 microseconds from 2000.
    let micros = (time - postgres_epoch).num_microseconds().unwrap_or(i64::MAX);
    (postgres_epoch + Duration::microseconds(micros)).date_naive()
}

/// Classifies an event time against `now` and the lateness window.
pub fn timeliness(time: DateTime<Utc>, now: DateTime<Utc>, lateness: Duration) -> Timeliness {
    if time > now + MAX_FUTURE {
        Timeliness::InFuture
    } else if time < now - lateness {
        Timeliness::TooLate
    } else {
        Timeliness::OnTime
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_event_day_is_the_utc_date_of_the_stored_time() {
        let at = |s: &str| s.parse::<DateTime<Utc>>().unwrap();
        let day = |s: &str| s.parse::<chrono::NaiveDate>().unwrap();
        assert_eq!(event_day(at("2026-12-06T23:59:59.999999999Z")), day("2026-12-06"));
        assert_eq!(event_day(at("2026-12-07T00:00:00Z")), day("2026-12-07"));
        assert_eq!(event_day(at("2026-12-07T01:00:00+02:00")), day("2026-12-06"));
        // Before 2000 a fraction of a microsecond is cut toward 2000, as Postgres keeps it.
        assert_eq!(event_day(at("1999-12-31T23:59:59.9999995Z")), day("2000-01-01"));
        assert_eq!(event_day(at("1999-12-31T23:59:59.999999Z")), day("1999-12-31"));
    }

    fn parse(v: Value) -> Result<UsageEvent, EventError> {
        event_from_value(v)
    }

    #[test]
    fn minimal_event_gets_defaults() {
        let e = parse(json!({"id": "e1", "subject": "alice", "time": "2026-11-22T10:00:00+01:00"})).unwrap();
        assert_eq!(e.requests, 1);
        assert_eq!(e.input_tokens, 0);
        assert_eq!(e.scope, "");
        assert_eq!(e.cost_micros, None);
        assert_eq!(e.time.to_rfc3339(), "2026-11-22T09:00:00+00:00");
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases = [
            (json!({"subject": "a", "time": "2026-11-22T10:00:00Z"}), "id"),
            (json!({"id": "", "subject": "a", "time": "2026-11-22T10:00:00Z"}), "id"),
            (json!({"id": "x".repeat(129), "subject": "a", "time": "2026-11-22T10:00:00Z"}), "id"),
            (json!({"id": "e", "time": "2026-11-22T10:00:00Z"}), "subject"),
            (json!({"id": "e", "subject": "a", "time": "yesterday"}), "time"),
            (json!({"id": "e", "subject": "a", "time": "2026-11-22T10:00:00Z", "input_tokens": -1}), "input_tokens"),
            (json!({"id": "e", "subject": "a", "time": "2026-11-22T10:00:00Z", "output_tokens": 1.5}), "output_tokens"),
            (json!({"id": "e", "subject": "a", "time": "2026-11-22T10:00:00Z", "input_token": 5}), "input_token"),
            (json!({"id": "e", "subject": "a", "time": "2026-11-22T10:00:00Z", "attributes": {"k": 1}}), "attributes.k"),
            (json!({"id": "e", "subject": "a", "time": "2026-11-22T10:00:00Z", "corrects": "e"}), "corrects"),
        ];
        for (value, field) in cases {
            let e = parse(value.clone()).unwrap_err();
            assert_eq!(e.field, field, "for {value}");
        }
    }

    #[test]
    fn amounts_are_bounded_and_an_amount_past_the_bound_is_out_of_range() {
        let with = |n: Value| json!({"id": "e", "subject": "a", "time": "2026-11-22T10:00:00Z", "cost_micros": n});
        assert_eq!(parse(with(json!(MAX_AMOUNT))).unwrap().cost_micros, Some(MAX_AMOUNT));
        for past in [json!(MAX_AMOUNT + 1), json!(i64::MAX - 1), json!(u64::MAX)] {
            let e = parse(with(past.clone())).unwrap_err();
            assert_eq!((e.field.as_str(), e.kind), ("cost_micros", EventErrorKind::OutOfRange), "for {past}");
            assert!(e.message.contains("10^15"), "{e}");
        }
        for wrong in [json!(-1), json!(1.5), json!(1e30), json!("5")] {
            let e = parse(with(wrong.clone())).unwrap_err();
            assert_eq!((e.field.as_str(), e.kind), ("cost_micros", EventErrorKind::Invalid), "for {wrong}");
        }
        // The canonical fast path holds the same bound.
        let valid = parse(with(json!(1))).unwrap();
        let past = UsageEvent { input_tokens: MAX_AMOUNT + 1, ..valid };
        let e = parse_event_with_fingerprint(&past.to_canonical_json()).unwrap_err();
        assert_eq!((e.field.as_str(), e.kind), ("input_tokens", EventErrorKind::OutOfRange));
    }

    #[test]
    fn nul_characters_and_the_reserved_heartbeat_prefix_are_refused_naming_the_field() {
        let at = "2026-11-22T10:00:00Z";
        let cases = [
            (json!({"id": "e", "subject": "a\u{0}b", "time": at}), "subject"),
            (json!({"id": "e\u{0}", "subject": "a", "time": at}), "id"),
            (json!({"id": "e", "subject": "a", "time": at, "scope": "\u{0}"}), "scope"),
            (json!({"id": "e", "subject": "a", "time": at, "model": "m\u{0}"}), "model"),
            (json!({"id": "e", "subject": "a", "time": at, "attributes": {"k": "v\u{0}"}}), "attributes.k"),
            (json!({"id": "e", "subject": "a", "time": at, "attributes": {"k\u{0}": "v"}}), "attributes.k\u{0}"),
            (json!({"id": "e", "subject": "a", "time": at, "corrects": "x\u{0}"}), "corrects"),
            (
                json!({"specversion": "1.0", "id": "1", "source": "s", "type": "t", "subject": "a", "time": at, "data": {"model": "\u{0}"}}),
                "data.model",
            ),
            (
                json!({"specversion": "1.0", "id": "1", "source": "s", "type": "t", "subject": "a", "time": at, "traceparent": "\u{0}"}),
                "traceparent",
            ),
            (json!({"id": "e", "subject": "__tally_heartbeat__/0", "time": at}), "subject"),
        ];
        for (value, field) in cases {
            let e = parse(value.clone()).unwrap_err();
            assert_eq!(e.field, field, "for {value}: {e}");
            let bytes = serde_json::to_vec(&value).unwrap();
            assert_eq!(parse_event_with_fingerprint(&bytes).unwrap_err().field, field);
        }
        // The prefix is reserved whole: a subject merely like it is fine.
        assert!(parse(json!({"id": "e", "subject": "__tally_heartbeat__", "time": at})).is_ok());
    }

    #[test]
    fn id_of_exactly_128_chars_is_accepted() {
        assert!(parse(json!({"id": "é".repeat(128), "subject": "a", "time": "2026-11-22T10:00:00Z"})).is_ok());
    }

    #[test]
    fn api_key_is_replaced_by_its_hash() {
        let e = parse(json!({"id": "e", "subject": "a", "time": "2026-11-22T10:00:00Z", "api_key": "sk-secret"})).unwrap();
        let json = String::from_utf8(e.to_canonical_json()).unwrap();
        assert!(!json.contains("sk-secret"));
        assert_eq!(e.api_key_sha256.as_deref(), Some(hash_api_key("sk-secret").as_str()));
    }

    #[test]
    fn canonical_form_round_trips_with_same_fingerprint() {
        let e = parse(json!({
            "id": "e", "subject": "a", "time": "2026-11-22T10:00:00Z", "api_key": "k", "model": "m",
            "input_tokens": 3, "output_tokens": 4, "cost_micros": 9, "attributes": {"b": "2", "a": "1"}
        }))
        .unwrap();
        let again = parse_event(&e.to_canonical_json()).unwrap();
        assert_eq!(again, e);
        assert_eq!(again.fingerprint(), e.fingerprint());
        let mut other = e.clone();
        other.output_tokens += 1;
        assert_ne!(other.fingerprint(), e.fingerprint());
    }

    #[test]
    fn cloudevent_dedupe_key_uses_source_and_id() {
        let ce = |source: &str| {
            json!({"specversion": "1.0", "id": "1", "source": source, "type": "usage", "subject": "a",
                   "time": "2026-11-22T10:00:00Z", "data": {"input_tokens": 7}})
        };
        let a = parse(ce("gw-a")).unwrap();
        let b = parse(ce("gw-b")).unwrap();
        assert_ne!(a.id, b.id);
        assert_eq!(a.input_tokens, 7);
        let bad = parse(json!({"specversion": "1.0", "id": "1", "source": "s", "type": "t", "subject": "a",
                               "time": "2026-11-22T10:00:00Z", "data": {"tokens": 1}}))
        .unwrap_err();
        assert_eq!(bad.field, "data.tokens");
    }

    #[test]
    fn a_cloudevent_whose_dedupe_key_outgrows_the_id_limit_is_refused_naming_id() {
        let ce = |id: String| json!({"specversion": "1.0", "id": id, "source": "gw", "type": "usage", "subject": "a", "time": "2026-11-22T10:00:00Z"});
        // "ce:2:gw:" takes 8 characters of the 128.
        let fits = parse(ce("x".repeat(MAX_ID_CHARS - 8))).unwrap();
        assert_eq!(fits.id.chars().count(), MAX_ID_CHARS);
        assert_eq!(parse_event(&fits.to_canonical_json()), Ok(fits));
        let e = parse(ce("x".repeat(MAX_ID_CHARS - 7))).unwrap_err();
        assert_eq!(e.field, "id");
        assert!(e.message.contains("129 characters"), "{e}");
    }

    fn cloudevent(extra: Value) -> Value {
        let mut ce = json!({"specversion": "1.0", "id": "1", "source": "gw", "type": "usage", "subject": "a",
                            "time": "2026-11-22T10:00:00Z", "data": {"input_tokens": 7, "attributes": {"route": "chat"}}});
        for (k, v) in extra.as_object().unwrap() {
            if v.is_null() {
                ce.as_object_mut().unwrap().remove(k);
            } else {
                ce[k] = v.clone();
            }
        }
        ce
    }

    #[test]
    fn cloudevent_extensions_are_kept_in_attributes_and_survive_the_canonical_form() {
        let trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let e = parse(cloudevent(json!({"traceparent": trace, "tracestate": "ro=1", "partitionkey": "a", "sampled": true,
                                        "priority": 3, "comexampleext1": "v", "dataref": null})))
        .unwrap();
        let expected: BTreeMap<String, String> = [
            ("ce.comexampleext1", "v"),
            ("ce.partitionkey", "a"),
            ("ce.priority", "3"),
            ("ce.sampled", "true"),
            ("ce.traceparent", trace),
            ("ce.tracestate", "ro=1"),
            ("route", "chat"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(e.attributes, expected);
        // The canonical form carries them, through the fast path and the general parser alike.
        let canonical = e.to_canonical_json();
        assert_eq!(parse_event_with_fingerprint(&canonical), Ok((e.clone(), e.fingerprint())));
        assert_eq!(parse_event(&canonical), Ok(e.clone()));
        // Another trace context is another payload: a resend must carry the same extensions.
        let other = parse(cloudevent(json!({"traceparent": trace.replace("01", "00"), "tracestate": "ro=1", "partitionkey": "a",
                                            "sampled": true, "priority": 3, "comexampleext1": "v"})))
        .unwrap();
        assert_eq!(other.id, e.id);
        assert_ne!(other.fingerprint(), e.fingerprint());
    }

    #[test]
    fn invalid_extension_names_and_values_are_refused_naming_the_field() {
        for name in ["traceParent", "trace-parent", "trace_parent", "averyveryverylongname1", "ünï", "x y"] {
            let e = parse(cloudevent(json!({ name: "v" }))).unwrap_err();
            assert_eq!(e.field, name);
            assert!(e.message.contains("extension attribute's name"), "{e}");
        }
        assert!(parse(cloudevent(json!({"abcdefghij0123456789": "v"}))).is_ok(), "20 characters is the limit");
        for value in [json!(1.5), json!({"a": 1}), json!(["x"])] {
            let e = parse(cloudevent(json!({ "ext": value }))).unwrap_err();
            assert_eq!(e.field, "ext", "{value}");
            assert!(e.message.contains("string, a boolean or an integer"), "{e}");
        }
        // An extension and a data attribute under the same key are one value given twice.
        let e = parse(cloudevent(json!({"ext": "v", "data": {"attributes": {"ce.ext": "w"}}}))).unwrap_err();
        assert_eq!(e.field, "data.attributes.ce.ext");
    }

    #[test]
    fn data_base64_is_the_data_object_encoded() {
        use base64::Engine;
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let plain = parse(cloudevent(json!({}))).unwrap();
        let encoded =
            parse(cloudevent(json!({"data": null, "data_base64": b64(r#"{"input_tokens": 7, "attributes": {"route": "chat"}}"#)})))
                .unwrap();
        assert_eq!(encoded, plain);
        let unpadded = b64(r#"{"input_tokens":7,"attributes":{"route":"chat"}}"#).trim_end_matches('=').to_string();
        assert_eq!(parse(cloudevent(json!({"data": null, "data_base64": unpadded}))).unwrap(), plain);
        let cases = [
            (json!({"data_base64": b64("{}")}), "data_base64", "not both"),
            (json!({"data": null, "data_base64": "not base64!"}), "data_base64", "not valid base64"),
            (json!({"data": null, "data_base64": b64("[1, 2]")}), "data_base64", "JSON object"),
            (json!({"data": null, "data_base64": b64("input_tokens=7")}), "data_base64", "JSON object"),
            (json!({"data": null, "data_base64": 7}), "data_base64", "base64 string"),
            (json!({"data": null, "data_base64": b64(r#"{"input_tokens": -1}"#)}), "data_base64.input_tokens", "non-negative"),
            (json!({"data": null, "data_base64": b64(r#"{"tokens": 1}"#)}), "data_base64.tokens", "unknown field"),
        ];
        for (extra, field, says) in cases {
            let e = parse(cloudevent(extra.clone())).unwrap_err();
            assert_eq!(e.field, field, "{extra}");
            assert!(e.message.contains(says), "{extra}: {e}");
        }
    }

    #[test]
    fn a_missing_time_says_tally_needs_the_event_time() {
        let plain = parse(json!({"id": "e", "subject": "a"})).unwrap_err();
        let ce = parse(cloudevent(json!({"time": null}))).unwrap_err();
        for e in [plain, ce] {
            assert_eq!(e.field, "time");
            assert!(e.message.contains("Tally meters by event time") && e.message.contains("RFC 3339"), "{e}");
        }
    }

    #[test]
    fn a_binary_mode_cloudevent_is_the_structured_one() {
        let structured = parse(cloudevent(json!({"traceparent": "00-abc-def-01", "datacontenttype": "application/json"}))).unwrap();
        let headers = [
            ("specversion", "1.0"),
            ("id", "1"),
            ("source", "gw"),
            ("type", "usage"),
            ("subject", "a"),
            ("time", "2026-11-22T10:00:00Z"),
            ("TraceParent", "00-abc-def-01"),
        ];
        let headers = || headers.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        let body = br#"{"input_tokens": 7, "attributes": {"route": "chat"}}"#;
        assert_eq!(event_from_value(cloudevent_from_binary(headers(), Some("application/json"), body)), Ok(structured));
        // No body is no data; a body that is not JSON is refused naming it, its bytes kept.
        let empty = event_from_value(cloudevent_from_binary(headers(), None, b" ")).unwrap();
        assert_eq!((empty.input_tokens, empty.requests), (0, 1));
        let envelope = cloudevent_from_binary(headers(), None, b"\xff tokens");
        assert!(envelope["data_base64"].is_string());
        assert_eq!(event_from_value(envelope).unwrap_err().field, "data_base64");
        let e = event_from_value(cloudevent_from_binary(headers().filter(|(k, _)| k != "time"), None, b"{}")).unwrap_err();
        assert_eq!(e.field, "time");
    }

    #[test]
    fn timeliness_bounds() {
        let now: DateTime<Utc> = "2026-11-22T12:00:00Z".parse().unwrap();
        let late = Duration::days(35);
        assert_eq!(timeliness(now + Duration::minutes(5), now, late), Timeliness::OnTime);
        assert_eq!(timeliness(now + Duration::minutes(5) + Duration::seconds(1), now, late), Timeliness::InFuture);
        assert_eq!(timeliness(now - late, now, late), Timeliness::OnTime);
        assert_eq!(timeliness(now - late - Duration::seconds(1), now, late), Timeliness::TooLate);
    }

    pub(crate) mod fast_path {
        use super::*;
        use proptest::prelude::*;

        /// What `parse_event` followed by `fingerprint` gives: the reference.
        fn reference(bytes: &[u8]) -> Result<(UsageEvent, String), EventError> {
            parse_event(bytes).map(|e| {
                let fp = e.fingerprint();
                (e, fp)
            })
        }

        /// Text with what JSON escapes (quotes, backslashes, control characters) and
        /// multi-byte characters, sometimes empty, sometimes over a length limit.
        fn text(max: usize) -> impl Strategy<Value = String> {
            proptest::collection::vec(
                prop_oneof![Just('a'), Just('"'), Just('\\'), Just('\n'), Just('\u{1}'), Just('é'), Just('😀'), Just('/')],
                0..max,
            )
            .prop_map(|cs| cs.into_iter().collect())
        }

        /// What the event strategies generate, field by field, in [`UsageEvent`]'s order:
        /// `(id, subject, seconds, nanoseconds, api_key_sha256, scope)`,
        /// `(model, requests, input, output, cached, cost)`, `(attributes, corrects, group)`.
        pub(crate) type EventParts = (
            (String, String, i64, u32, Option<String>, String),
            (Option<String>, i64, i64, i64, i64, Option<i64>),
            (BTreeMap<String, String>, Option<String>, Option<String>),
        );

        /// The event of generated parts (the time from seconds and nanoseconds).
        pub(crate) fn event_of_parts(
            ((id, subject, secs, nanos, key, scope), (model, requests, input, output, cached, cost), (attributes, corrects, group)): EventParts,
        ) -> UsageEvent {
            UsageEvent {
                id,
                subject,
                time: DateTime::from_timestamp(secs, nanos).unwrap(),
                api_key_sha256: key,
                scope,
                model,
                group,
                requests,
                input_tokens: input,
                output_tokens: output,
                cached_tokens: cached,
                cost_micros: cost,
                attributes,
                corrects,
            }
        }

        /// Events as serde would carry them: valid ones and ones each check must refuse
        /// (lengths over a limit, negative amounts, a bad hash, years RFC 3339 cannot write).
        fn any_event() -> impl Strategy<Value = UsageEvent> {
            let hex = prop_oneof![Just(None), Just(Some(hash_api_key("k"))), Just(Some("ABC".to_string()))];
            let count = prop_oneof![Just(0i64), Just(1), Just(300), Just(-1), Just(i64::MAX)];
            let name = prop_oneof![8 => text(4), 1 => Just("a".repeat(MAX_NAME_CHARS)), 1 => Just("é".repeat(MAX_NAME_CHARS + 1))];
            // Seconds from about year -250 to year 11 500.
            let secs = prop_oneof![8 => 0i64..4_000_000_000, 1 => -70_000_000_000i64..0, 1 => 250_000_000_000i64..300_000_000_000];
            (
                (text(130), name.clone(), secs, 0u32..1_000_000_000, hex, name.clone()),
                (
                    proptest::option::of(name.clone()),
                    count.clone(),
                    count.clone(),
                    count.clone(),
                    count.clone(),
                    proptest::option::of(count),
                ),
                (proptest::collection::btree_map(text(3), text(3), 0..2), proptest::option::of(text(3)), proptest::option::of(name)),
            )
                .prop_map(event_of_parts)
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(1000))]

            #[test]
            fn gives_what_parse_event_and_fingerprint_give(e in any_event()) {
                // The canonical bytes exercise the fast path (and its refusals); the same
                // event pretty-printed must take the fallback and still agree.
                let canonical = e.to_canonical_json();
                let pretty = serde_json::to_vec_pretty(&e).unwrap();
                for bytes in [&canonical, &pretty] {
                    prop_assert_eq!(parse_event_with_fingerprint(bytes), reference(bytes));
                }
                if let Ok((parsed, fp)) = reference(&canonical) {
                    // A valid event's canonical bytes parse back to it.
                    prop_assert_eq!(&parsed, &e);
                    prop_assert_eq!(fp, e.fingerprint());
                }
            }
        }

        #[test]
        fn raw_api_keys_cloudevents_and_bad_fields_are_parsed_as_before() {
            let inputs = [
                json!({"id": "e1", "subject": "a", "time": "2026-11-22T10:00:00Z", "api_key": "sk-1"}),
                json!({"specversion": "1.0", "id": "1", "source": "gw", "type": "usage", "subject": "a", "time": "2026-11-22T10:00:00Z"}),
                json!({"id": "e1", "subject": "a", "time": "2026-11-22T10:00:00Z", "requests": 1, "input_tokens": 1, "output_tokens": 0, "cached_tokens": 0, "scope": "", "extra": 1}),
                json!({"id": "e1", "subject": "a", "time": "2026-11-22T10:00:00Z", "requests": -1}),
            ];
            for input in inputs {
                let bytes = serde_json::to_vec(&input).unwrap();
                assert_eq!(parse_event_with_fingerprint(&bytes), reference(&bytes), "{input}");
            }
            // Canonical in shape, but refused by a check: the fast path must not take them.
            let valid = parse(json!({"id": "e1", "subject": "a", "time": "2026-11-22T10:00:00Z"})).unwrap();
            let corrects_itself = UsageEvent { corrects: Some("e1".into()), ..valid.clone() };
            let long_id = UsageEvent { id: "x".repeat(MAX_ID_CHARS + 1), ..valid.clone() };
            let bad_key = UsageEvent { api_key_sha256: Some("A".repeat(64)), ..valid };
            for (e, field) in [(corrects_itself, "corrects"), (long_id, "id"), (bad_key, "api_key_sha256")] {
                assert_eq!(parse_event_with_fingerprint(&e.to_canonical_json()).unwrap_err().field, field);
            }
            let bad = serde_json::to_vec(&inputs_with_unknown_field()).unwrap();
            assert_eq!(parse_event_with_fingerprint(&bad).unwrap_err().field, "extra");
        }

        fn inputs_with_unknown_field() -> Value {
            let mut e = serde_json::to_value(parse(json!({"id": "e1", "subject": "a", "time": "2026-11-22T10:00:00Z"})).unwrap()).unwrap();
            e["extra"] = json!(1);
            e
        }
    }
}
