//! `GET /openapi.json`: the OpenAPI 3 document of the API, written by hand next to the route
//! table. A test checks that every route of the router is in it and every path in it routes.

use axum::Json;
use serde_json::{json, Value};

/// Routes mounted from `crate::history` (its own router), as (method, path).
pub const HISTORY_ROUTES: &[(&str, &str)] =
    &[("GET", "/v1/history/series"), ("GET", "/v1/history/top"), ("GET", "/v1/subjects/{subject}/history"), ("GET", "/v1/reconcile")];

fn op(summary: &str, security: Option<&str>, params: &[&str], body: Option<&str>, responses: &[(&str, &str)]) -> Value {
    let mut o = json!({"summary": summary, "responses": {}});
    for (code, desc) in responses {
        o["responses"][*code] = json!({"description": desc, "content": {"application/json": {"schema": {"$ref": if code.starts_with('2') { "#/components/schemas/Any" } else { "#/components/schemas/Error" }}}}});
    }
    if let Some(role) = security {
        o["security"] = json!([{ role: [] }]);
        o["responses"]["401"] = json!({"description": "missing or wrong bearer token", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}});
    }
    let params: Vec<Value> = params
        .iter()
        .map(|p| match p.strip_prefix('?') {
            Some(q) => json!({"name": q, "in": "query", "required": false, "schema": {"type": "string"}}),
            None => json!({"name": p, "in": "path", "required": true, "schema": {"type": "string"}}),
        })
        .collect();
    if !params.is_empty() {
        o["parameters"] = Value::Array(params);
    }
    if let Some(schema) = body {
        o["requestBody"] =
            json!({"required": true, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}});
        let error =
            |desc: &str| json!({"description": desc, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}});
        if o["responses"].get("400").is_none() {
            o["responses"]["400"] = error("bad input");
        }
        o["responses"]["413"] = error("the body is over the limit (TALLY_API_MAX_BODY_BYTES), counted after decoding its Content-Encoding");
        o["responses"]["415"] = error("a Content-Type that is not JSON, or a Content-Encoding other than gzip, deflate, br or identity");
    }
    o
}

/// Gives an operation's 200 answer the schema `schema`.
fn with_answer(mut op: Value, schema: &str) -> Value {
    op["responses"]["200"]["content"]["application/json"]["schema"] = json!({"$ref": format!("#/components/schemas/{schema}")});
    op
}

/// Adds what every `/v1/` operation can answer: 503 when a dependency is down.
fn with_unavailable(mut doc: Value) -> Value {
    let answer = json!({"description": "a dependency (Postgres, ClickHouse or the broker) is unavailable",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}});
    for (path, ops) in doc["paths"].as_object_mut().into_iter().flatten() {
        if !path.starts_with("/v1/") {
            continue;
        }
        for op in ops.as_object_mut().into_iter().flat_map(|o| o.values_mut()) {
            op["responses"]["503"] = answer.clone();
        }
    }
    doc
}

/// The schemas of the check's answer (apart, to keep each `json!` within the macro's
/// recursion limit).
fn check_schemas() -> Value {
    json!({
        "BudgetOwner": {"type": "object", "required": ["kind", "name"], "properties": {
            "kind": {"type": "string", "enum": ["api_key", "group", "tier"]},
            "name": {"type": "string", "description": "a group's or a tier's name, or the SHA-256 hex of an API key"}}},
        "QuotaLine": {"type": "object", "properties": {
            "quota": {"type": "string"}, "metric": {"type": "string"}, "scope": {"type": "string", "nullable": true},
            "models": {"type": "array", "items": {"type": "string"}}, "used": {"type": "integer"}, "limit": {"type": "integer"},
            "remaining": {"type": "integer"}, "resets_at": {"type": "string", "format": "date-time"},
            "budget": {"allOf": [{"$ref": "#/components/schemas/BudgetOwner"}], "nullable": true,
                "description": "the budget the quota belongs to; null for the subject's own"}}},
        "CheckAnswer": {"type": "object", "description": "X-RateLimit-* and Retry-After describe `quota`; X-Tally-Budget names its budget (absent for the subject's own)", "properties": {
            "allowed": {"type": "boolean"}, "subject": {"type": "string"}, "tier": {"type": "string"},
            "action": {"type": "object", "nullable": true}, "model": {"type": "string"}, "reason": {"type": "string"},
            "quota": {"allOf": [{"$ref": "#/components/schemas/QuotaLine"}], "nullable": true,
                "description": "the deciding quota over the subject's and every budget's: the strictest against the request, else the smallest share left"},
            "retry_at": {"type": "string", "format": "date-time"}, "retry_after_seconds": {"type": "integer"},
            "version": {"type": "integer"}, "decision_age_ms": {"type": "integer", "nullable": true},
            "source": {"type": "string", "enum": ["view", "database", "policy"]},
            "budgets": {"type": "array", "description": "every budget the request meets, with what it alone says", "items": {"type": "object", "properties": {
                "kind": {"type": "string"}, "name": {"type": "string"}, "allowed": {"type": "boolean"},
                "action": {"type": "object", "nullable": true}, "reason": {"type": "string"},
                "quota": {"allOf": [{"$ref": "#/components/schemas/QuotaLine"}], "nullable": true},
                "version": {"type": "integer"}, "decision_age_ms": {"type": "integer", "nullable": true},
                "source": {"type": "string", "enum": ["view", "database", "policy"]}}}},
            "stale": {"type": "boolean"}, "staleness_ms": {"type": "integer", "nullable": true}, "stale_policy": {"type": "string"}}}
    })
}

/// The document. Besides each operation's statuses, every path answers an unlisted method
/// with 405 (and `Allow`), and an unknown path is a 404, both with the `Error` body.
pub fn document() -> Value {
    let read = Some("read");
    let admin = Some("admin");
    let page = ["?limit", "?cursor"];
    let ok = [("200", "ok")];
    let bad = [("200", "ok"), ("400", "bad input"), ("404", "not found"), ("409", "conflicts with the configuration")];
    let created = [("201", "created"), ("400", "bad input"), ("409", "conflicts with the configuration")];
    let mut doc = json!({
        "openapi": "3.0.3",
        "info": {"title": "Tally API", "version": env!("CARGO_PKG_VERSION"),
                 "description": "Quota checks, decisions, usage, history and the admin API of Tally. Every refusal is JSON {\"error\", \"field\"}: a body field that is wrong is named by its path (400); an unknown path is a 404 (field `path`), a method a path does not take a 405 (field `method`, with `Allow`). Request bodies may be sent with Content-Encoding gzip, deflate or br."},
        "components": {
            "securitySchemes": {
                "read": {"type": "http", "scheme": "bearer", "description": "the read token (or the admin token)"},
                "admin": {"type": "http", "scheme": "bearer", "description": "the admin token"}
            },
            "schemas": {
                "Any": {"type": "object"},
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"},
                    "field": {"type": "string", "description": "what was wrong: a body field by its path (`quotas[0].limit`), `body`, a parameter, a header (`authorization`, `content-type`, `content-encoding`), `path` or `method`"}}},
                "CheckRequest": {"type": "object", "additionalProperties": false, "properties": {
                    "subject": {"type": "string"}, "api_key": {"type": "string"}, "scope": {"type": "string"},
                    "model": {"type": "string", "description": "quotas narrowed to models apply only to a request naming one of them"},
                    "groups": {"type": "array", "maxItems": 64, "items": {"type": "string"},
                        "description": "groups the request is made for, beside the subject's configured ones; their budgets apply too. An unknown group is a 400 naming groups[i]"},
                    "estimated_tokens": {"type": "integer", "minimum": 0},
                    "estimated_cost_micros": {"type": "integer", "minimum": 0}}},
                "Tier": {"type": "object", "required": ["name"], "description": "a tier as in the YAML configuration (domain/src/config.rs)"},
                "Group": {"type": "object", "required": ["tier"], "properties": {"tier": {"type": "string"}}},
                "Assignment": {"type": "object", "required": ["tier"], "properties": {
                    "tier": {"type": "string"}, "expires_at": {"type": "string", "format": "date-time"}, "reason": {"type": "string"}}},
                "Override": {"type": "object", "required": ["subject", "reason", "created_by"], "properties": {
                    "subject": {"type": "string"}, "rate": {"type": "string", "example": "1000/h"}, "limit": {"type": "integer"},
                    "scope": {"type": "string"}, "quota": {"type": "string"}, "duration": {"type": "string", "example": "1h"},
                    "starts_at": {"type": "string", "format": "date-time"}, "expires_at": {"type": "string", "format": "date-time"},
                    "reason": {"type": "string"}, "created_by": {"type": "string"}}},
                "ApiKeyRequest": {"type": "object", "required": ["tier"], "properties": {
                    "tier": {"type": "string"}, "subject": {"type": "string"}, "label": {"type": "string"}}},
                "Budget": {"type": "object", "required": ["quotas"], "additionalProperties": false, "properties": {
                    "timezone": {"type": "string", "description": "IANA timezone of calendar periods (default: a tier pool's tier's, else the configuration's)"},
                    "quotas": {"type": "array", "minItems": 1, "items": {"type": "object", "required": ["name", "metric"],
                        "description": "a quota as in the YAML configuration (rate, or period and limit; scope, models, burst, thresholds, action, fallback_model); limits are taken as written"}}}}
            }
        },
        "paths": {
            "/healthz": {"get": op("liveness", None, &[], None, &ok)},
            "/readyz": {"get": op("readiness: Postgres, broker, Kafka clients connected, decision view caught up", None, &[], None, &[("200", "ready"), ("503", "not ready")])},
            "/metrics": {"get": op("Prometheus metrics", None, &[], None, &ok)},
            "/openapi.json": {"get": op("this document", None, &[], None, &ok)},
            "/v1/check": {"post": with_answer(op("may this subject make this request now? Every budget it meets must pass too (X-RateLimit-*, Retry-After, X-Tally-Budget headers)", read, &[], Some("CheckRequest"),
                &[("200", "the answer, allowed or not"), ("400", "bad input"), ("403", "unknown or revoked API key")]), "CheckAnswer")},
            "/v1/subjects/{subject}/decision": {"get": op("the latest decision snapshot (ETag / If-None-Match)", read, &["subject"], None,
                &[("200", "the snapshot"), ("304", "not modified"), ("404", "no decision yet")])},
            "/v1/subjects/{subject}/budgets": {"get": op("every budget the subject's requests meet by configuration (bound API keys', groups', its tier's pool), each with its decision or null", read, &["subject"], None, &ok)},
            "/v1/budgets/{kind}/{name}/decision": {"get": op("a budget's latest decision snapshot (ETag / If-None-Match); an API key's budget is named by the key's SHA-256 hex or its id", read, &["kind", "name"], None,
                &[("200", "the snapshot"), ("304", "not modified"), ("400", "bad kind or name"), ("404", "no decision yet")])},
            "/v1/subjects/{subject}/usage": {"get": op("ledger rows", read, &["subject", "?limit"], None, &[("200", "ok"), ("400", "bad input")])},
            "/v1/subjects/{subject}/history": {"get": op("usage history of one subject", read, &["subject", "?metric", "?from", "?to", "?granularity", "?tz", "?scope", "?model", "?api_key_sha256", "?budget", "?group_by", "?limit"], None, &[("200", "ok"), ("400", "bad input")])},
            "/v1/history/series": {"get": op("usage history series", read, &["?metric", "?from", "?to", "?granularity", "?tz", "?subject", "?scope", "?model", "?api_key_sha256", "?budget", "?group_by", "?limit"], None, &[("200", "ok"), ("400", "bad input")])},
            "/v1/history/top": {"get": op("top subjects", read, &["?metric", "?from", "?to", "?scope", "?model", "?api_key_sha256", "?budget", "?limit"], None, &[("200", "ok"), ("400", "bad input")])},
            "/v1/reconcile": {"get": op("ledger vs history for a month", read, &["?period", "?subject", "?budget"], None, &[("200", "zero drift"), ("400", "bad input"), ("409", "drift")])},
            "/v1/admin/config": {"get": op("the configuration document in force", admin, &[], None, &ok)},
            "/v1/admin/tiers": {
                "get": op("list tiers", admin, &page, None, &bad),
                "post": op("create a tier", admin, &[], Some("Tier"), &created)},
            "/v1/admin/tiers/{name}": {
                "get": op("one tier", admin, &["name"], None, &bad),
                "put": op("create or replace a tier", admin, &["name"], Some("Tier"), &bad),
                "delete": op("delete a tier", admin, &["name"], None, &bad)},
            "/v1/admin/groups": {"get": op("list groups and their tiers", admin, &page, None, &bad)},
            "/v1/admin/groups/{group}": {
                "get": op("one group", admin, &["group"], None, &bad),
                "put": op("map a group to a tier", admin, &["group"], Some("Group"), &bad),
                "delete": op("delete a group and its memberships", admin, &["group"], None, &bad)},
            "/v1/admin/groups/{group}/members": {"get": op("members of a group", admin, &["group", "?limit", "?cursor"], None, &bad)},
            "/v1/admin/groups/{group}/members/{subject}": {
                "put": op("add a subject to a group", admin, &["group", "subject"], None, &bad),
                "delete": op("remove a subject from a group", admin, &["group", "subject"], None, &bad)},
            "/v1/admin/assignments": {"get": op("list tier assignments", admin, &page, None, &bad)},
            "/v1/admin/assignments/{subject}": {
                "get": op("one subject's assignment", admin, &["subject"], None, &bad),
                "put": op("assign a tier to a subject, optionally until expires_at", admin, &["subject"], Some("Assignment"), &bad),
                "delete": op("remove an assignment", admin, &["subject"], None, &bad)},
            "/v1/admin/overrides": {
                "get": op("list overrides", admin, &["?limit", "?cursor", "?subject"], None, &bad),
                "post": op("create a temporary override", admin, &[], Some("Override"), &created)},
            "/v1/admin/overrides/{id}": {
                "get": op("one override", admin, &["id"], None, &bad),
                "delete": op("delete an override", admin, &["id"], None, &bad)},
            "/v1/admin/api-keys": {
                "get": op("list API keys (never the keys themselves)", admin, &page, None, &bad),
                "post": op("create an API key; the key is in this answer only", admin, &[], Some("ApiKeyRequest"), &created)},
            "/v1/admin/api-keys/{id}": {
                "get": op("one API key", admin, &["id"], None, &bad),
                "delete": op("revoke an API key", admin, &["id"], None, &bad)},
            "/v1/admin/budgets": {"get": op("list budgets (API keys', groups', tier pools')", admin, &page, None, &bad)},
            "/v1/admin/budgets/{kind}/{name}": {
                "get": op("one budget; kind is api_key, group or tier, an API key's name its SHA-256 hex or its id", admin, &["kind", "name"], None, &bad),
                "put": op("create or replace a budget", admin, &["kind", "name"], Some("Budget"), &bad),
                "delete": op("delete a budget", admin, &["kind", "name"], None, &bad)}
        }
    });
    for (name, schema) in check_schemas().as_object().into_iter().flatten() {
        doc["components"]["schemas"][name] = schema.clone();
    }
    with_unavailable(doc)
}

pub async fn serve() -> Json<Value> {
    Json(document())
}
