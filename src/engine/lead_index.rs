//! Which shard holds a lead: offer actions and `explain` name only the lead, so the
//! engine keeps one entry per lead from its acceptance until it is forgotten.
//!
//! Memory: there is an entry for every open lead (and every closed one not yet
//! forgotten), so an entry is kept small: the lead id and two numbers, the tenant's and
//! the shard's, interned once in [`Names`]. That is 40 bytes, against 96 for the
//! tenant, lead, zone and category ids it stands for.

use crate::core::shard::{Event, Shard};
use crate::ids::{CategoryId, LeadId, ShardKey, TenantId, ZoneId};
use dashmap::DashMap;
use parking_lot::RwLock;
use rustc_hash::{FxBuildHasher, FxHashMap};

/// Lead -> shard, shared by every connection and shard actor.
pub struct LeadIndex {
    /// `(lead, tenant number) -> shard number`, in [`MAP_SHARDS`] parts.
    map: DashMap<(LeadId, u32), u32, FxBuildHasher>,
    names: RwLock<Names>,
}

/// Parts of the index, each with its own lock: decisions on two worker threads that
/// accept or forget leads rarely wait for each other (dashmap's default here would be
/// 8).
const MAP_SHARDS: usize = 256;

impl Default for LeadIndex {
    fn default() -> Self {
        Self::with_parts(MAP_SHARDS)
    }
}

/// Tenants and shards by number. Only grows: a few entries per shard ever created.
#[derive(Default)]
struct Names {
    tenants: FxHashMap<TenantId, u32>,
    shards: FxHashMap<ShardKey, u32>,
    keys: Vec<ShardKey>,
}

impl LeadIndex {
    pub fn new() -> Self {
        Self::default()
    }

    /// An index in `parts` parts (a power of two above 1; [`MAP_SHARDS`] by default).
    pub fn with_parts(parts: usize) -> Self {
        Self {
            map: DashMap::with_capacity_and_hasher_and_shard_amount(0, FxBuildHasher, parts),
            names: RwLock::default(),
        }
    }

    /// Keeps the index in step with one of `key`'s events (live and during replay).
    pub fn on_event(&self, key: &ShardKey, ev: &Event) {
        match ev {
            Event::LeadAccepted { lead, .. } => self.insert(key, &lead.id),
            // Indexed too, so `explain` can give the quality gate's reason (R2).
            Event::LeadRejected { lead, .. } => self.insert(key, lead),
            Event::LeadForgotten { lead } => self.remove_if_at(key, lead),
            _ => {}
        }
    }

    /// Removes `lead`'s entry if it names `key`: a shard forgetting a lead id (or a
    /// stale entry found in it) never removes the entry another shard made for the
    /// same id since.
    pub fn remove_if_at(&self, key: &ShardKey, lead: &LeadId) {
        let (Some(t), Some(s)) = ({
            let names = self.names.read();
            (names.tenants.get(&key.tenant).copied(), names.shards.get(key).copied())
        }) else {
            return;
        };
        self.map.remove_if(&(lead.clone(), t), |_, at| *at == s);
    }

    pub fn insert(&self, key: &ShardKey, lead: &LeadId) {
        let (tenant, shard) = self.numbers(key);
        self.map.insert((lead.clone(), tenant), shard);
    }

    /// The shard of `lead`, if the lead is known.
    pub fn shard_of(&self, tenant: &TenantId, lead: &LeadId) -> Option<ShardKey> {
        let t = self.tenant_number(tenant)?;
        let shard = *self.map.get(&(lead.clone(), t))?;
        self.names.read().keys.get(shard as usize).cloned()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The index of what `shards` hold: each lead id names the shard that remembers
    /// it (a lead, open or closed, or an id its quality gate refused). Built at every
    /// start once the log is replayed, so the index is exactly what the recovered shards
    /// say, whatever a snapshot of an earlier release recorded. Two shards remembering
    /// one id (the publish claim and the index keep that from happening) name the one
    /// holding it as a lead, else the first met; the other is logged.
    pub fn from_shards<'a>(shards: impl IntoIterator<Item = &'a Shard>) -> Self {
        let index = Self::new();
        let mut refused: Vec<(&ShardKey, &LeadId)> = Vec::new();
        for shard in shards {
            let (leads, rejected) = shard.remembered_ids();
            for lead in leads {
                if let Some(other) = index.shard_of(&shard.key.tenant, lead) {
                    tracing::warn!(lead_id = %lead, shard = %shard.key, other = %other, "a lead id held by two shards");
                }
                index.insert(&shard.key, lead);
            }
            refused.extend(rejected.map(|l| (&shard.key, l)));
        }
        for (key, lead) in refused {
            match index.shard_of(&key.tenant, lead) {
                Some(other) => {
                    tracing::warn!(lead_id = %lead, shard = %key, other = %other, "a refused lead id held by another shard")
                }
                None => index.insert(key, lead),
            }
        }
        index
    }

    /// Every entry (tests and tools; snapshots do not hold the index).
    pub fn entries(&self) -> Vec<(TenantId, LeadId, ZoneId, CategoryId)> {
        let names = self.names.read();
        self.map
            .iter()
            .map(|e| {
                let k = &names.keys[*e.value() as usize];
                (k.tenant.clone(), e.key().0.clone(), k.zone.clone(), k.category.clone())
            })
            .collect()
    }

    /// The index of `entries`.
    pub fn from_entries(entries: Vec<(TenantId, LeadId, ZoneId, CategoryId)>) -> Self {
        let index = Self::new();
        for (tenant, lead, zone, category) in entries {
            index.insert(&ShardKey { tenant, zone, category }, &lead);
        }
        index
    }

    fn tenant_number(&self, tenant: &TenantId) -> Option<u32> {
        self.names.read().tenants.get(tenant).copied()
    }

    /// The numbers of `key`'s tenant and of `key`, given on first sight.
    fn numbers(&self, key: &ShardKey) -> (u32, u32) {
        {
            let names = self.names.read();
            if let (Some(&t), Some(&s)) = (names.tenants.get(&key.tenant), names.shards.get(key)) {
                return (t, s);
            }
        }
        let mut names = self.names.write();
        let next = names.tenants.len() as u32;
        let t = *names.tenants.entry(key.tenant.clone()).or_insert(next);
        let s = match names.shards.get(key) {
            Some(&s) => s,
            None => {
                let s = names.keys.len() as u32;
                names.keys.push(key.clone());
                names.shards.insert(key.clone(), s);
                s
            }
        };
        (t, s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(tenant: &str, zone: &str) -> ShardKey {
        ShardKey {
            tenant: TenantId::new(tenant),
            zone: ZoneId::new(zone),
            category: CategoryId::new("painting"),
        }
    }

    #[test]
    fn r1_leads_of_two_tenants_with_the_same_id_find_their_own_shard() {
        let index = LeadIndex::new();
        let (a, b) = (key("a", "roma"), key("b", "milano"));
        let lead = LeadId::new("L1");
        index.insert(&a, &lead);
        index.insert(&b, &lead);
        assert_eq!(index.shard_of(&a.tenant, &lead), Some(a.clone()));
        assert_eq!(index.shard_of(&b.tenant, &lead), Some(b.clone()));
        assert_eq!(index.shard_of(&TenantId::new("c"), &lead), None);
        index.remove_if_at(&a, &lead);
        assert_eq!(index.shard_of(&a.tenant, &lead), None);
        assert_eq!(index.shard_of(&b.tenant, &lead), Some(b.clone()));
        // A snapshot round trip keeps the entries.
        let back = LeadIndex::from_entries(index.entries());
        assert_eq!(back.len(), 1);
        assert_eq!(back.shard_of(&b.tenant, &lead), Some(b));
    }

    /// R1: a shard forgetting a lead id (or a stale entry found in it) removes the
    /// entry only while it names that shard, not one another shard made since.
    #[test]
    fn r1_a_removal_leaves_an_entry_that_names_another_shard() {
        let index = LeadIndex::new();
        let (roma, milano) = (key("a", "roma"), key("a", "milano"));
        let lead = LeadId::new("L1");
        index.insert(&roma, &lead);
        index.insert(&milano, &lead);
        index.remove_if_at(&roma, &lead);
        assert_eq!(index.shard_of(&milano.tenant, &lead), Some(milano.clone()));
        index.remove_if_at(&milano, &lead);
        assert_eq!(index.shard_of(&milano.tenant, &lead), None);
        // An unknown shard or tenant removes nothing.
        index.insert(&roma, &lead);
        index.remove_if_at(&key("b", "roma"), &lead);
        index.remove_if_at(&key("a", "napoli"), &lead);
        assert_eq!(index.shard_of(&roma.tenant, &lead), Some(roma));
    }
}
