//! The aggregation against real PostgreSQL and Redis: exact totals, incremental and idempotent
//! runs, late commits, finality and revisions, locking, deadlines, backfill and voids.
#![allow(clippy::unwrap_used)]

mod common;

use chrono::{Datelike, Duration, NaiveTime};
use common::*;
use meterbridge::domain::period::PeriodType;
use meterbridge::testing::{
    create_partitions_around_now, create_tenant, database_name, now, today,
};
use rand::{Rng, SeedableRng};
use sqlx::PgPool;

const METRICS: [&str; 3] = ["api.requests", "leads.processed", "sla.timers.started"];

fn random_events(tenants: &[uuid::Uuid], n: usize, seed: u64) -> Vec<Ev> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let now = now();
    (0..n)
        .map(|_| Ev {
            tenant: tenants[rng.gen_range(0..tenants.len())],
            metric: METRICS[rng.gen_range(0..METRICS.len())],
            quantity: rng.gen_range(1..1_000_000),
            // Anywhere in the last 34 days: across weeks and at least one month boundary.
            at: now - Duration::milliseconds(rng.gen_range(0..34 * 86_400_000)),
            actor: (rng.gen_range(0..4) > 0).then(|| format!("user-{}", rng.gen_range(0..6))),
        })
        .collect()
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn random_events_aggregate_exactly_and_a_rerun_writes_nothing(owner: PgPool) {
    let a = create_tenant(&owner, "acme").await.id.0;
    let b = create_tenant(&owner, "bolt").await.id.0;
    let events = random_events(&[a, b], 600, 7);
    let seqs = insert(&owner, &events).await;
    // A few voided: excluded from every period.
    void(&owner, &seqs[..20]).await;
    let app = app(&owner, &[]).await;

    let first = run(&app, &owner, now()).await;
    assert_eq!(first.outcome, "done");
    let want = expected(&events[20..]);
    assert_eq!(stored(&owner).await, want);
    // And the same totals computed directly in SQL, period by period.
    for (period, unit) in [("daily", "day"), ("weekly", "week"), ("monthly", "month")] {
        let mismatched: i64 = sqlx::query_scalar(
            "WITH direct AS (
                 SELECT tenant_id, metric, date_trunc($2, occurred_at, 'UTC') AS start,
                        sum(quantity) AS total, count(*) AS events,
                        count(DISTINCT actor_id) AS actors
                   FROM usage_events WHERE voided_at IS NULL GROUP BY 1, 2, 3)
             SELECT count(*) FROM direct d
               FULL JOIN (SELECT * FROM usage_aggregates
                           WHERE period_type = $1 AND event_count > 0) a
                 ON a.tenant_id = d.tenant_id AND a.metric = d.metric
                AND a.period_start = d.start
              WHERE (a.total_quantity, a.event_count, a.distinct_actors)
                    IS DISTINCT FROM (d.total, d.events, d.actors)",
        )
        .bind(period)
        .bind(unit)
        .fetch_one(&owner)
        .await
        .unwrap();
        assert_eq!(mismatched, 0, "{period}");
    }
    // Every cell written from its changes (new events reach no stored cell: no recompute).
    assert!(
        first.collected.cells_changed as usize >= want.len(),
        "{first:?}"
    );
    assert_eq!(first.collected.cells_queued, 0, "{first:?}");
    assert_eq!(
        first.cells_examined,
        first.cells_written + first.cells_unchanged
    );

    // Nothing new: nothing examined, nothing written.
    let again = run(&app, &owner, now()).await;
    assert_eq!(
        (again.cells_examined, again.cells_written),
        (0, 0),
        "{again:?}"
    );
    // A backfill of everything recomputes every cell and still writes nothing.
    let today = today();
    let backfill = app
        .aggregator()
        .backfill(
            &meterbridge::aggregation::Backfill {
                from: today - Duration::days(35),
                to: today,
                tenant: None,
                periods: PeriodType::ALL.to_vec(),
            },
            now(),
            later(),
        )
        .await
        .unwrap();
    assert!(backfill.cells_examined >= want.len() as u64, "{backfill:?}");
    assert_eq!(backfill.cells_written, 0, "{backfill:?}");
    assert_eq!(stored(&owner).await, want);
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn instants_at_the_edges_land_in_the_right_day_week_and_month(owner: PgPool) {
    // Fixed midnights, each with a tenant of its own so that no two share a period: a Monday that
    // is the first of a month, the day after 29 February, New Year's Day (a Friday), and an
    // ordinary Monday in the middle of a month.
    let edges = ["2027-03-01", "2028-03-01", "2027-01-01", "2027-03-08"];
    let mut events = Vec::new();
    let mut tenants = Vec::new();
    for edge in edges {
        let t = create_tenant(&owner, "edge").await.id.0;
        let midnight = day(edge).and_time(NaiveTime::MIN).and_utc();
        for (at, q) in [
            (midnight - Duration::milliseconds(1), 1),
            (midnight, 10),
            (
                midnight + Duration::days(1) - Duration::milliseconds(1),
                100,
            ),
        ] {
            events.push(Ev {
                tenant: t,
                metric: "api.requests",
                quantity: q,
                at,
                actor: None,
            });
        }
        tenants.push((t, day(edge)));
    }
    insert(&owner, &events).await;
    let app = app(&owner, &[]).await;
    run(&app, &owner, at("2028-03-05T00:00:00Z")).await;
    let got = stored(&owner).await;
    assert_eq!(got, expected(&events));
    for (t, edge) in tenants {
        let total = |p: PeriodType, d: chrono::NaiveDate| {
            got.get(&(t, p, d, "api.requests".to_owned()))
                .map(|v| v.0)
                .unwrap_or_else(|| panic!("no {p:?} cell of {d} ({edge})"))
        };
        let before = edge - Duration::days(1);
        // 23:59:59.999 belongs to the day before; 00:00:00 and 23:59:59.999 to the new one.
        assert_eq!(total(PeriodType::Daily, before), 1, "{edge}");
        assert_eq!(total(PeriodType::Daily, edge), 110, "{edge}");
        let (week, month) = (PeriodType::Weekly, PeriodType::Monthly);
        if edge.weekday() == chrono::Weekday::Mon {
            assert_eq!(total(week, week.start_of(before)), 1, "{edge}");
            assert_eq!(total(week, edge), 110, "{edge}");
        } else {
            assert_eq!(total(week, week.start_of(edge)), 111, "{edge}");
        }
        if edge.day() == 1 {
            assert_eq!(total(month, month.start_of(before)), 1, "{edge}");
            assert_eq!(total(month, edge), 110, "{edge}");
        } else {
            assert_eq!(total(month, month.start_of(edge)), 111, "{edge}");
        }
    }
    // The leap day is a day of its own, and February 2028 ends with it.
    let leap = got.keys().filter(|k| k.2 == day("2028-02-29")).count();
    assert_eq!(leap, 1, "{got:?}");
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn a_late_event_changes_only_its_day_week_and_month(owner: PgPool) {
    let t = create_tenant(&owner, "late").await.id.0;
    let events = random_events(&[t], 200, 11);
    insert(&owner, &events).await;
    let app = app(&owner, &[]).await;
    run(&app, &owner, now()).await;
    let before = computed_at(&owner).await;

    let late_day = today() - Duration::days(20);
    let late = Ev {
        tenant: t,
        metric: "api.requests",
        quantity: 5,
        at: late_day.and_hms_opt(12, 0, 0).unwrap().and_utc(),
        actor: Some("late-user".into()),
    };
    insert(&owner, std::slice::from_ref(&late)).await;
    let report = run(&app, &owner, now()).await;
    // Applied as a change to the three cells: no period recomputed from its events.
    assert_eq!(report.collected.cells_changed, 3, "{report:?}");
    assert_eq!(report.cells_examined, 0, "{report:?}");

    let after = computed_at(&owner).await;
    let changed: Vec<_> = after
        .iter()
        .filter(|(k, v)| before.get(*k) != Some(*v))
        .map(|(k, _)| (k.1.clone(), k.2))
        .collect();
    let mut want = vec![
        ("daily".to_owned(), late_day),
        ("monthly".to_owned(), PeriodType::Monthly.start_of(late_day)),
        ("weekly".to_owned(), PeriodType::Weekly.start_of(late_day)),
    ];
    want.sort();
    let mut changed = changed;
    changed.sort();
    assert_eq!(changed, want);
    let mut all = events.clone();
    all.push(late);
    assert_eq!(stored(&owner).await, expected(&all));
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn an_ingestion_committing_late_is_counted_by_the_next_run(owner: PgPool) {
    let t = create_tenant(&owner, "race").await.id.0;
    create_partitions_around_now(&owner).await;
    let at_now = now();
    let ev = |q| Ev {
        tenant: t,
        metric: "api.requests",
        quantity: q,
        at: at_now,
        actor: None,
    };
    // A: an ingestion transaction that writes first (lower seq) and commits late.
    let mut slow = owner.begin().await.unwrap();
    let a = insert_in(&mut slow, &[ev(1)]).await[0];
    // B: one that writes after and commits at once (higher seq, earlier commit).
    let b = insert(&owner, &[ev(10)]).await[0];
    assert!(a < b);

    // A run while A is still open.
    let app = app(&owner, &[]).await;
    let first = app.aggregator().aggregate(now(), later()).await.unwrap();
    assert_eq!(first.outcome, "done");
    // "Everything after seq N" would now have counted B and moved past A for ever. The run
    // stopped below A's transaction instead: neither is counted yet, A is not skipped.
    let total = |owner: PgPool| async move {
        sqlx::query_scalar::<_, Option<String>>(
            "SELECT total_quantity::text FROM usage_aggregates WHERE period_type = 'daily'",
        )
        .fetch_optional(&owner)
        .await
        .unwrap()
        .flatten()
    };
    assert_eq!(total(owner.clone()).await, None, "{first:?}");
    slow.commit().await.unwrap();
    assert!(first.collected.watermark <= a_xact(&owner, a).await);
    // The next runs count both, once (one run, or two when another test's transaction on the
    // cluster holds the bound between them for a while): the day, week and month, each 11.
    let second = run(&app, &owner, now()).await;
    assert!(
        matches!(second.collected.cells_changed, 3 | 6),
        "{second:?}"
    );
    assert_eq!(total(owner.clone()).await.as_deref(), Some("11"));
    let cells: Vec<(String, String)> =
        sqlx::query_as("SELECT period_type, total_quantity::text FROM usage_aggregates ORDER BY 1")
            .fetch_all(&owner)
            .await
            .unwrap();
    let eleven = |p: &str| (p.to_owned(), "11".to_owned());
    assert_eq!(
        cells,
        [eleven("daily"), eleven("monthly"), eleven("weekly")]
    );
}

async fn a_xact(owner: &PgPool, seq: i64) -> i64 {
    sqlx::query_scalar("SELECT xact_id FROM usage_events WHERE seq = $1")
        .bind(seq)
        .fetch_one(owner)
        .await
        .unwrap()
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn periods_become_final_after_the_grace_and_late_changes_are_revisions(owner: PgPool) {
    let t = create_tenant(&owner, "final").await.id.0;
    let day = today() - Duration::days(10);
    let noon = day.and_hms_opt(12, 0, 0).unwrap().and_utc();
    let seqs = insert(
        &owner,
        &[Ev {
            tenant: t,
            metric: "api.requests",
            quantity: 7,
            at: noon,
            actor: None,
        }],
    )
    .await;
    let app = app(&owner, &[("AGGREGATION_GRACE_SECONDS", "3600")]).await;
    // Aggregated while the day is still open: not final.
    let end_of_day = (day + Duration::days(1)).and_time(NaiveTime::MIN).and_utc();
    let r = run(&app, &owner, end_of_day + Duration::minutes(30)).await;
    assert_eq!(r.collected.cells_changed, 3, "{r:?}");
    let final_of = |owner: PgPool, p: &'static str| async move {
        sqlx::query_as::<_, (bool, i32)>(
            "SELECT final, revisions_after_final FROM usage_aggregates WHERE period_type = $1",
        )
        .bind(p)
        .fetch_one(&owner)
        .await
        .unwrap()
    };
    assert_eq!(final_of(owner.clone(), "daily").await, (false, 0));
    // The grace passes: the day becomes final with nothing recomputed.
    let r = run(&app, &owner, end_of_day + Duration::minutes(61)).await;
    // (The week too, when the day is a Sunday.)
    assert_eq!(
        (r.collected.cells_changed, r.cells_written),
        (0, 0),
        "{r:?}"
    );
    assert!(r.finalized >= 1, "{r:?}");
    assert_eq!(final_of(owner.clone(), "daily").await, (true, 0));
    // A rerun finalizes nothing more.
    assert_eq!(
        run(&app, &owner, end_of_day + Duration::minutes(62))
            .await
            .finalized,
        0
    );

    let final_cells: u64 =
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM usage_aggregates WHERE final")
            .fetch_one(&owner)
            .await
            .unwrap() as u64;
    // A late event for the final day still counts, and is recorded as a revision (of the week
    // too, when the day is a Sunday).
    insert(
        &owner,
        &[Ev {
            tenant: t,
            metric: "api.requests",
            quantity: 3,
            at: noon,
            actor: None,
        }],
    )
    .await;
    let r = run(&app, &owner, end_of_day + Duration::minutes(90)).await;
    assert_eq!(r.revisions, final_cells, "{r:?}");
    assert_eq!(final_of(owner.clone(), "daily").await, (true, 1));
    // So is a void.
    void(&owner, &seqs).await;
    let r = run(&app, &owner, end_of_day + Duration::minutes(95)).await;
    assert_eq!(r.revisions, final_cells, "{r:?}");
    let (total, revisions): (String, i32) = sqlx::query_as(
        "SELECT total_quantity::text, revisions_after_final FROM usage_aggregates
          WHERE period_type = 'daily'",
    )
    .fetch_one(&owner)
    .await
    .unwrap();
    assert_eq!((total.as_str(), revisions), ("3", 2));
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn a_second_run_skips_while_one_holds_the_lock(owner: PgPool) {
    let t = create_tenant(&owner, "lock").await.id.0;
    let events = random_events(&[t], 50, 3);
    insert(&owner, &events).await;
    let app = app(&owner, &[]).await;
    // Another run holds the lock (as every chunk of a run does).
    let mut other = owner.begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock(usage_aggregation_lock_id())")
        .execute(&mut *other)
        .await
        .unwrap();
    let second = app.aggregator().aggregate(now(), later()).await.unwrap();
    assert_eq!(second.outcome, "skipped: locked");
    assert_eq!(second.collected.chunks, 0);
    assert_eq!((second.cells_examined, second.cells_written), (0, 0));
    assert!(stored(&owner).await.is_empty());
    other.commit().await.unwrap();
    let after = run(&app, &owner, now()).await;
    assert_eq!(after.outcome, "done");
    assert_eq!(stored(&owner).await, expected(&events));
}

/// The cells as the events say they should be as of the stored watermark: what the committed
/// chunks have applied, and nothing more.
async fn expected_as_of_watermark(owner: &PgPool) -> Expected {
    type Row = (
        uuid::Uuid,
        String,
        i64,
        chrono::DateTime<chrono::Utc>,
        Option<String>,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT e.tenant_id, e.metric, e.quantity::int8, e.occurred_at, e.actor_id
               FROM usage_events e, usage_aggregation_state w
              WHERE coalesce(e.inserted_xact, 0) < w.watermark
                AND (e.voided_at IS NULL OR e.xact_id >= w.watermark)",
    )
    .fetch_all(owner)
    .await
    .unwrap();
    let metric = |m: &str| *METRICS.iter().find(|x| **x == m).unwrap();
    let events: Vec<Ev> = rows
        .into_iter()
        .map(|(tenant, m, quantity, at, actor)| Ev {
            tenant,
            metric: metric(&m),
            quantity,
            at,
            actor,
        })
        .collect();
    expected(&events)
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn a_run_cut_at_any_point_resumes_consistently(owner: PgPool) {
    let t = create_tenant(&owner, "cut").await.id.0;
    let u = create_tenant(&owner, "cut-too").await.id.0;
    let events = random_events(&[t, u], 400, 5);
    // Many transactions (so that a run takes many chunks), and voids in later ones.
    let mut seqs = Vec::new();
    for batch in events.chunks(20) {
        seqs.extend(insert(&owner, batch).await);
    }
    for (i, batch) in seqs.chunks(20).enumerate().filter(|(i, _)| i % 3 == 0) {
        void(&owner, &batch[i % 5..i % 5 + 3]).await;
    }
    let voided: std::collections::HashSet<usize> = seqs
        .chunks(20)
        .enumerate()
        .filter(|(i, _)| i % 3 == 0)
        .flat_map(|(i, _)| (i * 20 + i % 5)..(i * 20 + i % 5 + 3))
        .collect();
    let live: Vec<Ev> = events
        .iter()
        .enumerate()
        .filter(|(i, _)| !voided.contains(i))
        .map(|(_, e)| e.clone())
        .collect();
    // The smallest chunks (100 groups of changes), so that a run has many places to be cut.
    let app = app(&owner, &[("AGGREGATION_CHUNK_CHANGES", "100")]).await;

    // Runs killed after 1, 7, 13, ... ms, wherever they are (between statements, in a chunk's
    // transaction, before its commit): after each, the stored cells are exactly what the
    // committed chunks applied, as of the watermark they moved.
    let mut cut = 0;
    // Cut points spread over the first run's whole length and beyond (each run resumes).
    for ms in (0..40u64).map(|i| 1 + i * 6) {
        let aggregator = app.aggregator();
        let run = aggregator.aggregate(now(), later());
        if tokio::time::timeout(std::time::Duration::from_millis(ms), run)
            .await
            .is_err()
        {
            cut += 1;
        }
        // A connection dropped mid-transaction rolls back when the server notices.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert_eq!(
            stored(&owner).await,
            expected_as_of_watermark(&owner).await,
            "after a run cut at {ms} ms"
        );
        let queued: i64 = sqlx::query_scalar("SELECT count(*) FROM usage_aggregation_queue")
            .fetch_one(&owner)
            .await
            .unwrap();
        assert_eq!(queued, 0);
        if stored(&owner).await == expected(&live) {
            break;
        }
    }
    assert!(cut > 3, "only {cut} runs were cut");
    // A whole run finishes the rest, exactly.
    let last = run(&app, &owner, now()).await;
    assert_eq!(last.outcome, "done");
    assert_eq!(stored(&owner).await, expected(&live));
    // The actor sets agree with the events: a recompute of everything changes nothing.
    let sets_before = actor_sets(&owner).await;
    assert!(!sets_before.is_empty());
    let today = today();
    let backfill = app
        .aggregator()
        .backfill(
            &meterbridge::aggregation::Backfill {
                from: today - Duration::days(35),
                to: today,
                tenant: None,
                periods: PeriodType::ALL.to_vec(),
            },
            now(),
            later(),
        )
        .await
        .unwrap();
    assert_eq!(backfill.cells_written, 0, "{backfill:?}");
    assert_eq!(actor_sets(&owner).await, sets_before);
}

/// Every row of the actor sets, as text (days and periods).
async fn actor_sets(owner: &PgPool) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT format('%s %s %s %s %s', tenant_id, metric, day, actor, events)
           FROM usage_actor_days
         UNION ALL
         SELECT format('%s %s %s %s %s %s', tenant_id, metric, period_type, period_start, actor,
                       days)
           FROM usage_actor_periods
         ORDER BY 1",
    )
    .fetch_all(owner)
    .await
    .unwrap()
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn a_backfill_recomputes_its_range_only(owner: PgPool) {
    let a = create_tenant(&owner, "fill").await;
    let b = create_tenant(&owner, "other").await;
    let events = random_events(&[a.id.0, b.id.0], 300, 9);
    insert(&owner, &events).await;
    let app = app(&owner, &[]).await;
    run(&app, &owner, now()).await;
    // Damage every daily aggregate.
    sqlx::query("UPDATE usage_aggregates SET total_quantity = 0, source_hash = '\\x00'")
        .execute(&owner)
        .await
        .unwrap();
    let today = today();
    let (from, to) = (today - Duration::days(10), today - Duration::days(4));
    let report = app
        .aggregator()
        .backfill(
            &meterbridge::aggregation::Backfill {
                from,
                to,
                tenant: Some(a.slug.to_string()),
                periods: vec![PeriodType::Daily],
            },
            now(),
            later(),
        )
        .await
        .unwrap();
    assert!(report.backfill_queued.unwrap() > 0);
    let want = expected(&events);
    let got = stored(&owner).await;
    for (key, value) in &want {
        let repaired =
            key.0 == a.id.0 && key.1 == PeriodType::Daily && key.2 >= from && key.2 <= to;
        let now = got.get(key).unwrap();
        if repaired {
            assert_eq!(now, value, "{key:?}");
        } else {
            assert_eq!(now.0, 0, "{key:?} is outside the backfill");
        }
    }

    // Refused: a reversed range, too long a range, an unknown tenant, no periods.
    let bad = |from, to, tenant: Option<&str>, periods: Vec<PeriodType>| {
        meterbridge::aggregation::Backfill {
            from,
            to,
            tenant: tenant.map(str::to_owned),
            periods,
        }
    };
    let aggregator = app.aggregator();
    for request in [
        bad(to, from, None, PeriodType::ALL.to_vec()),
        bad(
            today - Duration::days(500),
            today,
            None,
            PeriodType::ALL.to_vec(),
        ),
        bad(from, to, Some("nobody-here"), PeriodType::ALL.to_vec()),
        bad(from, to, None, vec![]),
    ] {
        let e = aggregator
            .backfill(&request, now(), later())
            .await
            .unwrap_err();
        assert!(
            matches!(e, meterbridge::aggregation::AggregationError::BadRequest(_)),
            "{e}"
        );
    }
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn status_reports_backlog_per_tenant(owner: PgPool) {
    let a = create_tenant(&owner, "stat").await;
    let app = app(&owner, &[]).await;
    run(&app, &owner, now()).await;
    insert(&owner, &random_events(&[a.id.0], 25, 1)).await;
    let status = json_of(&app.aggregator().status(now()).await.unwrap());
    let row = status["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["tenant"].as_str() == Some(a.slug.as_str()))
        .unwrap()
        .clone();
    assert_eq!(row["pendingEvents"], 25);
    assert_eq!(row["queuedCells"], 0);
    assert!(row["oldestUnaggregatedAt"].is_string());
    assert!(status["state"]["lastRunAt"].is_string());

    run(&app, &owner, now()).await;
    let status = json_of(&app.aggregator().status(now()).await.unwrap());
    let row = status["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["tenant"].as_str() == Some(a.slug.as_str()))
        .unwrap()
        .clone();
    assert_eq!(row["pendingEvents"], 0);
    assert!(row["oldestUnaggregatedAt"].is_null());
    assert!(row["lastAggregatedAt"].is_string());
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn many_cells_of_a_period_are_computed_by_one_scan_with_or_without_a_filter(owner: PgPool) {
    // 50 tenants × 3 metrics on one day: 150 cells per period, beyond the index-probe size.
    let mut tenants = Vec::new();
    for _ in 0..50 {
        tenants.push(create_tenant(&owner, "wide").await.id.0);
    }
    let early = today().and_hms_opt(0, 0, 0).unwrap().and_utc() + Duration::minutes(1);
    let mut events = Vec::new();
    for (i, t) in tenants.iter().enumerate() {
        for (j, metric) in METRICS.iter().enumerate() {
            events.push(Ev {
                tenant: *t,
                metric,
                quantity: (i * 10 + j + 1) as i64,
                at: early,
                actor: Some(format!("a{}", i % 3)),
            });
        }
    }
    insert(&owner, &events).await;
    let app = app(&owner, &[]).await;
    // The first run writes every cell from its changes.
    let first = run(&app, &owner, now()).await;
    assert_eq!(first.collected.cells_changed, 3 * 150, "{first:?}");
    assert_eq!(stored(&owner).await, expected(&events));

    // A backfill of the events' day (not "today": a run may cross midnight) recomputes its 150
    // cells of each period by one scan of the period, without a filter (they are every cell
    // there is): wrong totals are put right.
    sqlx::query("UPDATE usage_aggregates SET total_quantity = total_quantity + 1")
        .execute(&owner)
        .await
        .unwrap();
    let backfill = app
        .aggregator()
        .backfill(
            &meterbridge::aggregation::Backfill::of(
                early.date_naive(),
                early.date_naive(),
                None,
                None,
            ),
            now(),
            later(),
        )
        .await
        .unwrap();
    assert_eq!(backfill.cells_written, 3 * 150, "{backfill:?}");
    assert_eq!(stored(&owner).await, expected(&events));

    // Cells whose actor sets are not kept (as in a database upgraded from before them): their
    // first change recomputes them. 66 of the 150 pairs change (more than the probe size,
    // fewer than half of those known): the scan keeps the changed cells' rows by their keys.
    sqlx::raw_sql(
        "UPDATE usage_aggregates SET actors_tracked = false;
         DELETE FROM usage_actor_days; DELETE FROM usage_actor_periods;",
    )
    .execute(&owner)
    .await
    .unwrap();
    let mut more = Vec::new();
    for t in &tenants[..22] {
        for metric in METRICS {
            more.push(Ev {
                tenant: *t,
                metric,
                quantity: 1000,
                at: early + Duration::seconds(1),
                actor: Some("late".into()),
            });
        }
    }
    insert(&owner, &more).await;
    let report = run(&app, &owner, now()).await;
    assert_eq!(report.collected.cells_queued, 3 * 66, "{report:?}");
    assert_eq!(report.cells_written, 3 * 66, "{report:?}");
    events.extend(more);
    assert_eq!(stored(&owner).await, expected(&events));
    let untracked: i64 =
        sqlx::query_scalar("SELECT count(*) FROM usage_aggregates WHERE NOT actors_tracked")
            .fetch_one(&owner)
            .await
            .unwrap();
    assert_eq!(untracked, 3 * (150 - 66));
}

/// A cell is classified as its events were when they were ingested, not by today's catalog: a
/// metric reclassified later (by a migration) keeps its past periods as they were billed.
#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn a_cell_takes_the_classification_stored_on_its_events(owner: PgPool) {
    let t = create_tenant(&owner, "class").await.id.0;
    let day = today() - Duration::days(3);
    let at = |h| day.and_hms_opt(h, 0, 0).unwrap().and_utc();
    let events = [
        Ev {
            tenant: t,
            metric: "api.requests",
            quantity: 5,
            at: at(9),
            actor: None,
        },
        Ev {
            tenant: t,
            metric: "api.requests",
            quantity: 7,
            at: at(15),
            actor: None,
        },
    ];
    let seqs = insert(&owner, &events).await;
    // The catalog says BILLABLE; these events were stored NON_BILLABLE.
    sqlx::query("UPDATE usage_events SET classification = 'NON_BILLABLE' WHERE seq = ANY($1)")
        .bind(&seqs)
        .execute(&owner)
        .await
        .unwrap();
    let app = app(&owner, &[]).await;
    run(&app, &owner, now()).await;
    let classes = |owner: PgPool| async move {
        sqlx::query_scalar::<_, String>(
            "SELECT DISTINCT classification FROM usage_aggregates ORDER BY 1",
        )
        .fetch_all(&owner)
        .await
        .unwrap()
    };
    assert_eq!(classes(owner.clone()).await, ["NON_BILLABLE"]);

    // The later event reclassified: the cell takes its latest event's classification.
    sqlx::query(
        "UPDATE usage_events SET classification = 'BILLABLE', voided_at = NULL WHERE seq = $1",
    )
    .bind(seqs[1])
    .execute(&owner)
    .await
    .unwrap();
    app.aggregator()
        .backfill(
            &meterbridge::aggregation::Backfill {
                from: day,
                to: day,
                tenant: None,
                periods: PeriodType::ALL.to_vec(),
            },
            now(),
            later(),
        )
        .await
        .unwrap();
    assert_eq!(classes(owner.clone()).await, ["BILLABLE"]);
}

/// A write transaction left open anywhere on the instance (here on another connection) holds
/// the watermark back: the run still says "done" with nothing queued, and reports what it could
/// not collect — how many committed events, how long the oldest has waited — and the oldest
/// transaction's session; the status job shows the same. Once that transaction ends, the next
/// run collects everything.
#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn a_stalled_watermark_is_measured_and_its_holder_named(owner: PgPool) {
    let t = create_tenant(&owner, "stall").await.id.0;
    let app = app(&owner, &[]).await;
    run(&app, &owner, now()).await;
    let mut holder = owner.begin().await.unwrap();
    let (pid, _xid): (i32, String) =
        sqlx::query_as("SELECT pg_backend_pid(), pg_current_xact_id()::text")
            .fetch_one(&mut *holder)
            .await
            .unwrap();
    let events: Vec<Ev> = (1..=5)
        .map(|q| Ev {
            tenant: t,
            metric: "api.requests",
            quantity: q,
            at: now(),
            actor: None,
        })
        .collect();
    insert(&owner, &events).await;
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;

    let stalled = app.aggregator().aggregate(now(), later()).await.unwrap();
    assert_eq!(stalled.outcome, "done");
    assert_eq!(stalled.queued_after, 0, "{stalled:?}");
    assert!(stalled.lag.uncollected_events >= 5, "{stalled:?}");
    assert!(stalled.lag.lag_seconds >= 1.0, "{stalled:?}");
    let oldest = stalled.lag.oldest_transaction.clone().expect("the holder");
    assert!(oldest.xid_age.unwrap_or(0) >= 1, "{oldest:?}");
    assert!(oldest.database.is_some(), "{oldest:?}");
    // Ours, unless another test's transaction on the cluster is older still.
    if oldest.pid == pid {
        assert_eq!(
            oldest.database.as_deref(),
            Some(database_name(&owner).as_str())
        );
    }
    let status = json_of(&app.aggregator().status(now()).await.unwrap());
    assert!(
        status["lag"]["uncollectedEvents"].as_i64().unwrap() >= 5,
        "{status}"
    );

    holder.commit().await.unwrap();
    let caught_up = run(&app, &owner, now()).await;
    assert_eq!(caught_up.lag.uncollected_events, 0, "{caught_up:?}");
    let total: String = sqlx::query_scalar(
        "SELECT total_quantity::text FROM usage_aggregates WHERE period_type = 'daily'",
    )
    .fetch_one(&owner)
    .await
    .unwrap();
    assert_eq!(total, "15");
}

/// One tenant's backfill of a year (3,650 queued cells) does not hold another tenant's one cell
/// back: a chunk interleaves the queued tenants, so it is in the first chunk of a run.
#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn a_tenants_backfill_never_starves_another_tenants_cells(owner: PgPool) {
    let big = meterbridge::testing::create_tenant(&owner, "big").await;
    let small = meterbridge::testing::create_tenant(&owner, "small").await;
    // The big tenant's cells come first in time: before, the queue was worked in time order.
    sqlx::query(
        "INSERT INTO usage_aggregation_queue (period_type, period_start, tenant_id, metric, reason)
         SELECT 'daily', timestamptz '2025-01-01 00:00:00+00' + d * interval '1 day', $1, m, 'backfill'
           FROM generate_series(0, 364) d,
                (SELECT name AS m FROM metrics ORDER BY name LIMIT 10) metrics",
    )
    .bind(big.id)
    .execute(&owner)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO usage_aggregation_queue (period_type, period_start, tenant_id, metric, reason)
         VALUES ('daily', timestamptz '2026-06-01 00:00:00+00', $1, 'api.requests', 'change')",
    )
    .bind(small.id)
    .execute(&owner)
    .await
    .unwrap();
    let mut conn = owner.acquire().await.unwrap();
    let chunk = meterbridge::repo::usage_aggregates::next_cells(&mut conn, 50)
        .await
        .unwrap();
    assert_eq!(chunk.len(), 50);
    assert_eq!(
        chunk.iter().filter(|c| c.tenant_id == small.id.0).count(),
        1,
        "the small tenant's cell is in the first chunk"
    );
    // The big tenant's cells still come in time order, for short partition ranges.
    let big_days: Vec<_> = chunk
        .iter()
        .filter(|c| c.tenant_id == big.id.0)
        .map(|c| c.period_start)
        .collect();
    assert!(big_days.windows(2).all(|w| w[0] <= w[1]));
    assert_eq!(
        big_days.first().map(|d| d.to_rfc3339()),
        Some("2025-01-01T00:00:00+00:00".into())
    );
}

/// The heap pages a search for transactions at or past `xact` reads in `usage_events` (the
/// bitmap heap scans' exact and lossy blocks), as a run's search for new events reads them.
async fn heap_blocks_searched(owner: &PgPool, xact: i64) -> i64 {
    fn sum(node: &serde_json::Value) -> i64 {
        let own = ["Exact Heap Blocks", "Lossy Heap Blocks"]
            .iter()
            .filter_map(|k| node[*k].as_i64())
            .sum::<i64>();
        own + node["Plans"]
            .as_array()
            .map_or(0, |plans| plans.iter().map(sum).sum())
    }
    let mut conn = owner.acquire().await.unwrap();
    sqlx::query("SET enable_seqscan = off")
        .execute(&mut *conn)
        .await
        .unwrap();
    let plan: serde_json::Value = sqlx::query_scalar(&format!(
        "EXPLAIN (ANALYZE, FORMAT JSON)
         SELECT count(*) FROM usage_events WHERE inserted_xact >= {xact} OR xact_id >= {xact}"
    ))
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    sum(&plan[0]["Plan"])
}

/// The storage maintenance summarizes the BRIN ranges a day has filled since its last run
/// (whether or not autovacuum got to them: it is off here), so a run's search for new events
/// reads none of the pages written before; a second maintenance has nothing to summarize.
#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn maintenance_summarizes_new_page_ranges_so_a_run_reads_only_new_pages(owner: PgPool) {
    use meterbridge::repo::usage_storage::StoragePolicy;
    let t = create_tenant(&owner, "brin").await.id.0;
    let at_noon = at("2026-06-01T12:00:00Z");
    meterbridge::testing::create_day_partitions(&owner, day("2026-06-01"), day("2026-06-01")).await;
    // Many ranges of 128 pages.
    sqlx::query(
        "INSERT INTO usage_events (tenant_id, event_id, metric, quantity, occurred_at, actor_id,
                                   source_service, correlation_id, classification, payload_hash,
                                   operation_key)
         SELECT $1, gen_random_uuid()::text, 'api.requests', 1, $2, 'actor-' || (i % 100), 'crm',
                gen_random_uuid()::text, 'BILLABLE', sha256('x'), gen_random_uuid()
           FROM generate_series(1, 60000) i",
    )
    .bind(t)
    .bind(at_noon)
    .execute(&owner)
    .await
    .unwrap();
    let next: i64 = sqlx::query_scalar("SELECT pg_current_xact_id()::text::bigint")
        .fetch_one(&owner)
        .await
        .unwrap();
    let before = heap_blocks_searched(&owner, next).await;
    assert!(before > 256, "unsummarized, every page matches: {before}");
    // Out of time budget at once: nothing summarized, the work left reported (and resumed).
    let out_of_time: Vec<(String, String)> =
        sqlx::query_as("SELECT * FROM usage_events_brin_summarize('2026-05-01', '0 seconds')")
            .fetch_all(&owner)
            .await
            .unwrap();
    assert_eq!(out_of_time.len(), 2, "{out_of_time:?}");
    assert!(
        out_of_time.iter().all(|(a, _)| a == "summary left work"),
        "{out_of_time:?}"
    );
    assert_eq!(heap_blocks_searched(&owner, next).await, before);
    // Extreme inputs: a negative budget is no budget; a window starting in the far future
    // holds no day; neither summarizes or records anything.
    let summarize = |from: &'static str, budget: &'static str| {
        let owner = owner.clone();
        async move {
            sqlx::query_as::<_, (String, String)>(
                "SELECT * FROM usage_events_brin_summarize($1::date, $2::interval)",
            )
            .bind(from)
            .bind(budget)
            .fetch_all(&owner)
            .await
            .unwrap()
        }
    };
    let negative = summarize("2026-05-01", "-1 hour").await;
    assert!(
        negative.len() == 2 && negative.iter().all(|(a, _)| a == "summary left work"),
        "{negative:?}"
    );
    assert!(summarize("9999-12-31", "1 hour").await.is_empty());
    let progress: i64 = sqlx::query_scalar("SELECT count(*) FROM usage_events_brin_progress")
        .fetch_one(&owner)
        .await
        .unwrap();
    assert_eq!(progress, 0);
    // A VACUUM of the day (its lock, held here) is not waited for: the day is skipped at once.
    let mut vacuum = owner.begin().await.unwrap();
    sqlx::query("LOCK TABLE usage_events_p20260601 IN SHARE UPDATE EXCLUSIVE MODE")
        .execute(&mut *vacuum)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let locked = summarize("2026-05-01", "1 hour").await;
    assert!(
        started.elapsed() < std::time::Duration::from_millis(900),
        "waited {:?}",
        started.elapsed()
    );
    assert!(
        locked.len() == 2 && locked.iter().all(|(a, _)| a == "summary skipped (locked)"),
        "{locked:?}"
    );
    vacuum.rollback().await.unwrap();
    assert_eq!(heap_blocks_searched(&owner, next).await, before);

    let policy = StoragePolicy::default();
    let maintain = |now| meterbridge::testing::maintain_storage(&owner, now, &policy);
    let done = maintain(at_noon).await;
    let summarized: Vec<&str> = done
        .iter()
        .filter(|a| a.action == "summarized")
        .map(|a| a.object.as_str())
        .collect();
    assert_eq!(
        summarized.len(),
        2,
        "both BRIN indexes of the day: {done:?}"
    );
    assert!(
        summarized
            .iter()
            .all(|o| o.starts_with("public.usage_events_p20260601_")),
        "{summarized:?}"
    );
    assert_eq!(heap_blocks_searched(&owner, next).await, 0);
    // The events are all still found by a search from before them.
    let first: i64 = sqlx::query_scalar("SELECT min(inserted_xact) FROM usage_events")
        .fetch_one(&owner)
        .await
        .unwrap();
    let found: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM usage_events WHERE inserted_xact >= $1 OR xact_id >= $1",
    )
    .bind(first)
    .fetch_one(&owner)
    .await
    .unwrap();
    assert_eq!(found, 60_000);

    // Nothing grew: nothing to summarize. A day outside ingestion's window is left alone.
    let again = maintain(at_noon).await;
    assert!(again.iter().all(|a| a.action != "summarized"), "{again:?}");
    insert(
        &owner,
        &[Ev {
            tenant: t,
            metric: "api.requests",
            quantity: 1,
            at: at_noon,
            actor: None,
        }],
    )
    .await;
    let much_later = maintain(at_noon + Duration::days(60)).await;
    assert!(
        much_later.iter().all(|a| a.action != "summarized"),
        "{much_later:?}"
    );
}
