//! `tally config apply FILE` and `tally config show`: the tier configuration in Postgres.
//!
//! `apply` validates the whole file first (every error with its location, nothing written
//! when any), stores it as the new version in force, and announces the change on the control
//! topic so aggregators re-evaluate every subject within a second.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use tally_aggregator::policy;
use tally_common::kafka::KafkaSettings;
use tally_common::postgres::PostgresSettings;
use tally_common::producing::{Outgoing, RebuildingProducer};

#[derive(Debug, clap::Subcommand)]
pub enum ConfigCommand {
    /// Validate FILE and make it the tier configuration in force.
    Apply {
        /// The YAML tier configuration (see examples/tiers.yaml).
        file: PathBuf,
        #[command(flatten)]
        postgres: PostgresSettings,
        #[command(flatten)]
        kafka: KafkaSettings,
    },
    /// Print the tier configuration in force and its version.
    Show {
        #[command(flatten)]
        postgres: PostgresSettings,
    },
}

pub async fn run(cmd: ConfigCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ConfigCommand::Apply { file, postgres, kafka } => apply(&file, &postgres, &kafka).await,
        ConfigCommand::Show { postgres } => show(&postgres).await,
    }
}

async fn apply(file: &PathBuf, postgres: &PostgresSettings, kafka: &KafkaSettings) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(file).with_context(|| format!("failed to read {}", file.display()))?;
    if let Err(e) = policy::Policy::from_yaml(&text, &file.display().to_string()) {
        eprintln!("{e:#}");
        return Ok(ExitCode::from(1));
    }
    let pool = postgres.connect().await?;
    let applied = policy::apply_file(&pool, file).await?;
    if !applied.changed {
        println!("configuration version {} is already in force; nothing changed", applied.version);
        return Ok(ExitCode::SUCCESS);
    }
    announce(kafka, applied.version).await?;
    println!("configuration version {} is in force", applied.version);
    Ok(ExitCode::SUCCESS)
}

/// Publishes `{"type": "config_applied", "version": N}` on the control topic (sent again on
/// a new producer after a fatal error).
async fn announce(kafka: &KafkaSettings, version: i64) -> anyhow::Result<()> {
    let health = tally_common::health::ClientHealth::new("control producer");
    let producer = RebuildingProducer::new(kafka.producer_config(), health, None)?;
    let payload = serde_json::json!({"type": "config_applied", "version": version, "at": chrono::Utc::now()}).to_string();
    producer.send(Outgoing::new(&kafka.control_topic, b"config", payload.as_bytes()), Duration::from_secs(10)).await.map_err(|e| {
        anyhow::anyhow!(
            "the configuration is stored, but announcing it on {} failed: {e}; aggregators pick it up within a second anyway",
            kafka.control_topic
        )
    })?;
    Ok(())
}

async fn show(postgres: &PostgresSettings) -> anyhow::Result<ExitCode> {
    let pool = postgres.connect().await?;
    let latest: Option<(i64, String, String, chrono::DateTime<chrono::Utc>)> =
        sqlx::query_as("SELECT version, document, source, applied_at FROM config_versions ORDER BY version DESC LIMIT 1")
            .fetch_optional(&pool)
            .await?;
    match latest {
        Some((version, document, source, applied_at)) => {
            println!("# version {version}, applied {applied_at} from {source}\n{document}");
        }
        None => println!("# no configuration applied: the built-in default is in force\n{}", policy::DEFAULT_CONFIG),
    }
    Ok(ExitCode::SUCCESS)
}
