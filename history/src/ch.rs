//! A small ClickHouse client over the HTTP interface.
//!
//! Plain HTTP through `reqwest` rather than the `clickhouse` crate: the statements Tally
//! sends are few and fixed, rows travel as `JSONEachRow` (which ClickHouse 18.16 and current
//! releases read and write alike), and there is no RowBinary schema, compression or
//! validation mode to keep compatible with an old server. Values in queries are always
//! quoted with [`quote`]; ClickHouse 18.16 has no server-side query parameters.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tally_common::clickhouse::ClickHouseSettings;

/// Why a ClickHouse call failed.
#[derive(Debug, thiserror::Error)]
pub enum ChError {
    /// The server could not be reached or did not answer in time. Retryable.
    #[error("ClickHouse at {url} is unreachable: {source}")]
    Unreachable { url: String, source: reqwest::Error },
    /// The server answered with an error status.
    #[error("ClickHouse refused a query ({status}): {message}")]
    Refused { status: u16, message: String },
    /// An answer row did not have the expected shape.
    #[error("ClickHouse answered a row Tally cannot read: {0}")]
    Decode(String),
}

impl ChError {
    /// Whether trying the same call again may succeed: the server was unreachable or
    /// answered with a server-side error (5xx), e.g. while it starts or is overloaded.
    pub fn is_retryable(&self) -> bool {
        match self {
            ChError::Unreachable { .. } => true,
            ChError::Refused { status, .. } => *status >= 500,
            ChError::Decode(_) => false,
        }
    }
}

/// A handle on Tally's history database.
#[derive(Clone)]
pub struct Ch {
    http: reqwest::Client,
    url: String,
    database: String,
}

impl Ch {
    pub fn new(settings: &ClickHouseSettings) -> Self {
        let http =
            reqwest::Client::builder().connect_timeout(Duration::from_secs(3)).timeout(Duration::from_secs(60)).build().unwrap_or_default();
        Ch { http, url: settings.clickhouse_url.clone(), database: settings.clickhouse_database.clone() }
    }

    /// `` `database`.table ``.
    pub fn table(&self, name: &str) -> String {
        format!("`{}`.{}", self.database.replace('`', ""), name)
    }

    async fn send(&self, params: &[(&str, &str)], body: String) -> Result<String, ChError> {
        let response = self
            .http
            .post(&self.url)
            .query(params)
            .body(body)
            .send()
            .await
            .map_err(|source| ChError::Unreachable { url: self.url.clone(), source })?;
        let status = response.status();
        let text = response.text().await.map_err(|source| ChError::Unreachable { url: self.url.clone(), source })?;
        if !status.is_success() {
            return Err(ChError::Refused { status: status.as_u16(), message: text.trim().chars().take(2000).collect() });
        }
        Ok(text)
    }

    /// Runs a statement that returns nothing.
    pub async fn execute(&self, sql: &str) -> Result<(), ChError> {
        self.send(&[], sql.to_string()).await.map(|_| ())
    }

    /// Runs a SELECT and decodes each row (JSONEachRow, 64-bit integers as numbers).
    pub async fn select<T: DeserializeOwned>(&self, sql: &str) -> Result<Vec<T>, ChError> {
        let params = [("output_format_json_quote_64bit_integers", "0")];
        let text = self.send(&params, format!("{sql} FORMAT JSONEachRow")).await?;
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).map_err(|e| ChError::Decode(format!("{e}: {}", l.chars().take(200).collect::<String>()))))
            .collect()
    }

    /// Inserts rows into `table` (a name from [`Ch::table`]) as JSONEachRow.
    pub async fn insert<T: Serialize>(&self, table: &str, rows: &[T]) -> Result<(), ChError> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut body = String::new();
        for row in rows {
            body.push_str(&serde_json::to_string(row).map_err(|e| ChError::Decode(e.to_string()))?);
            body.push('\n');
        }
        let query = format!("INSERT INTO {table} FORMAT JSONEachRow");
        self.send(&[("query", query.as_str())], body).await.map(|_| ())
    }
}

/// A ClickHouse string literal: `'...'` with backslashes and quotes escaped.
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("\\'"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\0' => out.push_str("\\0"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// A DateTime literal in UTC from seconds since the epoch.
pub fn datetime(epoch_seconds: i64) -> String {
    format!("toDateTime({epoch_seconds}, 'UTC')")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quote_escapes_what_would_end_the_literal() {
        assert_eq!(quote("alice"), "'alice'");
        assert_eq!(quote("o'brien"), "'o\\'brien'");
        assert_eq!(quote("a\\'); DROP"), "'a\\\\\\'); DROP'");
        assert_eq!(quote("x\ny"), "'x\\ny'");
    }

    #[test]
    fn retryable_errors_are_unreachable_or_server_side() {
        assert!(ChError::Refused { status: 503, message: String::new() }.is_retryable());
        assert!(!ChError::Refused { status: 400, message: String::new() }.is_retryable());
        assert!(!ChError::Decode(String::new()).is_retryable());
    }
}
