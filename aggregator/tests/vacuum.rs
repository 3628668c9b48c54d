//! Component test of the aggregator's own vacuuming, on a fresh migrated Postgres database:
//! after many relayed (inserted, then deleted) outbox rows, the relay's read by the primary
//! key walks every deleted row's index entry until a VACUUM; `vacuum::vacuum` removes them,
//! so the outbox stays the size of its busiest moment rather than of its history; and it
//! skips a table whose lock another instance holds.

use serde_json::Value;
use tally_aggregator::vacuum::{self, CHURNED};
use tally_testkit::TestDatabase;

/// Pages the relay's read of the outbox touches by its primary key (EXPLAIN ANALYZE's buffer
/// counts). The index path is forced: once the table is analyzed, Postgres may read the few
/// live rows by scanning the heap instead, whose size is bounded by the space VACUUM frees.
async fn pages_read_by_relay(db: &TestDatabase) -> i64 {
    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query("SET LOCAL enable_seqscan = off").execute(&mut *tx).await.unwrap();
    let plan: Value =
        sqlx::query_scalar("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) SELECT id, topic, key, payload FROM outbox ORDER BY id LIMIT 2000")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
    let top = &plan[0]["Plan"];
    ["Shared Hit Blocks", "Shared Read Blocks"].iter().map(|k| top[k].as_i64().unwrap_or(0)).sum()
}

/// Relays `rows` outbox rows the way the relay leaves them: inserted, then deleted.
async fn relay_rows(db: &TestDatabase, rows: i64) {
    sqlx::query("INSERT INTO outbox (topic, key, payload) SELECT 't', 'k' || g, '\\x00'::bytea FROM generate_series(1, $1) g")
        .bind(rows)
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM outbox").execute(&db.pool).await.unwrap();
}

async fn outbox_bytes(db: &TestDatabase) -> i64 {
    sqlx::query_scalar("SELECT pg_total_relation_size('outbox')").fetch_one(&db.pool).await.unwrap()
}

#[tokio::test]
async fn vacuuming_the_outbox_frees_the_relays_read_of_every_relayed_row() {
    let db = TestDatabase::create("tally_vacuum_test").await.expect("create the test database");
    // As on a server with autovacuum off, whatever this one's setting.
    sqlx::query("ALTER TABLE outbox SET (autovacuum_enabled = false)").execute(&db.pool).await.unwrap();
    relay_rows(&db, 200_000).await;
    sqlx::query("INSERT INTO outbox (topic, key, payload) SELECT 't', 'k' || g, '\\x00'::bytea FROM generate_series(1, 10) g")
        .execute(&db.pool)
        .await
        .unwrap();
    let before = pages_read_by_relay(&db).await;
    assert!(before > 200, "the read walks the deleted rows' entries: {before} pages");

    let outbox = CHURNED.iter().find(|t| t.table == "outbox").expect("the outbox is vacuumed");
    assert!(vacuum::vacuum(&db.pool, outbox).await.unwrap(), "no other instance holds the lock");
    let after = pages_read_by_relay(&db).await;
    assert!(after < 10, "after VACUUM the read touches the live rows' pages only: {after} pages (before: {before})");
    let live: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox").fetch_one(&db.pool).await.unwrap();
    assert_eq!(live, 10, "VACUUM removes only what was deleted");

    // The freed space is used again: as much traffic again leaves the outbox no bigger.
    let size = outbox_bytes(&db).await;
    relay_rows(&db, 200_000).await;
    assert!(vacuum::vacuum(&db.pool, outbox).await.unwrap());
    let size_again = outbox_bytes(&db).await;
    assert!(size_again <= size + size / 10, "the outbox grew from {size} to {size_again} bytes");
    db.remove().await.expect("drop the test database");
}

#[tokio::test]
async fn a_table_another_instance_is_vacuuming_is_skipped() {
    let db = TestDatabase::create("tally_vacuum_test").await.expect("create the test database");
    let decisions = CHURNED.iter().find(|t| t.table == "decisions").expect("decisions are vacuumed");
    let mut other = db.pool.acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock($1)").bind(decisions.lock).execute(&mut *other).await.unwrap();
    assert!(!vacuum::vacuum(&db.pool, decisions).await.unwrap(), "the lock is held: skipped");
    sqlx::query("SELECT pg_advisory_unlock($1)").bind(decisions.lock).execute(&mut *other).await.unwrap();
    drop(other);
    assert!(vacuum::vacuum(&db.pool, decisions).await.unwrap(), "the lock is free: vacuumed");
    db.remove().await.expect("drop the test database");
}
