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
