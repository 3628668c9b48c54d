//! The broker's ceiling, measured first: raw produce and consume rates for messages shaped
//! like usage events, and the broker's own produce→consume latency.
//!
//! The producer is Tally's producer configuration (idempotent, acks=all, lz4, keyed by
//! subject); the consumer assigns every partition by hand from the beginning, with no group
//! coordinator involved. Payloads are prepared before the clock starts, so the figures are
//! the broker's and the client's, not JSON encoding's.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use rdkafka::{ClientConfig, ClientContext, Message, Offset, TopicPartitionList};
use tally_common::kafka::KafkaSettings;

use super::report::{Latencies, Section};
use super::stack::PARTITIONS;

/// A prepared message: key and payload.
pub type Prepared = (String, Vec<u8>);

/// Counts acknowledgements and failures.
#[derive(Default)]
pub struct Acks {
    ok: AtomicU64,
    failed: AtomicU64,
}

/// The producer context that feeds [`Acks`].
pub struct AckContext(Arc<Acks>);

impl ClientContext for AckContext {}

impl ProducerContext for AckContext {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => self.0.ok.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.0.failed.fetch_add(1, Ordering::Relaxed),
        };
    }
}

/// A producer with Tally's producer configuration, counting acknowledgements.
pub fn producer(kafka: &KafkaSettings) -> anyhow::Result<(BaseProducer<AckContext>, Arc<Acks>)> {
    let acks = Arc::new(Acks::default());
    let p = kafka.producer_config().create_with_context(AckContext(acks.clone())).context("failed to create the bench producer")?;
    Ok((p, acks))
}

/// Produces `messages` to `topic` as fast as the broker acknowledges them; returns the time
/// until the last acknowledgement. Fails if any message was not acknowledged.
pub fn produce_all(kafka: &KafkaSettings, topic: &str, messages: &[Prepared]) -> anyhow::Result<Duration> {
    let (producer, acks) = producer(kafka)?;
    let started = Instant::now();
    for (key, payload) in messages {
        let mut record = BaseRecord::to(topic).key(key.as_str()).payload(payload.as_slice());
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    producer.poll(Duration::from_millis(5));
                }
                Err((e, _)) => bail!("failed to produce to {topic}: {e}"),
            }
        }
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(120)).with_context(|| format!("the broker did not acknowledge every message on {topic}"))?;
    let elapsed = started.elapsed();
    let (ok, failed) = (acks.ok.load(Ordering::Relaxed), acks.failed.load(Ordering::Relaxed));
    if failed > 0 || ok != messages.len() as u64 {
        bail!("{failed} of {} messages on {topic} failed ({ok} acknowledged)", messages.len());
    }
    Ok(elapsed)
}

/// A consumer with every partition of `topic` assigned by hand at `offset`.
pub(super) fn assigned_consumer(kafka: &KafkaSettings, topic: &str, offset: Offset) -> anyhow::Result<BaseConsumer> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &kafka.brokers)
        .set("group.id", format!("tally-bench-reader-{}", uuid::Uuid::new_v4().simple()))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("fetch.wait.max.ms", "10")
        .create()
        .context("failed to create the bench consumer")?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(topic, p, offset).context("failed to build the assignment")?;
    }
    consumer.assign(&tpl).context("failed to assign the partitions")?;
    Ok(consumer)
}

/// Reads `expected` messages of `topic` from the beginning; returns the time it took.
pub fn consume_all(kafka: &KafkaSettings, topic: &str, expected: u64, timeout: Duration) -> anyhow::Result<Duration> {
    let consumer = assigned_consumer(kafka, topic, Offset::Beginning)?;
    let started = Instant::now();
    let mut seen = 0u64;
    while seen < expected {
        if started.elapsed() > timeout {
            bail!("read only {seen} of {expected} messages of {topic} within {timeout:?}");
        }
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(_)) => seen += 1,
            Some(Err(e)) => bail!("failed to consume {topic}: {e}"),
            None => {}
        }
    }
    Ok(started.elapsed())
}

/// The broker's produce→consume latency for single messages sent `interval` apart.
pub fn round_trip(kafka: &KafkaSettings, topic: &str, count: usize, interval: Duration) -> anyhow::Result<Latencies> {
    let consumer = assigned_consumer(kafka, topic, Offset::End)?;
    // Let the assignment settle at the end offsets before the first message.
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_millis(1500) {
        let _ = consumer.poll(Duration::from_millis(50));
    }
    let (producer, _) = producer(kafka)?;
    let origin = Instant::now();
    let mut latencies = Latencies::default();
    let mut next_send = Instant::now();
    let mut sent = 0usize;
    let deadline = Instant::now() + interval * count as u32 + Duration::from_secs(20);
    while latencies.len() < count {
        if Instant::now() > deadline {
            bail!("only {} of {count} round-trip messages came back", latencies.len());
        }
        if sent < count && Instant::now() >= next_send {
            let stamp = origin.elapsed().as_micros().to_string();
            let key = format!("rtt-{sent}");
            producer
                .send(BaseRecord::to(topic).key(key.as_str()).payload(stamp.as_bytes()))
                .map_err(|(e, _)| e)
                .context("failed to produce a round-trip message")?;
            sent += 1;
            next_send += interval;
        }
        producer.poll(Duration::ZERO);
        if let Some(m) = consumer.poll(Duration::from_millis(1)) {
            let m = m.context("failed to consume a round-trip message")?;
            let stamp = m.payload().and_then(|p| std::str::from_utf8(p).ok()).and_then(|s| s.parse::<u64>().ok());
            if let Some(stamp) = stamp {
                let now = u64::try_from(origin.elapsed().as_micros()).unwrap_or(u64::MAX);
                latencies.push_micros(now.saturating_sub(stamp));
            }
        }
    }
    Ok(latencies)
}

/// What section 1 hands to the later sections as baselines.
#[derive(Debug, Clone, Copy)]
pub struct Ceiling {
    pub produce_per_s: f64,
    pub consume_per_s: f64,
    pub round_trip_p50_ms: f64,
    pub round_trip_p99_ms: f64,
}

/// Section 1: produce `messages` to `topic`, read them back, then time single round trips.
pub fn measure(kafka: &KafkaSettings, topic: &str, messages: &[Prepared], round_trips: usize) -> anyhow::Result<(Section, Ceiling)> {
    let n = messages.len() as f64;
    let produced = produce_all(kafka, topic, messages)?;
    let consumed = consume_all(kafka, topic, messages.len() as u64, Duration::from_secs(300))?;
    let rtt = round_trip(kafka, topic, round_trips, Duration::from_millis(20))?;
    let ceiling = Ceiling {
        produce_per_s: n / produced.as_secs_f64(),
        consume_per_s: n / consumed.as_secs_f64(),
        round_trip_p50_ms: rtt.p50_ms(),
        round_trip_p99_ms: rtt.p99_ms(),
    };
    let bytes = messages.iter().map(|(_, p)| p.len()).sum::<usize>() as f64 / n.max(1.0);
    let mut s = Section::default();
    s.figure("messages", n)
        .figure("message_bytes_avg", bytes)
        .figure("produce_per_s", ceiling.produce_per_s)
        .figure("consume_per_s", ceiling.consume_per_s)
        .latencies("round_trip", &rtt)
        .ratio("consume_to_produce", ceiling.consume_per_s, ceiling.produce_per_s)
        .note(format!(
            "{n} usage-event-shaped messages, keyed by subject over {PARTITIONS} partitions; idempotent acks=all lz4 producer (linger 5 ms); \
             consumer with partitions assigned by hand (no group); round trip = one message every 20 ms, produce to consume, {round_trips} messages"
        ));
    Ok((s, ceiling))
}
