//! The HTTP edges ingest and the API share, so that both answer alike.
//!
//! - JSON request bodies ([`JsonBody`], or [`json_content_type`], [`read_body`] and
//!   [`parse_json`] one by one): a body without a `Content-Type` is read as JSON; a type other
//!   than `application/json` or `application/<anything>+json` is a 415 naming `content-type`.
//!   Undecodable JSON, a wrong type, a missing or an unknown field are a 400 naming the field
//!   by its path (`subject`, `quotas[0].limit`; `body` when the JSON itself is broken). A body
//!   over the service's limit is a 413.
//! - Compressed request bodies ([`decoding`]): `Content-Encoding: gzip` (or `x-gzip`),
//!   `deflate` (zlib) and `br` are decoded before anything reads the body, so the body limit
//!   counts decoded bytes: a small body that inflates past it is a 413, read only up to the
//!   limit, never held whole. `identity` is no encoding; any other on a request with a body
//!   is a 415 naming `content-encoding`, with `Accept-Encoding` listing what is decoded.
//! - Unknown routes (404, `field: "path"`) and wrong methods (405, `field: "method"`, with the
//!   `Allow` header) answer JSON too ([`json_fallbacks`]).
//!
//! Every refusal is a [`Refusal`]: `{"error", "field"}`.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::Serialize;

/// The content codings [`decoding`] decodes, as `Accept-Encoding` lists them.
pub const ENCODINGS: &str = "gzip, deflate, br";

/// A refused request: its status and the JSON body `{"error", "field"}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub error: String,
    pub field: Option<String>,
}

/// The JSON body of every refusal Tally's HTTP services answer: what was wrong, and the
/// field it was wrong in.
#[derive(Serialize)]
pub struct ErrorBody<'a> {
    pub error: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<&'a str>,
}

impl Refusal {
    pub fn new(status: StatusCode, error: impl Into<String>, field: &str) -> Refusal {
        Refusal { status, error: error.into(), field: Some(field.to_string()) }
    }

    /// 400 naming the field.
    pub fn bad(field: &str, error: impl Into<String>) -> Refusal {
        Refusal::new(StatusCode::BAD_REQUEST, error, field)
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(ErrorBody { error: &self.error, field: self.field.as_deref() })).into_response();
        if self.field.as_deref() == Some("content-encoding") {
            r.headers_mut().insert(header::ACCEPT_ENCODING, HeaderValue::from_static(ENCODINGS));
        }
        r
    }
}

/// Whether a media type (without parameters, lowercase) is JSON.
pub fn is_json(mime: &str) -> bool {
    mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
}

/// The media type of `Content-Type`, lowercase and without parameters; `None` without one.
pub fn media_type(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::CONTENT_TYPE)?;
    let text = String::from_utf8_lossy(value.as_bytes());
    let mime = text.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    (!mime.is_empty()).then_some(mime)
}

/// Refuses (415) a `Content-Type` that is not JSON; no `Content-Type` passes.
pub fn json_content_type(headers: &HeaderMap) -> Result<(), Refusal> {
    match media_type(headers) {
        Some(mime) if !is_json(&mime) => Err(Refusal::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("the body must be JSON (Content-Type: application/json), not {mime}"),
            "content-type",
        )),
        _ => Ok(()),
    }
}

/// The whole body, decoded ([`decoding`]) and within the service's limit
/// (`axum::extract::DefaultBodyLimit`).
pub async fn read_body(req: Request) -> Result<Bytes, Refusal> {
    Bytes::from_request(req, &()).await.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            let error = "the request body is over this service's size limit (counted after decoding its Content-Encoding)";
            Refusal::new(StatusCode::PAYLOAD_TOO_LARGE, error, "body")
        } else {
            Refusal::bad("body", format!("the request body could not be read or decoded: {}", rejection.body_text()))
        }
    })
}

/// Deserializes a JSON body, naming the field of the first error by its path.
pub fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, Refusal> {
    // Tracking the path costs on every value, and only an error needs it: a body that does
    // not deserialize is read again to locate the error.
    serde_json::from_slice(bytes).map_err(|plain| located::<T>(bytes, plain))
}

/// Deserializes JSON a handler already holds (a body it read as a value and completed),
/// naming the field of the first error by its path as [`parse_json`] does.
pub fn from_json_value<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> Result<T, Refusal> {
    serde_path_to_error::deserialize(value).map_err(json_refusal)
}

fn located<T: serde::de::DeserializeOwned>(bytes: &[u8], plain: serde_json::Error) -> Refusal {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    match serde_path_to_error::deserialize::<_, T>(&mut de) {
        Err(e) => json_refusal(e),
        Ok(_) => Refusal::bad("body", format!("invalid JSON: {}", de.end().err().unwrap_or(plain))),
    }
}

fn json_refusal(e: serde_path_to_error::Error<serde_json::Error>) -> Refusal {
    // A key not read yet is `?`: the error is in the object around it.
    let path = e.path().to_string();
    let path = match path.trim_end_matches('?').trim_end_matches('.') {
        "" => ".".to_string(),
        known => known.to_string(),
    };
    let inner = e.into_inner();
    let message = inner.to_string();
    // serde names a missing field in backticks, at its parent's path (an unknown one is at
    // its own path already).
    let missing = message.strip_prefix("missing field `").and_then(|rest| rest.split('`').next());
    let field = match (missing, path.as_str()) {
        (Some(name), ".") => name.to_string(),
        (Some(name), parent) => format!("{parent}.{name}"),
        (None, ".") => "body".to_string(),
        (None, at) => at.to_string(),
    };
    let error = match inner.classify() {
        serde_json::error::Category::Data => message,
        _ => format!("invalid JSON: {message}"),
    };
    Refusal::bad(&field, error)
}

/// A JSON body extractor whose rejections are [`Refusal`]s (module docs).
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Refusal;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Refusal> {
        json_content_type(req.headers())?;
        let bytes = read_body(req).await?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// Decodes compressed request bodies (module docs). Apply it last, over every route and
/// fallback, so that it wraps them all.
pub fn decoding<S: Clone + Send + Sync + 'static>(router: Router<S>) -> Router<S> {
    let decompress = tower_http::decompression::RequestDecompressionLayer::new().gzip(true).deflate(true).br(true).no_zstd();
    router.layer(decompress).layer(axum::middleware::from_fn(known_encoding))
}

/// Answers 415 in JSON to a coding [`decoding`] does not decode (the decompression layer's own
/// 415 has no body), and writes the known ones as that layer reads them. A request without a
/// body has nothing to decode: its `Content-Encoding` is dropped.
async fn known_encoding(mut req: Request, next: Next) -> Response {
    if axum::body::HttpBody::is_end_stream(req.body()) {
        req.headers_mut().remove(header::CONTENT_ENCODING);
        return next.run(req).await;
    }
    let values: Vec<&HeaderValue> = req.headers().get_all(header::CONTENT_ENCODING).iter().collect();
    let coding = match values.as_slice() {
        [] => return next.run(req).await,
        [one] => String::from_utf8_lossy(one.as_bytes()).trim().to_ascii_lowercase(),
        _ => String::from("several codings"),
    };
    let known = match coding.as_str() {
        "gzip" | "x-gzip" => "gzip",
        "deflate" => "deflate",
        "br" => "br",
        "identity" | "" => "identity",
        _ => {
            let error = format!("Content-Encoding {coding:?} is not supported; send the body as is, or encoded with one of {ENCODINGS}");
            return Refusal::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, error, "content-encoding").into_response();
        }
    };
    req.headers_mut().insert(header::CONTENT_ENCODING, HeaderValue::from_static(known));
    next.run(req).await
}

/// JSON answers for unknown routes and wrong methods (module docs). Apply it once every
/// route is in the router: a wrong method is answered for the routes there.
pub fn json_fallbacks<S: Clone + Send + Sync + 'static>(router: Router<S>) -> Router<S> {
    router.fallback(not_found).method_not_allowed_fallback(method_not_allowed)
}

async fn not_found(method: Method, uri: Uri) -> Refusal {
    Refusal::new(StatusCode::NOT_FOUND, format!("no route for {method} {}", uri.path()), "path")
}

async fn method_not_allowed(method: Method, uri: Uri) -> Refusal {
    let error = format!("{method} is not allowed on {}; the Allow header lists the methods that are", uri.path());
    Refusal::new(StatusCode::METHOD_NOT_ALLOWED, error, "method")
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body as HttpBody;
    use axum::extract::DefaultBodyLimit;
    use axum::routing::{get, post};
    use serde_json::{json, Value};
    use std::io::Write;
    use tower::ServiceExt;

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Item {
        name: String,
        limits: Option<Vec<Limit>>,
    }

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Limit {
        value: u32,
    }

    const LIMIT: usize = 10_000;

    fn app() -> Router {
        let router = Router::new()
            .route("/items", post(|JsonBody(item): JsonBody<Item>| async move { item.name }))
            .route("/echo", post(|req: Request| async move { read_body(req).await.map(|b| b.len().to_string()) }))
            .route("/health", get(|| async { "ok" }));
        decoding(json_fallbacks(router).layer(DefaultBodyLimit::max(LIMIT)))
    }

    async fn send(req: axum::http::request::Builder, body: impl Into<HttpBody>) -> (StatusCode, HeaderMap, Value) {
        let r = app().oneshot(req.body(body.into()).unwrap()).await.unwrap();
        let (status, headers) = (r.status(), r.headers().clone());
        let bytes = axum::body::to_bytes(r.into_body(), usize::MAX).await.unwrap();
        let v = serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
        (status, headers, v)
    }

    fn post_json(path: &str) -> axum::http::request::Builder {
        Request::post(path).header("content-type", "application/json")
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    fn deflate(bytes: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    fn brotli(bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        brotli::CompressorWriter::new(&mut out, 4096, 5, 22).write_all(bytes).unwrap();
        out
    }

    #[test]
    fn a_held_value_is_read_like_a_body() {
        let cases = [
            (json!({"name": "a", "colour": "red"}), "colour", "unknown field `colour`"),
            (json!({}), "name", "missing field `name`"),
            (json!({"name": "a", "limits": [{"value": 1}, {"value": "x"}]}), "limits[1].value", "invalid type"),
        ];
        for (value, field, says) in cases {
            let refusal = from_json_value::<Item>(value.clone()).unwrap_err();
            assert_eq!((refusal.status, refusal.field.as_deref()), (StatusCode::BAD_REQUEST, Some(field)), "{value}");
            assert!(refusal.error.starts_with(says) && !refusal.error.contains(" line "), "{value}: {}", refusal.error);
        }
        assert_eq!(from_json_value::<Item>(json!({"name": "a"})).unwrap().name, "a");
    }

    #[tokio::test]
    async fn json_errors_are_400_naming_the_field_by_its_path() {
        let cases = [
            (r#"{"name": "a", "colour": "red"}"#, "colour", "unknown field"),
            (r#"{}"#, "name", "missing field"),
            (r#"{"name": 5}"#, "name", "invalid type"),
            (r#"{"name": "a", "limits": [{"value": 1}, {"value": -1}]}"#, "limits[1].value", "invalid value"),
            (r#"{"name": "a", "limits": [{"value": 1, "extra": 2}]}"#, "limits[0].extra", "unknown field"),
            (r#"{"name": "a", "limits": [{}]}"#, "limits[0].value", "missing field"),
            (r#"{not json"#, "body", "invalid JSON"),
            (r#"{"name": "a"} trailing"#, "body", "invalid JSON"),
            (r#"{"name": "a", "limits": [{"value": 1}, {"value" 2}]}"#, "limits[1]", "invalid JSON"),
            (r#"{"name": "a", "limits": [{"value": 1}, {7: 2}]}"#, "limits[1]", "invalid JSON"),
            (r#"5"#, "body", "invalid type"),
            ("", "body", "invalid JSON"),
        ];
        for (body, field, says) in cases {
            let (status, _, err) = send(post_json("/items"), body).await;
            assert_eq!((status, err["field"].as_str()), (StatusCode::BAD_REQUEST, Some(field)), "{body}: {err}");
            assert!(err["error"].as_str().unwrap().contains(says), "{body}: {err}");
        }
    }

    #[tokio::test]
    async fn content_types() {
        for ct in [None, Some("application/json; charset=utf-8"), Some("application/cloudevents+json"), Some("Application/JSON")] {
            let mut req = Request::post("/items");
            if let Some(ct) = ct {
                req = req.header("content-type", ct);
            }
            let (status, _, body) = send(req, r#"{"name": "a"}"#).await;
            assert_eq!((status, body), (StatusCode::OK, json!("a")), "{ct:?}");
        }
        for ct in ["text/plain", "application/x-www-form-urlencoded"] {
            let (status, _, err) = send(Request::post("/items").header("content-type", ct), r#"{"name": "a"}"#).await;
            assert_eq!((status, err["field"].as_str()), (StatusCode::UNSUPPORTED_MEDIA_TYPE, Some("content-type")), "{ct}");
            assert!(err["error"].as_str().unwrap().contains(ct), "{err}");
        }
    }

    #[tokio::test]
    async fn compressed_bodies_are_decoded() {
        let body = br#"{"name": "zipped"}"#;
        for (coding, encoded) in [
            ("gzip", gzip(body)),
            ("x-gzip", gzip(body)),
            ("GZIP", gzip(body)),
            ("deflate", deflate(body)),
            ("br", brotli(body)),
            ("identity", body.to_vec()),
        ] {
            let (status, _, answer) = send(post_json("/items").header("content-encoding", coding), encoded).await;
            assert_eq!((status, answer), (StatusCode::OK, json!("zipped")), "{coding}");
        }
    }

    #[tokio::test]
    async fn the_body_limit_counts_decoded_bytes() {
        // 1 kB of gzip that inflates to 1 MB: refused once the limit is passed, as JSON.
        let bomb = gzip(&vec![b' '; 1_000_000]);
        assert!(bomb.len() < LIMIT / 2, "{}", bomb.len());
        for path in ["/items", "/echo"] {
            let (status, _, err) = send(post_json(path).header("content-encoding", "gzip"), bomb.clone()).await;
            assert_eq!((status, err["field"].as_str()), (StatusCode::PAYLOAD_TOO_LARGE, Some("body")), "{path}: {err}");
            assert!(err["error"].as_str().unwrap().contains("after decoding"), "{err}");
        }
        let (status, _, err) = send(post_json("/items"), format!(r#"{{"name": "{}"}}"#, "x".repeat(LIMIT))).await;
        assert_eq!((status, err["field"].as_str()), (StatusCode::PAYLOAD_TOO_LARGE, Some("body")));
        // Just under the limit once decoded passes.
        let (status, _, len) = send(post_json("/echo").header("content-encoding", "gzip"), gzip(&vec![b' '; LIMIT])).await;
        assert_eq!((status, len), (StatusCode::OK, json!(LIMIT)));
    }

    #[tokio::test]
    async fn unsupported_or_broken_encodings_are_refused_in_json() {
        for coding in ["zstd", "compress", "gzip, br", "bogus"] {
            let (status, headers, err) = send(post_json("/items").header("content-encoding", coding), "{}").await;
            assert_eq!((status, err["field"].as_str()), (StatusCode::UNSUPPORTED_MEDIA_TYPE, Some("content-encoding")), "{coding}");
            assert!(err["error"].as_str().unwrap().contains("Content-Encoding"), "{err}");
            assert_eq!(headers["accept-encoding"], ENCODINGS);
        }
        let two = post_json("/items").header("content-encoding", "gzip").header("content-encoding", "br");
        assert_eq!(send(two, "{}").await.0, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        // Without a body there is nothing to decode.
        let (status, _, body) = send(Request::get("/health").header("content-encoding", "zstd"), HttpBody::empty()).await;
        assert_eq!((status, body), (StatusCode::OK, json!("ok")));
        let (status, _, err) = send(post_json("/items").header("content-encoding", "gzip"), "not gzip at all").await;
        assert_eq!((status, err["field"].as_str()), (StatusCode::BAD_REQUEST, Some("body")), "{err}");
    }

    #[tokio::test]
    async fn unknown_routes_and_wrong_methods_answer_json() {
        let (status, _, err) = send(Request::get("/nope"), HttpBody::empty()).await;
        assert_eq!((status, err["field"].as_str()), (StatusCode::NOT_FOUND, Some("path")));
        assert_eq!(err["error"], "no route for GET /nope");
        let (status, headers, err) = send(Request::delete("/items"), HttpBody::empty()).await;
        assert_eq!((status, err["field"].as_str()), (StatusCode::METHOD_NOT_ALLOWED, Some("method")));
        assert_eq!(headers["allow"], "POST");
        assert!(err["error"].as_str().unwrap().starts_with("DELETE is not allowed on /items"), "{err}");
        let (status, headers, _) = send(Request::post("/health"), HttpBody::empty()).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(headers["allow"], "GET,HEAD");
    }
}
