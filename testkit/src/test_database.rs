//! A fresh Postgres database for one component test, with Tally's migrations applied.

use anyhow::Context;
use sqlx::PgPool;
use tally_common::postgres::{migrate, PostgresSettings};

use crate::{random_id, with_database, Servers};

/// Connections in a test database's pool.
const POOL_SIZE: u32 = 4;

/// A migrated database of its own, named `<prefix>_<random id>`. It stays on the server
/// until [`TestDatabase::remove`]: a test calls that when it passes, and a failing test's
/// database is kept for a look.
pub struct TestDatabase {
    pub settings: PostgresSettings,
    pub pool: PgPool,
}

impl TestDatabase {
    /// A new database on the server of `TALLY_DATABASE_URL` ([`Servers::from_env`]).
    pub async fn create(prefix: &str) -> anyhow::Result<TestDatabase> {
        TestDatabase::create_on(&Servers::from_env().postgres, prefix).await
    }

    /// A new database on the server of `server_url` (a Postgres URL; its database part is
    /// replaced).
    pub async fn create_on(server_url: &str, prefix: &str) -> anyhow::Result<TestDatabase> {
        let name = format!("{prefix}_{}", random_id());
        let settings = PostgresSettings { database_url: with_database(server_url, &name)?, pool_size: POOL_SIZE };
        settings.create_database_if_missing().await?;
        let pool = settings.connect().await?;
        migrate(&pool).await.with_context(|| format!("failed to migrate the test database {name}"))?;
        Ok(TestDatabase { settings, pool })
    }

    /// The database's name.
    pub fn name(&self) -> String {
        self.settings.database().unwrap_or_default()
    }

    /// Closes the pool (every clone of it) and drops the database.
    pub async fn remove(self) -> anyhow::Result<()> {
        self.pool.close().await;
        self.settings.drop_database().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn exists(name: &str) -> bool {
        let server = PostgresSettings { database_url: Servers::from_env().postgres, pool_size: 1 }.connect().await.unwrap();
        let found = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)").bind(name).fetch_one(&server).await;
        server.close().await;
        found.unwrap()
    }

    #[tokio::test]
    async fn a_test_database_is_migrated_and_removed() {
        let db = TestDatabase::create("tally_testkit_test").await.unwrap();
        let name = db.name();
        assert!(name.starts_with("tally_testkit_test_"), "{name}");
        let offsets: i64 = sqlx::query_scalar("SELECT count(*) FROM consumer_offsets").fetch_one(&db.pool).await.unwrap();
        assert_eq!(offsets, 0);
        assert!(exists(&name).await);
        db.remove().await.unwrap();
        assert!(!exists(&name).await);
    }
}
