//! A data subject's erasure beside the aggregation: the subject's actor id and metadata gone
//! from every table (a `pg_dump --data-only` of the whole database, the archive included, has
//! neither), the rollups unchanged before and after the aggregation runs again, whatever the
//! aggregation did between the erasure's steps (new events of the subject, voids); an erasure
//! cut short resumes with one receipt; the same request again changes nothing; a request id of
//! another subject is refused; a void of a row under erasure waits for it.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use chrono::Duration as Days;
use common::*;
use meterbridge::domain::TenantId;
use meterbridge::repo::subject_erasures::{self, Pace, Request, ANOTHER_SUBJECT};
use meterbridge::testing::{archive, create_tenant, database_name};
use sqlx::PgPool;

const SUBJECT: &str = "subject-4d7e1b-marker";
const METADATA: &str = "subject-4d7e1b@mail.marker";

fn request<'a>(tenant: uuid::Uuid, request_id: &'a str, actor_id: &'a str) -> Request<'a> {
    Request {
        tenant: TenantId(tenant),
        request_id,
        actor_id,
        reason: "the subject asked",
        requested_by: "test",
    }
}

fn far() -> Instant {
    Instant::now() + Duration::from_secs(60)
}

fn ev(tenant: uuid::Uuid, metric: &'static str, quantity: i64, at: &str, actor: &str) -> Ev {
    Ev {
        tenant,
        metric,
        quantity,
        at: common::at(at),
        actor: Some(actor.to_owned()),
    }
}

/// Gives the subject's events of `tenant` their metadata (an erasure must empty it).
async fn with_metadata(owner: &PgPool, tenant: uuid::Uuid) {
    sqlx::query(
        "UPDATE usage_events SET metadata = jsonb_build_object('email', $3::text)
          WHERE tenant_id = $1 AND actor_id = $2",
    )
    .bind(tenant)
    .bind(SUBJECT)
    .bind(METADATA)
    .execute(owner)
    .await
    .unwrap();
}

fn pg_dump(owner: &PgPool) -> String {
    let out = std::process::Command::new("pg_dump")
        .args(["-h", "127.0.0.1", "-U", "postgres", "--data-only", "-d"])
        .arg(database_name(owner))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

async fn md5_uuid(owner: &PgPool, text: &str) -> String {
    sqlx::query_scalar("SELECT md5($1)::uuid::text")
        .bind(text)
        .fetch_one(owner)
        .await
        .unwrap()
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn an_erased_subject_is_gone_and_no_bill_changes(owner: PgPool) {
    let app = app(&owner, &[]).await;
    let t = create_tenant(&owner, "erase").await.id.0;
    let other = create_tenant(&owner, "other").await.id.0;
    // Two months, two weeks, several days; another actor on the same days; another tenant
    // whose end user happens to carry the same id.
    let mut events = vec![
        ev(t, "api.requests", 3, "2026-05-29T10:00:00Z", SUBJECT),
        ev(t, "api.requests", 4, "2026-05-30T10:00:00Z", SUBJECT),
        ev(t, "api.requests", 5, "2026-06-01T10:00:00Z", SUBJECT),
        ev(t, "api.requests", 6, "2026-06-01T11:00:00Z", SUBJECT),
        ev(t, "leads.processed", 7, "2026-06-02T10:00:00Z", SUBJECT),
        ev(t, "api.requests", 1, "2026-06-01T12:00:00Z", "bob"),
        ev(t, "api.requests", 2, "2026-05-29T12:00:00Z", "bob"),
        ev(other, "api.requests", 9, "2026-06-01T10:00:00Z", SUBJECT),
    ];
    insert(&owner, &events).await;
    with_metadata(&owner, t).await;
    with_metadata(&owner, other).await;
    let now = at("2026-06-03T00:00:00Z");
    run(&app, &owner, now).await;
    assert_eq!(stored(&owner).await, expected(&events));
    // The oldest day goes to the archive, as past the retention.
    archive(&owner, "2026-05-29").await;

    // The erasure starts (three rows a step), and while it runs the subject's events keep
    // arriving (on a day already done and on one not yet), the aggregation runs, and a void
    // of one not yet erased is applied.
    let req = request(t, "DSAR-1", SUBJECT);
    let mut tx = owner.begin().await.unwrap();
    let first = subject_erasures::step(&mut tx, &req, 3).await.unwrap();
    tx.commit().await.unwrap();
    assert!(first.finished_at.is_none(), "{first:?}");
    assert_eq!(first.events_erased, 3);
    let late = vec![
        ev(t, "api.requests", 10, "2026-05-30T15:00:00Z", SUBJECT),
        ev(t, "api.requests", 11, "2026-06-02T15:00:00Z", SUBJECT),
    ];
    let late_seqs = insert(&owner, &late).await;
    events.extend(late);
    run(&app, &owner, now).await;
    let mut tx = owner.begin().await.unwrap();
    subject_erasures::step(&mut tx, &req, 1).await.unwrap();
    tx.commit().await.unwrap();
    void(&owner, &late_seqs[1..]).await;
    events.pop();
    run(&app, &owner, now).await;
    let receipt = subject_erasures::erase(&owner, &req, Pace::unpaced(3), far())
        .await
        .unwrap();
    assert!(receipt.finished_at.is_some(), "{receipt:?}");
    // 5 stored + 2 late (one voided: still erased).
    assert_eq!(receipt.events_erased, 7, "{receipt:?}");
    assert!(
        receipt.actor_days >= 4 && receipt.actor_periods >= 4,
        "{receipt:?}"
    );
    assert!(receipt.steps >= 3, "{receipt:?}");

    // Billing: the rollups the events make (the subject one actor throughout), before and
    // after the aggregation runs again. The archived day is not in the events any more, but
    // its cells were aggregated before.
    let billed = expected(&events);
    assert_eq!(stored(&owner).await, billed);
    run(&app, &owner, now).await;
    assert_eq!(stored(&owner).await, billed);

    // The subject is gone: no row names them or holds their metadata, in any schema; their
    // events carry one token, their metadata is empty; the other tenant's rows are untouched.
    let dump = pg_dump(&owner);
    for gone in [
        SUBJECT.to_owned(),
        METADATA.to_owned(),
        md5_uuid(&owner, SUBJECT).await,
    ] {
        let lines: Vec<&str> = dump.lines().filter(|l| l.contains(&gone)).collect();
        // The other tenant's event (and its actor sets) carry the same id, legitimately.
        assert!(lines.len() <= 4, "{gone}: {lines:#?}");
        for line in lines {
            assert!(line.contains(&other.to_string()), "{gone} left: {line}");
        }
    }
    let tokens: Vec<(String, serde_json::Value)> = sqlx::query_as(
        "SELECT actor_id, metadata FROM usage_events WHERE tenant_id = $1 AND actor_id <> 'bob'
         UNION ALL
         SELECT actor_id, metadata FROM usage_archive.usage_events_p20260529
          WHERE tenant_id = $1 AND actor_id <> 'bob'",
    )
    .bind(t)
    .fetch_all(&owner)
    .await
    .unwrap();
    assert_eq!(tokens.len(), 7);
    assert!(tokens[0].0.starts_with("erased:"), "{tokens:?}");
    assert!(
        tokens
            .iter()
            .all(|(a, m)| *a == tokens[0].0 && *m == serde_json::json!({})),
        "{tokens:?}"
    );
    let others: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM usage_events
          WHERE tenant_id = $1 AND actor_id = $2 AND metadata ->> 'email' = $3",
    )
    .bind(other)
    .bind(SUBJECT)
    .bind(METADATA)
    .fetch_one(&owner)
    .await
    .unwrap();
    assert_eq!(others, 1);
    // The receipt holds no personal data: no id, no token.
    let receipt_row: String =
        sqlx::query_scalar("SELECT row_to_json(e)::text FROM subject_erasures e")
            .fetch_one(&owner)
            .await
            .unwrap();
    assert!(!receipt_row.contains(SUBJECT), "{receipt_row}");
    assert!(!receipt_row.contains(&tokens[0].0), "{receipt_row}");
    assert!(!receipt_row.contains("erased:"), "{receipt_row}");
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn an_erasure_cut_short_resumes_with_one_receipt_and_runs_once(owner: PgPool) {
    let t = create_tenant(&owner, "resume").await.id.0;
    let start = at("2026-06-01T00:00:00Z");
    let events: Vec<Ev> = (0..40)
        .map(|i| Ev {
            tenant: t,
            metric: "api.requests",
            quantity: 1,
            at: start + Days::hours(i * 3),
            actor: Some(SUBJECT.to_owned()),
        })
        .collect();
    insert(&owner, &events).await;
    // As if the aggregation had taken them (steps erase only what it has).
    meterbridge::testing::mark_aggregated(&owner).await;
    let req = request(t, "DSAR-2", SUBJECT);
    // One step committed; the next killed (its transaction never commits).
    let mut tx = owner.begin().await.unwrap();
    let first = subject_erasures::step(&mut tx, &req, 7).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!((first.events_erased, first.steps), (7, 1), "{first:?}");
    let mut killed = owner.begin().await.unwrap();
    subject_erasures::step(&mut killed, &req, 7).await.unwrap();
    drop(killed);
    // Run again to the end: every row once, one receipt.
    let done = subject_erasures::erase(&owner, &req, Pace::unpaced(7), far())
        .await
        .unwrap();
    assert!(done.finished_at.is_some());
    assert_eq!(done.events_erased, 40);
    let receipts: i64 = sqlx::query_scalar("SELECT count(*) FROM subject_erasures")
        .fetch_one(&owner)
        .await
        .unwrap();
    assert_eq!(receipts, 1);
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM usage_events WHERE actor_id = $1")
        .bind(SUBJECT)
        .fetch_one(&owner)
        .await
        .unwrap();
    assert_eq!(left, 0);

    // The same request again: its receipt, nothing changed.
    let again = subject_erasures::erase(&owner, &req, Pace::unpaced(7), far())
        .await
        .unwrap();
    assert_eq!(again, done);
    // Its id for another subject: refused, nothing written.
    let err = subject_erasures::erase(
        &owner,
        &request(t, "DSAR-2", "someone-else"),
        Pace::unpaced(7),
        far(),
    )
    .await
    .unwrap_err();
    assert_eq!(err.sqlstate().as_deref(), Some(ANOTHER_SUBJECT), "{err}");
    // Another tenant cannot reach this tenant's subject: its request erases nothing here.
    let stranger = create_tenant(&owner, "stranger").await.id.0;
    insert(
        &owner,
        &[Ev {
            tenant: t,
            metric: "api.requests",
            quantity: 1,
            at: start,
            actor: Some("carol".to_owned()),
        }],
    )
    .await;
    let theirs = subject_erasures::erase(
        &owner,
        &request(stranger, "X-1", "carol"),
        Pace::unpaced(7),
        far(),
    )
    .await
    .unwrap();
    assert_eq!(theirs.events_erased, 0);
    let carol: i64 =
        sqlx::query_scalar("SELECT count(*) FROM usage_events WHERE actor_id = 'carol'")
            .fetch_one(&owner)
            .await
            .unwrap();
    assert_eq!(carol, 1);
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn a_void_of_a_row_under_erasure_waits_for_it(owner: PgPool) {
    let app = app(&owner, &[]).await;
    let t = create_tenant(&owner, "void").await.id.0;
    let events = vec![
        ev(t, "api.requests", 2, "2026-06-01T10:00:00Z", SUBJECT),
        ev(t, "api.requests", 3, "2026-06-02T10:00:00Z", SUBJECT),
    ];
    let seqs = insert(&owner, &events).await;
    run(&app, &owner, at("2026-06-03T00:00:00Z")).await;
    let req = request(t, "DSAR-3", SUBJECT);
    let mut tx = owner.begin().await.unwrap();
    subject_erasures::step(&mut tx, &req, 1).await.unwrap();
    tx.commit().await.unwrap();
    // The first is erased (its actor is the token); its void waits: retryable, nothing changed.
    let err = sqlx::query(
        "UPDATE usage_events SET voided_at = now(), voided_by = 'ops', void_reason = 'test'
          WHERE seq = $1",
    )
    .bind(seqs[0])
    .execute(&owner)
    .await
    .unwrap_err();
    let code = err.as_database_error().and_then(|e| e.code()).unwrap();
    assert_eq!(code, "55P03", "{err}");
    subject_erasures::erase(&owner, &req, Pace::unpaced(1), far())
        .await
        .unwrap();
    // Once finished, it goes through, and the rollups follow.
    void(&owner, &seqs[..1]).await;
    run(&app, &owner, at("2026-06-03T00:00:00Z")).await;
    assert_eq!(stored(&owner).await, expected(&events[1..]));
}
