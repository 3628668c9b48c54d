//! Pointing a Postgres URL at another database on the same server.

/// A URL [`with_database`] cannot point at another database. The URL is shown with its
/// password, if any, masked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the Postgres URL {url:?} cannot name another database: {reason}")]
pub struct BadDatabaseUrl {
    pub url: String,
    pub reason: String,
}

/// Schemes Postgres clients accept for a server URL.
const POSTGRES_SCHEMES: [&str; 2] = ["postgres", "postgresql"];

/// `url` with its database (the path) replaced by `database`; user, password, host, port and
/// query string (`?sslmode=...`) are kept. A URL without a database part gets one. Fails,
/// naming the URL, when it is not a `postgres://` or `postgresql://` URL.
pub fn with_database(url: &str, database: &str) -> Result<String, BadDatabaseUrl> {
    let bad = |reason: String| BadDatabaseUrl { url: masked(url), reason };
    let mut parsed = url::Url::parse(url).map_err(|e| bad(e.to_string()))?;
    if !POSTGRES_SCHEMES.contains(&parsed.scheme()) {
        return Err(bad(format!("the scheme is {:?}, not postgres or postgresql", parsed.scheme())));
    }
    if parsed.cannot_be_a_base() {
        return Err(bad("it has no server part (postgres://host/database)".to_string()));
    }
    parsed.set_path(&format!("/{database}"));
    Ok(parsed.into())
}

/// `url` with its password replaced by `***`; as given when it does not parse.
fn masked(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            // Only a URL that cannot be a base refuses a password, and it has none.
            let _ = parsed.set_password(Some("***"));
            parsed.into()
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each URL pointed at database `b`, and what it must become.
    fn rewritten(cases: &[(&str, &str)]) {
        for (url, expected) in cases {
            assert_eq!(with_database(url, "b").as_deref(), Ok(*expected), "{url}");
        }
    }

    #[test]
    fn the_database_part_is_replaced_and_the_rest_kept() {
        rewritten(&[
            ("postgres://u@h:5432/tally", "postgres://u@h:5432/b"),
            ("postgresql://u:p%40ss@[::1]:6432/tally", "postgresql://u:p%40ss@[::1]:6432/b"),
        ]);
    }

    #[test]
    fn the_query_string_is_kept() {
        rewritten(&[
            ("postgres://u@h/tally?sslmode=disable&application_name=x", "postgres://u@h/b?sslmode=disable&application_name=x"),
            // A socket directory in the query string, and no host.
            ("postgres:///tally?host=/var/run/postgresql", "postgres:///b?host=/var/run/postgresql"),
        ]);
    }

    #[test]
    fn a_url_without_a_database_part_gets_one() {
        rewritten(&[
            ("postgres://u@h:5432", "postgres://u@h:5432/b"),
            ("postgres://u@h:5432/?sslmode=require", "postgres://u@h:5432/b?sslmode=require"),
        ]);
    }

    #[test]
    fn a_url_that_is_not_postgres_is_refused_by_name() {
        for url in ["tally", "postgres:tally", "http://h/tally", ""] {
            let e = with_database(url, "b").unwrap_err();
            assert_eq!(e.url, url);
            assert!(e.to_string().contains(&format!("{url:?}")), "{e}");
        }
        assert!(with_database("http://h/tally", "b").unwrap_err().reason.contains("\"http\""));
    }

    #[test]
    fn a_refused_url_has_its_password_masked() {
        let e = with_database("mysql://u:secret@h/tally", "b").unwrap_err();
        assert_eq!(e.url, "mysql://u:***@h/tally");
        assert!(!e.to_string().contains("secret"), "{e}");
    }
}
