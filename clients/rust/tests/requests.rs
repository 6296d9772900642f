//! The typed reads and the payment calls against the real `ingest-usage` and `verify-payment`
//! handlers (one base URL, as deployed), PostgreSQL and Redis.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::Stack;
use meterbridge::domain::usage_limit::{LimitPeriod, UsageLimit};
use meterbridge::repo::{usage_limits, usage_settings};
use meterbridge::testing::aggregate_until_caught_up;
use meterbridge_client::{
    Classification, Client, Error, NewPayment, Payment, PaymentQuery, PaymentStatus, Period,
    Source, StatusCode, SummaryQuery, TransitionOutcome, Verification, VerificationMethod,
};
use serde_json::json;
use sqlx::PgPool;

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn usage_reads_return_what_was_recorded(owner: PgPool) {
    let stack = Stack::new(&owner).await;
    {
        let mut conn = owner.acquire().await.unwrap();
        let change = usage_settings::Change {
            tenant: stack.tenant.id,
            actor: "test",
            reason: "test",
        };
        let limit = UsageLimit::new(
            "api.requests",
            LimitPeriod::Daily,
            1000,
            Some(vec![50, 80, 100]),
        )
        .unwrap();
        usage_limits::set(&mut conn, &change, &limit).await.unwrap();
    }
    let client = stack
        .client()
        .linger(Duration::from_millis(10))
        .build()
        .unwrap();
    // One instant for every event, so they all fall on one day whenever the test runs.
    let at = meterbridge::testing::now();
    let today = at.date_naive();
    client.record(stack.event(1, 2).actor_id("user-1").occurred_at(at));
    client.record(stack.event(2, 3).actor_id("user-2").occurred_at(at));
    client.record(stack.anonymous("leads.processed", 5).occurred_at(at));
    client.flush(Duration::from_secs(30)).await.unwrap();

    let realtime = client.realtime(Some(today)).await.unwrap();
    assert_eq!(realtime.date, today);
    assert_eq!(realtime.source, Source::Redis);
    assert_eq!(realtime.counters["api.requests"], 5);
    assert_eq!(realtime.counters["leads.processed"], 5);

    aggregate_until_caught_up(&owner).await;
    let summary = client
        .summary(
            &SummaryQuery::new(Period::Daily)
                .from(today)
                .to(today)
                .metric("api.requests"),
        )
        .await
        .unwrap();
    assert_eq!(
        (summary.period, summary.from, summary.to),
        (Period::Daily, today, today)
    );
    assert_eq!(summary.metric.as_deref(), Some("api.requests"));
    assert_eq!(summary.aggregates.len(), 1, "{summary:?}");
    let day = &summary.aggregates[0];
    assert_eq!(day.metric, "api.requests");
    assert_eq!(day.classification, Classification::Billable);
    assert_eq!(
        (day.total_quantity, day.event_count, day.distinct_actors),
        (5, 2, 2)
    );
    assert_eq!(day.period_start.date_naive(), today);

    let limits = client.limits().await.unwrap();
    assert_eq!(limits.metric, None);
    assert_eq!(limits.limits.len(), 1, "{limits:?}");
    let limit = &limits.limits[0];
    assert_eq!(
        (
            limit.metric.as_str(),
            limit.period,
            limit.limit,
            limit.usage,
            limit.remaining
        ),
        ("api.requests", Period::Daily, 1000, 5, 995)
    );
    assert_eq!(limit.percent, 0.5);
    assert_eq!(limit.thresholds, [50, 80, 100]);
    assert!(limit.reached.is_empty());
    let one = client.metric_limits("api.requests").await.unwrap();
    assert_eq!(one.metric.as_deref(), Some("api.requests"));
    assert_eq!(one.limits, limits.limits);

    // Errors carry the status and the problem document.
    let none = client.metric_limits("leads.processed").await.unwrap_err();
    assert_eq!(none.status(), Some(StatusCode::NOT_FOUND));
    assert_eq!(none.code(), Some("not_found"));
    let bad = client
        .summary(
            &SummaryQuery::new(Period::Daily)
                .from(today)
                .to(today - chrono::Duration::days(1)),
        )
        .await
        .unwrap_err();
    assert_eq!(bad.status(), Some(StatusCode::BAD_REQUEST));
    assert_eq!(bad.code(), Some("malformed_request"));
    assert!(bad.problem().unwrap().correlation_id.is_some());
    assert!(!bad.is_retryable());
    let stranger = Client::builder(&stack.server.url, "mbk_not_a_real_key")
        .build()
        .unwrap();
    let unauthorized = stranger.realtime(None).await.unwrap_err();
    assert_eq!(unauthorized.status(), Some(StatusCode::UNAUTHORIZED));
    assert_eq!(unauthorized.code(), Some("unauthorized"));
    client.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn payments_are_created_once_read_listed_and_verified(owner: PgPool) {
    let stack = Stack::new(&owner).await;
    let client = stack.client().build().unwrap();
    let reference = format!("pi_{}", stack.run);
    let order = NewPayment::new(4999, "usd", "stripe")
        .provider_reference(&reference)
        .description("Pro plan, November")
        .metadata(json!({"invoice": "inv-1042"}).as_object().unwrap().clone());

    let created = client
        .create_payment(&order, Some(&format!("order-{}", stack.run)))
        .await
        .unwrap();
    assert!(!created.replayed);
    let payment: Payment = created.payment;
    assert_eq!(payment.status, PaymentStatus::Pending);
    assert_eq!(
        (payment.amount_minor, payment.currency.as_str()),
        (4999, "USD")
    );
    assert_eq!(
        payment.provider_reference.as_deref(),
        Some(reference.as_str())
    );
    assert_eq!(payment.metadata["invoice"], "inv-1042");
    assert_eq!(payment.source_service, "crm");
    assert_eq!(payment.version, 1);

    // The same key and body: the first answer again, nothing new.
    let again = client
        .create_payment(&order, Some(&format!("order-{}", stack.run)))
        .await
        .unwrap();
    assert!(again.replayed);
    assert_eq!(again.payment.id, payment.id);
    // The same key, another body: 409.
    let other = NewPayment::new(5000, "USD", "stripe");
    let reused = client
        .create_payment(&other, Some(&format!("order-{}", stack.run)))
        .await
        .unwrap_err();
    assert_eq!(reused.status(), Some(StatusCode::CONFLICT));
    assert_eq!(reused.code(), Some("conflict"));
    assert!(matches!(
        client.create_payment(&other, Some("has space")).await,
        Err(Error::InvalidArgument(_))
    ));

    assert_eq!(client.payment(payment.id).await.unwrap(), payment);
    let page = client
        .list_payments(&PaymentQuery {
            status: Some(PaymentStatus::Pending),
            ..PaymentQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(
        page.payments.iter().map(|p| p.id).collect::<Vec<_>>(),
        [payment.id]
    );
    assert_eq!(page.next_cursor, None);

    let verification = Verification::new("finance-bot", VerificationMethod::ProviderApi)
        .amount_minor(4999)
        .currency("USD");
    let verified = client
        .verify_payment(payment.id, &verification)
        .await
        .unwrap();
    assert_eq!(verified.outcome, TransitionOutcome::Applied);
    assert_eq!(verified.payment.status, PaymentStatus::PaidVerified);
    assert_eq!(verified.payment.verified_by.as_deref(), Some("finance-bot"));
    assert_eq!(
        verified.payment.verification_method,
        Some(VerificationMethod::ProviderApi)
    );
    assert_eq!(verified.payment.version, 2);
    let again = client
        .verify_payment(payment.id, &verification)
        .await
        .unwrap();
    assert_eq!(again.outcome, TransitionOutcome::Unchanged);
    let wrong = client
        .verify_payment(payment.id, &verification.clone().amount_minor(1))
        .await
        .unwrap_err();
    assert_eq!(wrong.status(), Some(StatusCode::CONFLICT));

    let missing = client.payment(uuid::Uuid::now_v7()).await.unwrap_err();
    assert_eq!(missing.status(), Some(StatusCode::NOT_FOUND));
    assert_eq!(missing.code(), Some("not_found"));
    assert!(matches!(missing, Error::Api { .. }));
    client.shutdown(Duration::from_secs(1)).await.unwrap();
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn payments_may_live_at_a_base_url_of_their_own(owner: PgPool) {
    let stack = Stack::new(&owner).await;
    // The usage base URL leads nowhere; the payments one is the server.
    let client = Client::builder("http://127.0.0.1:9", &stack.key.key)
        .payments_base_url(format!("{}/", stack.server.url))
        .build()
        .unwrap();
    let shown = format!("{client:?}");
    assert!(!shown.contains(&stack.key.key), "{shown}");
    let created = client
        .create_payment(&NewPayment::new(100, "EUR", "bank-transfer"), None)
        .await
        .unwrap();
    assert_eq!(created.payment.currency, "EUR");
    let usage = client.realtime(None).await.unwrap_err();
    assert!(
        matches!(usage, Error::Transport(ref e) if e.is_connect()),
        "{usage}"
    );
    assert!(usage.is_retryable());
}
