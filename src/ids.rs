//! Identifiers shared by every layer.
//!
//! Ids come from the marketplace platform as strings (UUIDs, slugs, numbers as
//! text). They are stored as [`SmolStr`]: strings up to 23 bytes live inline
//! and longer ones behind an `Arc`, so cloning an id on the hot path never
//! allocates.

use serde::{Deserialize, Serialize};
use smol_str::SmolStr;
use std::fmt;

/// Milliseconds since the Unix epoch (UTC). The pure core never reads a clock:
/// every decision takes `now: Millis` from the shell.
pub type Millis = i64;

pub const SECOND_MS: Millis = 1_000;
pub const MINUTE_MS: Millis = 60 * SECOND_MS;
pub const HOUR_MS: Millis = 60 * MINUTE_MS;
pub const DAY_MS: Millis = 24 * HOUR_MS;

/// Longest id accepted from the wire; longer ids are refused as `invalid_field`.
pub const MAX_ID_LEN: usize = 128;

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub SmolStr);

        impl $name {
            pub fn new(s: impl AsRef<str>) -> Self {
                Self(SmolStr::new(s.as_ref()))
            }
            pub fn as_str(&self) -> &str {
                self.0.as_str()
            }
            /// Checks the id is usable: non-empty, at most [`MAX_ID_LEN`] bytes,
            /// no control characters.
            pub fn validate(&self, field: &'static str) -> Result<(), IdError> {
                validate_id(self.as_str(), field)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0.as_str())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.0.as_str())
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self::new(s)
            }
        }
    };
}

string_id!(
    /// A marketplace platform using rota.
    TenantId
);
string_id!(
    /// A geographic area id (city, province, postcode area).
    ZoneId
);
string_id!(
    /// A service id ("painting", "plumbing").
    CategoryId
);
string_id!(
    /// A professional who receives leads.
    ProId
);
string_id!(
    /// The platform's own lead id: the idempotency key of a lead (R1).
    LeadId
);
string_id!(
    /// A client of the marketplace (the person asking for a job).
    ClientId
);

/// What is wrong with an id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct IdError {
    pub field: &'static str,
    pub reason: &'static str,
}

pub fn validate_id(s: &str, field: &'static str) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError { field, reason: "must not be empty" });
    }
    if s.len() > MAX_ID_LEN {
        return Err(IdError { field, reason: "longer than 128 bytes" });
    }
    if s.chars().any(char::is_control) {
        return Err(IdError { field, reason: "contains control characters" });
    }
    Ok(())
}

/// The unit of sharding: one rotation ring per `(tenant, zone, category)`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Debug)]
pub struct ShardKey {
    pub tenant: TenantId,
    pub zone: ZoneId,
    pub category: CategoryId,
}

impl fmt::Display for ShardKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.tenant, self.zone, self.category)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_long_ids_are_refused_with_the_field_named() {
        let e = LeadId::new("").validate("lead_id").unwrap_err();
        assert_eq!(e.field, "lead_id");
        assert!(ProId::new("x".repeat(129)).validate("pro_id").is_err());
        assert!(ProId::new("pro-1").validate("pro_id").is_ok());
        assert!(ProId::new("a\nb").validate("pro_id").is_err());
    }
}
