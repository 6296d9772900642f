//! usage_events and their dedup keys: the batch insert that stores events and their hashed
//! keys in one statement, the lookup of the stored events that hold keys a batch wanted, and
//! the reads. Every function here runs inside a tenant transaction; the explicit tenant filters
//! below are belt and braces on top of row-level security.

use chrono::{DateTime, NaiveDate, NaiveTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::db::DbError;
use crate::domain::advisory_locks;
use crate::domain::dedup::{DedupKeys, KEY_ROTATION_LOCK};
use crate::domain::usage::UsageEvent;
use crate::domain::{Classification, SourceService, TenantId};

const UNIQUE_VIOLATION: &str = "23505";

/// The batch as column arrays for `UNNEST`, borrowed from the events (no copies).
struct Columns<'e> {
    event_ids: Vec<&'e str>,
    metrics: Vec<&'e str>,
    quantities: Vec<i64>,
    occurred: Vec<DateTime<Utc>>,
    actors: Vec<Option<&'e str>>,
    correlations: Vec<&'e str>,
    classifications: Vec<&'static str>,
    keys: Vec<Option<&'e str>>,
    metadata: Vec<&'e Value>,
    hashes: Vec<&'e [u8]>,
    event_keys: Vec<Uuid>,
    idempotency_keys: Vec<Option<Uuid>>,
    operation_keys: Vec<Uuid>,
    remembered: Vec<Uuid>,
}

impl<'e> Columns<'e> {
    fn of(events: &[&'e UsageEvent], keys: &[DedupKeys]) -> Self {
        Columns {
            event_ids: events.iter().map(|e| e.event_id.as_str()).collect(),
            metrics: events.iter().map(|e| e.metric.as_str()).collect(),
            quantities: events.iter().map(|e| e.quantity).collect(),
            occurred: events.iter().map(|e| e.occurred_at).collect(),
            actors: events.iter().map(|e| e.actor_id.as_deref()).collect(),
            correlations: events.iter().map(|e| e.correlation_id.as_str()).collect(),
            classifications: events.iter().map(|e| e.classification.as_str()).collect(),
            keys: events
                .iter()
                .map(|e| e.idempotency_key.as_deref())
                .collect(),
            metadata: events.iter().map(|e| &e.metadata).collect(),
            hashes: events.iter().map(|e| e.payload_hash.as_slice()).collect(),
            event_keys: keys.iter().map(|k| k.event).collect(),
            idempotency_keys: keys.iter().map(|k| k.idempotency).collect(),
            operation_keys: keys.iter().map(|k| k.operation).collect(),
            remembered: keys.iter().flat_map(DedupKeys::remembered).collect(),
        }
    }
}

/// Holds the key generations for the rest of the transaction: the rotation, the merges'
/// swaps and a filter's growth (which take the same advisory lock exclusively) wait for this
/// transaction, so every key it writes lands in the generation it read, every key committed
/// before it is visible to its probes, and the filters it reads keep their geometry. Call it
/// first, before any statement that reads or writes keys.
///
/// The transaction's statements are also planned for their actual parameters and the tables'
/// actual sizes: a plan cached while a new generation or day was still empty would read it
/// through (a sequential scan per batch) long after it has grown.
///
/// Returns the open generation and where the closed ones whose keys still count are (migration
/// 0015), which stays so until this transaction ends.
pub async fn hold_key_generation(conn: &mut PgConnection) -> Result<KeyGenerations, DbError> {
    sqlx::query!(
        r#"SELECT pg_advisory_xact_lock_shared($1) AS "locked!: ()",
                  set_config('plan_cache_mode', 'force_custom_plan', true) AS "plans!""#,
        KEY_ROTATION_LOCK
    )
    .fetch_one(&mut *conn)
    .await?;
    // A statement of its own: its snapshot is taken after the lock was granted. One row per
    // partition: its live generations (consecutive numbers), and its place in a level when it
    // is checked through the level's filter.
    let parts = sqlx::query!(
        r#"SELECT min(g.generation) AS "first!", max(g.generation) AS "last!",
                  bool_or(g.closed_at IS NULL) AS "open!",
                  p.level AS "level?", l.blocks AS "blocks?", l.slots AS "slots?",
                  p.slot AS "slot?", (p.name IS NOT NULL AND p.filter_next IS NULL) AS "filtered!"
             FROM usage_key_generations g
             LEFT JOIN usage_key_parts p ON p.name = g.stored_in
             LEFT JOIN usage_key_levels l ON l.level = p.level
            WHERE g.expired_at IS NULL
            GROUP BY g.stored_in, p.name, p.level, l.blocks, l.slots, p.slot, p.filter_next"#
    )
    .fetch_all(&mut *conn)
    .await?;
    let open = parts
        .iter()
        .find(|p| p.open)
        .map(|p| p.last)
        .ok_or_else(|| DbError::Config("no key generation is open".into()))?;
    let held: Vec<HeldPart> = parts
        .iter()
        .filter(|p| !p.open)
        .map(|p| HeldPart {
            first: p.first,
            last: p.last,
            filter: match (p.filtered, p.level, p.blocks, p.slots, p.slot) {
                (true, Some(level), Some(blocks), Some(slots), Some(slot)) => Some(PartFilter {
                    level,
                    blocks,
                    slots,
                    slot,
                }),
                _ => None,
            },
        })
        .collect();
    Ok(KeyGenerations::of(open, &held))
}

/// A closed partition as [`hold_key_generation`] read it: its live generations, and where its
/// filter is when it is complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldPart {
    pub first: i32,
    pub last: i32,
    pub filter: Option<PartFilter>,
}

/// Where a partition's filter is: its level, the level's geometry (its filter rows' blocks, and
/// the members each row holds: `slots` bits a slice, migration 0028) and the partition's slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartFilter {
    pub level: i16,
    pub blocks: i32,
    pub slots: i16,
    pub slot: i16,
}

/// The key generations as held by [`hold_key_generation`]: the open one, which takes new keys,
/// and the closed ones whose keys still count (expired ones are left out, even while their
/// keys wait in a partition for it to go). A partition whose filter is complete is checked
/// through its level's filter (one row read per level for every member) and its index probed
/// only on a "maybe"; the others (hours closed since the last maintenance step, partitions
/// whose filter is still being built) are probed by their index, as one range of generations
/// `(key_hash, generation)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyGenerations {
    pub open: i32,
    /// The closed generations probed by their index: first and last, `None` when there are
    /// none.
    pub unfiltered: Option<(i32, i32)>,
    /// The partitions checked through their level's filter.
    pub filtered: Vec<FilteredPart>,
}

/// A partition checked through its level's Bloom filter (migration 0015): where its filter is,
/// and its live generations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FilteredPart {
    pub filter: PartFilter,
    pub first: i32,
    pub last: i32,
}

impl KeyGenerations {
    /// From the open generation and the closed partitions.
    pub fn of(open: i32, parts: &[HeldPart]) -> Self {
        let mut unfiltered: Option<(i32, i32)> = None;
        let mut filtered = Vec::new();
        for part in parts {
            match part.filter {
                Some(filter) => filtered.push(FilteredPart {
                    filter,
                    first: part.first,
                    last: part.last,
                }),
                None => {
                    unfiltered = Some(unfiltered.map_or((part.first, part.last), |(lo, hi)| {
                        (lo.min(part.first), hi.max(part.last))
                    }))
                }
            }
        }
        filtered.sort_by_key(|f| (f.filter.level, f.first));
        KeyGenerations {
            open,
            unfiltered,
            filtered,
        }
    }

    /// The first and last live generation, the open one included.
    pub fn live(&self) -> (i32, i32) {
        let first = self
            .filtered
            .iter()
            .map(|f| f.first)
            .chain(self.unfiltered.map(|u| u.0))
            .fold(self.open, i32::min);
        (first, self.open)
    }

    /// The filtered partitions as the probe's parameter arrays.
    fn filter_columns(&self) -> FilterColumns {
        let f = &self.filtered;
        FilterColumns {
            levels: f.iter().map(|p| p.filter.level).collect(),
            blocks: f.iter().map(|p| p.filter.blocks).collect(),
            widths: f.iter().map(|p| p.filter.slots).collect(),
            slots: f.iter().map(|p| p.filter.slot).collect(),
            firsts: f.iter().map(|p| p.first).collect(),
            lasts: f.iter().map(|p| p.last).collect(),
        }
    }
}

/// [`KeyGenerations::filtered`] as column arrays, for `UNNEST`.
struct FilterColumns {
    levels: Vec<i16>,
    blocks: Vec<i32>,
    /// The level's slots (a slice's width), per partition.
    widths: Vec<i16>,
    slots: Vec<i16>,
    firsts: Vec<i32>,
    lasts: Vec<i32>,
}

/// Queues this transaction behind the tenant's other batches that also collided with stored
/// keys (the slow path only; new events never take it): they probe and insert one after the
/// other instead of taking each other's keys between probe and insert round after round.
pub async fn serialize_collisions(
    conn: &mut PgConnection,
    tenant: TenantId,
) -> Result<(), DbError> {
    sqlx::query!(
        "SELECT pg_advisory_xact_lock($1, hashtext($2::text))",
        advisory_locks::space::INGEST_COLLISIONS,
        tenant.0.to_string()
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// What [`insert`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Insert {
    /// Every event and every key is stored.
    Stored,
    /// Some key is already taken (by a committed event, or by a concurrent one that committed
    /// while this insert waited for it): nothing may be kept; roll the transaction back.
    KeyTaken,
}

/// Inserts the events (`keys[i]` are the keys of `events[i]`, free of in-batch duplicates)
/// with their operation keys, and their remembered keys into the open generation, in one
/// statement. The unique indexes (the day partition's on the operation, the open generation's
/// on the keys) refuse a key already there, after waiting for a concurrent writer to finish;
/// the same statement counts the keys that the live closed generations already hold (the
/// open one's unique index has just checked the same keys): the partitions without a complete
/// filter by their index, the others through their level's Bloom filter — one row per key and
/// level, a member's index only where its bits say "maybe" (about 1 % of new keys). Each
/// unique index is written in its own order (the events by instant and operation key, the keys
/// by hash), so two batches that share keys wait for each other rather than deadlock.
pub async fn insert(
    conn: &mut PgConnection,
    generations: &KeyGenerations,
    tenant: TenantId,
    source: &SourceService,
    events: &[&UsageEvent],
    keys: &[DedupKeys],
) -> Result<Insert, DbError> {
    let c = Columns::of(events, keys);
    // An empty range (1, 0) when there is none.
    let unfiltered = generations.unfiltered.unwrap_or((1, 0));
    let f = generations.filter_columns();
    let outcome = sqlx::query_scalar!(
        r#"WITH input AS (
               SELECT * FROM UNNEST($3::text[], $4::text[], $5::int8[], $6::timestamptz[],
                                    $7::text[], $8::text[], $9::text[], $10::text[],
                                    $11::jsonb[], $12::bytea[], $13::uuid[], $14::uuid[],
                                    $15::uuid[])
                   AS e(event_id, metric, quantity, occurred_at, actor_id, correlation_id,
                        classification, idempotency_key, metadata, payload_hash, event_key,
                        idem_key, op_key)
           ), stored AS (
               INSERT INTO usage_events (tenant_id, source_service, event_id, metric, quantity,
                                         occurred_at, actor_id, correlation_id, classification,
                                         idempotency_key, metadata, payload_hash, operation_key)
               SELECT $1, $2, event_id, metric, quantity, occurred_at, actor_id, correlation_id,
                      classification, idempotency_key, metadata, payload_hash, op_key
                 FROM input
                ORDER BY occurred_at, op_key
               RETURNING event_id, occurred_at, seq
           ), keyed AS (
               INSERT INTO usage_event_keys (generation, key_hash, tenant_id, occurred_at, seq)
               SELECT $17, k.key_hash, $1, s.occurred_at, s.seq
                 FROM stored s
                 JOIN input i ON i.event_id = s.event_id
                CROSS JOIN LATERAL (VALUES (i.event_key), (i.idem_key)) AS k(key_hash)
                WHERE k.key_hash IS NOT NULL
                ORDER BY k.key_hash
           )
           SELECT (SELECT count(*) FROM usage_event_keys
                    WHERE generation BETWEEN $18 AND $19 AND tenant_id = $1
                      AND key_hash = ANY($16::uuid[]))
                + (SELECT count(*) FROM UNNEST($16::uuid[]) AS p(key_hash)
                    -- Each step reads what the one before found, in this order (LIMIT and
                    -- OFFSET keep the planner from reordering or flattening them): the key's
                    -- six bit positions, computed once; for each level, its filter row (one
                    -- index probe, whatever the level holds) and in it the six slices of those
                    -- positions ANDed (migration 0028: each bit still set is a member that may
                    -- hold the key, about 0.4 % each); the members whose bit is set, only when
                    -- one is; for each of those, one probe of that member's partition alone.
                    CROSS JOIN LATERAL (
                          SELECT usage_key_level_bit(p.key_hash, 0) AS b0,
                                 usage_key_level_bit(p.key_hash, 1) AS b1,
                                 usage_key_level_bit(p.key_hash, 2) AS b2,
                                 usage_key_level_bit(p.key_hash, 3) AS b3,
                                 usage_key_level_bit(p.key_hash, 4) AS b4,
                                 usage_key_level_bit(p.key_hash, 5) AS b5
                          OFFSET 0) b
                    CROSS JOIN (SELECT DISTINCT level, blocks, slots
                                  FROM UNNEST($20::int2[], $21::int4[], $25::int2[])
                                       AS l(level, blocks, slots)) l
                    CROSS JOIN LATERAL (
                          SELECT substring(r.bits FROM b.b0 * l.slots + 1 FOR l.slots)
                               & substring(r.bits FROM b.b1 * l.slots + 1 FOR l.slots)
                               & substring(r.bits FROM b.b2 * l.slots + 1 FOR l.slots)
                               & substring(r.bits FROM b.b3 * l.slots + 1 FOR l.slots)
                               & substring(r.bits FROM b.b4 * l.slots + 1 FOR l.slots)
                               & substring(r.bits FROM b.b5 * l.slots + 1 FOR l.slots) AS maybe
                            FROM usage_key_filter_slices r
                           WHERE r.level = l.level
                             AND r.block = usage_key_level_block(p.key_hash, l.blocks)
                           LIMIT 1) f
                    CROSS JOIN LATERAL (
                          SELECT m.first_gen, m.last_gen
                            FROM UNNEST($20::int2[], $22::int2[], $23::int4[], $24::int4[])
                                 AS m(level, slot, first_gen, last_gen)
                           WHERE position(B'1' IN f.maybe) > 0
                             AND m.level = l.level AND get_bit(f.maybe, m.slot) = 1
                          OFFSET 0) c
                    CROSS JOIN LATERAL (
                          SELECT FROM usage_event_keys k
                           WHERE k.generation BETWEEN c.first_gen AND c.last_gen
                             AND k.tenant_id = $1 AND k.key_hash = p.key_hash
                           LIMIT 1) hit)
                  AS "earlier!""#,
        tenant.0,
        source.as_str(),
        &c.event_ids as &[&str],
        &c.metrics as &[&str],
        &c.quantities,
        &c.occurred,
        &c.actors as &[Option<&str>],
        &c.correlations as &[&str],
        &c.classifications as &[&str],
        &c.keys as &[Option<&str>],
        &c.metadata as &[&Value],
        &c.hashes as &[&[u8]],
        &c.event_keys,
        &c.idempotency_keys as &[Option<Uuid>],
        &c.operation_keys,
        &c.remembered,
        generations.open,
        unfiltered.0,
        unfiltered.1,
        &f.levels,
        &f.blocks,
        &f.slots,
        &f.firsts,
        &f.lasts,
        &f.widths
    )
    .fetch_one(&mut *conn)
    .await;
    match outcome {
        Ok(0) => Ok(Insert::Stored),
        Ok(_) => Ok(Insert::KeyTaken),
        Err(e) => {
            let e = DbError::from(e);
            if e.sqlstate().as_deref() == Some(UNIQUE_VIOLATION) {
                Ok(Insert::KeyTaken)
            } else {
                Err(e)
            }
        }
    }
}

/// A stored event that holds one of the unique keys a skipped event wanted.
#[derive(Debug, Clone)]
pub struct ExistingKeys {
    pub source_service: String,
    pub event_id: String,
    pub idempotency_key: Option<String>,
    pub correlation_id: String,
    pub metric: String,
    pub occurred_at: DateTime<Utc>,
    pub payload_hash: Vec<u8>,
}

/// Which of `keys` are taken, and the stored events that hold them.
#[derive(Debug, Clone, Default)]
pub struct TakenKeys {
    pub keys: std::collections::HashSet<Uuid>,
    pub holders: Vec<ExistingKeys>,
}

/// Which of the batch's keys some stored event of the tenant holds — `remembered` in the live
/// `generations`, `operations` (key and instant) in their day partitions — and those events. Index
/// lookups, not joins: each names the events' instants, so it reads only their days.
pub async fn find_taken(
    conn: &mut PgConnection,
    generations: &KeyGenerations,
    tenant: TenantId,
    remembered: &[Uuid],
    operations: &[(Uuid, DateTime<Utc>)],
) -> Result<TakenKeys, DbError> {
    let (first_live, last_live) = generations.live();
    // Planned for the actual instants (see hold_key_generation), so only their days are read.
    let held = sqlx::query!(
        r#"SELECT key_hash, occurred_at, seq FROM usage_event_keys
            WHERE generation BETWEEN $3 AND $4 AND tenant_id = $1 AND key_hash = ANY($2::uuid[])"#,
        tenant.0,
        remembered,
        first_live,
        last_live
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut taken = TakenKeys {
        keys: held.iter().map(|k| k.key_hash).collect(),
        holders: Vec::new(),
    };
    let holders: std::collections::HashSet<(DateTime<Utc>, i64)> =
        held.iter().map(|k| (k.occurred_at, k.seq)).collect();
    let (instants, seqs): (Vec<DateTime<Utc>>, Vec<i64>) = holders.iter().copied().unzip();
    let (op_keys, op_instants): (Vec<Uuid>, Vec<DateTime<Utc>>) =
        operations.iter().copied().unzip();
    let wanted_ops: std::collections::HashSet<(Uuid, DateTime<Utc>)> =
        operations.iter().copied().collect();
    let rows = sqlx::query!(
        r#"SELECT occurred_at, seq, operation_key, source_service, event_id, idempotency_key,
                  correlation_id, metric, payload_hash
             FROM usage_events
            WHERE tenant_id = $1 AND occurred_at = ANY($2::timestamptz[]) AND seq = ANY($3::int8[])
           UNION
           SELECT occurred_at, seq, operation_key, source_service, event_id, idempotency_key,
                  correlation_id, metric, payload_hash
             FROM usage_events
            WHERE tenant_id = $1 AND operation_key = ANY($4::uuid[])
              AND occurred_at = ANY($5::timestamptz[])"#,
        tenant.0,
        &instants,
        &seqs,
        &op_keys,
        &op_instants
    )
    .fetch_all(&mut *conn)
    .await?;
    for r in rows {
        let (Some(occurred_at), Some(seq), Some(operation_key)) =
            (r.occurred_at, r.seq, r.operation_key)
        else {
            continue;
        };
        let holds_key = holders.contains(&(occurred_at, seq));
        let holds_operation = wanted_ops.contains(&(operation_key, occurred_at));
        if holds_operation {
            taken.keys.insert(operation_key);
        }
        if !(holds_key || holds_operation) {
            continue;
        }
        if let (
            Some(source_service),
            Some(event_id),
            Some(correlation_id),
            Some(metric),
            Some(payload_hash),
        ) = (
            r.source_service,
            r.event_id,
            r.correlation_id,
            r.metric,
            r.payload_hash,
        ) {
            taken.holders.push(ExistingKeys {
                source_service,
                event_id,
                idempotency_key: r.idempotency_key,
                correlation_id,
                metric,
                occurred_at,
                payload_hash,
            });
        }
    }
    Ok(taken)
}

/// A stored event as the API returns it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredUsageEvent {
    /// Arrival order, the listing's tiebreaker; internal (cursors carry it opaquely).
    #[serde(skip)]
    pub seq: i64,
    pub event_id: String,
    pub metric: String,
    pub quantity: i64,
    pub occurred_at: DateTime<Utc>,
    pub actor_id: Option<String>,
    pub source_service: String,
    pub correlation_id: String,
    pub classification: String,
    /// Present when the caller chose an idempotency key other than the event id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    pub metadata: Value,
    pub created_at: DateTime<Utc>,
    /// Set when the event was voided (it then counts in no aggregate).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub voided_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub voided_by: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub void_reason: Option<String>,
}

/// A position in the listing order (occurred_at, seq).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListPosition {
    pub occurred_at: DateTime<Utc>,
    pub seq: i64,
}

impl ListPosition {
    /// Just before every event at `at`.
    pub fn before(at: DateTime<Utc>) -> Self {
        ListPosition {
            occurred_at: at,
            seq: i64::MIN,
        }
    }

    pub fn of(event: &StoredUsageEvent) -> Self {
        ListPosition {
            occurred_at: event.occurred_at,
            seq: event.seq,
        }
    }
}

/// One page of the listing: the tenant's events in `(after, to)`, in listing order, optionally
/// of one metric and/or one classification.
#[derive(Debug, Clone)]
pub struct EventFilter {
    pub metric: Option<String>,
    pub classification: Option<Classification>,
    /// Start strictly after this position (`ListPosition::before(from)` for a first page).
    pub after: ListPosition,
    /// End of the window (exclusive).
    pub to: DateTime<Utc>,
    pub limit: i64,
}

/// The listing. Every shape is one index range: `(tenant, occurred_at, seq)`, or the same
/// behind `metric` or `classification`; the row comparison is the range's start, so a deep page
/// costs what the first one does. Run it in a read transaction
/// ([`crate::Database::tenant_read_tx`]), whose custom plans let PostgreSQL drop the absent
/// filters and pick the index that serves the present one.
pub async fn list(
    conn: &mut PgConnection,
    tenant: TenantId,
    filter: &EventFilter,
) -> Result<Vec<StoredUsageEvent>, DbError> {
    let rows = sqlx::query_as!(
        StoredUsageEvent,
        r#"SELECT seq, event_id, metric, quantity, occurred_at, actor_id, source_service,
                  correlation_id, classification, idempotency_key, metadata, created_at,
                  voided_at, voided_by, void_reason
             FROM usage_events
            WHERE tenant_id = $1
              AND (occurred_at, seq) > ($2::timestamptz, $3::int8)
              AND occurred_at >= $2 AND occurred_at < $4
              AND ($5::text IS NULL OR metric = $5)
              AND ($6::text IS NULL OR classification = $6)
            ORDER BY occurred_at, seq
            LIMIT $7"#,
        tenant.0,
        filter.after.occurred_at,
        filter.after.seq,
        filter.to,
        filter.metric.as_deref(),
        filter.classification.map(Classification::as_str),
        filter.limit
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows)
}

/// Units per metric for one UTC day: what the real-time counters hold, recomputed. Sums are
/// exact (`numeric`, read as `i128`): no number of stored events can overflow them.
pub async fn day_totals(
    conn: &mut PgConnection,
    tenant: TenantId,
    day: NaiveDate,
) -> Result<Vec<(String, i128)>, DbError> {
    let start = day.and_time(NaiveTime::MIN).and_utc();
    let end = start
        .checked_add_signed(chrono::Duration::days(1))
        .ok_or_else(|| DbError::Decode(format!("no day after {day}")))?;
    let rows = sqlx::query!(
        r#"SELECT metric, sum(quantity)::text AS "total!"
             FROM usage_events
            WHERE tenant_id = $1 AND occurred_at >= $2 AND occurred_at < $3
              AND voided_at IS NULL
            GROUP BY metric ORDER BY metric"#,
        tenant.0,
        start,
        end
    )
    .fetch_all(&mut *conn)
    .await?;
    rows.into_iter()
        .map(|r| {
            let total = r
                .total
                .parse::<i128>()
                .map_err(|_| DbError::Decode(format!("sum {:?} is not an integer", r.total)))?;
            Ok((r.metric, total))
        })
        .collect()
}

/// Where a tenant's event is stored, found by one of its remembered key hashes (the keys live
/// as long as the deduplication window).
pub async fn locate(
    conn: &mut PgConnection,
    tenant: TenantId,
    key_hash: Uuid,
) -> Result<Option<ListPosition>, DbError> {
    let row = sqlx::query!(
        r#"SELECT occurred_at, seq FROM usage_event_keys
            WHERE key_hash = $2 AND tenant_id = $1
            LIMIT 1"#,
        tenant.0,
        key_hash
    )
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.map(|r| ListPosition {
        occurred_at: r.occurred_at,
        seq: r.seq,
    }))
}

/// Marks a stored event voided, unless it already is. Returns the event as it now stands, and
/// whether this call voided it; `None` when no such event is stored.
pub async fn void(
    conn: &mut PgConnection,
    tenant: TenantId,
    at: ListPosition,
    by: &str,
    reason: &str,
) -> Result<Option<(StoredUsageEvent, bool)>, DbError> {
    let voided = sqlx::query_as!(
        StoredUsageEvent,
        r#"UPDATE usage_events
              SET voided_at = now(), voided_by = $4, void_reason = $5
            WHERE tenant_id = $1 AND occurred_at = $2 AND seq = $3 AND voided_at IS NULL
           RETURNING seq, event_id, metric, quantity, occurred_at, actor_id, source_service,
                     correlation_id, classification, idempotency_key, metadata, created_at,
                     voided_at, voided_by, void_reason"#,
        tenant.0,
        at.occurred_at,
        at.seq,
        by,
        reason
    )
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(event) = voided {
        return Ok(Some((event, true)));
    }
    let current = sqlx::query_as!(
        StoredUsageEvent,
        r#"SELECT seq, event_id, metric, quantity, occurred_at, actor_id, source_service,
                  correlation_id, classification, idempotency_key, metadata, created_at,
                  voided_at, voided_by, void_reason
             FROM usage_events
            WHERE tenant_id = $1 AND occurred_at = $2 AND seq = $3"#,
        tenant.0,
        at.occurred_at,
        at.seq
    )
    .fetch_optional(&mut *conn)
    .await?;
    Ok(current.map(|event| (event, false)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closed_partitions_split_into_the_filtered_ones_and_one_probed_range() {
        let part = |first, last, filter| HeldPart {
            first,
            last,
            filter,
        };
        let filter = |level, blocks, slot| {
            Some(PartFilter {
                level,
                blocks,
                slots: [40, 12, 12][level as usize - 1],
                slot,
            })
        };
        // A week (3-9), a day (10-12), two hours filtered; hour 14 not yet; 15 open.
        let g = KeyGenerations::of(
            15,
            &[
                part(10, 12, filter(2, 64, 1)),
                part(3, 9, filter(3, 256, 0)),
                part(13, 13, filter(1, 8, 4)),
                part(14, 14, None),
            ],
        );
        assert_eq!(g.unfiltered, Some((14, 14)));
        assert_eq!(
            g.filtered
                .iter()
                .map(|f| (f.filter.level, f.first, f.last))
                .collect::<Vec<_>>(),
            [(1, 13, 13), (2, 10, 12), (3, 3, 9)]
        );
        assert_eq!(g.live(), (3, 15));
        let f = g.filter_columns();
        assert_eq!(
            (f.levels, f.blocks, f.widths, f.slots),
            (
                vec![1, 2, 3],
                vec![8, 64, 256],
                vec![40, 12, 12],
                vec![4, 1, 0]
            )
        );
        // Nothing closed: only the open generation is live.
        let g = KeyGenerations::of(1, &[]);
        assert_eq!(
            (g.unfiltered, g.filtered.len(), g.live()),
            (None, 0, (1, 1))
        );
        // Partitions whose filters are being built are probed as one range.
        let g = KeyGenerations::of(9, &[part(2, 5, None), part(8, 8, None)]);
        assert_eq!((g.unfiltered, g.live()), (Some((2, 8)), (2, 9)));
    }
}
