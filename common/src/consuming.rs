//! Pieces every Tally consumer with its own stored offsets shares (the aggregator and the
//! history writer): librdkafka logs through tracing, the topic's partition count, manual
//! assignment at stored offsets, and cutting a batch by size or time.

use std::time::Duration;

use rdkafka::consumer::{Consumer, ConsumerContext, StreamConsumer};
use rdkafka::message::BorrowedMessage;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

/// A consumer context that forwards librdkafka's own log lines to tracing.
pub struct KafkaLog;

impl ClientContext for KafkaLog {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        use rdkafka::config::RDKafkaLogLevel as L;
        match level {
            L::Emerg | L::Alert | L::Critical | L::Error => tracing::error!(fac, "librdkafka: {log_message}"),
            L::Warning => tracing::warn!(fac, "librdkafka: {log_message}"),
            L::Notice | L::Info => tracing::info!(fac, "librdkafka: {log_message}"),
            L::Debug => tracing::debug!(fac, "librdkafka: {log_message}"),
        }
    }
}

impl ConsumerContext for KafkaLog {}

/// The topic's partition count from the broker (0 when it cannot be read yet).
pub fn partition_count<C: ConsumerContext + 'static>(consumer: &StreamConsumer<C>, topic: &str) -> i32 {
    let metadata = tokio::task::block_in_place(|| consumer.fetch_metadata(Some(topic), Duration::from_secs(5)));
    match metadata {
        Ok(m) => m.topics().first().map_or(0, |t| t.partitions().len() as i32),
        Err(e) => {
            tracing::warn!(topic, error = %e, "cannot read the topic's partitions yet");
            0
        }
    }
}

/// Points the consumer at exactly `partitions` of `topic`, each at its given next offset.
pub fn assign_at<C: ConsumerContext + 'static>(
    consumer: &StreamConsumer<C>,
    topic: &str,
    partitions: impl IntoIterator<Item = (i32, i64)>,
) {
    let mut tpl = TopicPartitionList::new();
    for (p, next) in partitions {
        let _ = tpl.add_partition_offset(topic, p, Offset::Offset(next));
    }
    if let Err(e) = consumer.assign(&tpl) {
        tracing::warn!(error = %e, "failed to assign partitions to the consumer");
    }
}

/// Waits up to `idle` for a first message (an empty batch when none came), then takes more
/// until `max` messages or `max_wait` after the first. Consumer errors are logged and waited
/// out; nothing is skipped (offsets are the caller's).
pub async fn collect_batch<C, T>(
    consumer: &StreamConsumer<C>,
    idle: Duration,
    max_wait: Duration,
    max: usize,
    convert: impl Fn(&BorrowedMessage<'_>) -> T,
) -> Vec<T>
where
    C: ConsumerContext + 'static,
{
    let mut batch = Vec::new();
    loop {
        match tokio::time::timeout(idle, consumer.recv()).await {
            Err(_) => return batch,
            Ok(Ok(m)) => {
                batch.push(convert(&m));
                break;
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "consumer error");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let deadline = tokio::time::Instant::now() + max_wait;
    while batch.len() < max {
        match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Ok(Ok(m)) => batch.push(convert(&m)),
            Ok(Err(e)) => tracing::warn!(error = %e, "consumer error"),
            Err(_) => break,
        }
    }
    batch
}

/// A usage message's payload as Tally parses it: the structured form of a CloudEvent sent
/// in binary content mode ([`binary_cloudevent`]), else the value as it is. The aggregator
/// and the history writer both read messages through it, so they see the same event.
pub fn payload(m: &BorrowedMessage<'_>) -> Option<Vec<u8>> {
    use rdkafka::Message;
    m.headers().and_then(|h| binary_cloudevent(h, m.payload())).or_else(|| m.payload().map(<[u8]>::to_vec))
}

/// The structured form (JSON bytes) of a CloudEvent sent in binary content mode, as the
/// Kafka binding writes it: `ce_specversion` and its other attributes in `ce_` headers, the
/// data's type in `content-type`, the data as the value. It is then parsed, deduplicated and
/// quarantined like any event (a quarantined one carries this form: the value is in its
/// `data`, or `data_base64` when it is not JSON). `None` for any other message, a structured
/// CloudEvent (`content-type: application/cloudevents...`) included.
pub fn binary_cloudevent(headers: &impl rdkafka::message::Headers, value: Option<&[u8]>) -> Option<Vec<u8>> {
    let mut attributes = Vec::new();
    let mut content_type = None;
    for header in headers.iter() {
        let text = String::from_utf8_lossy(header.value.unwrap_or_default()).into_owned();
        if let Some(name) = header.key.strip_prefix("ce_") {
            attributes.push((name.to_string(), text));
        } else if header.key.eq_ignore_ascii_case("content-type") {
            content_type = Some(text);
        }
    }
    let structured = content_type.as_deref().is_some_and(|t| t.trim().to_ascii_lowercase().starts_with("application/cloudevents"));
    if structured || !attributes.iter().any(|(name, _)| name == "specversion") {
        return None;
    }
    let envelope = tally_domain::event::cloudevent_from_binary(attributes, content_type.as_deref(), value.unwrap_or_default());
    Some(serde_json::to_vec(&envelope).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_binary_mode_cloudevent_is_read_as_its_structured_form() {
        use rdkafka::message::{Header, OwnedHeaders};
        let headers = |pairs: &[(&str, &str)]| {
            pairs.iter().fold(OwnedHeaders::new(), |h, (key, value)| h.insert(Header { key, value: Some(value.as_bytes()) }))
        };
        let ce = [
            ("ce_specversion", "1.0"),
            ("ce_id", "1"),
            ("ce_source", "gw"),
            ("ce_type", "usage"),
            ("ce_subject", "alice"),
            ("ce_time", "2026-11-22T10:00:00Z"),
            ("ce_traceparent", "00-abc-def-01"),
            ("content-type", "application/json"),
        ];
        let value = br#"{"input_tokens": 7}"#;
        let structured = binary_cloudevent(&headers(&ce), Some(value)).expect("a binary mode event");
        let (event, _) = tally_domain::event::parse_event_with_fingerprint(&structured).unwrap();
        assert_eq!((event.id.as_str(), event.subject.as_str(), event.input_tokens), ("ce:2:gw:1", "alice", 7));
        assert_eq!(event.attributes["ce.traceparent"], "00-abc-def-01");
        // A value that is not JSON is kept, in data_base64, and refused naming it.
        let refused = binary_cloudevent(&headers(&ce), Some(b"\xff")).unwrap();
        assert_eq!(tally_domain::event::parse_event_with_fingerprint(&refused).unwrap_err().field, "data_base64");
        let plain = binary_cloudevent(&headers(&ce[1..]), Some(value));
        assert_eq!(plain, None, "without ce_specversion it is not a CloudEvent in binary mode");
        let structured_mode = [("ce_specversion", "1.0"), ("content-type", "application/cloudevents+json")];
        assert_eq!(binary_cloudevent(&headers(&structured_mode), Some(value)), None);
        assert_eq!(binary_cloudevent(&headers(&[("traceparent", "x")]), Some(value)), None);
    }
}
