//! Every PostgreSQL advisory lock meterbridge takes, in one place. Two locks that share an id
//! wait for each other for no reason (a compaction that holds the storage lock for minutes
//! would make every aggregation run skip), so each has its own, and a test compares this list
//! with the `*_lock_id()` functions of the schema (`shared/tests/advisory_locks.rs`).
//!
//! PostgreSQL keeps single-key (`bigint`) and two-key (`integer, integer`) advisory locks apart:
//! they never collide with each other.

/// A single-key lock: its id, and the SQL function that returns the same id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SingleLock {
    pub id: i64,
    pub sql_function: &'static str,
}

/// Ingestion holds it shared for each batch; the key-generation rotation and the compaction
/// take it exclusively, so no batch straddles a rotation.
pub const KEY_ROTATION: SingleLock = SingleLock {
    id: 7_235_010_426_170_001,
    sql_function: "usage_keys_lock_id",
};

/// One aggregation run at a time (a second one skips).
pub const AGGREGATION: SingleLock = SingleLock {
    id: 7_235_010_426_170_002,
    sql_function: "usage_aggregation_lock_id",
};

/// One storage maintenance or compaction at a time.
pub const STORAGE: SingleLock = SingleLock {
    id: 7_235_010_426_170_003,
    sql_function: "usage_storage_lock_id",
};

pub const SINGLE: [SingleLock; 3] = [KEY_ROTATION, AGGREGATION, STORAGE];

/// The first key of a two-key lock names its space; the second is a hash of what is locked
/// (a collision of two hashes only makes two requests wait for each other briefly).
pub mod space {
    /// A tenant's batches that collided with stored keys, taken one after the other.
    pub const INGEST_COLLISIONS: i32 = 0x6d62_0001;
    /// Requests that carry the same Idempotency-Key (per tenant and source).
    pub const IDEMPOTENCY_KEYS: i32 = 0x6d62_0002;

    pub const ALL: [i32; 2] = [INGEST_COLLISIONS, IDEMPOTENCY_KEYS];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_lock_has_an_id_and_a_function_of_its_own() {
        for (i, a) in SINGLE.iter().enumerate() {
            for b in &SINGLE[i + 1..] {
                assert_ne!(a.id, b.id, "{a:?} and {b:?}");
                assert_ne!(a.sql_function, b.sql_function);
            }
        }
        for (i, a) in space::ALL.iter().enumerate() {
            assert!(!space::ALL[i + 1..].contains(a), "space {a:#x} twice");
        }
    }
}
