//! Component tests of the history tables on the real ClickHouse server (`TALLY_CLICKHOUSE_URL`,
//! as `scripts/stack env` prints it), each in a database of its own: the migration of the
//! first schema's tables copies every row, and the rollups follow; an insert sent again with
//! its deduplication token stores nothing; a batch written again leaves no duplicate in raw
//! rows or rollups; the same event id on two UTC days is two events.

use chrono::{DateTime, NaiveDate, Utc};
use clickhouse::Row;
use serde::Deserialize;
use tally_common::clickhouse::ClickHouseSettings;
use tally_domain::event::{event_day, parse_event};
use tally_history::client::Ch;
use tally_history::sink::{dedup_token, Counted, RawRow, Sink};
use tally_testkit::{random_id, Servers};

/// A database of this test's own, dropped when the test passes.
struct Db {
    settings: ClickHouseSettings,
}

impl Db {
    fn new() -> Db {
        let settings = ClickHouseSettings {
            clickhouse_url: Servers::from_env().clickhouse,
            clickhouse_database: format!("tally_history_test_{}", random_id()),
        };
        Db { settings }
    }

    fn client(&self) -> clickhouse::Client {
        self.settings.client()
    }

    async fn i64(&self, sql: &str) -> i64 {
        self.client().query(sql).fetch_one::<i64>().await.unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    async fn drop(self) {
        self.settings.drop_database().await.expect("drop the test database");
    }
}

fn counted(json: &str) -> Counted {
    let event = parse_event(json.as_bytes()).expect("a valid event");
    let fingerprint = event.fingerprint();
    Counted::new(event, fingerprint)
}

/// Per table: rows under FINAL and the sums of events, tokens and cost, so that a duplicate
/// anywhere shows to the token and the micro-dollar.
#[derive(Debug, PartialEq, Eq, Deserialize, Row)]
struct Totals {
    rows: u64,
    events: i64,
    tokens: i64,
    cost: i64,
}

async fn totals(db: &Db, table: &str, events: &str) -> Totals {
    let sql = format!(
        "SELECT count() AS rows, toInt64({events}) AS events, sum(input_tokens + output_tokens) AS tokens, \
         sum(cost_micros) AS cost FROM {table} FINAL"
    );
    db.client().query(&sql).fetch_one::<Totals>().await.unwrap_or_else(|e| panic!("{sql}: {e}"))
}

async fn physical_raw_rows(db: &Db) -> i64 {
    db.i64("SELECT toInt64(count()) FROM usage_events").await
}

#[tokio::test]
async fn the_first_schema_is_copied_into_the_current_one_with_its_rollups() {
    let db = Db::new();
    let server = db.settings.server_client();
    server.query("CREATE DATABASE {db:Identifier}").param("db", &db.settings.clickhouse_database).execute().await.unwrap();
    // A database as the first schema left it: its tables, and rows written by that writer.
    let client = db.client();
    for text in [include_str!("../../migrations/clickhouse/0001_usage.sql"), include_str!("../../migrations/clickhouse/0002_rollups.sql")] {
        let code: String = text.lines().filter(|l| !l.trim_start().starts_with("--")).collect::<Vec<_>>().join("\n");
        for statement in code.split(';').map(str::trim).filter(|s| !s.is_empty()) {
            client.query_raw(statement).execute().await.unwrap();
        }
    }
    client
        .query_raw(
            "INSERT INTO usage_events (event_id, subject, time, time_ms, scope, model, requests, input_tokens, output_tokens, \
             cost_micros, inserted_at) VALUES \
             ('a', 's1', '2026-11-22 10:00:01', 250, 'chat', 'big', 1, 10, 5, 70, '2026-11-22 10:00:02'), \
             ('a', 's1', '2026-11-22 10:00:01', 250, 'chat', 'big', 1, 10, 5, 70, '2026-11-22 10:05:00'), \
             ('b', 's1', '2026-11-23 23:59:59', 999, 'chat', 'small', 1, 20, 1, 3, '2026-11-24 00:00:00'), \
             ('c', 's2', '2026-11-23 01:00:00', 0, '', '', 1, 7, 0, 0, '2026-11-24 00:00:00')",
        )
        .execute()
        .await
        .unwrap();

    db.settings.migrate().await.expect("migrate the first schema");
    db.settings.migrate().await.expect("migrating again changes nothing");

    let raw = totals(&db, "usage_events", "count()").await;
    assert_eq!(raw, Totals { rows: 3, events: 3, tokens: 43, cost: 73 }, "the copy is exact: one row per event");
    assert_eq!(physical_raw_rows(&db).await, 3);
    let ms = db.i64("SELECT toInt64(toUnixTimestamp64Milli(time)) FROM usage_events WHERE event_id = 'b'").await;
    assert_eq!(ms, "2026-11-23T23:59:59.999Z".parse::<DateTime<Utc>>().unwrap().timestamp_millis(), "milliseconds kept");
    let day = db.i64("SELECT toInt64(toUInt16(event_day)) FROM usage_events WHERE event_id = 'b'").await;
    assert_eq!(day, "2026-11-23".parse::<NaiveDate>().unwrap().signed_duration_since(NaiveDate::default()).num_days());
    for table in ["usage_hourly", "usage_daily", "usage_subject_daily"] {
        assert_eq!(totals(&db, table, "sum(events)").await, Totals { rows: 3, events: 3, tokens: 43, cost: 73 }, "{table}");
    }
    let old = client
        .query("SELECT toInt64(count()) FROM system.tables WHERE database = {db:String} AND endsWith(name, '_v1')")
        .param("db", &db.settings.clickhouse_database)
        .fetch_one::<i64>()
        .await
        .unwrap();
    assert_eq!(old, 0, "the first schema's tables are dropped");
    db.drop().await;
}

#[tokio::test]
async fn an_insert_sent_again_with_its_token_stores_nothing() {
    let db = Db::new();
    db.settings.migrate().await.unwrap();
    let ch = Ch::new(&db.settings);
    let now = Utc::now();
    let rows: Vec<RawRow> = ["e1", "e2", "e3"]
        .iter()
        .map(|id| {
            let c = counted(&format!(r#"{{"id":"{id}","subject":"s","time":"2026-11-22T10:00:00Z","input_tokens":5,"cost_micros":9}}"#));
            RawRow::from_event(&c.event, c.day, &c.fingerprint, now)
        })
        .collect();
    let token = dedup_token("p0:10-13", &rows);
    assert_eq!(token, dedup_token("p0:10-13", &rows), "the same rows of the same batch: the same token");
    assert_ne!(token, dedup_token("p0:10-13", &rows[..2]), "other rows: another token");
    assert_ne!(token, dedup_token("p1:10-13", &rows), "another batch: another token");
    // The writer was killed after its insert and before its progress commit; the insert, or
    // one still in flight then, comes again with the same rows and the same token.
    ch.insert::<RawRow>("usage_events", &rows, Some(&token)).await.unwrap();
    ch.insert::<RawRow>("usage_events", &rows, Some(&token)).await.unwrap();
    assert_eq!(physical_raw_rows(&db).await, 3, "the second insert stored nothing");
    // A part of them under another token is another insert.
    ch.insert::<RawRow>("usage_events", &rows[..1], Some(&dedup_token("p0:10-11", &rows[..1]))).await.unwrap();
    assert_eq!(physical_raw_rows(&db).await, 4);
    assert_eq!(totals(&db, "usage_events", "count()").await, Totals { rows: 3, events: 3, tokens: 15, cost: 27 }, "FINAL collapses it");
    db.drop().await;
}

#[tokio::test]
async fn a_batch_written_again_leaves_no_duplicate_and_an_id_on_two_days_is_two_events() {
    let db = Db::new();
    db.settings.migrate().await.unwrap();
    let sink = Sink { ch: Ch::new(&db.settings) };
    let events = vec![
        counted(
            r#"{"id":"x","subject":"s","time":"2026-11-22T23:59:59.999Z","input_tokens":11,"output_tokens":2,"cost_micros":101,"model":"m"}"#,
        ),
        counted(
            r#"{"id":"x","subject":"s","time":"2026-11-23T00:00:00Z","input_tokens":13,"output_tokens":4,"cost_micros":103,"model":"m"}"#,
        ),
        counted(r#"{"id":"y","subject":"t","time":"2026-11-23T08:30:00Z","input_tokens":17,"scope":"chat","cost_micros":107}"#),
    ];
    assert_ne!(events[0].key(), events[1].key());
    let first = sink.write(&events, "p0:0-3", Utc::now(), |_| {}).await.unwrap();
    assert_eq!((first.inserted, first.already_present), (3, 0));
    // The same batch again (a replay after a crash before the progress commit), then a part
    // of it in another batch shape.
    let again = sink.write(&events, "p0:0-3", Utc::now(), |_| {}).await.unwrap();
    assert_eq!((again.inserted, again.already_present), (0, 3));
    let part = sink.write(&events[1..], "p0:1-3", Utc::now(), |_| {}).await.unwrap();
    assert_eq!((part.inserted, part.already_present), (0, 2));
    let expected = Totals { rows: 3, events: 3, tokens: 47, cost: 311 };
    assert_eq!(physical_raw_rows(&db).await, 3);
    assert_eq!(totals(&db, "usage_events", "count()").await, expected);
    let distinct = db.i64("SELECT toInt64(uniqExact(event_id, event_day)) FROM usage_events FINAL").await;
    assert_eq!(distinct, 3, "x on two days is two events");
    let days = db.i64("SELECT toInt64(uniqExact(event_day)) FROM usage_events WHERE event_id = 'x'").await;
    assert_eq!(days, 2);
    for table in ["usage_hourly", "usage_daily", "usage_subject_daily"] {
        let t = totals(&db, table, "sum(events)").await;
        assert_eq!((t.events, t.tokens, t.cost), (expected.events, expected.tokens, expected.cost), "{table}");
    }
    // The day boundary splits x's two events into two daily buckets of subject s.
    let s_days = db.i64("SELECT toInt64(count()) FROM usage_subject_daily FINAL WHERE subject = 's'").await;
    assert_eq!(s_days, 2);
    let models = sink.raw_models(&[("s".to_string(), events[1].event.time, "x".to_string())]).await.unwrap();
    assert_eq!(models.get(&("x".to_string(), event_day(events[1].event.time))).map(String::as_str), Some("m"));
    assert_eq!(models.len(), 1, "only the event of that day");
    db.drop().await;
}
