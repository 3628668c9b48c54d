//! The tier configuration as the API sees it, and the admin API's edits of it.
//!
//! Contract:
//! - The configuration is the same data `tally config apply` writes: whole YAML documents in
//!   the configuration store (`tally_common::config_store`), the highest version in force
//!   (the built-in default, version 0, when none was applied).
//! - [`ConfigCache`] keeps the version in force in memory for the check path (API key
//!   lookups, the tier of a subject with no decision yet). A background task polls for a
//!   newer version every 500 ms; an edit made through this API instance is cached at once.
//! - [`Editor::edit`] applies ONE change: it loads the latest document as a typed
//!   [`ConfigDocument`], changes it, validates the result with [`Config::from_yaml_str`]
//!   (nothing is written if it is invalid), and stores it as a new version only if no other
//!   version landed since it was loaded (optimistic concurrency, `config_store::Base`; it
//!   re-applies the change on the newer document up to three times, then answers 409).
//!   After the commit it announces `{"type":"config_applied","version":N}` on the control
//!   topic so aggregators re-evaluate at once; if that fails they still pick the version up
//!   within their 200 ms tick.
//! - Edits write the document back from its typed form: comments (and empty sections) of a
//!   hand-written file do not survive an admin edit (the previous versions keep them); every
//!   item, and the order of lists and mappings, does.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::http::StatusCode;
use sqlx::PgPool;
use tally_common::config_store::{self, ApplyError, Base, CheckedDocument, StoredVersion};
use tally_common::producing::RebuildingProducer;
use tally_domain::config::{Config, ConfigDocument, ConfigErrors};

use crate::error::AppError;

/// One version of the configuration.
pub struct Loaded {
    /// 0 for the built-in default.
    pub version: i64,
    pub document: String,
    pub config: Config,
}

impl Loaded {
    pub fn builtin() -> anyhow::Result<Loaded> {
        let builtin = CheckedDocument::builtin().map_err(|e| anyhow::anyhow!("the built-in configuration is invalid: {e}"))?;
        Ok(Loaded::checked(0, builtin))
    }

    fn checked(version: i64, document: CheckedDocument) -> Loaded {
        Loaded { version, config: document.config().clone(), document: document.text().to_string() }
    }

    fn stored(stored: StoredVersion) -> anyhow::Result<Loaded> {
        let version = stored.version;
        let document =
            CheckedDocument::parse(stored.document).map_err(|e| anyhow::anyhow!("configuration version {version} is invalid: {e}"))?;
        Ok(Loaded::checked(version, document))
    }
}

/// The configuration version in force, in memory.
pub struct ConfigCache {
    current: RwLock<Arc<Loaded>>,
}

impl ConfigCache {
    pub fn new(loaded: Loaded) -> ConfigCache {
        ConfigCache { current: RwLock::new(Arc::new(loaded)) }
    }

    pub fn current(&self) -> Arc<Loaded> {
        match self.current.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Keeps `loaded` if it is newer than the cached version.
    pub fn offer(&self, loaded: Loaded) {
        let mut current = match self.current.write() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        if loaded.version > current.version {
            *current = Arc::new(loaded);
        }
    }

    /// Loads the latest version from the store if it is newer than the cached one.
    pub async fn refresh(&self, pool: &PgPool) -> anyhow::Result<()> {
        let Some(latest) = config_store::latest_version(pool).await? else { return Ok(()) };
        if latest <= self.current().version {
            return Ok(());
        }
        let Some(stored) = config_store::at_version(pool, latest).await? else { return Ok(()) };
        self.offer(Loaded::stored(stored)?);
        Ok(())
    }

    /// Polls Postgres for newer versions until the task is aborted.
    pub fn spawn_refresher(self: &Arc<Self>, pool: PgPool) -> tokio::task::JoinHandle<()> {
        let cache = self.clone();
        tokio::spawn(async move {
            loop {
                if let Err(e) = cache.refresh(&pool).await {
                    tracing::warn!(error = %e, "failed to refresh the tier configuration");
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    }
}

/// Announces configuration versions on the control topic.
pub struct Announcer {
    pub producer: Arc<RebuildingProducer>,
    pub topic: String,
}

impl Announcer {
    async fn announce(&self, version: i64) {
        if let Err(e) = config_store::announce(&self.producer, &self.topic, version, Duration::from_secs(5)).await {
            tracing::warn!(error = %e, version, topic = %self.topic, "announcing a configuration version failed; aggregators pick it up at their next tick");
        }
    }
}

/// Applies admin changes to the configuration in Postgres.
pub struct Editor {
    pub pool: PgPool,
    pub cache: Arc<ConfigCache>,
    pub announcer: Option<Announcer>,
}

/// What one change did.
pub struct Edited<T> {
    pub value: T,
    pub version: i64,
}

/// The version an edit starts from.
struct EditBase {
    /// 0 for the built-in default.
    version: i64,
    document: String,
}

impl Editor {
    /// The latest stored version and document (the built-in default when none).
    async fn base(&self) -> Result<EditBase, AppError> {
        Ok(match config_store::latest(&self.pool).await? {
            Some(stored) => EditBase { version: stored.version, document: stored.document },
            None => EditBase { version: 0, document: config_store::BUILTIN_DOCUMENT.to_string() },
        })
    }

    /// Applies `change` to the latest document and stores the result as a new version; see
    /// the module docs. `prefix` is the configuration path of the item the request is
    /// about (e.g. `tiers.gold`): validation errors under it name the request's field.
    pub async fn edit<T>(
        &self,
        source: &str,
        prefix: &str,
        mut change: impl FnMut(&mut ConfigDocument) -> Result<T, AppError>,
    ) -> Result<Edited<T>, AppError> {
        for _ in 0..4 {
            let base = self.base().await?;
            let mut document = read_document(base.version, &base.document)?;
            let value = change(&mut document)?;
            let text = document.to_yaml_string().map_err(|e| AppError::unavailable("configuration encoder", e))?;
            let document = CheckedDocument::parse(text).map_err(|e| config_error(&e, prefix))?;
            match config_store::apply(&self.pool, &document, source, Base::Version(base.version)).await {
                Ok(applied) if applied.changed => {
                    self.cache.offer(Loaded::checked(applied.version, document));
                    if let Some(a) = &self.announcer {
                        a.announce(applied.version).await;
                    }
                    return Ok(Edited { value, version: applied.version });
                }
                Ok(unchanged) => return Ok(Edited { value, version: unchanged.version }),
                Err(ApplyError::Stale { base, .. }) => {
                    tracing::info!(base, "configuration changed while editing; retrying on the newer version");
                }
                Err(ApplyError::Database(e)) => return Err(e.into()),
            }
        }
        Err(AppError::conflict(None, "the configuration kept changing during this edit; retry"))
    }
}

/// A stored version's document, typed; a version that does not read is a 503 (it validated
/// when it was stored, so that is a bug or a hand-edited row).
pub fn read_document(version: i64, text: &str) -> Result<ConfigDocument, AppError> {
    ConfigDocument::from_yaml_str(text)
        .map_err(|e| AppError::unavailable("configuration in force", format!("version {version} does not read: {e}")))
}

/// The first configuration error as a 400 (or 409 for a broken reference elsewhere).
fn config_error(e: &ConfigErrors, prefix: &str) -> AppError {
    let Some(first) = e.0.first() else { return AppError::bad("body", "invalid configuration") };
    // `prefix` names a section (`overrides`) or an item (`tiers.gold`); an index right after
    // it (`overrides[3].rate`) is the item the request added.
    let inner = first.path.strip_prefix(prefix).filter(|r| r.is_empty() || r.starts_with(['.', '['])).map(|rest| {
        let rest = if rest.starts_with('[') { rest.split_once(']').map(|(_, r)| r).unwrap_or(rest) } else { rest };
        rest.trim_start_matches('.')
    });
    if inner.is_some() && first.message.contains("overlaps") {
        return AppError::new(StatusCode::CONFLICT, first.message.clone(), Some("subject"));
    }
    match inner {
        Some(field) => AppError::bad(if field.is_empty() { "body" } else { field }, first.message.clone()),
        // The change broke something that refers to it (e.g. a group still maps to a
        // deleted tier): a conflict with the rest of the configuration.
        None => AppError::new(StatusCode::CONFLICT, format!("{}: {}", first.path, first.message), Some(&first.path)),
    }
}
