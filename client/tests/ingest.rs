//! The ingest client against a stand-in ingest on loopback: retries keep the event ids, and
//! client errors are not retried.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use chrono::Utc;
use serde_json::Value;
use tally_client::{Error, IngestClient, Retry, Usage};

/// A stand-in ingest that fails the first `failures` requests with `status`; returns its
/// URL and the bodies it received.
async fn stand_in(failures: usize, status: StatusCode) -> (String, Arc<Mutex<Vec<Value>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let app = Router::new().route(
        "/v1/events",
        post(move |Json(body): Json<Value>| {
            let s = s.clone();
            async move {
                let mut seen = s.lock().unwrap();
                seen.push(body.clone());
                if seen.len() <= failures {
                    (status, Json(serde_json::json!({"error": "try again"})))
                } else {
                    (StatusCode::ACCEPTED, Json(serde_json::json!({"accepted": body.as_array().map(Vec::len).unwrap_or(1)})))
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, seen)
}

fn fast() -> Retry {
    Retry { attempts: 5, first_backoff: Duration::from_millis(5), max_backoff: Duration::from_millis(20) }
}

#[tokio::test]
async fn retries_resend_the_same_ids() {
    let (url, seen) = stand_in(2, StatusCode::SERVICE_UNAVAILABLE).await;
    let client = IngestClient::new(&url).with_retry(fast());
    let mut e = Usage::new("evt-1", "alice", Utc::now());
    e.input_tokens = Some(10);
    let accepted = client.send(&[e.clone(), Usage::new("evt-2", "alice", Utc::now())]).await.unwrap();
    assert_eq!(accepted, 2);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 3, "two failures, then success");
    for body in seen.iter() {
        let ids: Vec<&str> = body.as_array().unwrap().iter().map(|e| e["id"].as_str().unwrap()).collect();
        assert_eq!(ids, ["evt-1", "evt-2"]);
    }
}

#[tokio::test]
async fn client_errors_are_not_retried_and_invalid_events_are_not_sent() {
    let (url, seen) = stand_in(10, StatusCode::BAD_REQUEST).await;
    let client = IngestClient::new(&url).with_retry(fast());
    let err = client.send(&[Usage::new("evt-1", "alice", Utc::now())]).await.unwrap_err();
    assert!(matches!(err, Error::Status { status: 400, .. }), "{err}");
    assert!(!err.retryable());
    assert_eq!(seen.lock().unwrap().len(), 1);
    let mut bad = Usage::new("evt-2", "alice", Utc::now());
    bad.input_tokens = Some(-5);
    let err = client.send(&[bad]).await.unwrap_err();
    assert!(matches!(&err, Error::Invalid { field, .. } if field == "input_tokens"), "{err}");
    assert_eq!(seen.lock().unwrap().len(), 1, "nothing sent");
}

#[tokio::test]
async fn gives_up_after_the_configured_attempts() {
    let (url, seen) = stand_in(100, StatusCode::SERVICE_UNAVAILABLE).await;
    let client = IngestClient::new(&url).with_retry(fast());
    let err = client.send(&[Usage::new("evt-1", "alice", Utc::now())]).await.unwrap_err();
    assert!(err.retryable());
    assert_eq!(seen.lock().unwrap().len(), 5);
}
