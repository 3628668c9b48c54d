//! The configuration store: the one owner of `config_versions`, the versioned tier
//! configuration every service reads.
//!
//! Contract:
//! - A version is a whole YAML document (`tally_domain::config`) that validated when it was
//!   written: [`apply`] only takes a [`CheckedDocument`], which exists only for a valid one.
//!   Stored versions are never changed or deleted.
//! - The highest stored version is in force. Version 0 is the built-in default
//!   ([`BUILTIN_DOCUMENT`]); it is never stored, and is in force while nothing is.
//! - Reads ([`latest_version`], [`latest`], [`at_version`]) take any executor: a pool, or
//!   the caller's own transaction when what it decides must agree with what it read.
//! - [`apply`] stores a document as the next version, one writer at a time (the table is
//!   locked for the write). On [`Base::Version`] it is optimistic: the write is refused with
//!   [`ApplyError::Stale`], and nothing is written, unless that version (0: none stored) is
//!   still the latest; [`Base::Any`] replaces whatever is in force. A document identical to
//!   the latest one (by SHA-256) is not stored again: the answer names the latest version
//!   with `changed: false`.
//! - [`announce`] publishes `{"type": "config_applied", "version": N, "at": ...}` with key
//!   `config` on the control topic after a new version is stored, so readers re-evaluate at
//!   once. It is a hint: readers also poll for the latest version, so a lost announcement
//!   only delays a change until their next poll.

use std::time::Duration;

use chrono::{DateTime, Utc};
use rdkafka::error::KafkaError;
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::{PgExecutor, PgPool};
use tally_domain::config::{Config, ConfigErrors};

use crate::producing::{Outgoing, RebuildingProducer};

/// The built-in configuration, version 0: in force while no version is stored.
pub const BUILTIN_DOCUMENT: &str = include_str!("../../config/default.yaml");

/// How the built-in configuration is named where a stored version names its source.
pub const BUILTIN_SOURCE: &str = "built-in default";

/// One stored version.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct StoredVersion {
    pub version: i64,
    /// The YAML document, as written.
    pub document: String,
    /// Who wrote it, e.g. `file tiers.yaml` or `admin api: put tier`.
    pub source: String,
    pub applied_at: DateTime<Utc>,
}

/// A configuration document that validated, with what it parsed to.
#[derive(Debug, Clone)]
pub struct CheckedDocument {
    text: String,
    config: Config,
}

impl CheckedDocument {
    /// Validates `text`; see `tally_domain::config::Config::from_yaml_str`.
    pub fn parse(text: impl Into<String>) -> Result<CheckedDocument, ConfigErrors> {
        let text = text.into();
        let config = Config::from_yaml_str(&text)?;
        Ok(CheckedDocument { text, config })
    }

    /// The built-in configuration (version 0).
    pub fn builtin() -> Result<CheckedDocument, ConfigErrors> {
        CheckedDocument::parse(BUILTIN_DOCUMENT)
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    fn sha256(&self) -> String {
        hex::encode(Sha256::digest(self.text.as_bytes()))
    }
}

/// What a write expects to replace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Base {
    /// Whatever version is in force.
    Any,
    /// Only this version (0: none stored); see [`ApplyError::Stale`].
    Version(i64),
}

/// What [`apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// The version in force after the call.
    pub version: i64,
    /// False when the document was already the version in force (nothing was written).
    pub changed: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The write was based on a version that is no longer the latest; nothing was written.
    #[error("configuration version {base} is no longer the latest (version {latest} is)")]
    Stale { base: i64, latest: i64 },
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// The highest stored version; `None` when nothing is stored (the built-in default is in
/// force).
pub async fn latest_version<'c>(db: impl PgExecutor<'c>) -> sqlx::Result<Option<i64>> {
    sqlx::query_scalar("SELECT max(version) FROM config_versions").fetch_one(db).await
}

/// The version in force; `None` when nothing is stored.
pub async fn latest<'c>(db: impl PgExecutor<'c>) -> sqlx::Result<Option<StoredVersion>> {
    sqlx::query_as("SELECT version, document, source, applied_at FROM config_versions ORDER BY version DESC LIMIT 1")
        .fetch_optional(db)
        .await
}

/// One stored version; `None` when there is no such version (0 never is).
pub async fn at_version<'c>(db: impl PgExecutor<'c>, version: i64) -> sqlx::Result<Option<StoredVersion>> {
    sqlx::query_as("SELECT version, document, source, applied_at FROM config_versions WHERE version = $1")
        .bind(version)
        .fetch_optional(db)
        .await
}

/// The latest version's number and digest, read inside the writer's lock.
#[derive(sqlx::FromRow)]
struct LatestDigest {
    version: i64,
    sha256: String,
}

/// Stores `document` as the next version unless it already is the latest; see the module
/// docs. `source` says who wrote it.
pub async fn apply(pool: &PgPool, document: &CheckedDocument, source: &str, base: Base) -> Result<Applied, ApplyError> {
    let sha = document.sha256();
    let mut tx = pool.begin().await?;
    // One writer at a time, so the base and "already in force" are decided on the latest.
    sqlx::query("LOCK TABLE config_versions IN SHARE ROW EXCLUSIVE MODE").execute(&mut *tx).await?;
    let latest: Option<LatestDigest> =
        sqlx::query_as("SELECT version, sha256 FROM config_versions ORDER BY version DESC LIMIT 1").fetch_optional(&mut *tx).await?;
    let latest_version = latest.as_ref().map_or(0, |l| l.version);
    if let Base::Version(base) = base {
        if base != latest_version {
            tx.rollback().await?;
            return Err(ApplyError::Stale { base, latest: latest_version });
        }
    }
    if latest.is_some_and(|l| l.sha256 == sha) {
        tx.commit().await?;
        return Ok(Applied { version: latest_version, changed: false });
    }
    let version: i64 = sqlx::query_scalar("INSERT INTO config_versions (document, sha256, source) VALUES ($1, $2, $3) RETURNING version")
        .bind(document.text())
        .bind(&sha)
        .bind(source)
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;
    tracing::info!(version, source, "configuration version stored");
    Ok(Applied { version, changed: true })
}

/// The control-topic message that announces a new version.
#[derive(Debug, Serialize)]
struct ConfigApplied {
    #[serde(rename = "type")]
    kind: &'static str,
    version: i64,
    at: DateTime<Utc>,
}

/// The key of every announcement on the control topic.
pub const ANNOUNCEMENT_KEY: &[u8] = b"config";

/// Publishes that `version` is stored, on `topic` (the control topic); see the module docs.
/// `timeout` bounds the wait for room in the producer's queue.
pub async fn announce(producer: &RebuildingProducer, topic: &str, version: i64, timeout: Duration) -> Result<(), KafkaError> {
    let message = ConfigApplied { kind: "config_applied", version, at: Utc::now() };
    let payload = serde_json::to_vec(&message).expect("a string, a number and a time always serialize");
    producer.send(Outgoing::new(topic, ANNOUNCEMENT_KEY, &payload), timeout).await.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_document_validates() {
        let builtin = CheckedDocument::builtin().expect("the built-in configuration is valid");
        assert_eq!(builtin.config().default_tier, "default");
    }

    #[test]
    fn an_invalid_document_is_never_checked() {
        let errors = CheckedDocument::parse("default_tier: nope\ntiers: [{name: free}]\n").unwrap_err();
        assert_eq!(errors.0[0].path, "default_tier");
    }

    #[test]
    fn the_announcement_is_the_config_applied_message() {
        let message = ConfigApplied { kind: "config_applied", version: 7, at: "2026-11-22T10:00:00Z".parse().unwrap() };
        let json: serde_json::Value = serde_json::to_value(&message).unwrap();
        assert_eq!(json, serde_json::json!({"type": "config_applied", "version": 7, "at": "2026-11-22T10:00:00Z"}));
    }
}
