//! Protocol edges, black-box: CloudEvents in structured and binary mode over HTTP and Kafka,
//! with extensions and `data_base64`, compressed bodies, and refusals that are JSON naming
//! the field, through the real `tally` binaries.

use crate::support;

use std::io::Write;
use std::time::Duration;

use chrono::Utc;
use rdkafka::message::{Header, OwnedHeaders};
use serde_json::{json, Value};
use support::{wait_for, Tally};

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

async fn answer(r: reqwest::RequestBuilder) -> (u16, reqwest::header::HeaderMap, Value) {
    let r = r.send().await.expect("request");
    let (status, headers) = (r.status().as_u16(), r.headers().clone());
    (status, headers, r.json().await.unwrap_or(Value::Null))
}

/// Produces a binary mode CloudEvent to the usage topic: `ce_` headers, the data as the value.
async fn produce_binary(t: &Tally, subject: &str, attributes: &[(&str, &str)], value: &[u8]) {
    let headers = attributes
        .iter()
        .fold(OwnedHeaders::new(), |h, (key, value)| h.insert(Header { key: &format!("ce_{key}"), value: Some(value.as_bytes()) }))
        .insert(Header { key: "content-type", value: Some("application/json") });
    let record = rdkafka::producer::FutureRecord::to(&t.usage_topic).key(subject).payload(value).headers(headers);
    t.producer().send(record, Duration::from_secs(30)).await.expect("produce");
}

#[tokio::test(flavor = "multi_thread")]
async fn cloudevents_in_every_mode_are_counted_and_keep_their_extensions() {
    let t = Tally::start(None).await;
    let http = reqwest::Client::new();
    let events = format!("{}/v1/events", t.ingest_url);
    let now = Utc::now().to_rfc3339();
    let subject = "cloud";

    // Structured, as application/cloudevents+json, with extensions and data_base64.
    use base64::Engine;
    let data = base64::engine::general_purpose::STANDARD.encode(r#"{"input_tokens": 1}"#);
    let structured = json!({"specversion": "1.0", "id": "s1", "source": "gw", "type": "usage", "subject": subject, "time": now,
                            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "sampled": true,
                            "data_base64": data});
    let req = http.post(&events).header("content-type", "application/cloudevents+json").body(structured.to_string());
    let (s, _, a) = answer(req).await;
    assert_eq!((s, a["accepted"].as_i64()), (202, Some(1)), "{a}");

    // Binary over HTTP, its body gzip-compressed.
    let req = http
        .post(&events)
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .header("ce-specversion", "1.0")
        .header("ce-id", "b1")
        .header("ce-source", "gw")
        .header("ce-type", "usage")
        .header("ce-subject", subject)
        .header("ce-time", &now)
        .header("ce-partitionkey", subject)
        .body(gzip(br#"{"input_tokens": 10}"#));
    let (s, _, a) = answer(req).await;
    assert_eq!((s, a["accepted"].as_i64()), (202, Some(1)), "{a}");

    // Binary over Kafka, straight to the usage topic; and one without its time.
    let attributes =
        [("specversion", "1.0"), ("id", "k1"), ("source", "gw"), ("type", "usage"), ("subject", subject), ("time", now.as_str())];
    produce_binary(&t, subject, &attributes, br#"{"input_tokens": 100}"#).await;
    produce_binary(&t, subject, &attributes[..5], br#"{"input_tokens": 1000}"#).await;

    let counted = wait_for(Duration::from_secs(30), || async { t.used(subject, "total_tokens").await == 111 }).await;
    assert!(counted, "used {}; logs in {}", t.used(subject, "total_tokens").await, t.log_dir().display());
    let quarantined = t.read_topic(&t.topic("quarantine")).await;
    assert_eq!(quarantined.len(), 1, "{quarantined:?}");
    let q = &quarantined[0].1;
    let reason = q["reason"].as_str().unwrap();
    assert!(reason.contains("`time`") && reason.contains("Tally meters by event time"), "{q}");
    let original: Value = serde_json::from_str(q["original"].as_str().unwrap()).unwrap();
    assert_eq!((original["id"].as_str(), original["data"]["input_tokens"].as_i64()), (Some("k1"), Some(1000)), "{q}");

    // The extensions were kept: they are in the events the aggregator recorded.
    let pool = t.pg().await;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM processed_events").fetch_one(&pool).await.unwrap();
    assert_eq!(rows, 3);
    let usage = t.read_topic(&t.usage_topic).await;
    let kept: Vec<&Value> = usage.iter().map(|(_, v)| v).filter(|v| v["attributes"].is_object()).collect();
    assert_eq!(kept.len(), 2, "{usage:?}");
    assert_eq!(kept[0]["attributes"]["ce.traceparent"], "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
    assert_eq!(kept[0]["attributes"]["ce.sampled"], "true");
    assert_eq!(kept[1]["attributes"]["ce.partitionkey"], subject);
}

#[tokio::test(flavor = "multi_thread")]
async fn ingest_and_api_refuse_in_json_naming_what_was_wrong() {
    let t = Tally::start(None).await;
    let http = reqwest::Client::new();
    let events = format!("{}/v1/events", t.ingest_url);
    let check = format!("{}/v1/check", t.api_url);
    let event = json!({"id": "e1", "subject": "s", "time": Utc::now().to_rfc3339()});
    // 8 kB of gzip that inflate to 9 MB, past ingest's 8 MiB limit.
    let bomb = gzip(format!("[{}]", " ".repeat(9 << 20)).as_bytes());
    assert!(bomb.len() < 16 << 10, "{}", bomb.len());
    let cases = [
        (http.post(&events).header("content-encoding", "gzip").body(bomb.clone()), 413, "body"),
        (http.post(&check).header("content-encoding", "gzip").body(gzip(&vec![b' '; 100_000])), 413, "body"),
        (http.post(&events).header("content-encoding", "zstd").body(event.to_string()), 415, "content-encoding"),
        (http.post(&check).header("content-encoding", "compress").body("{}"), 415, "content-encoding"),
        (http.post(&events).header("content-type", "text/plain").body(event.to_string()), 415, "content-type"),
        (http.post(&events).body(r#"{"id": "e1", "subject": "s"}"#), 400, "time"),
        (http.post(&events).body(r#"{"id": "e1", "subject": "s", "time": "2026-11-22T10:00:00Z", "colour": 1}"#), 400, "colour"),
        (http.post(&check).body(r#"{"subject": 5}"#), 400, "subject"),
        (http.post(&check).body("{nope"), 400, "body"),
        (http.post(&events).body("[]"), 400, "body"),
        (http.get(format!("{}/v1/nope", t.ingest_url)), 404, "path"),
        (http.get(format!("{}/v1/nope", t.api_url)), 404, "path"),
        (http.get(format!("{}/nope", t.aggregator_url)), 404, "path"),
        (http.get(&events), 405, "method"),
        (http.get(&check), 405, "method"),
    ];
    for (req, status, field) in cases {
        let (s, headers, err) = answer(req).await;
        assert_eq!((s, err["field"].as_str()), (status, Some(field)), "{err}");
        assert!(err["error"].is_string(), "{err}");
        if s == 405 {
            assert_eq!(headers["allow"], "POST");
        }
        if s == 415 && field == "content-encoding" {
            assert_eq!(headers["accept-encoding"], "gzip, deflate, br");
        }
    }
    // Compressed and plain bodies are the same request.
    let (s, _, a) = answer(http.post(&events).header("content-encoding", "gzip").body(gzip(event.to_string().as_bytes()))).await;
    assert_eq!((s, a["accepted"].as_i64()), (202, Some(1)), "{a}");
    let (s, _, a) = answer(http.post(&check).header("content-encoding", "gzip").body(gzip(br#"{"subject": "s"}"#))).await;
    assert_eq!((s, a["subject"].as_str()), (200, Some("s")), "{a}");
}
