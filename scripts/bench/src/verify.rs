//! The verification workload: payments verified through the real handler (parse → key → scope
//! → validate → one transaction: lock, update, audit, outbox → respond), beside the raw limit —
//! the same statements as a plain SQL transaction on the same role, without the HTTP layer.

use std::collections::HashMap;
use std::sync::Arc;

use meterbridge::config::{Config, Env};
use meterbridge::domain::Tenant;
use meterbridge::Services;
use serde_json::json;
use sqlx::postgres::PgPool;
use uuid::Uuid;
use verify_payment::{App, PaymentsConfig};

use crate::measure::{peak_rss_kib, peak_rss_reset, run_concurrently, Row};

pub const HANDLER: &str = "verify: handler";
pub const RAW: &str = "verify: raw SQL tx";

/// One App per caller, as separate Lambda containers would have.
pub async fn build_apps(api_url: &str, callers: usize) -> Vec<Arc<App>> {
    let mut apps = Vec::new();
    for _ in 0..callers {
        let vars: HashMap<String, String> = [("DATABASE_URL".to_owned(), api_url.to_owned())]
            .into_iter()
            .collect();
        let env = Env::from_lookup(move |k| vars.get(k).cloned());
        let services = Services::build_with_aws(Config::from(&env, "bench").unwrap(), None)
            .await
            .unwrap();
        apps.push(Arc::new(App::new(
            services,
            PaymentsConfig::from(&env).unwrap(),
        )));
    }
    apps
}

/// An emptied payments schema and `count` PENDING payments, analysed and checkpointed.
pub async fn seed(owner: &PgPool, tenant: &Tenant, count: usize) -> Vec<Uuid> {
    for statement in [
        "TRUNCATE payments, payment_audit, outbox_events, webhook_events, idempotency_records",
        "VACUUM ANALYZE payments",
        "CHECKPOINT",
    ] {
        sqlx::query(statement).execute(owner).await.unwrap();
    }
    sqlx::query_scalar(
        "INSERT INTO payments (tenant_id, id, amount_minor, currency, provider, provider_reference,
                               correlation_id, source_service)
         SELECT $1, gen_random_uuid(), 1000 + n, 'USD', 'stripe', 'pi_bench_' || n, 'bench', 'crm'
           FROM generate_series(1, $2::int) AS n
         RETURNING id",
    )
    .bind(tenant.id)
    .bind(count as i32)
    .fetch_all(owner)
    .await
    .unwrap()
}

/// One verification request per payment (from events/verify-payment/verify-payment.json, with
/// `key`), and a warm-up request (as JSON) for a payment that does not exist.
pub fn verify_requests(key: &str, payments: &[Uuid]) -> (Vec<lambda_http::Request>, String) {
    let template = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../events/verify-payment/verify-payment.json"
    ))
    .unwrap()
    .replace("{{INTERNAL_KEY}}", key);
    let requests = payments
        .iter()
        .map(|id| {
            let mut event: serde_json::Value =
                serde_json::from_str(&template.replace("{{PAYMENT_ID}}", &id.to_string())).unwrap();
            // The fixture's expected amount is the demo's; these payments each have their own.
            event["body"] = json!(
                json!({"verifiedBy": "bench", "verificationMethod": "provider_api"}).to_string()
            );
            lambda_http::request::from_str(&event.to_string()).unwrap()
        })
        .collect();
    let warm = template.replace("{{PAYMENT_ID}}", &Uuid::nil().to_string());
    (requests, warm)
}

pub async fn run_handler(apps: &[Arc<App>], key: &str, payments: Vec<Uuid>, callers: usize) -> Row {
    let count = payments.len();
    // Requests are built before the clock starts.
    let (requests, warm) = verify_requests(key, &payments);
    // Warm each container (key cache, connections) outside the measurement.
    for app in apps {
        let _ = verify_payment::handle(app, lambda_http::request::from_str(&warm).unwrap()).await;
    }
    let apps: Vec<Arc<App>> = apps.to_vec();
    peak_rss_reset();
    let (elapsed, latencies) = run_concurrently(requests, callers, move |caller, request| {
        let app = Arc::clone(&apps[caller]);
        async move {
            let response = verify_payment::handle(&app, request).await;
            assert_eq!(
                response.status(),
                200,
                "verification failed during the benchmark"
            );
        }
    })
    .await;
    Row {
        workload: HANDLER,
        batch: 1,
        callers,
        events: count,
        elapsed,
        latencies,
        peak_rss_kib: peak_rss_kib(),
    }
}

/// The statements one verification issues, in one transaction, on the API role.
pub async fn run_raw(
    api_pool: &PgPool,
    tenant: &Tenant,
    payments: Vec<Uuid>,
    callers: usize,
) -> Row {
    let count = payments.len();
    let db = Arc::new(meterbridge::Database::from_pool(api_pool.clone()));
    let tenant_id = tenant.id;
    peak_rss_reset();
    let (elapsed, latencies) = run_concurrently(payments, callers, move |_, id: Uuid| {
        let db = Arc::clone(&db);
        async move {
            let mut tx = db.tenant_tx(tenant_id).await.unwrap();
            let (status,): (String,) = sqlx::query_as(
                "SELECT status FROM payments WHERE tenant_id = $1 AND id = $2 FOR UPDATE",
            )
            .bind(tenant_id.0)
            .bind(id)
            .fetch_one(&mut *tx)
            .await
            .unwrap();
            assert_eq!(status, "PENDING");
            let (amount, verified_at): (i64, chrono::DateTime<chrono::Utc>) = sqlx::query_as(
                "UPDATE payments SET status = 'PAID_VERIFIED', verified_at = now(),
                        verified_by = 'bench', verification_method = 'provider_api',
                        updated_at = now(), version = version + 1
                  WHERE tenant_id = $1 AND id = $2
              RETURNING amount_minor, verified_at",
            )
            .bind(tenant_id.0)
            .bind(id)
            .fetch_one(&mut *tx)
            .await
            .unwrap();
            sqlx::query(
                "INSERT INTO payment_audit (tenant_id, payment_id, action, accepted, from_status,
                                            to_status, actor, actor_detail, method, reason,
                                            correlation_id, details)
                 VALUES ($1, $2, 'verify', true, 'PENDING', 'PAID_VERIFIED', 'key:bench', 'bench',
                         'provider_api', 'verified', 'bench', '{}')",
            )
            .bind(tenant_id.0)
            .bind(id)
            .execute(&mut *tx)
            .await
            .unwrap();
            let (sequence,): (i32,) = sqlx::query_as(
                "SELECT coalesce(max(aggregate_sequence), 0) + 1 FROM outbox_events
                  WHERE tenant_id = $1 AND aggregate_type = 'payment' AND aggregate_id = $2",
            )
            .bind(tenant_id.0)
            .bind(id)
            .fetch_one(&mut *tx)
            .await
            .unwrap();
            let event_id = Uuid::now_v7();
            let payload = json!({"eventId": event_id, "eventType": "payment.paid",
                "schemaVersion": 1, "tenantId": tenant_id, "occurredAt": verified_at,
                "correlationId": "bench", "idempotencyKey": format!("payment-paid-{id}"),
                "aggregateType": "payment", "aggregateId": id, "aggregateSequence": sequence,
                "sourceService": "crm", "data": {"paymentId": id, "amountMinor": amount}});
            sqlx::query(
                "INSERT INTO outbox_events (tenant_id, event_id, event_type, schema_version,
                                            payload, correlation_id, idempotency_key,
                                            aggregate_type, aggregate_id, aggregate_sequence,
                                            source_service, created_at)
                 VALUES ($1, $2, 'payment.paid', 1, $3, 'bench', $4, 'payment', $5, $6, 'crm', $7)",
            )
            .bind(tenant_id.0)
            .bind(event_id)
            .bind(&payload)
            .bind(format!("payment-paid-{id}"))
            .bind(id)
            .bind(sequence)
            .bind(verified_at)
            .execute(&mut *tx)
            .await
            .unwrap();
            tx.commit().await.unwrap();
        }
    })
    .await;
    Row {
        workload: RAW,
        batch: 1,
        callers,
        events: count,
        elapsed,
        latencies,
        peak_rss_kib: peak_rss_kib(),
    }
}
