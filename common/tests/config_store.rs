//! The configuration store against Postgres, each test on a fresh migrated database
//! (`tally_testkit::TestDatabase`) and no broker: what is applied is what the reads return,
//! and a write based on a version that is no longer the latest is refused and writes nothing.

use tally_common::config_store::{self, ApplyError, Base, CheckedDocument};
use tally_testkit::TestDatabase;

const FREE: &str = "default_tier: free\ntiers:\n  - name: free\n";
const PRO: &str = "default_tier: free\ntiers:\n  - name: free\n  - name: pro\n    priority: 10\n";
const TEAM: &str = "default_tier: free\ntiers:\n  - name: free\n  - name: team\n";

async fn fresh() -> TestDatabase {
    TestDatabase::create("tally_config_store_test").await.expect("create the test database")
}

fn checked(text: &str) -> CheckedDocument {
    CheckedDocument::parse(text).expect("a valid document")
}

#[tokio::test]
async fn an_empty_store_has_no_version() {
    let db = fresh().await;
    assert_eq!(config_store::latest_version(&db.pool).await.unwrap(), None);
    assert_eq!(config_store::latest(&db.pool).await.unwrap(), None);
    assert_eq!(config_store::at_version(&db.pool, 1).await.unwrap(), None);
    db.remove().await.unwrap();
}

#[tokio::test]
async fn latest_and_at_version_return_what_was_applied() {
    let db = fresh().await;
    let first = config_store::apply(&db.pool, &checked(FREE), "test: first", Base::Version(0)).await.unwrap();
    assert!(first.changed);
    let second = config_store::apply(&db.pool, &checked(PRO), "test: second", Base::Version(first.version)).await.unwrap();
    assert!(second.changed && second.version > first.version, "{first:?} then {second:?}");

    let latest = config_store::latest(&db.pool).await.unwrap().expect("a version is stored");
    assert_eq!((latest.version, latest.document.as_str(), latest.source.as_str()), (second.version, PRO, "test: second"));
    assert_eq!(config_store::latest_version(&db.pool).await.unwrap(), Some(second.version));
    let older = config_store::at_version(&db.pool, first.version).await.unwrap().expect("version 1 is kept");
    assert_eq!((older.document.as_str(), older.source.as_str()), (FREE, "test: first"));
    // Reads work on a transaction too (the aggregator reads inside its own).
    let mut tx = db.pool.begin().await.unwrap();
    assert_eq!(config_store::at_version(&mut *tx, second.version).await.unwrap(), Some(latest));
    tx.commit().await.unwrap();
    db.remove().await.unwrap();
}

#[tokio::test]
async fn applying_on_a_stale_base_is_refused_and_changes_nothing() {
    let db = fresh().await;
    let first = config_store::apply(&db.pool, &checked(FREE), "test", Base::Version(0)).await.unwrap();
    let second = config_store::apply(&db.pool, &checked(PRO), "test", Base::Version(first.version)).await.unwrap();

    // An edit that read version 1 and another that read nothing both lost the race.
    for base in [first.version, 0] {
        let refused = config_store::apply(&db.pool, &checked(TEAM), "test: stale", Base::Version(base)).await;
        match refused {
            Err(ApplyError::Stale { base: b, latest }) => assert_eq!((b, latest), (base, second.version)),
            other => panic!("a stale base must be refused, got {other:?}"),
        }
    }
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM config_versions").fetch_one(&db.pool).await.unwrap();
    assert_eq!(count, 2, "nothing was written");
    let latest = config_store::latest(&db.pool).await.unwrap().unwrap();
    assert_eq!((latest.version, latest.document.as_str()), (second.version, PRO));
    db.remove().await.unwrap();
}

#[tokio::test]
async fn the_same_document_again_is_not_a_new_version() {
    let db = fresh().await;
    let first = config_store::apply(&db.pool, &checked(FREE), "test", Base::Any).await.unwrap();
    let again = config_store::apply(&db.pool, &checked(FREE), "test", Base::Any).await.unwrap();
    assert_eq!((again.version, again.changed), (first.version, false));
    let replaced = config_store::apply(&db.pool, &checked(PRO), "test", Base::Any).await.unwrap();
    assert!(replaced.changed && replaced.version > first.version);
    db.remove().await.unwrap();
}
