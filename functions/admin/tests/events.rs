//! Every payload in events/admin/ run through the handler, in the order an operator would,
//! against a fresh database.

use std::path::PathBuf;

use admin::{handle_event, Admin, AdminError};
use meterbridge::auth::{hashes_match, parse_presented_key};
use meterbridge::repo::api_keys;
use meterbridge::testing::{pool_as, INGEST_ROLE};
use meterbridge::Database;
use serde_json::Value;
use sqlx::PgPool;

fn events_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../events/admin")
}

fn load(name: &str) -> Value {
    let text =
        std::fs::read_to_string(events_dir().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"))
}

async fn ok(db: &Admin, name: &str) -> Value {
    handle_event(db, load(name))
        .await
        .unwrap_or_else(|e| panic!("{name} failed: {e}"))
}

async fn err(db: &Admin, name: &str) -> AdminError {
    match handle_event(db, load(name)).await {
        Ok(v) => panic!("{name} should fail, returned {v}"),
        Err(e) => e,
    }
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn every_admin_event_runs_through_the_handler(owner: PgPool) {
    let db = Admin::new(Database::from_pool(owner.clone()));
    let mut seen = Vec::new();
    let mut run = |name: &'static str| {
        seen.push(name);
        name
    };

    let out = ok(&db, run("migrate.json")).await;
    assert_eq!(out["migrated"], true);
    assert_eq!(out["migrations"][0]["version"], 1);

    let out = ok(&db, run("tenant-create.json")).await;
    assert_eq!(out["tenant"]["slug"], "demo");
    assert_eq!(out["tenant"]["name"], "Demo Tenant");
    assert_eq!(out["tenant"]["status"], "active");
    let e = err(&db, "tenant-create.json").await;
    assert_eq!(e.error_type(), "Conflict");
    assert!(e.to_string().contains("already exists"), "{e}");

    let out = ok(&db, run("tenant-list.json")).await;
    assert_eq!(out["tenants"].as_array().unwrap().len(), 1);

    // The key is returned once, works for the API role, and is stored only as a hash.
    let out = ok(&db, run("api-key-create.json")).await;
    let key = out["key"].as_str().unwrap();
    let presented = parse_presented_key(key).expect("well-formed key");
    assert_eq!(out["apiKey"]["prefix"], presented.prefix.as_str());
    assert_eq!(out["apiKey"]["trust"], "internal");
    let api = pool_as(&owner, INGEST_ROLE).await;
    let candidate = api_keys::find_candidate(&api, &presented.prefix)
        .await
        .unwrap()
        .unwrap();
    assert!(hashes_match(&presented.hash, &candidate.key_hash));
    let stored: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM api_keys WHERE key_hash::text LIKE '%' || $1 || '%'",
    )
    .bind(key)
    .fetch_one(&owner)
    .await
    .unwrap();
    assert_eq!(stored, 0);

    let out = ok(&db, run("api-key-create-external.json")).await;
    assert_eq!(out["apiKey"]["trust"], "external");
    assert_eq!(out["apiKey"]["sourceService"], "web-widget");

    let out = ok(&db, run("api-key-list.json")).await;
    let listed = out["apiKeys"].as_array().unwrap();
    assert_eq!(listed.len(), 2);
    assert!(listed
        .iter()
        .all(|k| k.get("key").is_none() && k.get("keyHash").is_none()));

    // The revoke fixture names a fixed prefix; give the tenant a key with it.
    sqlx::query(
        "INSERT INTO api_keys (tenant_id, prefix, key_hash, source_service, trust)
         SELECT id, '0123456789ab', decode(repeat('ab', 32), 'hex'), 'crm', 'internal' FROM tenants WHERE slug = 'demo'",
    )
    .execute(&owner)
    .await
    .unwrap();
    let out = ok(&db, run("api-key-revoke.json")).await;
    assert!(out["apiKey"]["revokedAt"].is_string());
    assert!(
        api_keys::find_candidate(&api, "0123456789ab")
            .await
            .unwrap()
            .unwrap()
            .revoked
    );

    // A refund: the fixture names a fixed payment id; give the tenant a verified payment with it.
    sqlx::query(
        "INSERT INTO payments (tenant_id, id, amount_minor, currency, provider, status, verified_at,
                               verified_by, verification_method, correlation_id, source_service)
         SELECT id, '0192f3a0-0000-7000-8000-000000000001', 4999, 'USD', 'stripe', 'PAID_VERIFIED',
                now(), 'ops', 'manual', 'c-1', 'billing' FROM tenants WHERE slug = 'demo'",
    )
    .execute(&owner)
    .await
    .unwrap();
    let out = ok(&db, run("payment-refund.json")).await;
    assert_eq!(out["outcome"], "applied");
    assert_eq!(out["payment"]["status"], "REFUNDED");
    let out = ok(&db, "payment-refund.json").await;
    assert_eq!(
        out["outcome"], "unchanged",
        "a second refund changes nothing"
    );
    let (events, audit): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM outbox_events WHERE event_type = 'payment.refunded'),
                (SELECT count(*) FROM payment_audit WHERE actor = 'admin')",
    )
    .fetch_one(&owner)
    .await
    .unwrap();
    assert_eq!((events, audit), (1, 2), "one event; both attempts audited");

    // The outbox: the refund's event is pending; made DEAD, it is redriven by type; a DEAD
    // event named by id is skipped; both are logged with who and why.
    let out = ok(&db, run("outbox-status.json")).await;
    assert_eq!(
        (out["pending"].as_i64(), out["dead"].as_i64()),
        (Some(1), Some(0))
    );
    assert_eq!(out["byEventType"][0]["eventType"], "payment.refunded");
    sqlx::query("UPDATE outbox_events SET status = 'DEAD', attempts = 10, last_error = 'x'")
        .execute(&owner)
        .await
        .unwrap();
    let out = ok(&db, run("outbox-redrive.json")).await;
    assert_eq!(out["count"], 1);
    let (status, attempts): (String, i32) =
        sqlx::query_as("SELECT status, attempts FROM outbox_events")
            .fetch_one(&owner)
            .await
            .unwrap();
    assert_eq!((status.as_str(), attempts), ("PENDING", 0));
    sqlx::query(
        "INSERT INTO outbox_events (tenant_id, event_id, event_type, schema_version, payload,
                                    correlation_id, idempotency_key, aggregate_type, aggregate_id,
                                    aggregate_sequence, source_service, status)
         SELECT id, '0192f3a0-0000-7000-8000-0000000000e1', 'payment.paid', 1, '{}', 'c', 'k-skip',
                'payment', gen_random_uuid(), 1, 'test', 'DEAD' FROM tenants WHERE slug = 'demo'",
    )
    .execute(&owner)
    .await
    .unwrap();
    let out = ok(&db, run("outbox-skip.json")).await;
    assert_eq!(out["count"], 1);
    let logged: Vec<(String, String)> =
        sqlx::query_as("SELECT action, actor FROM outbox_admin_log ORDER BY id")
            .fetch_all(&owner)
            .await
            .unwrap();
    assert_eq!(
        logged,
        [
            ("redrive".to_owned(), "oncall@example.com".to_owned()),
            ("skip".to_owned(), "oncall@example.com".to_owned())
        ]
    );
    // Without an event bus, a relay run is refused clearly (the relay is tested on its own).
    let e = err(&db, run("outbox-relay.json")).await;
    assert_eq!(e.error_type(), "BadRequest");
    assert!(e.to_string().contains("EVENT_BUS_NAME"), "{e}");

    // The storage policy: the days ahead exist already (the migration made a week of them),
    // the run adds the second week; a second run has nothing to do.
    let out = ok(&db, run("usage-maintain.json")).await;
    assert_eq!(out["policy"]["retentionDays"], 90);
    // Each day created has its two BRIN indexes set to summarize as they fill.
    let actions = out["actions"].as_array().unwrap();
    let of = |kind: &str| actions.iter().filter(|a| a["action"] == kind).count();
    assert!(of("created") > 0, "{out}");
    assert_eq!(of("autosummarized"), 2 * of("created"), "{out}");
    assert_eq!(of("created") + of("autosummarized"), actions.len(), "{out}");
    let out = ok(&db, "usage-maintain.json").await;
    assert_eq!(out["actions"], serde_json::json!([]));
    assert_eq!(
        (&out["keySteps"], &out["keyWorkLeft"]),
        (&serde_json::json!(0), &serde_json::json!(false))
    );
    let out = ok(&db, run("usage-status.json")).await;
    assert_eq!(out["storage"]["keyGenerations"], 1, "{out}");
    let levels: Vec<i64> = out["storage"]["keyLevels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["level"].as_i64().unwrap())
        .collect();
    assert_eq!(levels, [1, 2, 3], "{out}");
    assert_eq!(out["storage"]["keyMerge"], serde_json::Value::Null, "{out}");
    assert_eq!(out["storage"]["openGeneration"], 1, "{out}");
    assert!(
        out["storage"]["dayPartitions"].as_i64().unwrap() >= 36 + 14,
        "{out}"
    );

    // Aggregation, as the owner: a run, a backfill of a week, the status per tenant.
    let out = ok(&db, run("usage-aggregate.json")).await;
    assert_eq!(out["aggregation"]["outcome"], "done", "{out}");
    assert_eq!(
        out["aggregation"]["counters"]["error"],
        "no Redis configured"
    );
    let out = ok(&db, run("usage-backfill.json")).await;
    assert_eq!(out["backfill"]["outcome"], "done", "{out}");
    assert!(out["backfill"]["backfillQueued"].is_i64(), "{out}");
    // Period events: monthly on, audited; shown as set.
    let out = ok(&db, run("usage-period-events-set.json")).await;
    assert_eq!(out["periods"], serde_json::json!(["monthly"]), "{out}");
    assert_eq!(out["before"], serde_json::json!([]), "{out}");
    let out = ok(&db, run("usage-period-events-show.json")).await;
    assert_eq!(out["periods"], serde_json::json!(["monthly"]), "{out}");
    // A usage limit: set (audited), listed, removed; a second removal finds nothing.
    let out = ok(&db, run("usage-limits-set.json")).await;
    assert_eq!(out["limit"]["limit"], "1000000", "{out}");
    assert_eq!(out["limit"]["thresholds"], serde_json::json!([50, 80, 100]));
    let out = ok(&db, run("usage-limits-list.json")).await;
    assert_eq!(out["limits"].as_array().unwrap().len(), 1, "{out}");
    let out = ok(&db, run("usage-limits-remove.json")).await;
    assert_eq!(out["removed"]["metric"], "api.requests", "{out}");
    assert_eq!(
        err(&db, "usage-limits-remove.json").await.error_type(),
        "NotFound"
    );
    let out = ok(&db, "usage-limits-set.json").await;
    assert!(out["replaced"].is_null(), "{out}");
    // A meter: set (audited), listed, removed; a second removal finds nothing.
    let out = ok(&db, run("meter-set.json")).await;
    assert_eq!(out["meter"]["eventType"], "api-calls", "{out}");
    let out = ok(&db, run("meter-list.json")).await;
    assert_eq!(out["meters"][0]["groupBy"]["method"], "$.method", "{out}");
    let out = ok(&db, run("meter-remove.json")).await;
    assert_eq!(out["removed"]["slug"], "api_calls", "{out}");
    assert_eq!(err(&db, "meter-remove.json").await.error_type(), "NotFound");
    let out = ok(&db, run("usage-aggregation-status.json")).await;
    assert!(out["aggregation"]["tenants"].is_array(), "{out}");
    assert!(
        out["aggregation"]["state"]["lastRunAt"].is_string(),
        "{out}"
    );

    // An export needs the export bucket (the S3 path: tests/subject_export.rs).
    let e = err(&db, run("subject-export.json")).await;
    assert_eq!(e.error_type(), "BadRequest");
    assert!(e.to_string().contains("EXPORT_BUCKET"), "{e}");

    // A subject with no events: the erasure finishes at once, and again returns its receipt.
    let out = ok(&db, run("subject-erase.json")).await;
    assert_eq!(out["finished"], true, "{out}");
    assert_eq!(out["erasure"]["requestId"], "DSAR-2026-0042", "{out}");
    assert_eq!(out["erasure"]["eventsErased"], 0, "{out}");
    assert!(!out.to_string().contains("user-42"), "{out}");
    let again = ok(&db, "subject-erase.json").await;
    assert_eq!(again["erasure"], out["erasure"]);

    let out = ok(&db, run("tenant-disable.json")).await;
    assert_eq!(out["tenant"]["status"], "disabled");
    assert!(out["tenant"]["disabledAt"].is_string());
    let e = err(&db, "api-key-create.json").await;
    assert_eq!(e.error_type(), "Conflict");
    assert!(e.to_string().contains("disabled"), "{e}");
    // Offboarding waits for the grace period after the disabling (tests/tenant_erase.rs).
    let e = err(&db, run("tenant-erase.json")).await;
    assert_eq!(e.error_type(), "Conflict");
    assert!(e.to_string().contains("grace period ends"), "{e}");

    let e = err(&db, run("tenant-create-bad-slug.json")).await;
    assert_eq!(e.error_type(), "BadRequest");
    assert!(e.to_string().contains("slug"), "{e}");

    let e = err(&db, run("unknown-action.json")).await;
    assert_eq!(e.error_type(), "BadRequest");
    assert!(
        e.to_string().contains("unknown variant `tenant.delete`"),
        "{e}"
    );

    // Every file in events/admin/ has been exercised above.
    let mut files: Vec<String> = std::fs::read_dir(events_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    let mut seen: Vec<String> = seen.into_iter().map(str::to_owned).collect();
    seen.sort();
    seen.dedup();
    assert_eq!(files, seen, "each admin event file needs a case here");
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn missing_things_and_bad_arguments_have_clear_errors(owner: PgPool) {
    let db = Admin::new(Database::from_pool(owner));
    let cases = [
        (
            serde_json::json!({"action": "tenant.disable", "slug": "ghost"}),
            "NotFound",
            "no tenant",
        ),
        (
            serde_json::json!({"action": "api-key.list", "tenant": "ghost"}),
            "NotFound",
            "no tenant",
        ),
        (
            serde_json::json!({"action": "api-key.revoke", "prefix": "ffffffffffff"}),
            "NotFound",
            "no API key",
        ),
        (
            serde_json::json!({"action": "api-key.create", "tenant": "x", "source": "crm", "trust": "root"}),
            "BadRequest",
            "trust",
        ),
        (
            serde_json::json!({"action": "api-key.create", "tenant": "x", "source": "CRM!", "trust": "internal"}),
            "BadRequest",
            "source",
        ),
        (
            serde_json::json!({"action": "tenant.create"}),
            "BadRequest",
            "missing field `slug`",
        ),
        (
            serde_json::json!({"action": "tenant.create", "slug": "ok", "name": " "}),
            "BadRequest",
            "name",
        ),
        (
            serde_json::json!({"action": "payment.refund", "tenant": "ghost",
                               "paymentId": "0192f3a0-0000-7000-8000-000000000001", "reason": "x"}),
            "NotFound",
            "no tenant",
        ),
        (
            serde_json::json!({"action": "payment.refund", "tenant": "ghost",
                               "paymentId": "0192f3a0-0000-7000-8000-000000000001", "reason": " "}),
            "BadRequest",
            "reason",
        ),
        (
            serde_json::json!({"action": "payment.refund", "tenant": "ghost",
                               "paymentId": "not-a-uuid", "reason": "x"}),
            "BadRequest",
            "invalid admin payload",
        ),
        (
            serde_json::json!({"action": "outbox.redrive", "reason": "x"}),
            "BadRequest",
            "eventIds, or eventType",
        ),
        (
            serde_json::json!({"action": "outbox.skip", "eventIds": [], "reason": "x"}),
            "BadRequest",
            "eventIds",
        ),
        (
            serde_json::json!({"action": "outbox.redrive", "eventType": "payment.paid", "reason": " "}),
            "BadRequest",
            "reason",
        ),
        (
            serde_json::json!("migrate"),
            "BadRequest",
            "invalid admin payload",
        ),
    ];
    for (payload, error_type, needle) in cases {
        let e = handle_event(&db, payload.clone())
            .await
            .expect_err("must fail");
        assert_eq!(e.error_type(), error_type, "{payload}: {e}");
        assert!(e.to_string().contains(needle), "{payload}: {e}");
        let diagnostic: lambda_runtime::Diagnostic = e.into();
        assert_eq!(diagnostic.error_type, error_type);
    }
}

/// `tenant.limits.*`: set per tenant and per key, shown, cleared, each change audited; a key of
/// another tenant, a tenant-only limit on a key and a burst without its rate are refused.
#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn tenant_limits_are_set_shown_cleared_and_audited(owner: PgPool) {
    use serde_json::json;
    let db = Admin::new(Database::from_pool(owner.clone()));
    let run = |payload: Value| handle_event(&db, payload);
    for slug in ["acme", "other"] {
        run(json!({"action": "tenant.create", "slug": slug}))
            .await
            .unwrap();
    }
    let key = |tenant: &'static str| {
        run(
            json!({"action": "api-key.create", "tenant": tenant, "source": "crm",
                   "trust": "internal"}),
        )
    };
    let acme_key = key("acme").await.unwrap();
    let other_key = key("other").await.unwrap();
    let prefix = |k: &Value| k["apiKey"]["prefix"].as_str().unwrap().to_owned();

    let out = run(json!({"action": "tenant.limits.set", "tenant": "acme",
                         "requestsPerSecond": 50, "maxInFlight": 3, "reason": "big customer"}))
    .await
    .unwrap();
    assert_eq!(out["override"]["requestBurst"], 100, "twice the rate");
    assert_eq!(out["override"]["maxInFlight"], 3);
    let out = run(json!({"action": "tenant.limits.set", "tenant": "acme",
                         "apiKeyPrefix": prefix(&acme_key), "eventsPerSecond": 300,
                         "reason": "partner loop", "actor": "oncall"}))
    .await
    .unwrap();
    assert_eq!(out["override"]["eventBurst"], 1000, "at least a full batch");

    for (bad, kind) in [
        (
            json!({"action": "tenant.limits.set", "tenant": "acme", "apiKeyPrefix": prefix(&other_key),
                "eventsPerSecond": 1, "reason": "x"}),
            "NotFound",
        ),
        (
            json!({"action": "tenant.limits.set", "tenant": "acme", "apiKeyPrefix": prefix(&acme_key),
                "maxInFlight": 2, "reason": "x"}),
            "BadRequest",
        ),
        (
            json!({"action": "tenant.limits.set", "tenant": "acme", "requestBurst": 5,
                "reason": "x"}),
            "BadRequest",
        ),
        (
            json!({"action": "tenant.limits.set", "tenant": "acme", "eventsPerSecond": 10,
                "eventBurst": 999, "reason": "x"}),
            "BadRequest",
        ),
        (
            json!({"action": "tenant.limits.set", "tenant": "nobody", "eventsPerSecond": 10,
                "reason": "x"}),
            "NotFound",
        ),
        (
            json!({"action": "tenant.limits.set", "tenant": "acme", "eventsPerSecond": 10,
                "reason": " "}),
            "BadRequest",
        ),
    ] {
        let e = run(bad.clone()).await.unwrap_err();
        assert_eq!(e.error_type(), kind, "{bad}: {e}");
    }

    let shown = run(json!({"action": "tenant.limits.show", "tenant": "acme"}))
        .await
        .unwrap();
    assert_eq!(shown["overrides"].as_array().unwrap().len(), 2);
    assert_eq!(
        shown["defaults"]["external"]["keyRequests"]["perSecond"],
        10
    );
    let other = run(json!({"action": "tenant.limits.show", "tenant": "other"}))
        .await
        .unwrap();
    assert_eq!(
        other["overrides"],
        json!([]),
        "another tenant's overrides are its own"
    );

    let clear = json!({"action": "tenant.limits.clear", "tenant": "acme",
                       "apiKeyPrefix": prefix(&acme_key), "reason": "loop fixed"});
    assert_eq!(run(clear.clone()).await.unwrap()["cleared"], true);
    assert_eq!(
        run(clear).await.unwrap()["cleared"],
        false,
        "a replay changes nothing"
    );

    let audit: Vec<(String, String, bool, bool)> = sqlx::query_as(
        "SELECT actor, reason, before IS NULL, after IS NULL FROM rate_limit_audit ORDER BY id",
    )
    .fetch_all(&owner)
    .await
    .unwrap();
    assert_eq!(
        audit,
        [
            ("admin".to_owned(), "big customer".to_owned(), true, false),
            ("oncall".to_owned(), "partner loop".to_owned(), true, false),
            ("admin".to_owned(), "loop fixed".to_owned(), false, true),
        ]
    );
}
