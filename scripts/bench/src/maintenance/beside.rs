//! The empty database measured beside the simulated one: the baseline of the ingestion ratio,
//! taken in the same minutes as the figure it divides, so that a machine whose speed drifts
//! within a run (other guests on the host, frequency) moves both alike.
//!
//! Every `BENCH_SIM_BESIDE_EVERY` (4) steps, right after the simulated database's step, the
//! same step's events (same shape, new ids) go through the same handler code into a copy of a
//! freshly migrated database (`meterbridge_sim_empty`, cloned from a template with its tenants
//! and keys), on the same simulated clock, with the scheduled storage maintenance run on it
//! at the same instants (untimed). A copy takes at most `BENCH_SIM_EMPTY_EVENTS` events, as
//! the baseline at the start always did (the first events into the empty database); then it is
//! dropped and cloned afresh, outside any measurement, and warmed by one untimed step. The
//! ratio compares the simulated database's CPU time an event over those same paired steps
//! with the copy's.

use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};
use ingest_usage::App;
use meterbridge::repo::usage_storage::StoragePolicy;
use serde_json::Value;
use sqlx::postgres::{PgPool, PgPoolOptions};

use super::{
    admin_database, ingest, ingest_apps, migrate, step_requests, storage_maintenance,
    tenants_with_keys, url_with_database, CpuMark, Settings, SimClock, Totals,
};

const TEMPLATE: &str = "meterbridge_sim_empty_template";
const COPY: &str = "meterbridge_sim_empty";

/// The empty copy in use, and what it takes to make the next.
pub(super) struct Beside {
    admin: PgPool,
    admin_url: String,
    keys: Vec<String>,
    pub(super) tenants: Vec<uuid::Uuid>,
    clock: Arc<SimClock>,
    callers: usize,
    cap: usize,
    every: usize,
    copy: Option<Copy>,
    next_tenant: usize,
}

struct Copy {
    owner: PgPool,
    admin: meterbridge::Database,
    apps: Vec<Arc<App>>,
    events: usize,
}

impl Beside {
    /// Migrates the template (as the simulated database is) with `settings.tenants` tenants
    /// and a key each; `None` where `BENCH_SIM_BESIDE_EVERY` is 0.
    pub(super) async fn prepare(
        admin: &PgPool,
        admin_url: &str,
        settings: &Settings,
        clock: Arc<SimClock>,
    ) -> Option<Beside> {
        if settings.beside_every == 0 {
            return None;
        }
        for db in [COPY, TEMPLATE] {
            sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
                .execute(admin)
                .await
                .unwrap();
        }
        sqlx::query(&format!("CREATE DATABASE {TEMPLATE}"))
            .execute(admin)
            .await
            .unwrap();
        let owner = PgPoolOptions::new()
            .max_connections(2)
            .connect(&url_with_database(admin_url, TEMPLATE))
            .await
            .expect("the template of the empty database");
        migrate(&owner).await;
        let (tenants, keys) = tenants_with_keys(&owner, settings.tenants, "empty").await;
        owner.close().await;
        Some(Beside {
            admin: admin.clone(),
            admin_url: admin_url.to_owned(),
            keys,
            tenants,
            clock,
            callers: settings.callers,
            cap: settings.empty_events,
            every: settings.beside_every,
            copy: None,
            next_tenant: 0,
        })
    }

    /// Whether step `step` of a day is paired with a step into the empty copy.
    pub(super) fn pairs(&self, step: usize) -> bool {
        step % self.every == self.every - 1
    }

    /// Sends step `step` of day `day`'s events into the empty copy, at `at` (the step's end on
    /// the simulated clock), and returns what they took.
    pub(super) async fn step(
        &mut self,
        fixture: &Value,
        settings: &Settings,
        day: usize,
        step: usize,
        at: DateTime<Utc>,
    ) -> Totals {
        let (requests, count) = self.requests(fixture, settings, day, step);
        let full = self
            .copy
            .as_ref()
            .is_some_and(|c| c.events + 2 * count > self.cap);
        if full || self.copy.is_none() {
            self.renew(fixture, at).await;
            // A warm-up, untimed: the same step's events once more (new ids), so that every
            // connection has loaded the catalog of the insert's tables, as the simulated
            // database's long-lived ones have.
            let (warm, warm_count) = self.requests(fixture, settings, day, step);
            let copy = self.copy.as_mut().unwrap();
            let (_, accepted) = ingest(&copy.apps, warm).await;
            assert_eq!(accepted, warm_count, "every event is new and valid");
            copy.events += warm_count;
        }
        let copy = self.copy.as_mut().unwrap();
        let mark = CpuMark::now(&copy.owner).await;
        let (wall, accepted) = ingest(&copy.apps, requests).await;
        let cpu = mark.since(&copy.owner).await;
        assert_eq!(accepted, count, "every event is new and valid");
        copy.events += count;
        Totals {
            events: count,
            wall,
            cpu,
        }
    }

    /// Step `step` of day `day`'s events (new ids), as requests of the copy's tenants.
    fn requests(
        &mut self,
        fixture: &Value,
        settings: &Settings,
        day: usize,
        step: usize,
    ) -> (Vec<lambda_http::Request>, usize) {
        step_requests(
            fixture,
            &self.keys,
            settings,
            day,
            step,
            &mut self.next_tenant,
        )
    }

    /// Drops the copy in use and clones a new one from the template, deployed at `at`: its
    /// key generation opened then, its storage maintained once, each container warmed with
    /// each tenant's key (the fixture's events are all rejected: nothing is stored).
    async fn renew(&mut self, fixture: &Value, at: DateTime<Utc>) {
        let started = Instant::now();
        self.close_copy().await;
        sqlx::query(&format!("DROP DATABASE IF EXISTS {COPY} WITH (FORCE)"))
            .execute(&self.admin)
            .await
            .unwrap();
        sqlx::query(&format!("CREATE DATABASE {COPY} TEMPLATE {TEMPLATE}"))
            .execute(&self.admin)
            .await
            .unwrap();
        // A clone does not take the template's per-database settings of roles (the migrations'
        // `ALTER ROLE ... IN DATABASE ... SET jit = off`: without it, the insert is compiled by
        // LLVM at each call, 2-4 times its cost): they are copied over.
        let settings: Vec<(Option<String>, String)> = sqlx::query_as(
            "SELECT r.rolname::text, c.setting
               FROM pg_catalog.pg_db_role_setting s
               JOIN pg_catalog.pg_database d ON d.oid = s.setdatabase
               LEFT JOIN pg_catalog.pg_roles r ON r.oid = s.setrole
              CROSS JOIN LATERAL unnest(s.setconfig) AS c(setting)
              WHERE d.datname = $1",
        )
        .bind(TEMPLATE)
        .fetch_all(&self.admin)
        .await
        .unwrap();
        for (role, setting) in settings {
            let (name, value) = setting.split_once('=').expect("name=value");
            let target = match role {
                Some(role) => format!("ROLE \"{role}\" IN DATABASE {COPY}"),
                None => format!("DATABASE {COPY}"),
            };
            sqlx::query(&format!(
                "ALTER {target} SET {name} = '{}'",
                value.replace('\'', "''")
            ))
            .execute(&self.admin)
            .await
            .unwrap();
        }
        let owner_url = url_with_database(&self.admin_url, COPY);
        let owner = PgPoolOptions::new()
            .max_connections(2)
            .connect(&owner_url)
            .await
            .expect("the empty copy");
        sqlx::query("UPDATE usage_key_generations SET opened_at = $1 WHERE closed_at IS NULL")
            .bind(at)
            .execute(&owner)
            .await
            .unwrap();
        let admin = admin_database(owner_url).await;
        storage_maintenance(&admin, at, &StoragePolicy::default())
            .await
            .expect("the empty copy's first maintenance");
        let apps = ingest_apps(&owner, self.callers, &self.clock, fixture, &self.keys).await;
        self.copy = Some(Copy {
            owner,
            admin,
            apps,
            events: 0,
        });
        eprintln!(
            "maintenance: a new empty copy at {at} in {:.1} s (outside the measurements)",
            started.elapsed().as_secs_f64()
        );
    }

    /// The scheduled storage maintenance on the copy in use, at the simulated database's
    /// instants (untimed).
    pub(super) async fn maintain(&self, at: DateTime<Utc>) {
        if let Some(copy) = &self.copy {
            storage_maintenance(&copy.admin, at, &StoragePolicy::default())
                .await
                .expect("the empty copy's maintenance");
        }
    }

    /// Closes the copy's containers and pools, if there is one.
    async fn close_copy(&mut self) {
        if let Some(old) = self.copy.take() {
            drop(old.apps);
            old.owner.close().await;
            old.admin.pool().close().await;
        }
    }

    /// Drops the copy and the template.
    pub(super) async fn drop_databases(mut self) {
        self.close_copy().await;
        for db in [COPY, TEMPLATE] {
            sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
                .execute(&self.admin)
                .await
                .unwrap();
        }
    }
}
