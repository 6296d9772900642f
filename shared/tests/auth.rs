//! API key verdicts expire by the wall clock as well as the monotonic one: a frozen Lambda
//! container, whose monotonic clock stood still, still sees a revocation within the TTL.

use std::time::Duration;

use meterbridge::auth::{AuthError, Authenticator};
use meterbridge::clock::FrozenClock;
use meterbridge::domain::Trust;
use meterbridge::repo::api_keys;
use meterbridge::testing::{create_api_key, create_tenant, pool_as, INGEST_ROLE};
use meterbridge::Database;
use sqlx::PgPool;

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn a_revocation_bites_after_a_freeze(owner: PgPool) {
    let acme = create_tenant(&owner, "acme").await;
    let key = create_api_key(&owner, &acme, "crm", Trust::Internal).await;
    let db = Database::from_pool(pool_as(&owner, INGEST_ROLE).await);
    let clock = FrozenClock::new();
    let auth = Authenticator::with_clock(Duration::from_secs(60), clock.clone());

    let caller = auth.authenticate(&db, Some(&key.key)).await.unwrap();
    assert_eq!(caller.tenant_id, acme.id);
    api_keys::revoke(&owner, &key.prefix).await.unwrap();
    clock.advance_wall(Duration::from_secs(59));
    assert!(
        auth.authenticate(&db, Some(&key.key)).await.is_ok(),
        "a verdict lives up to its TTL"
    );
    // The container was frozen: the monotonic clock did not move, the wall clock did.
    clock.advance_wall(Duration::from_secs(1));
    assert!(matches!(
        auth.authenticate(&db, Some(&key.key)).await,
        Err(AuthError::Revoked)
    ));
}
