use std::sync::RwLock;
use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientConfig;

use crate::{Error, Usage};

/// Produces usage events straight to the usage topic.
///
/// An idempotent producer that hits a fatal error (e.g. fenced by the broker after an outage
/// longer than its message timeout) fails every send until it is destroyed: the sender then
/// creates a new one and sends the failed event once more on it (same id, counted once).
pub struct KafkaSender {
    config: ClientConfig,
    /// The producer in use and its generation (how often it was replaced).
    producer: RwLock<(u64, FutureProducer)>,
    topic: String,
}

/// Whether `e` (or the producer's state) leaves the producer unusable.
fn is_fatal(e: &KafkaError, producer: &FutureProducer) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(RDKafkaErrorCode::Fatal | RDKafkaErrorCode::ProducerFenced | RDKafkaErrorCode::InvalidProducerEpoch)
    ) || producer.client().fatal_error().is_some()
}

impl KafkaSender {
    /// An idempotent, acks=all producer on `brokers` for `topic` (e.g. `tally.usage.v1`).
    pub fn new(brokers: &str, topic: &str) -> Result<KafkaSender, Error> {
        let mut config = rdkafka::ClientConfig::new();
        config.set("bootstrap.servers", brokers).set("enable.idempotence", "true").set("acks", "all").set("message.timeout.ms", "30000");
        let producer = config.create().map_err(|e| Error::Kafka(e.to_string()))?;
        Ok(KafkaSender { config, producer: RwLock::new((0, producer)), topic: topic.to_string() })
    }

    fn producer(&self) -> (u64, FutureProducer) {
        self.producer.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the producer of `generation` unless another send did already.
    fn replace(&self, generation: u64) -> Result<(), Error> {
        if self.producer().0 != generation {
            return Ok(());
        }
        let fresh: FutureProducer = self.config.create().map_err(|e| Error::Kafka(e.to_string()))?;
        let mut current = self.producer.write().unwrap_or_else(|e| e.into_inner());
        let unused = if current.0 == generation { std::mem::replace(&mut *current, (generation + 1, fresh)).1 } else { fresh };
        drop(current);
        drop_off_async_threads(unused);
        Ok(())
    }

    /// Validates every event (nothing is produced if one is invalid), produces their
    /// canonical form keyed by subject, and returns once every one is acknowledged.
    pub async fn send(&self, events: &[Usage]) -> Result<usize, Error> {
        let canonical = events.iter().map(Usage::validate).collect::<Result<Vec<_>, _>>()?;
        let payloads: Vec<Vec<u8>> = canonical.iter().map(|e| e.to_canonical_json()).collect();
        for (event, payload) in canonical.iter().zip(&payloads) {
            let mut replaced = false;
            loop {
                let (generation, producer) = self.producer();
                let record = FutureRecord::to(&self.topic).key(event.subject.as_bytes()).payload(payload.as_slice());
                match producer.send(record, Duration::from_secs(30)).await {
                    Ok(_) => break,
                    Err((e, _)) if !replaced && is_fatal(&e, &producer) => {
                        tracing::warn!(error = %e, "kafka producer hit a fatal error; sending on a new one");
                        self.replace(generation)?;
                        replaced = true;
                    }
                    Err((e, _)) => return Err(Error::Kafka(e.to_string())),
                }
            }
        }
        Ok(events.len())
    }
}

/// Drops a producer, which purges and joins its thread: on a blocking thread when a tokio
/// runtime runs this, so no async thread waits (and no panic outside one).
fn drop_off_async_threads(producer: FutureProducer) {
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => drop(runtime.spawn_blocking(move || drop(producer))),
        Err(_) => drop(producer),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::mocking::MockCluster;
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

    #[tokio::test(flavor = "multi_thread")]
    async fn a_fenced_producer_is_replaced_and_the_event_sent_again() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("usage", 1, 1).unwrap();
        let sender = KafkaSender::new(&cluster.bootstrap_servers(), "usage").unwrap();
        let now = chrono::Utc::now();
        assert_eq!(sender.send(&[Usage::new("a", "alice", now)]).await.unwrap(), 1);
        cluster.request_errors(RDKafkaApiKey::Produce, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_PRODUCER_FENCED]);
        assert_eq!(sender.send(&[Usage::new("b", "alice", now)]).await.unwrap(), 1);
        assert_eq!(sender.producer().0, 1, "replaced once");
        assert_eq!(sender.send(&[Usage::new("c", "alice", now)]).await.unwrap(), 1);
        assert_eq!(sender.producer().0, 1);
    }
}
