//! The API's one error type: a status and a JSON body `{"error", "field"}`.
//!
//! Internal failures (Postgres, the broker) answer with a generic message; their cause is
//! logged once, here, and never sent to the client.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use tally_common::http::ErrorBody;

#[derive(Debug)]
pub struct AppError {
    pub status: StatusCode,
    pub error: String,
    pub field: Option<String>,
}

impl AppError {
    pub fn new(status: StatusCode, error: impl Into<String>, field: Option<&str>) -> AppError {
        AppError { status, error: error.into(), field: field.map(str::to_string) }
    }

    /// 400 naming the field that was wrong.
    pub fn bad(field: &str, error: impl Into<String>) -> AppError {
        AppError::new(StatusCode::BAD_REQUEST, error, Some(field))
    }

    pub fn not_found(field: &str, error: impl Into<String>) -> AppError {
        AppError::new(StatusCode::NOT_FOUND, error, Some(field))
    }

    pub fn conflict(field: Option<&str>, error: impl Into<String>) -> AppError {
        AppError::new(StatusCode::CONFLICT, error, field)
    }

    pub fn unauthorized() -> AppError {
        AppError::new(StatusCode::UNAUTHORIZED, "a valid bearer token is required", Some("authorization"))
    }

    /// 503 with a generic message; `cause` is logged, never sent.
    pub fn unavailable(what: &str, cause: impl std::fmt::Display) -> AppError {
        tracing::error!(error = %cause, what, "dependency failed");
        AppError::new(StatusCode::SERVICE_UNAVAILABLE, format!("the {what} is unavailable"), None)
    }

    /// A Postgres failure.
    pub fn database(cause: impl std::fmt::Display) -> AppError {
        AppError::unavailable("database", cause)
    }
}

impl From<sqlx::Error> for AppError {
    fn from(e: sqlx::Error) -> AppError {
        AppError::database(e)
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(ErrorBody { error: &self.error, field: self.field.as_deref() })).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(axum::http::header::WWW_AUTHENTICATE, axum::http::HeaderValue::from_static("Bearer"));
        }
        r
    }
}

/// A JSON body extractor whose rejections are [`AppError`]s: 400 naming the field by its path
/// (undecodable JSON, a wrong type, a missing or unknown field), 413 over the body limit
/// (after decoding), 415 for a `Content-Type` that is not JSON (`tally_common::http`).
pub struct JsonBody<T>(pub T);

impl<S, T> axum::extract::FromRequest<S> for JsonBody<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = AppError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, AppError> {
        let tally_common::http::JsonBody(v) = tally_common::http::JsonBody::<T>::from_request(req, state).await?;
        Ok(JsonBody(v))
    }
}

impl From<tally_common::http::Refusal> for AppError {
    fn from(r: tally_common::http::Refusal) -> AppError {
        AppError { status: r.status, error: r.error, field: r.field }
    }
}
