//! A Tally of its own: the shared servers, the run's names, and the environment that points a
//! `tally` process at them.

use std::path::PathBuf;
use std::process::Command;

use anyhow::Context;
use tally_common::postgres::PostgresSettings;

use crate::{with_database, Names};

/// Where the shared servers are. They are only used, never started or stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Servers {
    /// Kafka bootstrap servers (`host:port`).
    pub kafka: String,
    /// A Postgres URL on the server; a run replaces its database part with its own.
    pub postgres: String,
    /// ClickHouse's HTTP interface.
    pub clickhouse: String,
}

impl Servers {
    /// The servers named by `TALLY_KAFKA_BROKERS`, `TALLY_DATABASE_URL` and
    /// `TALLY_CLICKHOUSE_URL` (as `scripts/stack env` prints them), the local stack's
    /// addresses where one is unset or empty.
    pub fn from_env() -> Servers {
        Servers {
            kafka: env_or("TALLY_KAFKA_BROKERS", "127.0.0.1:9092"),
            postgres: env_or("TALLY_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres"),
            clickhouse: env_or("TALLY_CLICKHOUSE_URL", "http://127.0.0.1:8123"),
        }
    }
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).ok().filter(|v| !v.is_empty()).unwrap_or_else(|| default.to_string())
}

/// One run's Tally: which binary, on which servers, under which names, with which tier
/// configuration, logging where. Creating it writes the configuration file and nothing
/// else; `tally setup` (or [`tally_common`]'s setup) creates the databases and topics, and
/// [`Instance::drop_databases`] removes the databases.
#[derive(Debug, Clone)]
pub struct Instance {
    /// The `tally` binary the services run.
    pub exe: PathBuf,
    pub servers: Servers,
    pub names: Names,
    /// Postgres URL of the run's own database.
    pub database_url: String,
    /// The tier configuration file (`TALLY_CONFIG`), in `log_dir`.
    pub config: Option<PathBuf>,
    /// Where the run's service logs (and its configuration file) go.
    pub log_dir: PathBuf,
}

impl Instance {
    /// A run of `exe` on `servers` under `names`, logging to `log_dir` (created), with
    /// `tiers_yaml` written there as its tier configuration when given.
    pub fn new(exe: PathBuf, servers: Servers, names: Names, log_dir: PathBuf, tiers_yaml: Option<&str>) -> anyhow::Result<Instance> {
        let database_url = with_database(&servers.postgres, &names.database())?;
        std::fs::create_dir_all(&log_dir).with_context(|| format!("failed to create {}", log_dir.display()))?;
        let config = match tiers_yaml {
            Some(yaml) => {
                let path = log_dir.join("tiers.yaml");
                std::fs::write(&path, yaml).with_context(|| format!("failed to write {}", path.display()))?;
                Some(path)
            }
            None => None,
        };
        Ok(Instance { exe, servers, names, database_url, config, log_dir })
    }

    /// `tally <args>` pointed at the run: its servers, database, topics, consumer group and
    /// configuration. Callers add what is theirs (listen addresses, tokens, log levels).
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.exe);
        cmd.args(args)
            .env("TALLY_KAFKA_BROKERS", &self.servers.kafka)
            .env("TALLY_DATABASE_URL", &self.database_url)
            .env("TALLY_CLICKHOUSE_URL", &self.servers.clickhouse)
            .env("TALLY_CLICKHOUSE_DATABASE", self.names.database())
            .env("TALLY_USAGE_TOPIC", self.names.topic("usage"))
            .env("TALLY_DECISIONS_TOPIC", self.names.topic("decisions"))
            .env("TALLY_QUARANTINE_TOPIC", self.names.topic("quarantine"))
            .env("TALLY_CONTROL_TOPIC", self.names.topic("control"))
            .env("TALLY_AGGREGATOR_GROUP", self.names.group());
        match &self.config {
            Some(config) => cmd.env("TALLY_CONFIG", config),
            None => cmd.env_remove("TALLY_CONFIG"),
        };
        cmd
    }

    /// The run's Postgres database, with a pool of `pool_size` connections.
    pub fn postgres(&self, pool_size: u32) -> PostgresSettings {
        PostgresSettings { database_url: self.database_url.clone(), pool_size }
    }

    /// Drops the run's Postgres and ClickHouse databases (both are tried). The services
    /// must be stopped first; Postgres closes connections that remain.
    pub async fn drop_databases(&self) -> anyhow::Result<()> {
        let postgres = self.postgres(1).drop_database().await.context("failed to drop the run's Postgres database");
        let clickhouse = self.drop_clickhouse_database().await.context("failed to drop the run's ClickHouse database");
        postgres.and(clickhouse)
    }

    async fn drop_clickhouse_database(&self) -> anyhow::Result<()> {
        let settings = tally_common::clickhouse::ClickHouseSettings {
            clickhouse_url: self.servers.clickhouse.clone(),
            clickhouse_database: self.names.database(),
        };
        settings.drop_database().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(tiers_yaml: Option<&str>) -> Instance {
        let servers = Servers {
            kafka: "k:9092".into(),
            postgres: "postgres://u@h/postgres?sslmode=disable".into(),
            clickhouse: "http://c:8123".into(),
        };
        let names = Names { kind: "test", id: crate::random_id() };
        let log_dir = std::env::temp_dir().join(format!("tally-testkit-{}", names.id));
        Instance::new(PathBuf::from("tally"), servers, names, log_dir, tiers_yaml).unwrap()
    }

    fn env_of(cmd: &Command, name: &str) -> Option<String> {
        cmd.get_envs().find(|(k, _)| *k == name).and_then(|(_, v)| v).map(|v| v.to_string_lossy().into_owned())
    }

    #[test]
    fn the_command_points_at_the_runs_names() {
        let run = instance(Some("default_tier: free\n"));
        let cmd = run.command(&["aggregator"]);
        let database = run.names.database();
        assert_eq!(env_of(&cmd, "TALLY_DATABASE_URL").unwrap(), format!("postgres://u@h/{database}?sslmode=disable"));
        assert_eq!(env_of(&cmd, "TALLY_CLICKHOUSE_DATABASE").unwrap(), database);
        assert_eq!(env_of(&cmd, "TALLY_USAGE_TOPIC").unwrap(), run.names.topic("usage"));
        assert_eq!(env_of(&cmd, "TALLY_AGGREGATOR_GROUP").unwrap(), run.names.group());
        let config = env_of(&cmd, "TALLY_CONFIG").unwrap();
        assert_eq!(std::fs::read_to_string(config).unwrap(), "default_tier: free\n");
        std::fs::remove_dir_all(&run.log_dir).unwrap();
    }

    #[test]
    fn without_a_configuration_none_is_inherited() {
        let run = instance(None);
        let cmd = run.command(&["api"]);
        assert!(cmd.get_envs().any(|(k, v)| k == "TALLY_CONFIG" && v.is_none()), "TALLY_CONFIG is not removed");
        std::fs::remove_dir_all(&run.log_dir).unwrap();
    }

    #[test]
    fn a_bad_server_url_is_refused_before_anything_is_written() {
        let servers = Servers { kafka: String::new(), postgres: "tally".into(), clickhouse: String::new() };
        let names = Names::new("test");
        let log_dir = std::env::temp_dir().join(format!("tally-testkit-{}", names.id));
        let e = Instance::new(PathBuf::from("tally"), servers, names, log_dir.clone(), Some("x")).unwrap_err();
        assert!(e.to_string().contains("\"tally\""), "{e}");
        assert!(!log_dir.exists());
    }
}
