//! The route table of the API service: every route once, with the role it needs
//! ([`crate::auth`]); the router, the auth layers and the OpenAPI test are built from it.
//! The handlers live in their area's module.

use std::sync::Arc;

use axum::routing::{delete, get, post, put, MethodRouter};
use axum::Router;

use crate::auth::{guard, Role};
use crate::state::AppState;
use crate::{admin, budgets, check, openapi, probes, subjects};

/// One route: method, path (axum syntax), role and handler.
pub struct RouteSpec {
    pub method: &'static str,
    pub path: &'static str,
    pub role: Role,
    pub handler: MethodRouter<Arc<AppState>>,
}

fn r(method: &'static str, path: &'static str, role: Role, handler: MethodRouter<Arc<AppState>>) -> RouteSpec {
    RouteSpec { method, path, role, handler }
}

/// Every route of the API but the history routes (mounted from [`crate::history`]).
pub fn routes() -> Vec<RouteSpec> {
    use admin as a;
    use Role::*;
    vec![
        r("GET", "/healthz", Public, get(probes::healthz)),
        r("GET", "/readyz", Public, get(probes::readyz)),
        r("GET", "/metrics", Public, get(probes::metrics)),
        r("GET", "/openapi.json", Public, get(openapi::serve)),
        r("POST", "/v1/check", Read, post(check::check)),
        r("GET", "/v1/subjects/{subject}/decision", Read, get(subjects::decision)),
        r("GET", "/v1/subjects/{subject}/usage", Read, get(subjects::usage)),
        r("GET", "/v1/subjects/{subject}/budgets", Read, get(budgets::subject_budgets)),
        r("GET", "/v1/budgets/{kind}/{name}/decision", Read, get(budgets::decision)),
        r("GET", "/v1/admin/config", Admin, get(a::config_show)),
        r("GET", "/v1/admin/tiers", Admin, get(a::tiers_list)),
        r("POST", "/v1/admin/tiers", Admin, post(a::tier_create)),
        r("GET", "/v1/admin/tiers/{name}", Admin, get(a::tier_get)),
        r("PUT", "/v1/admin/tiers/{name}", Admin, put(a::tier_put)),
        r("DELETE", "/v1/admin/tiers/{name}", Admin, delete(a::tier_delete)),
        r("GET", "/v1/admin/groups", Admin, get(a::groups_list)),
        r("GET", "/v1/admin/groups/{group}", Admin, get(a::group_get)),
        r("PUT", "/v1/admin/groups/{group}", Admin, put(a::group_put)),
        r("DELETE", "/v1/admin/groups/{group}", Admin, delete(a::group_delete)),
        r("GET", "/v1/admin/groups/{group}/members", Admin, get(a::members_list)),
        r("PUT", "/v1/admin/groups/{group}/members/{subject}", Admin, put(a::member_put)),
        r("DELETE", "/v1/admin/groups/{group}/members/{subject}", Admin, delete(a::member_delete)),
        r("GET", "/v1/admin/assignments", Admin, get(a::assignments_list)),
        r("GET", "/v1/admin/assignments/{subject}", Admin, get(a::assignment_get)),
        r("PUT", "/v1/admin/assignments/{subject}", Admin, put(a::assignment_put)),
        r("DELETE", "/v1/admin/assignments/{subject}", Admin, delete(a::assignment_delete)),
        r("GET", "/v1/admin/overrides", Admin, get(a::overrides_list)),
        r("POST", "/v1/admin/overrides", Admin, post(a::override_create)),
        r("GET", "/v1/admin/overrides/{id}", Admin, get(a::override_get)),
        r("DELETE", "/v1/admin/overrides/{id}", Admin, delete(a::override_delete)),
        r("GET", "/v1/admin/api-keys", Admin, get(a::keys_list)),
        r("POST", "/v1/admin/api-keys", Admin, post(a::key_create)),
        r("GET", "/v1/admin/api-keys/{id}", Admin, get(a::key_get)),
        r("DELETE", "/v1/admin/api-keys/{id}", Admin, delete(a::key_delete)),
        r("GET", "/v1/admin/budgets", Admin, get(a::budgets_list)),
        r("GET", "/v1/admin/budgets/{kind}/{name}", Admin, get(a::budget_get)),
        r("PUT", "/v1/admin/budgets/{kind}/{name}", Admin, put(a::budget_put)),
        r("DELETE", "/v1/admin/budgets/{kind}/{name}", Admin, delete(a::budget_delete)),
    ]
}

/// The router of [`routes`], each behind the auth layer of its role.
pub fn router(state: Arc<AppState>) -> Router {
    let auth = state.auth.clone();
    let mut out = Router::new();
    for role in [Role::Public, Role::Read, Role::Admin] {
        let mut part = Router::new();
        for spec in routes().into_iter().filter(|s| s.role == role) {
            part = part.route(spec.path, spec.handler);
        }
        out = out.merge(guard(part, role, &auth));
    }
    out.with_state(state)
}
