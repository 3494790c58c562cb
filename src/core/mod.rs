//! The pure dispatch core: `state + command + now -> events`, and `apply(event)`.
//!
//! No async, no actix, no threads, no files, no wall clock, no randomness in here
//! (see `STYLE.md`): the shell passes `now` and a read-only view of the ledger, logs
//! the returned events, applies them, and only then publishes.
//!
//! | file | owns | rules |
//! |---|---|---|
//! | [`policy`] | tenant policy TOML -> validated [`policy::Policy`] | every number of every rule |
//! | [`deadlines`] | a shard's deadlines, compact, in tick order | R7, R12, R15 timers |
//! | [`model`] | pros, leads, offers, geo, weekly windows, validation | R1, R4, R8, R13, R16, R17, R25 windows |
//! | [`orders`] | order requests: acceptance modes, approval, custom offers, response and cancellation rates | R25-R27 |
//! | [`rank`] | quality and responsiveness -> rotation weight | R14, R15, R28, R29 |
//! | [`ring`] | stride-scheduled rotation with a fairness bound | R21, R28 |
//! | [`shard`] | one `(tenant, zone, category)`: decide / apply / tick / explain | R1-R9, R12-R18, R21-R23, R28 |

pub mod deadlines;
pub mod model;
pub mod orders;
pub mod policy;
pub mod rank;
pub mod ring;
pub mod shard;

pub use model::*;
pub use policy::{DispatchMode, Policy, PolicyError};
pub use shard::{
    Charge, ChargeMode, Command, Decision, Event, Funds, Grant, LeadOutcome, LeadStatus, OfferAction,
    OfferView, Party, Reject, RejectReason, Reply, Shard, Skip, Unlimited, MAX_CREATED_AHEAD_MS,
};
