//! The history database: the `clickhouse` crate's client bound to it, with time limits, and
//! what a failed call means.
//!
//! Every statement names its tables bare (the client is bound to the history database) and
//! passes every value as a server-side query parameter (`{name: Type}`, [`Query::param`]);
//! rows are typed ([`clickhouse::Row`]) and travel in `RowBinary`, validated against the
//! table's schema, LZ4-compressed ([`ClickHouseSettings::client`]).
//!
//! The crate's `inserter` is not used: it ends an INSERT when a size or a time is reached, so
//! a batch's rows would be cut into inserts whose boundaries depend on timing, and a replayed
//! batch would not be the same inserts under the same deduplication tokens. The writer sends
//! one INSERT per batch ([`Ch::insert`]) and commits its progress after ClickHouse
//! acknowledged it.

use std::future::Future;
use std::time::Duration;

use clickhouse::query::Query;
use clickhouse::{Row, RowOwned, RowRead, RowWrite};
use tally_common::clickhouse::ClickHouseSettings;

/// Longest wait for one call: an unanswered call counts as ClickHouse being unreachable.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a ClickHouse call failed.
#[derive(Debug, thiserror::Error)]
pub enum ChError {
    /// The server could not be reached or did not answer in time. Retryable.
    #[error("ClickHouse at {url} is unreachable: {message}")]
    Unreachable { url: String, message: String },
    /// The server refused the call; `code` is ClickHouse's error code when it gave one.
    #[error("ClickHouse refused a query: {message}")]
    Refused { code: Option<u32>, message: String },
    /// Rows did not match their type (schema validation), or an answer could not be read.
    #[error("ClickHouse rows do not match what Tally expects: {0}")]
    Decode(String),
}

/// ClickHouse error codes that the same call meets again however often it is retried: the
/// statement, the schema or the access is wrong, not the server's state.
const PERMANENT_CODES: &[u32] = &[
    1,   // UNSUPPORTED_METHOD
    6,   // CANNOT_PARSE_TEXT
    8,   // THERE_IS_NO_COLUMN
    10,  // NOT_FOUND_COLUMN_IN_BLOCK
    16,  // NO_SUCH_COLUMN_IN_TABLE
    20,  // NUMBER_OF_COLUMNS_DOESNT_MATCH
    26,  // CANNOT_PARSE_QUOTED_STRING
    27,  // CANNOT_PARSE_INPUT_ASSERTION_FAILED
    36,  // BAD_ARGUMENTS
    43,  // ILLEGAL_TYPE_OF_ARGUMENT
    47,  // UNKNOWN_IDENTIFIER
    48,  // NOT_IMPLEMENTED
    53,  // TYPE_MISMATCH
    60,  // UNKNOWN_TABLE
    62,  // SYNTAX_ERROR
    70,  // CANNOT_CONVERT_TYPE
    81,  // UNKNOWN_DATABASE
    117, // INCORRECT_DATA
    192, // UNKNOWN_USER
    456, // UNKNOWN_QUERY_PARAMETER
    457, // BAD_QUERY_PARAMETER
    497, // ACCESS_DENIED
    516, // AUTHENTICATION_FAILED
];

impl ChError {
    /// Whether trying the same call again may succeed: the server was unreachable, or it
    /// refused for a reason of its state (overloaded, too many parts, out of memory, starting).
    /// A refusal of the statement or the schema, or rows that do not match, would come back.
    pub fn is_retryable(&self) -> bool {
        match self {
            ChError::Unreachable { .. } => true,
            ChError::Refused { code, .. } => code.is_none_or(|c| !PERMANENT_CODES.contains(&c)),
            ChError::Decode(_) => false,
        }
    }

    fn from_crate(url: &str, e: clickhouse::error::Error) -> ChError {
        use clickhouse::error::Error as E;
        match e {
            E::Network(_) | E::TimedOut => ChError::Unreachable { url: url.to_string(), message: e.to_string() },
            E::BadResponse(message) => ChError::Refused { code: error_code(&message), message: message.chars().take(2000).collect() },
            E::SchemaMismatch(_)
            | E::NotEnoughData
            | E::DataFormat(_)
            | E::InvalidUtf8Encoding(_)
            | E::InvalidTagEncoding(_)
            | E::Custom(_)
            | E::InvalidColumnsHeader(_)
            | E::RowNotFound
            | E::DeserializeAnyNotSupported
            | E::SequenceMustHaveLength
            | E::InvalidParams(_)
            | E::Unsupported(_) => ChError::Decode(e.to_string()),
            other => ChError::Refused { code: None, message: other.to_string() },
        }
    }
}

/// The code of a ClickHouse exception text (`Code: 60. DB::Exception: ...`).
fn error_code(message: &str) -> Option<u32> {
    let rest = &message[message.find("Code: ")? + "Code: ".len()..];
    rest[..rest.find(|c: char| !c.is_ascii_digit())?].parse().ok()
}

/// A handle on Tally's history database.
#[derive(Clone)]
pub struct Ch {
    client: clickhouse::Client,
    url: String,
}

impl Ch {
    pub fn new(settings: &ClickHouseSettings) -> Self {
        Ch { client: settings.client(), url: settings.clickhouse_url.clone() }
    }

    /// A statement to run with [`Ch::execute`] or [`Ch::fetch_all`]: `?fields` stands for the
    /// row type's columns, `{name: Type}` for a parameter given with [`Query::param`].
    pub fn query(&self, sql: &str) -> Query {
        self.client.query(sql)
    }

    async fn timed<T>(&self, call: impl Future<Output = clickhouse::error::Result<T>>) -> Result<T, ChError> {
        match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(result) => result.map_err(|e| ChError::from_crate(&self.url, e)),
            Err(_) => Err(ChError::from_crate(&self.url, clickhouse::error::Error::TimedOut)),
        }
    }

    /// Runs a statement that returns nothing.
    pub async fn execute(&self, query: Query) -> Result<(), ChError> {
        self.timed(query.execute()).await
    }

    /// Runs a SELECT and reads every row as a `T`.
    pub async fn fetch_all<T: RowOwned + RowRead>(&self, query: Query) -> Result<Vec<T>, ChError> {
        self.timed(query.fetch_all::<T>()).await
    }

    /// Inserts `rows` into `table` as one INSERT. With `token`, the insert carries it as its
    /// `insert_deduplication_token`: on a table with a deduplication window, the same insert
    /// with the same token stores its rows once however often it is sent.
    pub async fn insert<T: Row + RowWrite>(&self, table: &str, rows: &[T::Value<'_>], token: Option<&str>) -> Result<(), ChError> {
        if rows.is_empty() {
            return Ok(());
        }
        let write = async {
            let mut insert = self.client.insert::<T>(table).await?.with_timeouts(Some(CALL_TIMEOUT), Some(CALL_TIMEOUT));
            if let Some(token) = token {
                insert = insert.with_setting("insert_deduplication_token", token);
            }
            for row in rows {
                insert.write(row).await?;
            }
            insert.end().await
        };
        self.timed(write).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exception_codes_are_read_from_the_text() {
        assert_eq!(error_code("Code: 60. DB::Exception: Unknown table expression identifier 'x'. (UNKNOWN_TABLE)"), Some(60));
        assert_eq!(error_code("Code: 241. DB::Exception: Memory limit exceeded"), Some(241));
        assert_eq!(error_code("bad response"), None);
    }

    #[test]
    fn retryable_errors_are_unreachable_or_of_the_servers_state() {
        let refused = |code| ChError::Refused { code, message: String::new() };
        assert!(refused(Some(241)).is_retryable(), "memory limit");
        assert!(refused(Some(252)).is_retryable(), "too many parts");
        assert!(refused(None).is_retryable());
        assert!(!refused(Some(60)).is_retryable(), "unknown table");
        assert!(!refused(Some(16)).is_retryable(), "no such column");
        assert!(!ChError::Decode(String::new()).is_retryable());
        assert!(ChError::Unreachable { url: String::new(), message: String::new() }.is_retryable());
    }
}
