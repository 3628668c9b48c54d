//! The opt-in testcontainers path (`TALLY_TEST_CONTAINERS=1`, `--features containers`): one
//! Kafka (KRaft), Postgres and ClickHouse per test process, started on first use and kept
//! for the process's life. Tests isolate themselves by names exactly as on the local stack.

use std::sync::OnceLock;

use testcontainers_modules::clickhouse::ClickHouse;
use testcontainers_modules::kafka::apache::{Kafka, KAFKA_PORT};
use testcontainers_modules::postgres::Postgres;
use testcontainers_modules::testcontainers::runners::SyncRunner;
use testcontainers_modules::testcontainers::{Container, ImageExt};

use super::Servers;

struct Started {
    _kafka: Container<Kafka>,
    _postgres: Container<Postgres>,
    _clickhouse: Container<ClickHouse>,
    servers: Servers,
}

static STARTED: OnceLock<Started> = OnceLock::new();

/// The ClickHouse image tag, as in compose.yaml.
const CLICKHOUSE_TAG: &str = "25.8";

fn start() -> Started {
    let kafka = Kafka::default().start().expect("start the Kafka container");
    let postgres = Postgres::default().start().expect("start the Postgres container");
    // The release the project tests (the module's default is 23.3).
    let clickhouse = ClickHouse::default().with_tag(CLICKHOUSE_TAG).start().expect("start the ClickHouse container");
    let servers = Servers {
        kafka: format!("127.0.0.1:{}", kafka.get_host_port_ipv4(KAFKA_PORT).expect("kafka port")),
        postgres: format!("postgres://postgres:postgres@127.0.0.1:{}/postgres", postgres.get_host_port_ipv4(5432).expect("postgres port")),
        clickhouse: format!("http://127.0.0.1:{}", clickhouse.get_host_port_ipv4(8123).expect("clickhouse port")),
    };
    Started { _kafka: kafka, _postgres: postgres, _clickhouse: clickhouse, servers }
}

pub fn servers() -> Servers {
    STARTED.get_or_init(start).servers.clone()
}
