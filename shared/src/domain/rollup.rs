//! What a range of changes does to the rollups, as plain arithmetic (no I/O): the changed
//! events, grouped by (tenant, metric, day, actor), fold into a delta per day, week and month
//! cell; actors whose live event count in a day goes from none to some (or back) change the
//! day's distinct actors and their day count in the week and month, whose own 0 ↔ some
//! transitions change those cells' distinct actors.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::NaiveDate;
use uuid::Uuid;

use super::period::PeriodType;

/// The changes of one (tenant, metric, day, actor) in a transaction range: inserts count +1,
/// voids -1 (an event inserted and voided in the range cancels out).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub tenant_id: Uuid,
    pub metric: String,
    pub day: NaiveDate,
    /// The actor's hash; `None` for events without an actor.
    pub actor: Option<Uuid>,
    pub quantity: i128,
    pub events: i64,
    /// XOR of the hashed seq of every changed event (an insert and its void cancel).
    pub seq_xor: i64,
    /// The latest insert's seq and classification, packed (`seq * 4 + code`), if any.
    pub latest: Option<i64>,
}

/// One cell of the rollups.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CellKey {
    pub period_type: PeriodType,
    pub period_start: NaiveDate,
    pub tenant_id: Uuid,
    pub metric: String,
}

impl CellKey {
    fn of(period: PeriodType, tenant: Uuid, metric: &str, day: NaiveDate) -> Self {
        CellKey {
            period_type: period,
            period_start: period.start_of(day),
            tenant_id: tenant,
            metric: metric.to_owned(),
        }
    }
}

/// What the changes add to one cell.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CellDelta {
    pub quantity: i128,
    pub events: i64,
    pub seq_xor: i64,
    pub latest: Option<i64>,
    /// Actors that appeared (+) or vanished (-) in the cell.
    pub distinct: i64,
}

impl CellDelta {
    fn add(&mut self, quantity: i128, events: i64, seq_xor: i64, latest: Option<i64>) {
        self.quantity += quantity;
        self.events += events;
        self.seq_xor ^= seq_xor;
        self.latest = self.latest.max(latest);
    }

    /// No value of the cell moves.
    pub fn is_empty(&self) -> bool {
        self.quantity == 0 && self.events == 0 && self.seq_xor == 0 && self.distinct == 0
    }
}

/// An actor's place in a day: (tenant, metric, day, actor).
pub type ActorDay = (Uuid, String, NaiveDate, Uuid);
/// An actor's place in a week or month: (tenant, metric, period, start, actor).
pub type ActorPeriod = (Uuid, String, PeriodType, NaiveDate, Uuid);

/// The changes folded per cell and per actor-day, before the stored actor counts are known.
#[derive(Debug, Default)]
pub struct Folded {
    pub cells: BTreeMap<CellKey, CellDelta>,
    /// Live-event count changes per actor and day.
    pub actor_days: BTreeMap<ActorDay, i64>,
}

/// Folds the changes into deltas of their day, week and month cells (distinct actors not yet).
pub fn fold(changes: &[Change]) -> Folded {
    let mut folded = Folded::default();
    for c in changes {
        for period in PeriodType::ALL {
            folded
                .cells
                .entry(CellKey::of(period, c.tenant_id, &c.metric, c.day))
                .or_default()
                .add(c.quantity, c.events, c.seq_xor, c.latest);
        }
        if let Some(actor) = c.actor {
            *folded
                .actor_days
                .entry((c.tenant_id, c.metric.clone(), c.day, actor))
                .or_default() += c.events;
        }
    }
    folded
}

/// How the stored count of an actor in a day or period changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CountChange<K> {
    pub key: K,
    /// The count now stored (0: no row).
    pub before: i64,
    pub after: i64,
}

impl<K> CountChange<K> {
    /// +1 when the actor appears, -1 when it vanishes, 0 otherwise.
    pub fn presence(&self) -> i64 {
        match (self.before > 0, self.after > 0) {
            (false, true) => 1,
            (true, false) => -1,
            _ => 0,
        }
    }
}

/// Applies count deltas to the stored counts: the new counts, and the keys whose count would
/// fall below zero (an inconsistency: their cells are recomputed instead).
pub fn apply_counts<K: Ord + Clone + std::hash::Hash>(
    deltas: &BTreeMap<K, i64>,
    stored: &HashMap<K, i64>,
) -> (Vec<CountChange<K>>, BTreeSet<K>) {
    let mut changes = Vec::new();
    let mut broken = BTreeSet::new();
    for (key, delta) in deltas {
        if *delta == 0 {
            continue;
        }
        let before = stored.get(key).copied().unwrap_or(0);
        let after = before + delta;
        if after < 0 {
            broken.insert(key.clone());
        } else {
            changes.push(CountChange {
                key: key.clone(),
                before,
                after,
            });
        }
    }
    (changes, broken)
}

/// The actors that appeared in or vanished from a day, as day-count deltas of their week and
/// month.
pub fn period_deltas(day_changes: &[CountChange<ActorDay>]) -> BTreeMap<ActorPeriod, i64> {
    let mut out = BTreeMap::new();
    for change in day_changes {
        let presence = change.presence();
        if presence == 0 {
            continue;
        }
        let (tenant, metric, day, actor) = &change.key;
        for period in [PeriodType::Weekly, PeriodType::Monthly] {
            *out.entry((
                *tenant,
                metric.clone(),
                period,
                period.start_of(*day),
                *actor,
            ))
            .or_default() += presence;
        }
    }
    out
}

/// The cell of an actor-day's day, and of an actor-period's period.
pub fn day_cell(key: &ActorDay) -> CellKey {
    CellKey::of(PeriodType::Daily, key.0, &key.1, key.2)
}

pub fn period_cell(key: &ActorPeriod) -> CellKey {
    CellKey {
        period_type: key.2,
        period_start: key.3,
        tenant_id: key.0,
        metric: key.1.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(day: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(2027, 3, day).unwrap()
    }

    fn change(day: u32, actor: Option<u8>, quantity: i128, events: i64) -> Change {
        Change {
            tenant_id: Uuid::nil(),
            metric: "api.requests".into(),
            day: d(day),
            actor: actor.map(|a| Uuid::from_bytes([a; 16])),
            quantity,
            events,
            seq_xor: events,
            latest: (events > 0).then_some(events * 4),
        }
    }

    #[test]
    fn changes_fold_into_their_day_week_and_month() {
        // 2027-03-01 is a Monday: days 1 and 7 share a week, day 8 starts the next.
        let folded = fold(&[
            change(1, Some(1), 10, 2),
            change(7, Some(1), 5, 1),
            change(8, None, -3, -1),
        ]);
        let cell = |p: PeriodType, day: u32| {
            folded.cells[&CellKey::of(p, Uuid::nil(), "api.requests", d(day))].clone()
        };
        assert_eq!(cell(PeriodType::Daily, 1).quantity, 10);
        assert_eq!(cell(PeriodType::Weekly, 1).quantity, 15);
        assert_eq!(cell(PeriodType::Weekly, 8).quantity, -3);
        assert_eq!(cell(PeriodType::Monthly, 1).quantity, 12);
        assert_eq!(cell(PeriodType::Monthly, 1).events, 2);
        assert_eq!(folded.actor_days.len(), 2, "no actor, no actor-day");
    }

    #[test]
    fn actors_appear_and_vanish_once_per_period() {
        let a = Uuid::from_bytes([1; 16]);
        let key = |day: u32| (Uuid::nil(), "m".to_owned(), d(day), a);
        // The actor already had 2 events on day 1; 2 voided now, and 1 new on day 2.
        let deltas = BTreeMap::from([(key(1), -2), (key(2), 1)]);
        let stored = HashMap::from([(key(1), 2)]);
        let (changes, broken) = apply_counts(&deltas, &stored);
        assert!(broken.is_empty());
        let presences: Vec<i64> = changes.iter().map(CountChange::presence).collect();
        assert_eq!(presences, [-1, 1]);
        // Same week and month: one day gone, one day come: the actor stays in both.
        let periods = period_deltas(&changes);
        assert!(periods.values().all(|v| *v == 0), "{periods:?}");
        // Below zero is an inconsistency, never a stored count.
        let (changes, broken) = apply_counts(&BTreeMap::from([(key(3), -1)]), &HashMap::new());
        assert!(changes.is_empty());
        assert_eq!(broken.into_iter().collect::<Vec<_>>(), [key(3)]);
    }
}
