//! Which shard holds a lead: offer actions and `explain` name only the lead, so the
//! engine keeps one entry per lead from its acceptance until it is forgotten.

use crate::core::shard::Event;
use crate::ids::{CategoryId, LeadId, ShardKey, TenantId, ZoneId};
use dashmap::DashMap;
use rustc_hash::FxBuildHasher;

/// Lead -> shard, shared by every connection and shard actor.
#[derive(Default)]
pub struct LeadIndex {
    map: DashMap<(TenantId, LeadId), (ZoneId, CategoryId), FxBuildHasher>,
}

impl LeadIndex {
    pub fn new() -> Self {
        Self::default()
    }

    /// Keeps the index in step with one of `key`'s events (live and during replay).
    pub fn on_event(&self, key: &ShardKey, ev: &Event) {
        match ev {
            Event::LeadAccepted { lead, .. } => self.insert(key, &lead.id),
            Event::LeadForgotten { lead } => self.remove(&key.tenant, lead),
            _ => {}
        }
    }

    pub fn insert(&self, key: &ShardKey, lead: &LeadId) {
        self.map.insert((key.tenant.clone(), lead.clone()), (key.zone.clone(), key.category.clone()));
    }

    pub fn remove(&self, tenant: &TenantId, lead: &LeadId) {
        self.map.remove(&(tenant.clone(), lead.clone()));
    }

    /// The shard of `lead`, if the lead is known.
    pub fn shard_of(&self, tenant: &TenantId, lead: &LeadId) -> Option<ShardKey> {
        let e = self.map.get(&(tenant.clone(), lead.clone()))?;
        let (zone, category) = e.value().clone();
        Some(ShardKey { tenant: tenant.clone(), zone, category })
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Every entry, for a snapshot.
    pub fn entries(&self) -> Vec<(TenantId, LeadId, ZoneId, CategoryId)> {
        self.map
            .iter()
            .map(|e| (e.key().0.clone(), e.key().1.clone(), e.value().0.clone(), e.value().1.clone()))
            .collect()
    }

    /// The index a snapshot recorded.
    pub fn from_entries(entries: Vec<(TenantId, LeadId, ZoneId, CategoryId)>) -> Self {
        let index = Self::new();
        for (t, l, z, c) in entries {
            index.map.insert((t, l), (z, c));
        }
        index
    }
}
