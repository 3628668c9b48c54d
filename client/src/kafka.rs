use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::{Error, Usage};

/// Produces usage events straight to the usage topic.
pub struct KafkaSender {
    producer: FutureProducer,
    topic: String,
}

impl KafkaSender {
    /// An idempotent, acks=all producer on `brokers` for `topic` (e.g. `tally.usage.v1`).
    pub fn new(brokers: &str, topic: &str) -> Result<KafkaSender, Error> {
        let producer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", "30000")
            .create()
            .map_err(|e| Error::Kafka(e.to_string()))?;
        Ok(KafkaSender { producer, topic: topic.to_string() })
    }

    /// Validates every event (nothing is produced if one is invalid), produces their
    /// canonical form keyed by subject, and returns once every one is acknowledged.
    pub async fn send(&self, events: &[Usage]) -> Result<usize, Error> {
        let canonical = events.iter().map(Usage::validate).collect::<Result<Vec<_>, _>>()?;
        let payloads: Vec<Vec<u8>> = canonical.iter().map(|e| e.to_canonical_json()).collect();
        for (event, payload) in canonical.iter().zip(&payloads) {
            let record = FutureRecord::to(&self.topic).key(event.subject.as_bytes()).payload(payload.as_slice());
            self.producer.send(record, Duration::from_secs(30)).await.map_err(|(e, _)| Error::Kafka(e.to_string()))?;
        }
        Ok(events.len())
    }
}
