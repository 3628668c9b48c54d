//! API keys: generation, ids, and last-use bookkeeping.
//!
//! Contract:
//! - A key is `tally_sk_` followed by 64 hex characters of 32 random bytes from the
//!   operating system. It is returned once, in the creation answer; Tally stores only its
//!   SHA-256 (in the configuration's `api_keys`, like `tally config apply` does).
//! - A key's id (`key_` + the first 16 hex characters of its SHA-256) is derived, so keys
//!   listed in a hand-written configuration have one too.
//! - Last use is recorded off the hot path: a check notes the key in memory, and a task
//!   writes the notes to `api_key_usage` with one statement per second (and once more at
//!   shutdown). A crash loses at most that second of last-use times, never a key.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;

pub const KEY_PREFIX: &str = "tally_sk_";

/// A new random key.
pub fn generate() -> anyhow::Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("the operating system's random source failed: {e}"))?;
    Ok(format!("{KEY_PREFIX}{}", hex::encode(bytes)))
}

/// The id of the key with this SHA-256 hex.
pub fn key_id(key_sha256: &str) -> String {
    format!("key_{}", key_sha256.get(..16).unwrap_or(key_sha256))
}

/// Last uses noted since the last flush, per key hash.
#[derive(Default)]
pub struct LastUse {
    pending: Mutex<HashMap<String, DateTime<Utc>>>,
}

impl LastUse {
    /// Notes a use; cheap (one short lock, no I/O). Memory is bounded by the number of
    /// configured keys, since only keys found in the configuration are noted.
    pub fn note(&self, key_sha256: &str, at: DateTime<Utc>) {
        let mut pending = match self.pending.lock() {
            Ok(p) => p,
            Err(poisoned) => poisoned.into_inner(),
        };
        let e = pending.entry(key_sha256.to_string()).or_insert(at);
        if *e < at {
            *e = at;
        }
    }

    /// Writes the pending notes with one statement; on failure they are kept for the next try.
    pub async fn flush(&self, pool: &PgPool) -> Result<usize, sqlx::Error> {
        let batch: Vec<(String, DateTime<Utc>)> = {
            let mut pending = match self.pending.lock() {
                Ok(p) => p,
                Err(poisoned) => poisoned.into_inner(),
            };
            pending.drain().collect()
        };
        if batch.is_empty() {
            return Ok(0);
        }
        let hashes: Vec<String> = batch.iter().map(|(h, _)| h.clone()).collect();
        let ids: Vec<String> = batch.iter().map(|(h, _)| key_id(h)).collect();
        let times: Vec<DateTime<Utc>> = batch.iter().map(|(_, t)| *t).collect();
        let result = sqlx::query(
            "INSERT INTO api_key_usage (key_sha256, key_id, last_used_at)
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::timestamptz[])
             ON CONFLICT (key_sha256) DO UPDATE
             SET last_used_at = GREATEST(api_key_usage.last_used_at, EXCLUDED.last_used_at)",
        )
        .bind(&hashes)
        .bind(&ids)
        .bind(&times)
        .execute(pool)
        .await;
        if let Err(e) = result {
            for (h, t) in batch {
                self.note(&h, t);
            }
            return Err(e);
        }
        Ok(hashes.len())
    }

    /// Flushes every second until the task is aborted.
    pub fn spawn_flusher(self: &std::sync::Arc<Self>, pool: PgPool) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if let Err(e) = me.flush(&pool).await {
                    tracing::warn!(error = %e, "failed to record API key last use; will retry");
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_random_prefixed_and_have_derived_ids() {
        let a = generate().unwrap();
        let b = generate().unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with(KEY_PREFIX) && a.len() == KEY_PREFIX.len() + 64);
        assert_eq!(key_id(&"ab".repeat(32)), "key_abababababababab");
    }
}
