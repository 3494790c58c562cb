//! Exactly-once checks over what the daemon acknowledged and what the stream delivered.
//!
//! * every acknowledged lead appears on the stream exactly once (`lead_accepted` for
//!   accepted leads, `lead_rejected` for rejected ones);
//! * no offer `(lead, pro)` is delivered twice;
//! * every offer listed in a publish acknowledgement is delivered;
//! * a lead whose publish was answered with an error is never delivered;
//! * the stream says what the acknowledgement said: `lead_accepted` for a lead
//!   acknowledged `accepted`, `lead_rejected` for one acknowledged `rejected`;
//! * offers go only to leads that were accepted: none for a lead acknowledged
//!   `rejected` or refused with an error, none without its `lead_accepted` event;
//! * a lead's events arrive on the stream of the tenant that published it: a lead seen
//!   once, but on another tenant's subscription, never reached its own subscriber (and
//!   was shown to another tenant).
//!
//! A publish answered `unavailable` is in doubt, not refused (docs/PROTOCOL.md: the
//! request may have been stored; send it again): like one never answered, its lead may
//! or may not appear, but at most once.
//!
//! Leads are dense ordinals (see `schedule`), pros are interned, so the state per
//! lead is a few bytes plus its offers.

use serde::Serialize;
use std::collections::HashMap;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Ack {
    #[default]
    None,
    Accepted,
    Rejected,
    /// A definite refusal: nothing was stored.
    Error,
    /// An error that leaves the request in doubt ([`in_doubt`]): it may have been stored.
    InDoubt,
}

/// Whether an error code leaves a request in doubt rather than refused. PROTOCOL.md
/// names `unavailable` (a crash or a failing disk cut the request off: "send it again,
/// as any request in doubt"); every other code is answered before anything is stored
/// (`overloaded`, `rate_limited`: "nothing was stored"/"nothing was done"; decoding
/// and validation errors).
pub fn in_doubt(code: &str) -> bool {
    code == "unavailable"
}

#[derive(Debug, Default)]
struct LeadCheck {
    ack: Ack,
    /// The stream (tenant subscription) its events must arrive on.
    stream: u32,
    accepted_events: u16,
    rejected_events: u16,
    /// Its events (`lead_accepted`, `lead_rejected`, `offered`) that arrived on another
    /// stream than `stream`, and the first such stream.
    wrong_stream_events: u16,
    wrong_stream: u32,
    acked_offers: Vec<u32>,
    stream_offers: Vec<u32>,
}

#[derive(Debug, Default)]
pub struct Checker {
    leads: Vec<LeadCheck>,
    pros: HashMap<String, u32>,
    /// Acknowledged leads whose stream event has not arrived yet.
    pending: u64,
    duplicate_offers: u64,
    examples: Vec<String>,
}

/// What the checks found; all zero is a pass.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Violations {
    /// Acknowledged leads never delivered on the stream.
    pub missing_deliveries: u64,
    /// Leads delivered (accepted or rejected event) more than once.
    pub duplicate_deliveries: u64,
    /// Offers `(lead, pro)` delivered more than once.
    pub duplicate_offers: u64,
    /// Offers listed in an acknowledgement but never delivered.
    pub acked_offers_not_delivered: u64,
    /// Leads delivered although their publish was answered with an error (one that
    /// is not [`in_doubt`]).
    pub delivered_after_error: u64,
    /// Leads whose stream event says otherwise than their acknowledgement
    /// (`lead_rejected` for a lead acknowledged `accepted`, or the reverse).
    pub status_mismatches: u64,
    /// Leads offered to pros although not accepted: acknowledged `rejected`, refused
    /// with an error, or without a `lead_accepted` event on the stream.
    pub offers_for_unaccepted_leads: u64,
    /// Leads with an event on another stream than their tenant's. Counted apart from
    /// the deliveries: a lead seen once, but by the wrong tenant's subscriber, passes
    /// every other check.
    pub wrong_stream: u64,
    /// Up to 20 examples, for a human.
    pub examples: Vec<String>,
}

impl Violations {
    pub fn total(&self) -> u64 {
        self.missing_deliveries
            + self.duplicate_deliveries
            + self.duplicate_offers
            + self.acked_offers_not_delivered
            + self.delivered_after_error
            + self.status_mismatches
            + self.offers_for_unaccepted_leads
            + self.wrong_stream
    }
}

const MAX_EXAMPLES: usize = 20;

impl Checker {
    /// `leads` leads, all published for stream 0 (one tenant).
    pub fn new(leads: usize) -> Self {
        Self::with_streams(std::iter::repeat_n(0, leads))
    }

    /// One lead per item, in ordinal order: the stream (tenant subscription) its events
    /// must arrive on. Known from the schedule before anything is sent, so an event
    /// that overtakes its publish's bookkeeping is still checked.
    pub fn with_streams(streams: impl IntoIterator<Item = u32>) -> Self {
        let leads = streams.into_iter().map(|stream| LeadCheck { stream, ..Default::default() }).collect();
        Checker { leads, ..Default::default() }
    }

    fn pro(&mut self, pro: &str) -> u32 {
        if let Some(&p) = self.pros.get(pro) {
            return p;
        }
        let p = self.pros.len() as u32;
        self.pros.insert(pro.to_string(), p);
        p
    }

    fn lead(&mut self, ord: u32) -> Option<&mut LeadCheck> {
        self.leads.get_mut(ord as usize)
    }

    fn delivered(l: &LeadCheck) -> bool {
        l.accepted_events + l.rejected_events > 0
    }

    /// The publish was acknowledged as accepted, with these offers made at once.
    pub fn on_ack_accepted<'a>(&mut self, ord: u32, offers: impl IntoIterator<Item = &'a str>) {
        let pros: Vec<u32> = offers.into_iter().map(|p| self.pro(p)).collect();
        let Some(l) = self.lead(ord) else { return };
        let was_pending = l.ack == Ack::None;
        l.ack = Ack::Accepted;
        l.acked_offers = pros;
        let delivered = Self::delivered(l);
        if was_pending && !delivered {
            self.pending += 1;
        }
    }

    pub fn on_ack_rejected(&mut self, ord: u32) {
        let Some(l) = self.lead(ord) else { return };
        l.ack = Ack::Rejected;
        let delivered = Self::delivered(l);
        if !delivered {
            self.pending += 1;
        }
    }

    /// The publish was answered with error `code`: a refusal, or in doubt
    /// ([`in_doubt`]), which checks like a publish never answered.
    pub fn on_ack_error(&mut self, ord: u32, code: &str) {
        if let Some(l) = self.lead(ord) {
            l.ack = if in_doubt(code) { Ack::InDoubt } else { Ack::Error };
        }
    }

    /// An event of the lead arrived on `stream`.
    fn on_stream(l: &mut LeadCheck, stream: u32) {
        if stream != l.stream {
            if l.wrong_stream_events == 0 {
                l.wrong_stream = stream;
            }
            l.wrong_stream_events = l.wrong_stream_events.saturating_add(1);
        }
    }

    fn on_delivery(&mut self, ord: u32, stream: u32, accepted: bool) {
        let Some(l) = self.leads.get_mut(ord as usize) else { return };
        Self::on_stream(l, stream);
        let first = !Self::delivered(l);
        if accepted {
            l.accepted_events += 1;
        } else {
            l.rejected_events += 1;
        }
        if first && matches!(l.ack, Ack::Accepted | Ack::Rejected) {
            self.pending = self.pending.saturating_sub(1);
        }
    }

    /// A `lead_accepted` event arrived on `stream`. Returns true if it was the first
    /// for the lead.
    pub fn on_lead_accepted(&mut self, ord: u32, stream: u32) -> bool {
        let first = self.leads.get(ord as usize).is_some_and(|l| !Self::delivered(l));
        self.on_delivery(ord, stream, true);
        first
    }

    /// A `lead_rejected` event arrived on `stream`.
    pub fn on_lead_rejected(&mut self, ord: u32, stream: u32) {
        self.on_delivery(ord, stream, false);
    }

    /// An `offered` event arrived on `stream`. Returns true if it is the lead's first
    /// offer.
    pub fn on_offered(&mut self, ord: u32, stream: u32, pro: &str) -> bool {
        let p = self.pro(pro);
        let Some(l) = self.leads.get_mut(ord as usize) else { return false };
        Self::on_stream(l, stream);
        let first = l.stream_offers.is_empty();
        if l.stream_offers.contains(&p) {
            self.duplicate_offers += 1;
            if self.examples.len() < MAX_EXAMPLES {
                self.examples.push(format!("lead #{ord}: offer to {pro} delivered twice"));
            }
        } else {
            l.stream_offers.push(p);
        }
        first
    }

    /// Whether an offer of the lead has been delivered.
    pub fn offered(&self, ord: u32) -> bool {
        self.leads.get(ord as usize).is_some_and(|l| !l.stream_offers.is_empty())
    }

    /// Acknowledged leads still waiting for their stream event.
    pub fn pending(&self) -> u64 {
        self.pending
    }

    pub fn finish(&self) -> Violations {
        let mut v = Violations { duplicate_offers: self.duplicate_offers, ..Default::default() };
        v.examples.clone_from(&self.examples);
        let example = |v: &mut Violations, s: String| {
            if v.examples.len() < MAX_EXAMPLES {
                v.examples.push(s);
            }
        };
        for (ord, l) in self.leads.iter().enumerate() {
            let events = l.accepted_events + l.rejected_events;
            match l.ack {
                Ack::Accepted | Ack::Rejected if events == 0 => {
                    v.missing_deliveries += 1;
                    example(&mut v, format!("lead #{ord}: acknowledged but never delivered"));
                }
                Ack::Error if events > 0 => {
                    v.delivered_after_error += 1;
                    example(&mut v, format!("lead #{ord}: answered with an error but delivered"));
                }
                _ => {}
            }
            if events > 1 {
                v.duplicate_deliveries += 1;
                example(&mut v, format!("lead #{ord}: delivered {events} times"));
            }
            let mismatch = match l.ack {
                Ack::Accepted if l.rejected_events > 0 => Some(("accepted", "lead_rejected")),
                Ack::Rejected if l.accepted_events > 0 => Some(("rejected", "lead_accepted")),
                _ => None,
            };
            if let Some((ack, event)) = mismatch {
                v.status_mismatches += 1;
                example(&mut v, format!("lead #{ord}: acknowledged {ack} but delivered as {event}"));
            }
            // Offers of a lead refused with an error that was delivered anyway are part
            // of that violation (`delivered_after_error`), not another one.
            let unaccepted = l.ack == Ack::Rejected || l.accepted_events == 0;
            if !l.stream_offers.is_empty() && unaccepted {
                v.offers_for_unaccepted_leads += 1;
                let why = match l.ack {
                    Ack::Rejected => "acknowledged rejected",
                    Ack::Error => "refused with an error",
                    _ => "never delivered as lead_accepted",
                };
                example(&mut v, format!("lead #{ord}: {} offer(s) but {why}", l.stream_offers.len()));
            }
            if l.wrong_stream_events > 0 {
                v.wrong_stream += 1;
                example(
                    &mut v,
                    format!(
                        "lead #{ord}: {} event(s) on stream {} instead of its tenant's stream {}",
                        l.wrong_stream_events, l.wrong_stream, l.stream
                    ),
                );
            }
            let missing = l.acked_offers.iter().filter(|p| !l.stream_offers.contains(p)).count() as u64;
            if missing > 0 {
                v.acked_offers_not_delivered += missing;
                example(&mut v, format!("lead #{ord}: {missing} acknowledged offer(s) never delivered"));
            }
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_run_has_no_violations() {
        let mut c = Checker::new(3);
        c.on_ack_accepted(0, ["p1", "p2"]);
        assert_eq!(c.pending(), 1);
        assert!(c.on_lead_accepted(0, 0));
        assert!(c.on_offered(0, 0, "p1"));
        assert!(!c.on_offered(0, 0, "p2"));
        // Delivery before the ack (the stream can overtake the reply).
        c.on_lead_accepted(1, 0);
        c.on_ack_accepted(1, []);
        c.on_ack_rejected(2);
        c.on_lead_rejected(2, 0);
        assert_eq!(c.pending(), 0);
        assert_eq!(c.finish(), Violations::default());
    }

    #[test]
    fn duplicates_are_flagged() {
        let mut c = Checker::new(2);
        c.on_ack_accepted(0, ["p1"]);
        c.on_lead_accepted(0, 0);
        c.on_offered(0, 0, "p1");
        c.on_offered(0, 0, "p1");
        c.on_ack_accepted(1, []);
        c.on_lead_accepted(1, 0);
        c.on_lead_accepted(1, 0);
        let v = c.finish();
        assert_eq!(v.duplicate_offers, 1);
        assert_eq!(v.duplicate_deliveries, 1);
        assert_eq!(v.total(), 2);
        assert!(v.examples.iter().any(|e| e.contains("delivered twice")), "{:?}", v.examples);
    }

    #[test]
    fn missing_deliveries_and_offers_are_flagged() {
        let mut c = Checker::new(3);
        c.on_ack_accepted(0, ["p1", "p2"]);
        c.on_lead_accepted(0, 0);
        c.on_offered(0, 0, "p1");
        c.on_ack_accepted(1, []);
        c.on_ack_rejected(2);
        assert_eq!(c.pending(), 2);
        let v = c.finish();
        assert_eq!(v.missing_deliveries, 2);
        assert_eq!(v.acked_offers_not_delivered, 1);
    }

    #[test]
    fn unanswered_leads_are_not_violations_but_errors_that_deliver_are() {
        let mut c = Checker::new(2);
        c.on_ack_error(0, "overloaded");
        c.on_lead_accepted(0, 0);
        let v = c.finish();
        assert_eq!(v.delivered_after_error, 1);
        assert_eq!(v.missing_deliveries, 0, "lead #1 was never answered: not a delivery violation");
    }

    #[test]
    fn the_stream_must_say_what_the_acknowledgement_said() {
        let mut c = Checker::new(3);
        c.on_ack_accepted(0, []);
        c.on_lead_rejected(0, 0);
        c.on_ack_rejected(1);
        c.on_lead_accepted(1, 0);
        c.on_ack_accepted(2, []);
        c.on_lead_accepted(2, 0);
        let v = c.finish();
        assert_eq!(v.status_mismatches, 2, "{v:?}");
        assert_eq!(v.total(), 2, "{v:?}");
        assert!(v
            .examples
            .iter()
            .any(|e| e.contains("acknowledged accepted but delivered as lead_rejected")));
    }

    #[test]
    fn offers_go_only_to_accepted_leads() {
        let mut c = Checker::new(6);
        // Acknowledged rejected, yet offered.
        c.on_ack_rejected(0);
        c.on_lead_rejected(0, 0);
        c.on_offered(0, 0, "p1");
        // Refused (nothing stored), yet offered.
        c.on_ack_error(1, "overloaded");
        c.on_offered(1, 0, "p1");
        // Never answered and never accepted on the stream, yet offered.
        c.on_offered(2, 0, "p1");
        // Never answered, accepted on the stream: in doubt, and it was stored.
        c.on_lead_accepted(3, 0);
        c.on_offered(3, 0, "p1");
        // Accepted: offers are what it is for, also ones not in the acknowledgement.
        c.on_ack_accepted(4, ["p1"]);
        c.on_lead_accepted(4, 0);
        c.on_offered(4, 0, "p1");
        c.on_offered(4, 0, "p2");
        let v = c.finish();
        assert_eq!(v.offers_for_unaccepted_leads, 3, "{v:?}");
        assert_eq!(v.total(), 3, "{v:?}");
    }

    /// Tenant A's leads seen exactly once, but on tenant B's subscription: every other
    /// check passes, and A's subscriber never got them.
    #[test]
    fn a_lead_delivered_on_another_tenants_stream_is_a_violation() {
        // Leads 0 and 2 for stream 0, lead 1 for stream 1.
        let mut c = Checker::with_streams([0, 1, 0]);
        c.on_ack_accepted(0, ["p1"]);
        c.on_lead_accepted(0, 1);
        c.on_offered(0, 1, "p1");
        c.on_ack_accepted(1, ["p1"]);
        c.on_lead_accepted(1, 1);
        c.on_offered(1, 1, "p1");
        // Accepted on its own stream, offered on the other.
        c.on_ack_accepted(2, ["p1"]);
        c.on_lead_accepted(2, 0);
        c.on_offered(2, 1, "p1");
        assert_eq!(c.pending(), 0, "each lead was seen once");
        let v = c.finish();
        assert_eq!(v.wrong_stream, 2, "{v:?}");
        assert_eq!(v.total(), 2, "nothing else is wrong: {v:?}");
        assert!(
            v.examples
                .iter()
                .any(|e| e == "lead #0: 2 event(s) on stream 1 instead of its tenant's stream 0"),
            "{:?}",
            v.examples
        );
    }

    #[test]
    fn a_lead_answered_unavailable_is_in_doubt_not_refused() {
        assert!(in_doubt("unavailable"));
        assert!(!in_doubt("overloaded") && !in_doubt("rate_limited") && !in_doubt("invalid_field"));
        let mut c = Checker::new(3);
        // Stored after all: delivered once, with its offers.
        c.on_ack_error(0, "unavailable");
        c.on_lead_accepted(0, 0);
        c.on_offered(0, 0, "p1");
        // Not stored: never delivered.
        c.on_ack_error(1, "unavailable");
        assert_eq!(c.pending(), 0, "nothing to wait for");
        // Still at most once.
        c.on_ack_error(2, "unavailable");
        c.on_lead_accepted(2, 0);
        c.on_lead_accepted(2, 0);
        let v = c.finish();
        assert_eq!((v.delivered_after_error, v.missing_deliveries), (0, 0), "{v:?}");
        assert_eq!(v.duplicate_deliveries, 1, "{v:?}");
        assert_eq!(v.total(), 1, "{v:?}");
    }
}
