//! Kafka settings, client configuration and topic creation.
//!
//! Clients are plain librdkafka (through rdkafka) so the same code runs against Apache
//! Kafka, Redpanda and the tansu broker of the local stack.

use std::time::Duration;

use anyhow::{bail, Context};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientConfig;

/// Where the broker is and what Tally's topics are called.
#[derive(Debug, Clone, clap::Args)]
pub struct KafkaSettings {
    /// Bootstrap brokers, comma separated.
    #[arg(long = "kafka-brokers", env = "TALLY_KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub brokers: String,
    /// Topic of usage events.
    #[arg(long, env = "TALLY_USAGE_TOPIC", default_value = "tally.usage.v1")]
    pub usage_topic: String,
    /// Compacted topic of per-subject decision snapshots (key = subject).
    #[arg(long, env = "TALLY_DECISIONS_TOPIC", default_value = "tally.decisions.v1")]
    pub decisions_topic: String,
    /// Topic of rejected events with the reason.
    #[arg(long, env = "TALLY_QUARANTINE_TOPIC", default_value = "tally.quarantine.v1")]
    pub quarantine_topic: String,
    /// Topic of control-plane changes.
    #[arg(long, env = "TALLY_CONTROL_TOPIC", default_value = "tally.control.v1")]
    pub control_topic: String,
    /// librdkafka debug contexts (e.g. `cgrp,topic,fetch`), logged through tracing.
    #[arg(long = "kafka-debug", env = "TALLY_KAFKA_DEBUG")]
    pub debug: Option<String>,
    /// Partitions given to topics Tally creates.
    #[arg(long, env = "TALLY_TOPIC_PARTITIONS", default_value_t = 4)]
    pub partitions: i32,
    /// Longest time, in milliseconds, a consumer's fetch waits at the broker for data
    /// (librdkafka `fetch.wait.max.ms`). Kept short because some brokers hold every fetch for
    /// part of this time even when data is there: tansu 0.6 sleeps half of it (at least
    /// 250 ms of the default 500) before answering, which every consumer hop adds to decision
    /// latency. The cost is more fetch requests while idle.
    #[arg(long = "kafka-fetch-wait-ms", env = "TALLY_KAFKA_FETCH_WAIT_MS", default_value_t = DEFAULT_FETCH_WAIT_MS)]
    pub fetch_wait_ms: u32,
    /// Longest time, in milliseconds, a producer tries to deliver a message before it gives
    /// up (librdkafka `message.timeout.ms`). An idempotent producer whose messages timed out
    /// may be fenced by the broker once it is back; Tally's producers then replace themselves
    /// (`tally_common::producing`).
    #[arg(long = "kafka-message-timeout-ms", env = "TALLY_KAFKA_MESSAGE_TIMEOUT_MS", default_value_t = DEFAULT_MESSAGE_TIMEOUT_MS)]
    pub message_timeout_ms: u32,
}

/// See [`KafkaSettings::message_timeout_ms`].
pub const DEFAULT_MESSAGE_TIMEOUT_MS: u32 = 30_000;

/// See [`KafkaSettings::fetch_wait_ms`].
pub const DEFAULT_FETCH_WAIT_MS: u32 = 20;

impl KafkaSettings {
    fn base(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        // librdkafka backs off reconnects up to 10 s by default: after an outage a client
        // came back up to 10 s after the broker. Two seconds costs one attempt per client
        // every two seconds while the broker is away.
        c.set("bootstrap.servers", &self.brokers).set("reconnect.backoff.max.ms", "2000");
        if let Some(debug) = self.debug.as_deref().filter(|d| !d.is_empty()) {
            c.set("debug", debug);
        }
        c
    }

    /// An idempotent, acks=all, lz4 producer: a delivered message was written once.
    pub fn producer_config(&self) -> ClientConfig {
        let mut c = self.base();
        c.set("enable.idempotence", "true")
            .set("acks", "all")
            .set("compression.type", "lz4")
            .set("linger.ms", "5")
            .set("message.timeout.ms", self.message_timeout_ms.to_string());
        c
    }

    /// A consumer in `group` that never commits on its own: offsets are the caller's.
    pub fn consumer_config(&self, group: &str) -> ClientConfig {
        let mut c = self.base();
        c.set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "1000")
            .set("fetch.wait.max.ms", self.fetch_wait_ms.to_string());
        c
    }

    /// Creates Tally's four topics if they do not exist yet.
    pub async fn ensure_topics(&self) -> anyhow::Result<()> {
        let admin: AdminClient<DefaultClientContext> = self.base().create().context("failed to create the Kafka admin client")?;
        let compact = [("cleanup.policy", "compact")];
        let topics = [
            NewTopic::new(&self.usage_topic, self.partitions, TopicReplication::Fixed(1)),
            NewTopic::new(&self.decisions_topic, self.partitions, TopicReplication::Fixed(1)).set(compact[0].0, compact[0].1),
            NewTopic::new(&self.quarantine_topic, self.partitions, TopicReplication::Fixed(1)),
            NewTopic::new(&self.control_topic, 1, TopicReplication::Fixed(1)),
        ];
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        let results = admin.create_topics(&topics, &opts).await.with_context(|| format!("failed to create topics on {}", self.brokers))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => bail!("failed to create topic {topic}: {code}"),
            }
        }
        Ok(())
    }
}
