//! Who may call a route: the roles, the bearer tokens and the auth layer.
//!
//! Contract: `public` routes (`/healthz`, `/readyz`, `/metrics`, `/openapi.json`) need no
//! token. `read` routes (check, decision, usage, history) need the read or the admin token
//! when a read token is configured, and are open otherwise. `admin` routes need the admin
//! token, and are refused (401, `field: "authorization"`, `WWW-Authenticate: Bearer`) when
//! none is configured. `--no-auth` opens everything (local development only; logged loudly
//! at start). Tokens are compared in constant time and never logged. A refused request
//! reaches no handler, so it changes nothing.

use std::sync::Arc;

use axum::extract::Request;
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use tally_common::auth::{authorized, Token};
use tally_common::metrics::Counter;

use crate::error::AppError;

/// Bearer tokens of the API (the ingest token is the ingest service's).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AuthSettings {
    /// Token for the admin API (`/v1/admin/...`); also accepted on read routes. Without
    /// it the admin API refuses every request.
    #[arg(long = "admin-token", env = "TALLY_ADMIN_TOKEN", hide_env_values = true)]
    pub admin: Option<Token>,
    /// Token for read routes (check, decision, usage, history). Without it they are open.
    #[arg(long = "read-token", env = "TALLY_READ_TOKEN", hide_env_values = true)]
    pub read: Option<Token>,
    /// Serve every route without tokens, the admin API included. Local development only.
    #[arg(long = "no-auth", env = "TALLY_API_NO_AUTH")]
    pub no_auth: bool,
}

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Public,
    Read,
    Admin,
}

/// The auth layer's state.
pub struct Auth {
    pub settings: AuthSettings,
    pub rejected: Counter,
}

impl Auth {
    pub fn allows(&self, role: Role, header: Option<&str>) -> bool {
        let s = &self.settings;
        if s.no_auth {
            return true;
        }
        let admin = s.admin.iter();
        match role {
            Role::Public => true,
            Role::Read => match &s.read {
                None => true,
                Some(read) => authorized(header, admin.chain(std::iter::once(read))),
            },
            Role::Admin => authorized(header, admin),
        }
    }

    /// Says at start what is open, without printing any token.
    pub fn log_posture(&self) {
        let s = &self.settings;
        if s.no_auth {
            tracing::warn!("AUTH DISABLED (--no-auth): every route, the admin API included, is open to anyone who can reach this address");
            return;
        }
        if s.admin.is_none() {
            tracing::warn!("no admin token configured (TALLY_ADMIN_TOKEN): the admin API refuses every request");
        }
        if s.read.is_none() {
            tracing::warn!("no read token configured (TALLY_READ_TOKEN): check, decision, usage and history are open to anyone who can reach this address");
        }
    }
}

/// The auth middleware for one role.
pub async fn require(role: Role, auth: Arc<Auth>, req: Request, next: Next) -> Response {
    let header = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    if auth.allows(role, header) {
        next.run(req).await
    } else {
        auth.rejected.inc();
        AppError::unauthorized().into_response()
    }
}

/// Applies the auth layer of `role` to `router`.
pub fn guard<S: Clone + Send + Sync + 'static>(router: Router<S>, role: Role, auth: &Arc<Auth>) -> Router<S> {
    let auth = auth.clone();
    router.route_layer(axum::middleware::from_fn(move |req: Request, next: Next| require(role, auth.clone(), req, next)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_common::metrics::Registry;

    #[test]
    fn roles_and_tokens() {
        let admin = Token::new("admin-token-0123456789");
        let read = Token::new("read-token-0123456789");
        let auth = |settings| Auth { settings, rejected: Registry::default().counter("x", "x", &[]) };
        let open = auth(AuthSettings::default());
        assert!(open.allows(Role::Read, None));
        assert!(!open.allows(Role::Admin, None), "no admin token configured: the admin API is closed");
        let both = auth(AuthSettings { admin: Some(admin), read: Some(read), no_auth: false });
        assert!(!both.allows(Role::Read, None));
        assert!(both.allows(Role::Read, Some("Bearer read-token-0123456789")));
        assert!(both.allows(Role::Read, Some("Bearer admin-token-0123456789")));
        assert!(!both.allows(Role::Admin, Some("Bearer read-token-0123456789")));
        assert!(both.allows(Role::Admin, Some("Bearer admin-token-0123456789")));
        assert!(both.allows(Role::Public, None));
        let dev = auth(AuthSettings { no_auth: true, ..AuthSettings::default() });
        assert!(dev.allows(Role::Admin, None));
    }
}
