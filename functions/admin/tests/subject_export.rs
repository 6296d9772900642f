//! `subject.export`: what is held about a data subject, as JSON Lines with a manifest — each of
//! their events once, from attached and archived days alike, and nothing of anyone else's; to
//! S3 (moto) encrypted, in parts, behind presigned links; hostile input refused with nothing
//! written.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::time::Duration;

use admin::export::{self, s3_client, Asked, ExportStore, MIN_PART_SIZE};
use admin::{handle_event, Admin};
use common::{aggregate_all, at, day};
use meterbridge::clock::FrozenClock;
use meterbridge::testing::{archive, create_day_partitions, create_tenant, moto_sdk_config};
use meterbridge::Database;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use sqlx::PgPool;

const SUBJECT: &str = "subject-9c1f-export-marker";
const METADATA: &str = "subject-9c1f@mail.marker";

/// `count` events of `actor` of `tenant` at `occurred_at`, each with `metadata`; their ids.
async fn insert(
    owner: &PgPool,
    tenant: uuid::Uuid,
    actor: &str,
    occurred_at: &str,
    count: i32,
    metadata: Value,
) -> Vec<String> {
    sqlx::query_scalar(
        "INSERT INTO usage_events (tenant_id, event_id, metric, quantity, occurred_at, actor_id,
                                   source_service, correlation_id, classification, metadata,
                                   payload_hash, operation_key)
         SELECT $1, 'evt-' || gen_random_uuid(), 'api.requests', 2, $3, $2, 'crm',
                'corr-' || n, 'BILLABLE', $5, sha256('x'), gen_random_uuid()
           FROM generate_series(1, $4) AS n
         RETURNING event_id",
    )
    .bind(tenant)
    .bind(actor)
    .bind(at(occurred_at))
    .bind(count)
    .bind(metadata)
    .fetch_all(owner)
    .await
    .unwrap()
}

async fn exported(admin: &Admin, tenant: &str, actor: &str) -> (Vec<Value>, Vec<u8>, Value) {
    let mut out = Vec::new();
    let asked = Asked {
        tenant,
        actor_id: actor,
    };
    let manifest = export::to_writer(&admin.db, &asked, &mut out)
        .await
        .unwrap();
    let lines = String::from_utf8(out.clone())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (lines, out, serde_json::to_value(manifest).unwrap())
}

fn records<'a>(lines: &'a [Value], kind: &str) -> Vec<&'a Value> {
    lines.iter().filter(|l| l["record"] == kind).collect()
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn an_export_holds_each_record_of_the_subject_once_live_and_archived(owner: PgPool) {
    let mut admin = Admin::new(Database::from_pool(owner.clone()));
    admin.clock = FrozenClock::at(at("2026-06-03T00:00:00Z"));
    let tenant = create_tenant(&owner, "export").await;
    let other = create_tenant(&owner, "other").await;
    create_day_partitions(&owner, day("2026-05-28"), day("2026-06-03")).await;
    let email = json!({"email": METADATA});
    let mut ids = insert(
        &owner,
        tenant.id.0,
        SUBJECT,
        "2026-05-29T10:00:00Z",
        2,
        email.clone(),
    )
    .await;
    ids.extend(
        insert(
            &owner,
            tenant.id.0,
            SUBJECT,
            "2026-06-01T10:00:00Z",
            3,
            email.clone(),
        )
        .await,
    );
    ids.extend(
        insert(
            &owner,
            tenant.id.0,
            SUBJECT,
            "2026-06-02T23:59:59.5Z",
            1,
            json!({}),
        )
        .await,
    );
    // Another end user of the tenant; the same id at another tenant.
    insert(
        &owner,
        tenant.id.0,
        "bob",
        "2026-06-01T10:00:00Z",
        2,
        json!({}),
    )
    .await;
    insert(
        &owner,
        other.id.0,
        SUBJECT,
        "2026-06-01T10:00:00Z",
        4,
        email.clone(),
    )
    .await;
    sqlx::query(
        "UPDATE usage_events SET voided_at = '2026-06-02T08:00:00Z', voided_by = 'ops',
                void_reason = 'duplicate' WHERE event_id = $1",
    )
    .bind(&ids[2])
    .execute(&owner)
    .await
    .unwrap();
    // The aggregation counts the subject in its distinct-actor sets; then the oldest day goes
    // to the archive.
    aggregate_all(&admin, &owner).await;
    archive(&owner, "2026-05-29").await;

    let (lines, bytes, manifest) = exported(&admin, tenant.slug.as_str(), SUBJECT).await;
    let events = records(&lines, "usage_event");
    let mut got: Vec<&str> = events
        .iter()
        .map(|e| e["eventId"].as_str().unwrap())
        .collect();
    got.sort_unstable();
    let mut want: Vec<&str> = ids.iter().map(String::as_str).collect();
    want.sort_unstable();
    assert_eq!(
        got, want,
        "each of the subject's events once, no one else's"
    );
    assert!(events.iter().all(|e| e["actorId"] == SUBJECT));
    let archived: Vec<bool> = events.iter().map(|e| e["archived"] == true).collect();
    assert_eq!(
        archived,
        [true, true, false, false, false, false],
        "oldest first"
    );
    assert_eq!(events[0]["day"], "2026-05-29");
    assert_eq!(events[0]["metadata"], email);
    assert_eq!(events[0]["quantity"], 2);
    assert_eq!(events[0]["occurredAt"], "2026-05-29T10:00:00.000000Z");
    assert_eq!(events[5]["occurredAt"], "2026-06-02T23:59:59.500000Z");
    assert!(events[0]["receivedAt"].as_str().unwrap().ends_with('Z'));
    assert_eq!(events[0]["payloadSha256"].as_str().unwrap().len(), 64);
    let voided: Vec<&&Value> = events
        .iter()
        .filter(|e| e["voidedAt"].is_string())
        .collect();
    assert_eq!(voided.len(), 1);
    assert_eq!(voided[0]["voidedAt"], "2026-06-02T08:00:00.000000Z");
    assert_eq!(voided[0]["voidReason"], "duplicate");
    // The distinct-actor sets: the days and the week and month periods that count them.
    let days: Vec<&str> = records(&lines, "usage_actor_day")
        .iter()
        .map(|d| d["day"].as_str().unwrap())
        .collect();
    assert_eq!(days, ["2026-05-29", "2026-06-01", "2026-06-02"]);
    let periods = records(&lines, "usage_actor_period");
    assert!(
        periods
            .iter()
            .any(|p| p["periodType"] == "monthly" && p["periodStart"] == "2026-06-01"),
        "{periods:?}"
    );

    // The manifest counts every record, names the subject by its salted hash only, and
    // fingerprints the file.
    assert_eq!(manifest["format"], export::FORMAT);
    assert_eq!(manifest["tenant"], tenant.slug.as_str());
    let counts = &manifest["counts"];
    assert_eq!(counts["usageEventsLive"], 4, "{manifest}");
    assert_eq!(counts["usageEventsArchived"], 2, "{manifest}");
    assert_eq!(counts["usageActorDays"], 3, "{manifest}");
    assert_eq!(counts["usageActorPeriods"], periods.len(), "{manifest}");
    assert_eq!(counts["subjectErasures"], 0, "{manifest}");
    assert_eq!(manifest["records"], lines.len(), "{manifest}");
    assert_eq!(manifest["bytes"], bytes.len(), "{manifest}");
    assert_eq!(manifest["sha256"], hex::encode(Sha256::digest(&bytes)));
    let subject = manifest["subject"].as_str().unwrap();
    assert_eq!(subject.len(), 64);
    assert!(!manifest.to_string().contains(SUBJECT), "{manifest}");

    // Someone with no events: an empty export, not an error.
    let (none, bytes, manifest) = exported(&admin, tenant.slug.as_str(), "nobody").await;
    assert!(none.is_empty() && bytes.is_empty(), "{none:?}");
    assert_eq!(manifest["records"], 0);

    // Once erased, the id holds nothing but the erasure's receipt (with the same subject hash).
    let erase = json!({"action": "subject.erase", "tenant": tenant.slug.as_str(),
                       "actorId": SUBJECT, "requestId": "DSAR-7", "reason": "asked"});
    let erased = handle_event(&admin, erase).await.unwrap();
    assert_eq!(erased["finished"], true, "{erased}");
    assert_eq!(erased["erasure"]["subject"], subject);
    let (lines, _, manifest) = exported(&admin, tenant.slug.as_str(), SUBJECT).await;
    assert_eq!(manifest["counts"]["usageEventsLive"], 0, "{manifest}");
    assert_eq!(manifest["counts"]["usageEventsArchived"], 0, "{manifest}");
    assert_eq!(manifest["counts"]["subjectErasures"], 1, "{manifest}");
    let receipt = records(&lines, "subject_erasure");
    assert_eq!(receipt[0]["requestId"], "DSAR-7");
    assert_eq!(receipt[0]["eventsErased"], 6);
    assert!(receipt[0]["finishedAt"].as_str().unwrap().ends_with('Z'));
    // The other tenant's end user with the same id is still theirs.
    let (theirs, _, _) = exported(&admin, other.slug.as_str(), SUBJECT).await;
    assert_eq!(records(&theirs, "usage_event").len(), 4);
}

fn events_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../events/admin")
}

/// A bucket of its own in moto, and the admin function's store for it.
async fn store() -> ExportStore {
    let client = s3_client(&moto_sdk_config().await);
    let bucket = format!("exports-{}", uuid::Uuid::new_v4().simple());
    client.create_bucket().bucket(&bucket).send().await.unwrap();
    ExportStore {
        client,
        bucket,
        kms_key_id: None,
        url_ttl: Duration::from_secs(120),
        part_size: MIN_PART_SIZE,
    }
}

/// GET of a presigned URL (no credentials of our own): status and body.
fn fetch(url: &str) -> (u16, Vec<u8>) {
    let out = std::process::Command::new("curl")
        .args(["-sS", "-o", "-", "-w", "\n%{http_code}", url])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut body = out.stdout;
    let at = body.iter().rposition(|b| *b == b'\n').unwrap();
    let status = std::str::from_utf8(&body[at + 1..])
        .unwrap()
        .parse()
        .unwrap();
    body.truncate(at);
    (status, body)
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn an_export_to_s3_is_encrypted_uploaded_in_parts_and_linked(owner: PgPool) {
    let mut admin = Admin::new(Database::from_pool(owner.clone()));
    let store = store().await;
    admin.exports = Some(store.clone());
    let tenant = create_tenant(&owner, "demo").await;
    create_day_partitions(&owner, day("2026-06-01"), day("2026-06-02")).await;
    // About 12 MB of records: three parts of 5 MiB (the last smaller).
    let padding = json!({"note": "x".repeat(400)});
    insert(
        &owner,
        tenant.id.0,
        "user-42",
        "2026-06-01T10:00:00Z",
        12_000,
        padding.clone(),
    )
    .await;
    insert(
        &owner,
        tenant.id.0,
        "user-42",
        "2026-06-02T10:00:00Z",
        12_000,
        padding,
    )
    .await;

    // The payload an operator sends (events/admin/subject-export.json), for tenant "demo".
    let text = std::fs::read_to_string(events_dir().join("subject-export.json")).unwrap();
    let mut payload: Value = serde_json::from_str(&text).unwrap();
    payload["tenant"] = json!(tenant.slug.as_str());
    let out = handle_event(&admin, payload).await.unwrap();
    let manifest = &out["manifest"];
    assert_eq!(manifest["counts"]["usageEventsLive"], 24_000, "{out}");
    let bytes = manifest["bytes"].as_u64().unwrap();
    assert!(bytes > 2 * MIN_PART_SIZE as u64, "{manifest}");
    assert!(
        !out.to_string().contains("user-42"),
        "the id is in no key or link: {out}"
    );

    // The object: encrypted at rest, the manifest's size; the upload closed.
    let uri = out["records"]["s3Uri"].as_str().unwrap();
    let key = uri
        .strip_prefix(&format!("s3://{}/", store.bucket))
        .unwrap();
    assert!(
        key.starts_with(&format!("subject-exports/{}/", tenant.slug.as_str())),
        "{key}"
    );
    let head = store
        .client
        .head_object()
        .bucket(&store.bucket)
        .key(key)
        .send()
        .await
        .unwrap();
    assert_eq!(head.content_length(), Some(bytes as i64));
    assert_eq!(
        head.server_side_encryption().map(|s| s.as_str()),
        Some("AES256")
    );
    let open = store
        .client
        .list_multipart_uploads()
        .bucket(&store.bucket)
        .send()
        .await
        .unwrap();
    assert!(open.uploads().is_empty(), "{open:?}");

    // The links: the records as the manifest fingerprints them, and the manifest itself.
    let (status, body) = fetch(out["records"]["url"].as_str().unwrap());
    assert_eq!(status, 200);
    assert_eq!(body.len() as u64, bytes);
    assert_eq!(manifest["sha256"], hex::encode(Sha256::digest(&body)));
    let lines = body
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .count();
    assert_eq!(manifest["records"], lines);
    let (status, body) = fetch(out["manifestObject"]["url"].as_str().unwrap());
    assert_eq!(status, 200);
    let stored: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(&stored, manifest);
    let url = out["records"]["url"].as_str().unwrap();
    // Signed for the store's URL life (moto serves it without checking the signature; S3
    // refuses it once expired or altered).
    assert!(url.contains("X-Amz-Expires=120"), "{url}");
    assert!(url.contains("X-Amz-Signature="), "{url}");
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn an_export_request_is_checked_before_anything_is_written(owner: PgPool) {
    let mut admin = Admin::new(Database::from_pool(owner.clone()));
    let tenant = create_tenant(&owner, "acme").await;
    let ok = json!({"action": "subject.export", "tenant": tenant.slug.as_str(), "actorId": "u-1"});
    // No bucket configured: the payload cannot fall back to anything else.
    let err = handle_event(&admin, ok.clone()).await.unwrap_err();
    assert_eq!(err.error_type(), "BadRequest", "{err}");
    assert!(err.to_string().contains("EXPORT_BUCKET"), "{err}");

    let store = store().await;
    admin.exports = Some(store.clone());
    let with = |field: &str, value: Value| {
        let mut p = ok.clone();
        p[field] = value;
        p
    };
    let cases = [
        (with("tenant", json!("no-such-tenant")), "NotFound"),
        (with("tenant", json!("x".repeat(10_000))), "NotFound"),
        (with("actorId", json!("")), "BadRequest"),
        (with("actorId", json!("x".repeat(129))), "BadRequest"),
        (with("actorId", json!("u-1\u{0}")), "BadRequest"),
        (with("actorId", json!(["u-1"])), "BadRequest"),
        // Standard output is the command line's; a payload may not ask for it.
        (with("to", json!("stdout")), "BadRequest"),
        (with("bucket", json!("elsewhere")), "BadRequest"),
    ];
    for (payload, kind) in cases {
        let err = handle_event(&admin, payload.clone()).await.unwrap_err();
        assert_eq!(err.error_type(), kind, "{payload}: {err}");
    }
    let listed = store
        .client
        .list_objects_v2()
        .bucket(&store.bucket)
        .send()
        .await
        .unwrap();
    assert!(listed.contents().is_empty(), "nothing written: {listed:?}");

    // The bucket gone: the export fails as unavailable (retry), and leaves no upload behind.
    admin.exports = Some(ExportStore {
        bucket: format!("{}-missing", store.bucket),
        ..store
    });
    let err = handle_event(&admin, ok).await.unwrap_err();
    assert_eq!(err.error_type(), "Unavailable", "{err}");
}
