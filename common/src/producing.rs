//! A producer that replaces itself after a fatal error.
//!
//! librdkafka's idempotent producer can hit a *fatal* error, after which every send fails
//! at once with `_FATAL` until the producer is destroyed: a broker answers the epoch bump
//! that follows a message timeout with `ProducerFenced` (tansu 0.6 does after a connection
//! cut longer than `message.timeout.ms`; Apache Kafka may fence too). A process that keeps
//! such a producer stays broken while the broker is fine.
//!
//! [`RebuildingProducer`] keeps the configuration and the producer in use. When a send fails
//! with a fatal error (the error's code, or `fatal_error()` on the client), or librdkafka's
//! error callback reports one, it creates a new producer (a log line, the client's
//! `rebuilds` count and the `tally_kafka_producer_rebuilds_total` metric when given) and
//! sends again, once, what had failed on the old one. Messages are resent under the same
//! key and payload, so whoever counts them must dedupe (the aggregator does, by event id;
//! decision snapshots carry versions). A watchdog task replaces a broken producer that is
//! not sending, so an idle service heals too.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, Instant};

use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::future_producer::Delivery;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientConfig;

use crate::health::{watched, ClientHealth, Watched};
use crate::metrics::Counter;

/// How often the watchdog looks for a fatal error on an idle producer.
const WATCHDOG_PERIOD: Duration = Duration::from_millis(500);

struct Instance {
    generation: u64,
    producer: FutureProducer<Watched>,
    fatal: Arc<AtomicBool>,
}

impl Instance {
    fn is_fatal(&self) -> bool {
        self.fatal.load(Ordering::Relaxed) || self.producer.client().fatal_error().is_some()
    }
}

/// One message to send: borrowed, so it can be sent again on a new producer.
#[derive(Debug, Clone, Copy)]
pub struct Outgoing<'a> {
    pub topic: &'a str,
    pub key: &'a [u8],
    pub payload: &'a [u8],
    pub partition: Option<i32>,
    /// Headers, each `(name, value)`.
    pub headers: &'a [(&'a str, &'a [u8])],
}

impl<'a> Outgoing<'a> {
    pub fn new(topic: &'a str, key: &'a [u8], payload: &'a [u8]) -> Self {
        Outgoing { topic, key, payload, partition: None, headers: &[] }
    }

    fn record(&self) -> FutureRecord<'a, [u8], [u8]> {
        let mut record = FutureRecord::to(self.topic).key(self.key).payload(self.payload);
        if let Some(p) = self.partition {
            record = record.partition(p);
        }
        if !self.headers.is_empty() {
            let headers = self.headers.iter().fold(OwnedHeaders::new(), |h, (key, value)| h.insert(Header { key, value: Some(*value) }));
            record = record.headers(headers);
        }
        record
    }
}

/// Whether `error` leaves the producer unusable (see the module docs).
pub fn is_fatal(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(RDKafkaErrorCode::Fatal | RDKafkaErrorCode::ProducerFenced | RDKafkaErrorCode::InvalidProducerEpoch)
    )
}

/// A producer replaced by a new one after a fatal error (see the module docs).
pub struct RebuildingProducer {
    config: ClientConfig,
    health: Arc<ClientHealth>,
    current: RwLock<Arc<Instance>>,
    rebuilds: Option<Counter>,
}

impl RebuildingProducer {
    /// A producer from `config` (statistics are turned on for `health`), with a watchdog
    /// task when a tokio runtime is running. `rebuilds` counts replacements.
    pub fn new(config: ClientConfig, health: Arc<ClientHealth>, rebuilds: Option<Counter>) -> anyhow::Result<Arc<RebuildingProducer>> {
        let config = watched(config);
        let first = Self::create(&config, &health)?;
        let producer = Arc::new(RebuildingProducer { config, health, current: RwLock::new(Arc::new(first)), rebuilds });
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(watchdog(Arc::downgrade(&producer)));
        }
        Ok(producer)
    }

    fn create(config: &ClientConfig, health: &Arc<ClientHealth>) -> anyhow::Result<Instance> {
        let context = Watched::new(health.clone());
        let (generation, fatal) = (health.generation(), context.fatal_flag());
        let producer: FutureProducer<Watched> =
            config.create_with_context(context).map_err(|e| anyhow::anyhow!("failed to create the {} producer: {e}", health.name()))?;
        Ok(Instance { generation, producer, fatal })
    }

    pub fn health(&self) -> &Arc<ClientHealth> {
        &self.health
    }

    fn instance(&self) -> Arc<Instance> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The producer in use (replaced first if it is broken). For calls other than sends;
    /// a send should go through [`RebuildingProducer::send`].
    pub fn producer(&self) -> FutureProducer<Watched> {
        let instance = self.instance();
        if instance.is_fatal() {
            self.replace(instance.generation, "fatal error");
            return self.instance().producer.clone();
        }
        instance.producer.clone()
    }

    /// Replaces the instance of `generation` if it is still the one in use; a failure to
    /// create the new one leaves the old one (the next send or watchdog round tries again).
    fn replace(&self, generation: u64, why: &str) {
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        if current.generation != generation {
            return;
        }
        let next_generation = self.health.replacing();
        match Self::create(&self.config, &self.health) {
            Ok(instance) => {
                debug_assert_eq!(instance.generation, next_generation);
                self.health.rebuilt(next_generation);
                let old = std::mem::replace(&mut *current, Arc::new(instance));
                drop(current);
                if let Some(c) = &self.rebuilds {
                    c.inc();
                }
                tracing::warn!(client = self.health.name(), generation = next_generation, why, "kafka producer replaced by a new one");
                // Dropping a producer purges and waits for its thread: not on a runtime thread.
                match tokio::runtime::Handle::try_current() {
                    Ok(runtime) => drop(runtime.spawn_blocking(move || drop(old))),
                    Err(_) => drop(old),
                }
            }
            Err(e) => {
                // The broken instance stays in use, so the next send or watchdog round tries
                // again; the report says broken (since it first broke) meanwhile.
                self.health.broke(next_generation, Instant::now(), &format!("{why}; {e:#}"));
                tracing::error!(client = self.health.name(), error = %e, "could not replace a broken kafka producer; retrying");
            }
        }
    }

    /// Sends `message` and waits for its acknowledgement. After a fatal error it replaces
    /// the producer and sends the message once more on the new one. `queue_timeout` bounds
    /// the wait for room in librdkafka's queue; the acknowledgement comes within
    /// `message.timeout.ms`.
    pub async fn send(&self, message: Outgoing<'_>, queue_timeout: Duration) -> Result<Delivery, KafkaError> {
        self.send_resending(message, queue_timeout, true).await
    }

    /// As [`RebuildingProducer::send`], but never sends again: after a fatal error the
    /// producer is replaced for the next send and the error returned. For a caller that
    /// resends in its own order (the outbox relay: a resend of each failed message as its
    /// error arrives could reorder a subject's snapshots on the compacted topic).
    pub async fn send_once(&self, message: Outgoing<'_>, queue_timeout: Duration) -> Result<Delivery, KafkaError> {
        self.send_resending(message, queue_timeout, false).await
    }

    async fn send_resending(&self, message: Outgoing<'_>, queue_timeout: Duration, resend: bool) -> Result<Delivery, KafkaError> {
        let mut resent = !resend;
        loop {
            let instance = self.instance();
            let instance = if instance.is_fatal() {
                self.replace(instance.generation, "fatal error");
                self.instance()
            } else {
                instance
            };
            match instance.producer.send(message.record(), queue_timeout).await {
                Ok(delivery) => {
                    self.health.delivered();
                    return Ok(delivery);
                }
                Err((e, _)) => {
                    if is_fatal(&e) || instance.is_fatal() {
                        self.replace(instance.generation, &e.to_string());
                    }
                    // Failed on an instance replaced meanwhile (fatal, or purged as it was
                    // dropped): once more on the new one.
                    if !resent && self.instance().generation != instance.generation {
                        resent = true;
                        continue;
                    }
                    return Err(e);
                }
            }
        }
    }
}

/// Replaces the producer when it broke while idle; ends when the producer is dropped.
async fn watchdog(producer: Weak<RebuildingProducer>) {
    loop {
        tokio::time::sleep(WATCHDOG_PERIOD).await;
        let Some(p) = producer.upgrade() else { return };
        let instance = p.instance();
        if instance.is_fatal() {
            let reason = instance.producer.client().fatal_error().map(|(_, r)| r).unwrap_or_else(|| "fatal error".into());
            p.replace(instance.generation, &reason);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::mocking::MockCluster;
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

    /// A fenced idempotent producer is replaced and the failed message sent again on the new
    /// one; the next sends go through without another replacement.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_fenced_producer_is_replaced_and_the_message_resent() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("t", 1, 1).unwrap();
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", "5000");
        let clients = crate::health::Clients::default();
        let registry = crate::metrics::Registry::default();
        let rebuilds = registry.counter("tally_kafka_producer_rebuilds_total", "t", &[]);
        let producer = RebuildingProducer::new(config, clients.register("test producer"), Some(rebuilds.clone())).unwrap();
        producer.send(Outgoing::new("t", b"k", b"one"), Duration::from_secs(5)).await.expect("first send");
        cluster.request_errors(RDKafkaApiKey::Produce, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_PRODUCER_FENCED]);
        let d = producer.send(Outgoing::new("t", b"k", b"two"), Duration::from_secs(5)).await.expect("resent on a new producer");
        assert_eq!(d.partition, 0);
        assert_eq!(rebuilds.get(), 1);
        producer.send(Outgoing::new("t", b"k", b"three"), Duration::from_secs(5)).await.expect("third send");
        assert_eq!(rebuilds.get(), 1);
        let report = clients.report(Instant::now());
        assert!(report.ready, "{report:?}");
        assert_eq!(report.clients[0].rebuilds, 1);
        // send_once leaves the resend to the caller, on the replaced producer.
        cluster.request_errors(RDKafkaApiKey::Produce, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_PRODUCER_FENCED]);
        assert!(producer.send_once(Outgoing::new("t", b"k", b"four"), Duration::from_secs(5)).await.is_err());
        assert_eq!(rebuilds.get(), 2);
        producer.send_once(Outgoing::new("t", b"k", b"four"), Duration::from_secs(5)).await.expect("the caller's resend");
    }

    #[test]
    fn fatal_codes() {
        assert!(is_fatal(&KafkaError::MessageProduction(RDKafkaErrorCode::Fatal)));
        assert!(is_fatal(&KafkaError::MessageProduction(RDKafkaErrorCode::ProducerFenced)));
        assert!(!is_fatal(&KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut)));
        assert!(!is_fatal(&KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)));
    }
}
