//! Postgres settings, pool, database creation and migrations, and which failures are
//! transient ([`is_transient`]).
//!
//! Migrations live in `migrations/postgres` at the repo root and are embedded in the binary.

use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};

/// How a database Tally creates compares text: byte for byte (the `C` collation), not by the
/// server's locale. Tally's text columns are identifiers (event ids, subjects, metrics),
/// which it never sorts for people, and every key lookup compares them: with a locale
/// collation each comparison goes through `strcoll`. Only the collation is set; the
/// encoding and character classes stay the server's. On a cluster whose default locale
/// provider is ICU (PostgreSQL 15 and later), the database inherits ICU and this changes
/// nothing (`LOCALE_PROVIDER libc`, which would, is a syntax error before 15).
pub const BYTE_ORDER_COLLATION: &str = "TEMPLATE template0 LC_COLLATE 'C'";

/// Where Tally's Postgres database is.
#[derive(Debug, Clone, clap::Args)]
pub struct PostgresSettings {
    /// Postgres URL of Tally's database, e.g. postgres://postgres@127.0.0.1:5432/tally.
    #[arg(long = "database-url", env = "TALLY_DATABASE_URL", default_value = "postgres://postgres@127.0.0.1:5432/tally")]
    pub database_url: String,
    /// Connections in the pool.
    #[arg(long = "database-pool-size", env = "TALLY_DATABASE_POOL_SIZE", default_value_t = 8)]
    pub pool_size: u32,
}

impl PostgresSettings {
    fn options(&self) -> anyhow::Result<PgConnectOptions> {
        self.database_url
            .parse::<PgConnectOptions>()
            .context("TALLY_DATABASE_URL is not a valid Postgres URL")
            .map(|o| o.disable_statement_logging())
    }

    /// The database name in the URL.
    pub fn database(&self) -> anyhow::Result<String> {
        Ok(self.options()?.get_database().unwrap_or("postgres").to_string())
    }

    pub async fn connect(&self) -> anyhow::Result<PgPool> {
        PgPoolOptions::new()
            .max_connections(self.pool_size)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(self.options()?)
            .await
            .with_context(|| format!("failed to connect to Postgres database {}", self.database().unwrap_or_default()))
    }

    /// Creates the database named in the URL if it does not exist, connecting to the
    /// server's `postgres` database to do so. It compares text byte for byte
    /// ([`BYTE_ORDER_COLLATION`]).
    pub async fn create_database_if_missing(&self) -> anyhow::Result<()> {
        let name = self.database()?;
        let admin = self.options()?.database("postgres");
        let mut conn = admin.connect().await.context("failed to connect to the Postgres server")?;
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)").bind(&name).fetch_one(&mut conn).await?;
        if !exists {
            let quoted = format!("\"{}\"", name.replace('"', "\"\""));
            match sqlx::query(&format!("CREATE DATABASE {quoted} {BYTE_ORDER_COLLATION}")).execute(&mut conn).await {
                Ok(_) => {}
                // Another process created it between our check and our CREATE.
                Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => {}
                Err(e) => return Err(e).with_context(|| format!("failed to create database {name}")),
            }
        }
        conn.close().await.ok();
        Ok(())
    }

    /// Drops the database named in the URL (used by tests to clean up).
    pub async fn drop_database(&self) -> anyhow::Result<()> {
        let name = self.database()?;
        let mut conn = self.options()?.database("postgres").connect().await?;
        let quoted = format!("\"{}\"", name.replace('"', "\"\""));
        sqlx::query(&format!("DROP DATABASE IF EXISTS {quoted} WITH (FORCE)")).execute(&mut conn).await?;
        Ok(())
    }
}

/// Applies the embedded Postgres migrations.
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::migrate!("../migrations/postgres").run(pool).await.context("failed to run the Postgres migrations")
}

/// Whether a Postgres or connection failure says nothing about the statements that met it,
/// so the same transaction may well succeed if tried again: connection exceptions (class
/// 08), transaction rollbacks such as serialization failures and deadlocks (40),
/// insufficient resources (53), operator intervention such as a shutdown (57), system
/// errors (58), a lock not available (55P03), a read-only server (25006, as after a
/// failover until the pool reaches the new primary), and every failure to reach or keep the
/// server. Any other failure comes back when the same statements are tried again.
pub fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => {
            let code = db.code();
            let code = code.as_deref().unwrap_or_default();
            ["08", "40", "53", "57", "58"].iter().any(|class| code.starts_with(class)) || ["55P03", "25006"].contains(&code)
        }
        sqlx::Error::Configuration(_)
        | sqlx::Error::InvalidArgument(_)
        | sqlx::Error::RowNotFound
        | sqlx::Error::TypeNotFound { .. }
        | sqlx::Error::ColumnIndexOutOfBounds { .. }
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::Encode(_)
        | sqlx::Error::Decode(_) => false,
        // I/O, TLS, protocol, pool timeouts, a crashed worker, and what sqlx may add.
        _ => true,
    }
}
