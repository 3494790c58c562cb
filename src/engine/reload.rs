//! Configuration reload (SIGHUP): tenants' policies and tokens change while rota runs.
//!
//! What a reload applies, at once and without a restart:
//! * **tokens**: a new token works for the next connection; a removed one is refused,
//!   and every open connection made with it (or whose token's scopes changed) is
//!   closed with 1008 `token revoked` (a leaked token is revoked without a restart);
//! * **policies**: logged, then set on every shard of the tenant and its order book,
//!   with no decision in flight (so recovery replays each decision under the policy
//!   it was made with). Decisions from then on follow it; what earlier decisions
//!   set (a lead's price, its response and guarantee windows, its close time) stays
//!   as it was decided, also after a crash. This is what a restart with the new file
//!   does, without the restart;
//! * **new tenants**: a tenant added to the file is opened (its stream, stream history,
//!   order book, rate limit and metrics) and its tokens work for the next connection:
//!   a marketplace is onboarded without a restart.
//!
//! What it does not: removing a tenant refuses the whole reload, and nothing changes
//! (a tenant's leads, rotation and money stay in the log; a start without it is
//! refused too: close a tenant by removing its tokens); any other setting (listen
//! addresses, data directory, log, limits) takes effect at the next restart, and the
//! reload names those that differ. A file that does not load (syntax, an invalid
//! policy) is refused by [`crate::config::Config::load`] before this runs.

use super::Engine;
use crate::config::Config;
use crate::ids::TenantId;
use std::sync::Arc;

/// What a reload changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reloaded {
    /// Tenants added (opened, their tokens working).
    pub added: Vec<TenantId>,
    /// Tenants whose policy changed (applied to their shards and order book).
    pub policies: Vec<TenantId>,
    /// Tenants whose tokens changed.
    pub tokens: Vec<TenantId>,
    /// Other settings that differ from the running ones: they take effect at the next
    /// restart (`wal.fsync`, `listen`, ...).
    pub restart_needed: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReloadError {
    #[error(
        "a reload cannot remove tenants (removed {0:?}): their leads, rotation and money \
         stay in the log, and a start without them is refused; remove their tokens to \
         close them. Nothing was changed"
    )]
    TenantsRemoved(Vec<String>),
    #[error("the log refused the new policies ({0}); nothing was changed")]
    Log(String),
}

impl Engine {
    /// Applies `new` (see the module docs). All or nothing for the checks: when it
    /// returns an error nothing has changed.
    pub fn reload(&self, new: &Config) -> Result<Reloaded, ReloadError> {
        let inner = &self.inner;
        // One reload at a time (the tenants map is replaced whole when one is added).
        let _one = inner.reloading.lock();
        let running = self.tenants_map();
        let mut removed: Vec<String> = running
            .keys()
            .filter(|id| !new.tenants.iter().any(|t| &t.id == *id))
            .map(|id| id.to_string())
            .collect();
        if !removed.is_empty() {
            removed.sort();
            inner.metrics.m.config_reloads.get("error").increment(1);
            return Err(ReloadError::TenantsRemoved(removed));
        }
        let mut out = Reloaded { restart_needed: restart_needed(&inner.cfg, new), ..Reloaded::default() };
        let mut changes = Vec::new();
        let mut added = Vec::new();
        for t in &new.tenants {
            match running.get(&t.id) {
                Some(tenant) => {
                    let old = tenant.cfg();
                    if old.tokens != t.tokens {
                        out.tokens.push(t.id.clone());
                    }
                    let policy_changed = *old.policy != *t.policy;
                    if policy_changed {
                        out.policies.push(t.id.clone());
                    }
                    changes.push((tenant.clone(), Arc::new(t.clone()), policy_changed));
                }
                // Opened once its policy is logged (`set_tenant_configs`).
                None => added.push(t.clone()),
            }
        }
        out.added = added.iter().map(|t| t.id.clone()).collect();
        if let Err(e) = self.set_tenant_configs(changes, added) {
            inner.metrics.m.config_reloads.get("error").increment(1);
            return Err(ReloadError::Log(e.to_string()));
        }
        out.added.sort();
        out.policies.sort();
        out.tokens.sort();
        // Open connections check their token against the new configuration.
        inner.reloads.send_modify(|n| *n += 1);
        inner.metrics.m.config_reloads.get("ok").increment(1);
        Ok(out)
    }

    /// A receiver that changes at every applied reload (connections re-check their
    /// token then: [`Engine::token_scopes`]).
    pub fn reloads(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.reloads.subscribe()
    }

    /// The scopes the token whose SHA-256 is `hash` has on `tenant` now, if it is
    /// still one of its tokens.
    pub fn token_scopes(&self, tenant: &TenantId, hash: &[u8; 32]) -> Option<Vec<crate::protocol::Scope>> {
        let t = self.tenant(tenant)?;
        let cfg = t.cfg();
        cfg.tokens.iter().find(|(h, _)| h == hash).map(|(_, scopes)| scopes.clone())
    }
}

/// The settings other than tenants that differ between `running` and `new`, as key
/// paths (`wal.fsync`): they are read at start only.
fn restart_needed(running: &Config, new: &Config) -> Vec<String> {
    let table = |c: &Config| match toml::Value::try_from(&c.raw) {
        Ok(toml::Value::Table(mut t)) => {
            t.remove("tenants");
            t
        }
        _ => toml::map::Map::new(),
    };
    let (a, b) = (table(running), table(new));
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    let mut out = Vec::new();
    for k in keys {
        match (a.get(k), b.get(k)) {
            (Some(toml::Value::Table(x)), Some(toml::Value::Table(y))) => {
                let mut sub: Vec<&String> = x.keys().chain(y.keys()).collect();
                sub.sort();
                sub.dedup();
                out.extend(sub.into_iter().filter(|s| x.get(*s) != y.get(*s)).map(|s| format!("{k}.{s}")));
            }
            (x, y) if x != y => out.push(k.clone()),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Sources;

    fn load(flags: &[&str]) -> Config {
        Config::load(&Sources { flags: flags.iter().map(|f| f.to_string()).collect(), ..Sources::default() })
            .expect("valid config")
    }

    #[test]
    fn settings_read_only_at_start_are_named_when_a_reload_changes_them() {
        let running = load(&[]);
        assert_eq!(restart_needed(&running, &load(&[])), Vec::<String>::new());
        let new = load(&["wal.fsync=\"never\"", "listen=\"127.0.0.1:9\"", "max_connections=7"]);
        assert_eq!(restart_needed(&running, &new), ["listen", "max_connections", "wal.fsync"]);
    }
}
