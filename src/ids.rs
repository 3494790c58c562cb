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

/// An optional time in 8 bytes: `Option<Millis>` takes 16 (an `i64` has no spare bit
/// pattern for `None`), and the lead and offer states hold several of them for every
/// open lead. `None` is `i64::MIN`, a time no lead can carry (times are positive Unix
/// milliseconds, and sums saturate upwards). On the wire, in the WAL and in snapshots it
/// is exactly an `Option<Millis>`; a stored `Some(i64::MIN)` is refused on reading.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct OptMillis(Millis);

impl OptMillis {
    pub const NONE: OptMillis = OptMillis(Millis::MIN);

    /// `Some(t)`. `t` must not be `i64::MIN` (it would read back as `None`).
    pub fn some(t: Millis) -> Self {
        debug_assert_ne!(t, Millis::MIN, "i64::MIN stands for None");
        Self(t)
    }

    pub fn get(self) -> Option<Millis> {
        (self.0 != Millis::MIN).then_some(self.0)
    }

    pub fn is_some(self) -> bool {
        self.0 != Millis::MIN
    }

    pub fn is_none(self) -> bool {
        self.0 == Millis::MIN
    }

    /// Takes the value out, leaving `None` (as [`Option::take`]).
    pub fn take(&mut self) -> Option<Millis> {
        std::mem::replace(self, Self::NONE).get()
    }
}

impl Default for OptMillis {
    fn default() -> Self {
        Self::NONE
    }
}

impl From<Option<Millis>> for OptMillis {
    fn from(t: Option<Millis>) -> Self {
        t.map_or(Self::NONE, Self::some)
    }
}

impl From<OptMillis> for Option<Millis> {
    fn from(t: OptMillis) -> Self {
        t.get()
    }
}

impl PartialEq<Option<Millis>> for OptMillis {
    fn eq(&self, other: &Option<Millis>) -> bool {
        self.get() == *other
    }
}

impl fmt::Debug for OptMillis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.get(), f)
    }
}

impl Serialize for OptMillis {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.get().serialize(s)
    }
}

impl<'de> Deserialize<'de> for OptMillis {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Option::<Millis>::deserialize(d)? {
            Some(Millis::MIN) => Err(serde::de::Error::custom("time i64::MIN is out of range")),
            t => Ok(t.into()),
        }
    }
}

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
            /// Checks the id is usable: non-empty, at most [`MAX_ID_LEN`](crate::ids::MAX_ID_LEN) bytes,
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
// Other modules define their own string ids (e.g. the ledger's op ids) with it.
pub(crate) use string_id;

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

    #[test]
    fn optional_times_take_8_bytes_and_serialise_as_options() {
        assert_eq!(std::mem::size_of::<OptMillis>(), 8);
        for t in [None, Some(0), Some(1_795_424_400_000), Some(-5), Some(Millis::MAX)] {
            let o = OptMillis::from(t);
            assert_eq!(o.get(), t);
            assert_eq!(rmp_serde::to_vec(&o).unwrap(), rmp_serde::to_vec(&t).unwrap());
            assert_eq!(serde_json::to_string(&o).unwrap(), serde_json::to_string(&t).unwrap());
            let back: OptMillis = rmp_serde::from_slice(&rmp_serde::to_vec(&t).unwrap()).unwrap();
            assert_eq!(back, o);
        }
        let bad = rmp_serde::to_vec(&Some(Millis::MIN)).unwrap();
        assert!(rmp_serde::from_slice::<OptMillis>(&bad).is_err());
        let mut o = OptMillis::some(7);
        assert_eq!(o.take(), Some(7));
        assert!(o.is_none());
    }
}
