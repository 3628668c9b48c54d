//! `tally config apply FILE` and `tally config show`: the tier configuration in Postgres.
//!
//! `apply` validates the whole file first (every error with its location, nothing written
//! when any), stores it in the configuration store (`tally_common::config_store`) as the new
//! version in force, whatever version was in force before, and announces the change on the
//! control topic so aggregators re-evaluate every subject within a second.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use tally_aggregator::policy;
use tally_common::config_store::{self, Base, CheckedDocument};
use tally_common::kafka::KafkaSettings;
use tally_common::postgres::PostgresSettings;
use tally_common::producing::RebuildingProducer;

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

async fn apply(file: &Path, postgres: &PostgresSettings, kafka: &KafkaSettings) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(file).with_context(|| format!("failed to read {}", file.display()))?;
    let document = match CheckedDocument::parse(text) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("invalid tier configuration {}:\n{e}", file.display());
            return Ok(ExitCode::from(1));
        }
    };
    let pool = postgres.connect().await?;
    let applied = config_store::apply(&pool, &document, &policy::file_source(file), Base::Any).await?;
    if !applied.changed {
        println!("configuration version {} is already in force; nothing changed", applied.version);
        return Ok(ExitCode::SUCCESS);
    }
    announce(kafka, applied.version).await?;
    println!("configuration version {} is in force", applied.version);
    Ok(ExitCode::SUCCESS)
}

/// Announces the new version on the control topic, on a producer of its own (which sends
/// again on a new producer after a fatal error).
async fn announce(kafka: &KafkaSettings, version: i64) -> anyhow::Result<()> {
    let health = tally_common::health::ClientHealth::new("control producer");
    let producer = RebuildingProducer::new(kafka.producer_config(), health, None)?;
    config_store::announce(&producer, &kafka.control_topic, version, Duration::from_secs(10)).await.map_err(|e| {
        anyhow::anyhow!(
            "the configuration is stored, but announcing it on {} failed: {e}; aggregators pick it up within a second anyway",
            kafka.control_topic
        )
    })
}

async fn show(postgres: &PostgresSettings) -> anyhow::Result<ExitCode> {
    let pool = postgres.connect().await?;
    match config_store::latest(&pool).await? {
        Some(v) => println!("# version {}, applied {} from {}\n{}", v.version, v.applied_at, v.source, v.document),
        None => println!("# no configuration applied: the built-in default is in force\n{}", config_store::BUILTIN_DOCUMENT),
    }
    Ok(ExitCode::SUCCESS)
}
