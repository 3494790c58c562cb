//! What the core knows about pros, leads and offers, with their validation.
//!
//! Everything here is plain data that crosses the wire and the WAL; the rules that use
//! it live in [`super::shard`].

use crate::ids::{CategoryId, ClientId, LeadId, Millis, ProId, ZoneId};
use chrono::{Datelike, TimeZone, Timelike};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// A field of a command that is not acceptable, named as on the wire.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("invalid field {field}: {reason}")]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

pub fn field_err(field: impl Into<String>, reason: impl Into<String>) -> FieldError {
    FieldError { field: field.into(), reason: reason.into() }
}

impl From<crate::ids::IdError> for FieldError {
    fn from(e: crate::ids::IdError) -> Self {
        field_err(e.field, e.reason)
    }
}

// ---------------------------------------------------------------------------------
// Geography
// ---------------------------------------------------------------------------------

/// A point on Earth in degrees.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GeoPoint {
    pub lat: f64,
    pub lon: f64,
}

impl GeoPoint {
    pub fn validate(&self, field: &str) -> Result<(), FieldError> {
        if !self.lat.is_finite() || !(-90.0..=90.0).contains(&self.lat) {
            return Err(field_err(format!("{field}.lat"), "must be a number in [-90, 90]"));
        }
        if !self.lon.is_finite() || !(-180.0..=180.0).contains(&self.lon) {
            return Err(field_err(format!("{field}.lon"), "must be a number in [-180, 180]"));
        }
        Ok(())
    }

    /// Mean Earth radius, km.
    const R_KM: f64 = 6371.0088;

    /// Great-circle distance in kilometres (haversine, mean Earth radius 6371.0088 km).
    pub fn distance_km(&self, other: &GeoPoint) -> f64 {
        let (la1, la2) = (self.lat.to_radians(), other.lat.to_radians());
        let dlat = la2 - la1;
        let dlon = (other.lon - self.lon).to_radians();
        let a = (dlat / 2.0).sin().powi(2) + la1.cos() * la2.cos() * (dlon / 2.0).sin().powi(2);
        2.0 * Self::R_KM * a.sqrt().min(1.0).asin()
    }

    /// Whether `other` is within `radius_km`: [`Self::distance_km`]` <= radius_km`, with
    /// the same answer, but most nearby points are accepted without trigonometry.
    ///
    /// Going along the meridian by the latitude difference and then along a parallel by
    /// the longitude difference is a path between the two points, so its length bounds
    /// the great-circle distance from above, and the parallel is never longer than the
    /// equator: `distance <= R * (|dlat| + |dlon|)` (radians). Below the radius by a
    /// margin far wider than the haversine's rounding, the point is within; otherwise
    /// the distance is computed.
    pub fn within_km(&self, other: &GeoPoint, radius_km: f64) -> bool {
        let bound = Self::R_KM * ((other.lat - self.lat).abs() + (other.lon - self.lon).abs()).to_radians();
        if bound <= radius_km * (1.0 - 1e-9) {
            return true;
        }
        self.distance_km(other) <= radius_km
    }
}

// ---------------------------------------------------------------------------------
// Weekly windows in a local time zone (R4 schedules, R25 approval windows)
// ---------------------------------------------------------------------------------

/// One interval of a week, in local wall-clock minutes of one day.
/// A night window 22:00-06:00 is two intervals: `mon 1320..1440` and `tue 0..360`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct WeeklyInterval {
    /// `mon`, `tue`, ... `sun`.
    pub day: Weekday,
    pub start_min: u16,
    pub end_min: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Weekday {
    Mon,
    Tue,
    Wed,
    Thu,
    Fri,
    Sat,
    Sun,
}

impl Weekday {
    fn from_chrono(d: chrono::Weekday) -> Self {
        use chrono::Weekday as C;
        match d {
            C::Mon => Self::Mon,
            C::Tue => Self::Tue,
            C::Wed => Self::Wed,
            C::Thu => Self::Thu,
            C::Fri => Self::Fri,
            C::Sat => Self::Sat,
            C::Sun => Self::Sun,
        }
    }
}

/// Intervals a [`WeeklyWindows`] may hold: one an hour of the week.
pub const MAX_WEEKLY_INTERVALS: usize = 168;

/// Shards one pro may cover (zones x categories): each is a shard it joins, with its own
/// copy of the profile and a logged change per shard at every update.
pub const MAX_SHARDS_PER_PRO: usize = 1024;

/// Categories and zones one pro may list (their pairs are bounded by
/// [`MAX_SHARDS_PER_PRO`] too).
pub const MAX_CATEGORIES_PER_PRO: usize = 256;
pub const MAX_ZONES_PER_PRO: usize = 1024;

/// Auto-buy configs one pro may have (R19), and the zone and category entries all of
/// them may list together: the profile is copied into every shard the pro covers and
/// logged with each, so its size is bounded like its other lists.
pub const MAX_AUTOBUY_CONFIGS: usize = 64;
pub const MAX_AUTOBUY_ENTRIES: usize = 4096;

/// The latest time accepted on the wire, 9999-12-31T23:59:59.999Z in ms: later than
/// any real date, far from `i64` overflow when durations are added, and below the
/// rotation's "until budget comes back" mark ([`crate::core::ring::UNTIL_BUDGET`]),
/// which a pause "for ever" written as `i64::MAX` would otherwise have looked like.
pub const MAX_TIME_MS: Millis = 253_402_300_799_999;

/// Checks a time sent by a client: a Unix time in ms, no later than [`MAX_TIME_MS`].
pub fn validate_time(t: Millis, field: impl Into<String>) -> Result<(), FieldError> {
    if (0..=MAX_TIME_MS).contains(&t) {
        Ok(())
    } else {
        Err(field_err(
            field,
            format!("must be a Unix time in ms from 0 to {MAX_TIME_MS} (9999-12-31), got {t}"),
        ))
    }
}

/// A set of weekly intervals in an IANA time zone. Empty = always.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct WeeklyWindows {
    pub time_zone: String,
    pub intervals: Vec<WeeklyInterval>,
}

impl WeeklyWindows {
    pub fn validate(&self, field: &str) -> Result<Tz, FieldError> {
        let tz: Tz = self.time_zone.parse().map_err(|_| {
            field_err(format!("{field}.time_zone"), format!("unknown IANA time zone {:?}", self.time_zone))
        })?;
        // Every decision on the pro converts times against these (schedules under the
        // shard's lock, approval windows under the tenant's order book): bounded like
        // the rest of a profile. One an hour of the week is more than any schedule.
        if self.intervals.len() > MAX_WEEKLY_INTERVALS {
            return Err(field_err(
                format!("{field}.intervals"),
                format!("at most {MAX_WEEKLY_INTERVALS} intervals"),
            ));
        }
        for (i, iv) in self.intervals.iter().enumerate() {
            if iv.end_min > 1440 {
                return Err(field_err(format!("{field}.intervals[{i}].end_min"), "must be at most 1440"));
            }
            if iv.start_min >= iv.end_min {
                return Err(field_err(
                    format!("{field}.intervals[{i}]"),
                    "start_min must be before end_min; a window across midnight is two intervals",
                ));
            }
        }
        Ok(tz)
    }

    /// Whether `now` falls inside one of the intervals, in the windows' local time.
    /// Unparseable zones (impossible after [`Self::validate`]) count as UTC.
    pub fn contains(&self, now: Millis) -> bool {
        if self.intervals.is_empty() {
            return true;
        }
        self.contains_in(self.tz(), now)
    }

    /// The windows' zone. Unparseable zones (impossible after [`Self::validate`]) count
    /// as UTC. Parsing is a hash lookup by name: callers on a hot path parse once and
    /// use [`Self::contains_in`].
    pub fn tz(&self) -> Tz {
        self.time_zone.parse().unwrap_or(chrono_tz::UTC)
    }

    /// [`Self::contains`] with the zone already parsed (`tz` must be [`Self::tz`]).
    pub fn contains_in(&self, tz: Tz, now: Millis) -> bool {
        if self.intervals.is_empty() {
            return true;
        }
        let Some((day, minute)) = local_day_minute(tz, now) else {
            return true;
        };
        self.intervals.iter().any(|iv| iv.day == day && iv.start_min <= minute && minute < iv.end_min)
    }
}

impl WeeklyWindows {
    /// The first instant at or after `now` at which the windows are open (`tz` must be
    /// [`Self::tz`]); `None` if no opening was found within eight days (impossible
    /// with at least one interval) or the time is out of range. Never later than the
    /// true opening: an opening whose local time is skipped by a daylight-saving jump
    /// is taken as the first instant after the jump, and of two instants with the same
    /// local time the earlier one; a caller woken early finds the windows still closed
    /// and asks again. A window that a jump back reopens (its local times occur twice)
    /// opens again at the jump.
    pub fn next_open_in(&self, tz: Tz, now: Millis) -> Option<Millis> {
        if self.contains_in(tz, now) {
            return Some(now);
        }
        let local = tz.timestamp_millis_opt(now).single()?;
        // Openings at or before `now` (earlier today) drop out below.
        let today = local.date_naive();
        let mut best: Option<Millis> = None;
        for offset in 0..=7u64 {
            let date = today.checked_add_days(chrono::Days::new(offset))?;
            let day = Weekday::from_chrono(date.weekday());
            for iv in self.intervals.iter().filter(|iv| iv.day == day) {
                let start = date.and_hms_opt(0, 0, 0)? + chrono::Duration::minutes(i64::from(iv.start_min));
                // Skipped local time (a jump forward): the first minute that exists. A
                // local time that occurs twice (a jump back) opens twice: both count.
                let Some(local) = (0..=180)
                    .map(|m| tz.from_local_datetime(&(start + chrono::Duration::minutes(m))))
                    .find(|r| !matches!(r, chrono::LocalResult::None))
                else {
                    continue;
                };
                let mut candidates = [local.earliest(), local.latest(), None];
                // A jump back inside the window (its local times occur twice) opens it
                // again at the jump, when the clock comes back to a time inside it: not
                // an interval start. Its sign: the window lasts longer than its minutes.
                let end = date.and_hms_opt(0, 0, 0)? + chrono::Duration::minutes(i64::from(iv.end_min));
                let minutes = i64::from(iv.end_min - iv.start_min);
                let lasts = tz
                    .from_local_datetime(&end)
                    .latest()
                    .zip(local.earliest())
                    .map(|(e, s)| (e.timestamp_millis() - s.timestamp_millis()) / 60_000);
                if lasts.is_some_and(|l| l > minutes) {
                    candidates[2] = (0..minutes)
                        .map(|m| tz.from_local_datetime(&(start + chrono::Duration::minutes(m))))
                        .find_map(|r| match r {
                            chrono::LocalResult::Ambiguous(_, second) => Some(second),
                            _ => None,
                        });
                }
                for at in candidates.into_iter().flatten() {
                    let at = at.timestamp_millis();
                    if at > now && best.is_none_or(|b| at < b) {
                        best = Some(at);
                    }
                }
            }
        }
        best
    }
}

/// `now` as (weekday, minute of the day) in `tz`, or `None` if out of range.
///
/// A decision checks every candidate's schedule at the same `now`, and the pros of one
/// shard mostly share a zone: the conversion (a search of the zone's transitions, then
/// calendar arithmetic) was a sixth of a publish's decision. The last conversion is
/// remembered per thread, keyed by zone and exact instant, so the answer is the same
/// as converting again.
fn local_day_minute(tz: Tz, now: Millis) -> Option<(Weekday, u16)> {
    type Memo = Option<(Tz, Millis, Option<(Weekday, u16)>)>;
    thread_local! {
        static LAST: std::cell::Cell<Memo> = const { std::cell::Cell::new(None) };
    }
    let convert = || {
        let local = tz.timestamp_millis_opt(now).single()?;
        Some((Weekday::from_chrono(local.weekday()), (local.hour() * 60 + local.minute()) as u16))
    };
    LAST.with(|last| match last.get() {
        Some((z, t, v)) if z == tz && t == now => v,
        _ => {
            let v = convert();
            last.set(Some((tz, now, v)));
            v
        }
    })
}

// ---------------------------------------------------------------------------------
// Pros
// ---------------------------------------------------------------------------------

/// Profile quality inputs (R21, R28): more and better reviews, more projects and a
/// complete profile earn a larger share of the rotation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default)]
pub struct Quality {
    pub reviews: u32,
    /// Average rating x 100 (0..=500).
    pub rating_centi: u32,
    pub projects: u32,
    /// How complete the profile is, per mille (0..=1000).
    pub profile_permille: u32,
}

/// When a pro can take new leads (R4, R16).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default)]
pub struct Availability {
    /// Paused until this time (exclusive); `None` = not paused.
    pub paused_until: Option<Millis>,
    /// Unavailable (vacation) from..until (exclusive), R16.
    pub vacation: Option<(Millis, Millis)>,
    /// Weekly schedule in the pro's own time zone; `None` = always.
    pub schedule: Option<WeeklyWindows>,
}

/// Why a pro is not available now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unavailable {
    Paused,
    Vacation,
    OutsideSchedule,
}

impl Availability {
    pub fn check(&self, now: Millis) -> Result<(), Unavailable> {
        self.check_in(now, None)
    }

    /// [`Self::check`] with the schedule's zone already parsed (`Some` must be the
    /// schedule's [`WeeklyWindows::tz`]; `None` parses it).
    pub fn check_in(&self, now: Millis, schedule_tz: Option<Tz>) -> Result<(), Unavailable> {
        if matches!(self.paused_until, Some(t) if now < t) {
            return Err(Unavailable::Paused);
        }
        if matches!(self.vacation, Some((from, until)) if from <= now && now < until) {
            return Err(Unavailable::Vacation);
        }
        if let Some(s) = &self.schedule {
            if !s.contains_in(schedule_tz.unwrap_or_else(|| s.tz()), now) {
                return Err(Unavailable::OutsideSchedule);
            }
        }
        Ok(())
    }

    /// The schedule's zone, parsed, to pass to [`Self::check_in`].
    pub fn schedule_tz(&self) -> Option<Tz> {
        self.schedule.as_ref().map(WeeklyWindows::tz)
    }

    pub fn validate(&self, field: &str) -> Result<(), FieldError> {
        if let Some(t) = self.paused_until {
            validate_time(t, format!("{field}.paused_until"))?;
        }
        if let Some((from, until)) = self.vacation {
            validate_time(from, format!("{field}.vacation"))?;
            validate_time(until, format!("{field}.vacation"))?;
            if from >= until {
                return Err(field_err(format!("{field}.vacation"), "start must be before end"));
            }
        }
        if let Some(s) = &self.schedule {
            s.validate(&format!("{field}.schedule"))?;
        }
        Ok(())
    }
}

/// An auto-buy configuration as the dispatch core sees it (R19): which zones and
/// categories it buys in and whether it is active. Its weekly budget lives in the
/// ledger, shared by every shard the config covers.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AutoBuyConfig {
    pub name: String,
    pub zones: Vec<ZoneId>,
    pub categories: Vec<CategoryId>,
    pub weekly_budget_credits: u64,
    /// Highest price this config pays for one lead; `None` = any.
    #[serde(default)]
    pub max_price_credits: Option<u64>,
    #[serde(default = "yes")]
    pub active: bool,
    /// Paused for some days with automatic resume (R24).
    #[serde(default)]
    pub paused_until: Option<Millis>,
}

fn yes() -> bool {
    true
}

impl AutoBuyConfig {
    pub fn covers(&self, zone: &ZoneId, category: &CategoryId) -> bool {
        self.zones.contains(zone) && self.categories.contains(category)
    }

    pub fn is_buying(&self, now: Millis) -> bool {
        self.active && !matches!(self.paused_until, Some(t) if now < t)
    }

    pub fn validate(&self, field: &str) -> Result<(), FieldError> {
        crate::ids::validate_id(&self.name, "name")
            .map_err(|e| field_err(format!("{field}.name"), e.reason))?;
        if self.zones.is_empty() {
            return Err(field_err(format!("{field}.zones"), "must list at least one zone"));
        }
        if self.categories.is_empty() {
            return Err(field_err(format!("{field}.categories"), "must list at least one category"));
        }
        if self.weekly_budget_credits == 0 || self.weekly_budget_credits > MAX_CREDITS {
            return Err(field_err(format!("{field}.weekly_budget_credits"), "must be in 1..=10^12"));
        }
        // 0 would never buy (that is `active: false`); leave it out for any price.
        if self.max_price_credits.is_some_and(|m| m == 0 || m > MAX_CREDITS) {
            return Err(field_err(
                format!("{field}.max_price_credits"),
                "must be in 1..=10^12 (left out: any price)",
            ));
        }
        if self.zones.len() > 1024 {
            return Err(field_err(format!("{field}.zones"), "at most 1024 zones per config"));
        }
        if self.categories.len() > 256 {
            return Err(field_err(format!("{field}.categories"), "at most 256 categories per config"));
        }
        for (i, z) in self.zones.iter().enumerate() {
            z.validate("zones").map_err(|e| field_err(format!("{field}.zones[{i}]"), e.reason))?;
        }
        for (i, c) in self.categories.iter().enumerate() {
            c.validate("categories").map_err(|e| field_err(format!("{field}.categories[{i}]"), e.reason))?;
        }
        if let Some(t) = self.paused_until {
            validate_time(t, format!("{field}.paused_until"))?;
        }
        Ok(())
    }
}

/// Largest amount of credits accepted anywhere on the wire: far from `u64` overflow
/// when summed over millions of operations.
pub const MAX_CREDITS: u64 = 1_000_000_000_000;

/// A professional as the platform describes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pro {
    pub id: ProId,
    pub categories: Vec<CategoryId>,
    pub zones: Vec<ZoneId>,
    /// Base location; `None` = no distance filter.
    #[serde(default)]
    pub base: Option<GeoPoint>,
    /// Preferred radius around the base, km; `None` = no limit.
    #[serde(default)]
    pub radius_km: Option<f64>,
    #[serde(default)]
    pub quality: Quality,
    /// Lead attributes this pro refuses (e.g. "dropshipper"), R4.
    #[serde(default)]
    pub refuses: Vec<String>,
    #[serde(default)]
    pub availability: Availability,
    #[serde(default)]
    pub autobuy: Vec<AutoBuyConfig>,
}

impl Pro {
    pub fn validate(&self) -> Result<(), FieldError> {
        self.id.validate("pro.id")?;
        if self.categories.is_empty() {
            return Err(field_err("pro.categories", "must list at least one category"));
        }
        if self.zones.is_empty() {
            return Err(field_err("pro.zones", "must list at least one zone"));
        }
        for (i, c) in self.categories.iter().enumerate() {
            c.validate("categories").map_err(|e| field_err(format!("pro.categories[{i}]"), e.reason))?;
        }
        for (i, z) in self.zones.iter().enumerate() {
            z.validate("zones").map_err(|e| field_err(format!("pro.zones[{i}]"), e.reason))?;
        }
        if let Some(b) = &self.base {
            b.validate("pro.base")?;
        }
        if let Some(r) = self.radius_km {
            if !r.is_finite() || r <= 0.0 {
                return Err(field_err("pro.radius_km", "must be a positive number of km"));
            }
            if self.base.is_none() {
                return Err(field_err("pro.base", "is required when radius_km is set"));
            }
        }
        validate_attributes(&self.refuses, "pro.refuses")?;
        if self.categories.len() > MAX_CATEGORIES_PER_PRO {
            return Err(field_err(
                "pro.categories",
                format!("{} categories: at most {MAX_CATEGORIES_PER_PRO} per pro", self.categories.len()),
            ));
        }
        if self.zones.len() > MAX_ZONES_PER_PRO {
            return Err(field_err(
                "pro.zones",
                format!("{} zones: at most {MAX_ZONES_PER_PRO} per pro", self.zones.len()),
            ));
        }
        if self.categories.len() * self.zones.len() > MAX_SHARDS_PER_PRO {
            return Err(field_err(
                "pro.zones",
                format!(
                    "{} zones x {} categories: a pro covers at most {MAX_SHARDS_PER_PRO} zone and category pairs",
                    self.zones.len(),
                    self.categories.len()
                ),
            ));
        }
        let q = &self.quality;
        if q.rating_centi > 500 {
            return Err(field_err("pro.quality.rating_centi", "must be at most 500 (5.00 stars)"));
        }
        if q.profile_permille > 1000 {
            return Err(field_err("pro.quality.profile_permille", "must be at most 1000"));
        }
        self.availability.validate("pro.availability")?;
        if self.autobuy.len() > MAX_AUTOBUY_CONFIGS {
            return Err(field_err(
                "pro.autobuy",
                format!("{} configs: at most {MAX_AUTOBUY_CONFIGS} per pro", self.autobuy.len()),
            ));
        }
        let entries: usize = self.autobuy.iter().map(|c| c.zones.len() + c.categories.len()).sum();
        if entries > MAX_AUTOBUY_ENTRIES {
            return Err(field_err(
                "pro.autobuy",
                format!(
                    "{entries} zone and category entries over all configs: at most {MAX_AUTOBUY_ENTRIES} per pro"
                ),
            ));
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, c) in self.autobuy.iter().enumerate() {
            c.validate(&format!("pro.autobuy[{i}]"))?;
            if !names.insert(&c.name) {
                return Err(field_err(format!("pro.autobuy[{i}].name"), "duplicate config name"));
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------
// Leads
// ---------------------------------------------------------------------------------

/// How the client wants to be contacted (R8).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default)]
pub struct ContactPrefs {
    pub call: bool,
    pub whatsapp: bool,
    pub chat: bool,
}

impl ContactPrefs {
    /// Only the marketplace chat: the price is held, not charged, until the client
    /// replies (R9).
    pub fn chat_only(&self) -> bool {
        !self.call && !self.whatsapp
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Client {
    pub id: ClientId,
    pub name: String,
    pub phone: String,
    #[serde(default)]
    pub phone_verified: bool,
    #[serde(default)]
    pub contact: ContactPrefs,
    /// Exact address; never shown before the pro responded (R8).
    #[serde(default)]
    pub address: Option<String>,
    /// Set when the client is itself a pro on the platform (R2 competitor check).
    #[serde(default)]
    pub pro_id: Option<ProId>,
}

impl Client {
    /// The client of a lead: an id, and a name, phone and address of bounded length
    /// (names `lead.client.*`).
    pub fn validate(&self) -> Result<(), FieldError> {
        self.id.validate("lead.client.id")?;
        let bounded = |text: &str, field: &str, max: usize| {
            if text.len() > max {
                return Err(field_err(field, format!("longer than {max} bytes")));
            }
            Ok(())
        };
        bounded(&self.name, "lead.client.name", MAX_CLIENT_NAME_BYTES)?;
        bounded(&self.phone, "lead.client.phone", MAX_CLIENT_PHONE_BYTES)?;
        if let Some(address) = &self.address {
            bounded(address, "lead.client.address", MAX_CLIENT_ADDRESS_BYTES)?;
        }
        Ok(())
    }
}

/// Job kinds (R13).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// The matching picks pros.
    #[default]
    Match,
    /// The client chose the pro(s): only direct targets get it.
    Direct,
    /// A prospect writes to one pro: delivered on the notification channel only.
    Contact,
}

/// Answers to a category's form (R1): key -> answer, in key order, no key twice.
///
/// A boxed slice sorted by key rather than a `BTreeMap`: a lead carries a handful of
/// answers and is read far more than it is built, and a B-tree's first node takes about
/// 540 bytes for a single answer. On the wire, in the WAL and in snapshots it is exactly
/// the map it replaces (an object / MessagePack map in key order; a key given twice
/// keeps its last answer), and [`Lead::fingerprint`] sees the same pairs in the same
/// order.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Details(Box<[(String, String)]>);

impl Details {
    pub fn get(&self, key: &str) -> Option<&String> {
        self.0.binary_search_by(|(k, _)| k.as_str().cmp(key)).ok().map(|i| &self.0[i].1)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The answers in key order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&String, &String)> + '_ {
        self.0.iter().map(|(k, v)| (k, v))
    }

    pub fn keys(&self) -> impl ExactSizeIterator<Item = &String> + '_ {
        self.0.iter().map(|(k, _)| k)
    }

    pub fn values(&self) -> impl ExactSizeIterator<Item = &String> + '_ {
        self.0.iter().map(|(_, v)| v)
    }

    /// Sets `key`'s answer (as [`BTreeMap::insert`]); returns the previous one.
    pub fn insert(&mut self, key: String, value: String) -> Option<String> {
        match self.0.binary_search_by(|(k, _)| k.cmp(&key)) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, value)),
            Err(i) => {
                let mut v = std::mem::take(&mut self.0).into_vec();
                v.insert(i, (key, value));
                self.0 = v.into_boxed_slice();
                None
            }
        }
    }
}

impl From<BTreeMap<String, String>> for Details {
    fn from(m: BTreeMap<String, String>) -> Self {
        Self(m.into_iter().collect())
    }
}

impl From<&Details> for BTreeMap<String, String> {
    fn from(d: &Details) -> Self {
        d.0.iter().cloned().collect()
    }
}

impl<const N: usize> From<[(String, String); N]> for Details {
    fn from(pairs: [(String, String); N]) -> Self {
        pairs.into_iter().collect()
    }
}

/// Later pairs win over earlier ones with the same key, as when building a map.
impl FromIterator<(String, String)> for Details {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(it: I) -> Self {
        BTreeMap::from_iter(it).into()
    }
}

impl<'a> IntoIterator for &'a Details {
    type Item = (&'a String, &'a String);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (String, String)>,
        fn(&'a (String, String)) -> (&'a String, &'a String),
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(k, v)| (k, v))
    }
}

impl fmt::Debug for Details {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl Serialize for Details {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for Details {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Through the map it replaces: the same keys, order and duplicate handling.
        BTreeMap::<String, String>::deserialize(d).map(Details::from)
    }
}

/// A client's request (R1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lead {
    /// The platform's lead id: the idempotency key.
    pub id: LeadId,
    pub category: CategoryId,
    pub zone: ZoneId,
    #[serde(default)]
    pub location: Option<GeoPoint>,
    #[serde(default)]
    pub description: String,
    /// Answers to the category's form.
    #[serde(default)]
    pub details: Details,
    /// Attributes pros may refuse (e.g. "dropshipper"), R4.
    #[serde(default)]
    pub attributes: Vec<String>,
    pub client: Client,
    /// Pros the client chose (R5).
    #[serde(default)]
    pub direct: Vec<ProId>,
    #[serde(default)]
    pub kind: JobKind,
    /// When the client created the request; lifetime counts from here (R7).
    pub created_at: Millis,
}

/// Most attributes on a lead, and most refused attributes on a pro (R4); also on a
/// `candidates` query.
pub const MAX_ATTRIBUTES: usize = 64;

/// Longest attribute, in bytes (R4).
pub const MAX_ATTRIBUTE_BYTES: usize = 128;

/// A list of attributes (a lead's, a pro's refused ones, a `candidates` query's): at
/// most [`MAX_ATTRIBUTES`] of 1..=[`MAX_ATTRIBUTE_BYTES`] bytes each; else
/// `invalid_field` naming `field`.
pub fn validate_attributes(attributes: &[String], field: &str) -> Result<(), FieldError> {
    if attributes.len() > MAX_ATTRIBUTES
        || attributes.iter().any(|a| a.is_empty() || a.len() > MAX_ATTRIBUTE_BYTES)
    {
        return Err(field_err(
            field,
            format!("at most {MAX_ATTRIBUTES} attributes of 1..={MAX_ATTRIBUTE_BYTES} bytes each"),
        ));
    }
    Ok(())
}

/// Longest free text accepted in a lead.
pub const MAX_TEXT: usize = 16 * 1024;

/// Most answers in a lead's `details`.
pub const MAX_DETAILS: usize = 256;

/// Most direct targets of a lead (R5).
pub const MAX_DIRECT: usize = 64;

/// Longest client name, phone number and address of a lead, in bytes: each is copied
/// into the lead's every offer view once revealed (R8), and kept with the lead.
pub const MAX_CLIENT_NAME_BYTES: usize = 256;
pub const MAX_CLIENT_PHONE_BYTES: usize = 64;
pub const MAX_CLIENT_ADDRESS_BYTES: usize = 1024;

impl Lead {
    pub fn validate(&self) -> Result<(), FieldError> {
        self.id.validate("lead.id")?;
        self.category.validate("lead.category")?;
        self.zone.validate("lead.zone")?;
        self.client.validate()?;
        if let Some(l) = &self.location {
            l.validate("lead.location")?;
        }
        if self.description.len() > MAX_TEXT {
            return Err(field_err("lead.description", "longer than 16 KiB"));
        }
        if self.details.len() > MAX_DETAILS || self.details.iter().any(|(k, v)| k.len() + v.len() > MAX_TEXT)
        {
            return Err(field_err("lead.details", "at most 256 answers of at most 16 KiB each"));
        }
        validate_attributes(&self.attributes, "lead.attributes")?;
        if self.direct.len() > MAX_DIRECT {
            return Err(field_err("lead.direct", "at most 64 direct targets"));
        }
        for (i, p) in self.direct.iter().enumerate() {
            if p.validate("lead.direct").is_err() {
                return Err(field_err(format!("lead.direct[{i}]"), "must be a non-empty pro id"));
            }
            if self.direct[..i].contains(p) {
                return Err(field_err(format!("lead.direct[{i}]"), "duplicate direct target"));
            }
        }
        if self.kind != JobKind::Match && self.direct.is_empty() {
            return Err(field_err("lead.direct", "direct and contact jobs need at least one target pro"));
        }
        if self.kind == JobKind::Contact && self.direct.len() != 1 {
            return Err(field_err("lead.direct", "a contact job is written to exactly one pro"));
        }
        if self.created_at <= 0 || self.created_at > MAX_TIME_MS {
            return Err(field_err(
                "lead.created_at",
                format!("must be a positive Unix time in ms, at most {MAX_TIME_MS} (9999-12-31)"),
            ));
        }
        Ok(())
    }

    /// A stable fingerprint of the payload, to tell a republish (same id, same payload:
    /// idempotent) from a conflict (same id, different payload).
    ///
    /// Every field is fed to [`StableHasher`] with explicit tags and lengths, so the
    /// value depends only on the payload: the same across runs, platforms, compiler and
    /// dependency versions (fingerprints are stored in the WAL and in snapshots). The
    /// destructuring below makes a new field of `Lead` a compile error here until it is
    /// hashed too.
    pub fn fingerprint(&self) -> u64 {
        let Lead {
            id,
            category,
            zone,
            location,
            description,
            details,
            attributes,
            client,
            direct,
            kind,
            created_at,
        } = self;
        let Client { id: client_id, name, phone, phone_verified, contact, address, pro_id } = client;
        let mut h = StableHasher::new();
        h.str(id.as_str());
        h.str(category.as_str());
        h.str(zone.as_str());
        match location {
            None => h.word(0),
            Some(p) => {
                h.word(1);
                h.word(p.lat.to_bits());
                h.word(p.lon.to_bits());
            }
        }
        h.str(description);
        h.word(details.len() as u64);
        for (k, v) in details {
            h.str(k);
            h.str(v);
        }
        h.word(attributes.len() as u64);
        for a in attributes {
            h.str(a);
        }
        h.str(client_id.as_str());
        h.str(name);
        h.str(phone);
        h.word(u64::from(*phone_verified));
        h.word(u64::from(contact.call) | u64::from(contact.whatsapp) << 1 | u64::from(contact.chat) << 2);
        h.opt_str(address.as_deref());
        h.opt_str(pro_id.as_ref().map(|p| p.as_str()));
        h.word(direct.len() as u64);
        for p in direct {
            h.str(p.as_str());
        }
        h.word(match kind {
            JobKind::Match => 0,
            JobKind::Direct => 1,
            JobKind::Contact => 2,
        });
        h.word(*created_at as u64);
        h.finish()
    }

    /// The fingerprint of releases before [`Self::fingerprint`] hashed fields: FNV-1a
    /// over the MessagePack encoding of the lead. Only compared on a republish whose
    /// fingerprint does not match, so that a lead logged by an older release is still
    /// recognised as the same payload.
    pub fn legacy_fingerprint(&self) -> u64 {
        let bytes = rmp_serde::to_vec(self).expect("a lead always serialises: plain data");
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h
    }

    /// Whether `fingerprint` (as stored when the lead was first published) is this
    /// lead's, by either the current or the legacy function.
    pub fn has_fingerprint(&self, fingerprint: u64, current: u64) -> bool {
        fingerprint == current || fingerprint == self.legacy_fingerprint()
    }
}

/// A small hash with a fixed definition, for fingerprints that are stored: the FxHash
/// step (rotate, xor, multiply) over little-endian 64-bit words, finished with the
/// MurmurHash3 avalanche so that every input bit reaches every output bit. Defined
/// here rather than taken from a crate so that its output never changes under us.
/// Not collision resistant against an adversary; it tells a changed payload from a
/// republish.
pub struct StableHasher(u64);

impl StableHasher {
    const K: u64 = 0x517c_c1b7_2722_0a95;

    pub fn new() -> Self {
        Self(0x2b99_2ddf_a232_49d6)
    }

    pub fn word(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(Self::K);
    }

    /// Length first, so that `("ab", "c")` and `("a", "bc")` differ.
    pub fn bytes(&mut self, b: &[u8]) {
        self.word(b.len() as u64);
        let mut chunks = b.chunks_exact(8);
        for c in &mut chunks {
            self.word(u64::from_le_bytes(c.try_into().expect("chunks_exact(8) yields 8 bytes")));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut last = [0u8; 8];
            last[..rest.len()].copy_from_slice(rest);
            self.word(u64::from_le_bytes(last));
        }
    }

    pub fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }

    pub fn opt_str(&mut self, s: Option<&str>) {
        match s {
            None => self.word(0),
            Some(s) => {
                self.word(1);
                self.str(s);
            }
        }
    }

    pub fn finish(&self) -> u64 {
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }
}

impl Default for StableHasher {
    fn default() -> Self {
        Self::new()
    }
}

// ---------------------------------------------------------------------------------
// Offers
// ---------------------------------------------------------------------------------

/// How a pro got an offer (also the metrics' `kind` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OfferKind {
    /// The client chose this pro (R5).
    Direct,
    /// Released to the rotation after the head start (R5, shared leads).
    Generic,
    /// Picked by the matching (R13 `match`).
    Match,
    /// Bought automatically from an auto-buy budget (R21).
    AutoBuy,
    /// A prospect's message, notification channel only (R13 `contact`).
    Contact,
}

impl OfferKind {
    /// Takes one of the seats R6 leaves beside the direct targets
    /// (`max_responders - direct targets`): every offer the rotation made, whatever
    /// the mode (a shared lead's generic release, a matched lead's partners, an
    /// auto-buy lead's buyers). Direct offers have seats of their own; a contact is
    /// not a lead's offer.
    pub fn takes_a_generic_seat(self) -> bool {
        matches!(self, Self::Generic | Self::Match | Self::AutoBuy)
    }
}

/// Offer statuses (R17).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OfferStatus {
    New,
    Opened,
    Declined,
    Expired,
    /// The pro replied; waiting for the client.
    Replied,
    /// The client wrote back; waiting for the pro.
    AwaitingResponse,
    /// The lead closed or filled before this pro acted.
    Inactive,
    Completed,
}

impl OfferStatus {
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Declined | Self::Expired | Self::Completed | Self::Inactive)
    }

    pub fn is_open(self) -> bool {
        matches!(self, Self::New | Self::Opened)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::New => "new",
            Self::Opened => "opened",
            Self::Declined => "declined",
            Self::Expired => "expired",
            Self::Replied => "replied",
            Self::AwaitingResponse => "awaiting_response",
            Self::Inactive => "inactive",
            Self::Completed => "completed",
        }
    }
}

/// What a pro sees of the client: nothing personal before responding (R8).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevealedContact {
    pub name: String,
    /// Only if the client chose call or WhatsApp.
    pub phone: Option<String>,
    pub address: Option<String>,
    /// The marketplace chat is always available.
    pub chat: bool,
}

impl RevealedContact {
    pub fn for_client(c: &Client) -> Self {
        Self {
            name: c.name.clone(),
            phone: (c.contact.call || c.contact.whatsapp).then(|| c.phone.clone()),
            address: c.address.clone(),
            chat: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn r4_r16_remembered_local_time_equals_a_fresh_conversion_across_zones_and_dst() {
        let zones: [Tz; 4] =
            [chrono_tz::Europe::Rome, chrono_tz::UTC, chrono_tz::America::New_York, chrono_tz::Asia::Kolkata];
        // Around the Rome DST change of 25 October 2026 (01:00 UTC), every 7 minutes
        // and 13 seconds for two days, zones interleaved and repeated so the remembered
        // conversion is both hit and missed.
        let start = 1_792_800_000_000i64; // 2026-10-24 00:00 UTC
        let mut checked = 0;
        for k in 0..400i64 {
            let now = start + k * 433_000;
            for tz in zones.iter().chain(zones.iter().rev()) {
                let local = tz.timestamp_millis_opt(now).single().unwrap();
                let want =
                    (Weekday::from_chrono(local.weekday()), (local.hour() * 60 + local.minute()) as u16);
                assert_eq!(local_day_minute(*tz, now), Some(want), "{tz} at {now}");
                assert_eq!(local_day_minute(*tz, now), Some(want), "{tz} at {now}, remembered");
                checked += 1;
            }
        }
        assert_eq!(checked, 3_200);
        // Rome: 02:30 local on Sunday before the change (00:30 UTC, CEST), 02:30 local
        // after it (01:30 UTC, CET): the same minute twice, an hour apart.
        let before = local_day_minute(chrono_tz::Europe::Rome, 1_792_888_200_000);
        let after = local_day_minute(chrono_tz::Europe::Rome, 1_792_891_800_000);
        assert_eq!(before, Some((Weekday::Sun, 150)));
        assert_eq!(after, Some((Weekday::Sun, 150)));
    }

    #[test]
    fn r4_within_km_answers_like_the_haversine_distance() {
        // Deterministic pseudo-random points around Bologna, across the antimeridian,
        // near a pole, and radii on both sides of each distance.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 11) as f64 / (1u64 << 53) as f64
        };
        let centres = [
            GeoPoint { lat: 44.4949, lon: 11.3426 },
            GeoPoint { lat: 0.0, lon: 179.9 },
            GeoPoint { lat: 89.5, lon: -40.0 },
        ];
        let mut fast = 0;
        for c in centres {
            for _ in 0..2_000 {
                let spread = [0.01, 0.5, 5.0][(next() * 3.0) as usize % 3];
                let p = GeoPoint {
                    lat: (c.lat + (next() - 0.5) * spread).clamp(-90.0, 90.0),
                    lon: c.lon + (next() - 0.5) * spread,
                };
                let d = c.distance_km(&p);
                for r in [d * 0.5, d * (1.0 - 1e-12), d, d * (1.0 + 1e-12), d * 1.5, d * 3.0, 50.0] {
                    assert_eq!(c.within_km(&p, r), d <= r, "{c:?} {p:?} r={r} d={d}");
                }
                let bound = GeoPoint::R_KM * ((p.lat - c.lat).abs() + (p.lon - c.lon).abs()).to_radians();
                if bound <= 50.0 * (1.0 - 1e-9) {
                    fast += 1;
                }
            }
        }
        assert!(fast > 1_000, "the shortcut is taken for nearby points ({fast})");
    }

    #[test]
    fn r4_great_circle_distance_matches_known_cities() {
        let bologna = GeoPoint { lat: 44.4949, lon: 11.3426 };
        let milan = GeoPoint { lat: 45.4642, lon: 9.19 };
        let d = bologna.distance_km(&milan);
        assert!((199.0..203.0).contains(&d), "Bologna-Milan is ~201 km, got {d}");
        assert_eq!(bologna.distance_km(&bologna), 0.0);
    }

    #[test]
    fn malformed_location_is_refused() {
        assert!(GeoPoint { lat: 91.0, lon: 0.0 }.validate("lead.location").is_err());
        assert!(GeoPoint { lat: f64::NAN, lon: 0.0 }.validate("lead.location").is_err());
        let e = GeoPoint { lat: 0.0, lon: 200.0 }.validate("lead.location").unwrap_err();
        assert_eq!(e.field, "lead.location.lon");
    }

    #[test]
    fn r25_night_window_is_two_intervals_around_midnight() {
        let w = WeeklyWindows {
            time_zone: "Europe/Rome".into(),
            intervals: vec![
                WeeklyInterval { day: Weekday::Mon, start_min: 22 * 60, end_min: 1440 },
                WeeklyInterval { day: Weekday::Tue, start_min: 0, end_min: 6 * 60 },
            ],
        };
        w.validate("w").unwrap();
        // 2026-11-23 is a Monday; Rome is UTC+1 in November.
        let at = |d: u32, h: u32, m: u32| {
            chrono::Utc.with_ymd_and_hms(2026, 11, d, h, m, 0).unwrap().timestamp_millis()
        };
        assert!(w.contains(at(23, 21, 30)), "Mon 22:30 local");
        assert!(w.contains(at(23, 23, 59)), "Tue 00:59 local");
        assert!(w.contains(at(24, 4, 59)), "Tue 05:59 local");
        assert!(!w.contains(at(24, 5, 0)), "Tue 06:00 local is outside");
        assert!(!w.contains(at(23, 20, 59)), "Mon 21:59 local is outside");
    }

    /// R4: a window open across the hour the clocks go back (Sunday 01:00-02:30 in
    /// Rome, 2026-10-25) closes at 02:30 summer time and opens again at 03:00 summer
    /// time = 02:00 winter time: a pro parked at 02:40 is back then, not a week later.
    #[test]
    fn r4_a_window_reopened_by_the_clocks_going_back_is_the_next_opening() {
        let w = WeeklyWindows {
            time_zone: "Europe/Rome".into(),
            intervals: vec![WeeklyInterval { day: Weekday::Sun, start_min: 60, end_min: 150 }],
        };
        let tz = w.validate("w").unwrap();
        let utc = |h, m| chrono::Utc.with_ymd_and_hms(2026, 10, 25, h, m, 0).unwrap().timestamp_millis();
        // 02:40 summer time (00:40 UTC): closed since 02:30.
        assert!(!w.contains_in(tz, utc(0, 40)));
        assert!(w.contains_in(tz, utc(1, 0)), "02:00 winter time is inside the window");
        assert_eq!(w.next_open_in(tz, utc(0, 40)), Some(utc(1, 0)));
        assert_eq!(w.next_open_in(tz, utc(0, 59)), Some(utc(1, 0)));
        // Once the repeated hour is over, the next opening is the next Sunday's.
        let next_week = chrono::Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap().timestamp_millis();
        assert_eq!(w.next_open_in(tz, utc(2, 0)), Some(next_week), "01:00 winter time, 2026-11-01");
    }

    #[test]
    fn r4_next_opening_is_never_later_than_the_true_one_across_days_weeks_and_dst() {
        use crate::ids::MINUTE_MS;
        let iv = |day, start_min, end_min| WeeklyInterval { day, start_min, end_min };
        let cases = [
            // Across midnight, in a zone that jumps forward on 2026-03-29 (02:00 -> 03:00)
            // and back on 2026-10-25 (03:00 -> 02:00); Sunday opens inside the jump.
            WeeklyWindows {
                time_zone: "Europe/Rome".into(),
                intervals: vec![
                    iv(Weekday::Mon, 22 * 60, 1440),
                    iv(Weekday::Tue, 0, 6 * 60),
                    iv(Weekday::Sun, 2 * 60 + 30, 4 * 60),
                ],
            },
            // Opens inside the hour that occurs twice when the clocks go back.
            WeeklyWindows {
                time_zone: "Europe/Rome".into(),
                intervals: vec![iv(Weekday::Sun, 2 * 60, 2 * 60 + 5), iv(Weekday::Thu, 0, 30)],
            },
            // Open across the jump back (01:00-02:30): closes at 02:30 summer time and
            // opens again when the clocks go back to 02:00, not at an interval start.
            WeeklyWindows { time_zone: "Europe/Rome".into(), intervals: vec![iv(Weekday::Sun, 60, 150)] },
            // One short window a week: the next opening is up to seven days away.
            WeeklyWindows {
                time_zone: "America/New_York".into(),
                intervals: vec![iv(Weekday::Wed, 600, 615)],
            },
        ];
        let utc = |y, mo, d| chrono::Utc.with_ymd_and_hms(y, mo, d, 0, 0, 0).unwrap().timestamp_millis();
        for w in &cases {
            let tz = w.validate("w").unwrap();
            for from in [utc(2026, 3, 25), utc(2026, 10, 21), utc(2026, 11, 20)] {
                // Instants at odd offsets over two weeks, seconds included.
                for k in 0..300i64 {
                    let now = from + k * (67 * MINUTE_MS + 1_234);
                    let t = w.next_open_in(tz, now).expect("a weekly window opens within a week");
                    assert!(t >= now, "{}: opening before now", w.time_zone);
                    // Open then, or an early wake: a window due in a skipped hour
                    // answers the instant the clocks jumped.
                    let offset = |at: Millis| {
                        use chrono::Offset;
                        tz.offset_from_utc_datetime(
                            &chrono::DateTime::from_timestamp_millis(at).unwrap().naive_utc(),
                        )
                        .fix()
                    };
                    assert!(
                        w.contains_in(tz, t) || offset(t - MINUTE_MS) != offset(t),
                        "{}: not open at the opening {t} (now {now})",
                        w.time_zone
                    );
                    // No minute between now and the answer was open: never late.
                    let mut m = now - now.rem_euclid(MINUTE_MS) + MINUTE_MS;
                    while m < t {
                        assert!(
                            !w.contains_in(tz, m),
                            "{}: open at {m}, before the answer {t} (now {now})",
                            w.time_zone
                        );
                        m += MINUTE_MS;
                    }
                    if w.contains_in(tz, now) {
                        assert_eq!(t, now);
                    }
                }
            }
        }
    }

    #[test]
    fn r4_an_inverted_schedule_interval_is_refused() {
        let w = WeeklyWindows {
            time_zone: "UTC".into(),
            intervals: vec![WeeklyInterval { day: Weekday::Fri, start_min: 600, end_min: 300 }],
        };
        let e = w.validate("pro.availability.schedule").unwrap_err();
        assert_eq!(e.field, "pro.availability.schedule.intervals[0]");
    }

    #[test]
    fn r8_phone_revealed_only_for_call_or_whatsapp() {
        let mut c = Client {
            id: ClientId::new("c"),
            name: "Anna Rossi".into(),
            phone: "+39 333".into(),
            phone_verified: true,
            contact: ContactPrefs { call: false, whatsapp: false, chat: true },
            address: None,
            pro_id: None,
        };
        assert_eq!(RevealedContact::for_client(&c).phone, None);
        c.contact.whatsapp = true;
        assert_eq!(RevealedContact::for_client(&c).phone.as_deref(), Some("+39 333"));
    }
}

#[cfg(test)]
mod fingerprint_tests {
    use super::*;

    fn lead() -> Lead {
        Lead {
            id: LeadId::new("L1"),
            category: CategoryId::new("painting"),
            zone: ZoneId::new("bologna"),
            location: Some(GeoPoint { lat: 44.5, lon: 11.35 }),
            description: "Tinteggiatura di un appartamento".into(),
            details: Details::from([("rooms".into(), "3".into())]),
            attributes: vec![],
            client: Client {
                id: ClientId::new("c1"),
                name: "Anna Rossi".into(),
                phone: "+39 333".into(),
                phone_verified: true,
                contact: ContactPrefs { call: true, whatsapp: false, chat: true },
                address: None,
                pro_id: None,
            },
            direct: vec![],
            kind: JobKind::Match,
            created_at: 1_795_424_400_000,
        }
    }

    #[test]
    fn r1_fingerprint_is_fixed_across_runs_and_versions() {
        // Stored in the WAL and snapshots: a change to this value breaks idempotency
        // of leads published before an upgrade.
        assert_eq!(lead().fingerprint(), 0x3603_8410_e559_26c7);
    }

    #[test]
    fn r1_fingerprint_tells_every_field_apart() {
        let base = lead().fingerprint();
        let mut l = lead();
        l.description.push('.');
        assert_ne!(l.fingerprint(), base);
        let mut l = lead();
        l.client.contact.whatsapp = true;
        assert_ne!(l.fingerprint(), base);
        let mut l = lead();
        l.details.insert("room".into(), "s3".into());
        assert_ne!(l.fingerprint(), base);
        let mut l = lead();
        l.client.address = Some(String::new());
        assert_ne!(l.fingerprint(), base);
    }

    #[test]
    fn r1_details_read_and_write_exactly_as_the_map_they_replace() {
        let pairs = [("rooms", "3"), ("floor", "2"), ("area_m2", "80"), ("rooms", "4")];
        let map: BTreeMap<String, String> =
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let details: Details = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        assert_eq!(details.len(), 3, "a key given twice keeps its last answer");
        assert_eq!(details.get("rooms").map(String::as_str), Some("4"));
        assert_eq!(details.get("garden"), None);
        assert!(details.iter().eq(map.iter()));
        assert_eq!(BTreeMap::from(&details), map);
        assert_eq!(rmp_serde::to_vec(&details).unwrap(), rmp_serde::to_vec(&map).unwrap());
        assert_eq!(rmp_serde::to_vec_named(&details).unwrap(), rmp_serde::to_vec_named(&map).unwrap());
        assert_eq!(serde_json::to_string(&details).unwrap(), serde_json::to_string(&map).unwrap());
        let json = r#"{"rooms":"3","floor":"2","rooms":"4"}"#;
        let want: BTreeMap<String, String> = serde_json::from_str(json).unwrap();
        assert_eq!(BTreeMap::from(&serde_json::from_str::<Details>(json).unwrap()), want);
        let back: Details = rmp_serde::from_slice(&rmp_serde::to_vec(&map).unwrap()).unwrap();
        assert_eq!(back, details);
        let mut d = Details::default();
        assert_eq!(d.insert("b".into(), "1".into()), None);
        assert_eq!(d.insert("a".into(), "2".into()), None);
        assert_eq!(d.insert("b".into(), "3".into()), Some("1".into()));
        assert!(d.keys().eq(["a", "b"].iter()));
    }

    #[test]
    fn r1_leads_fingerprinted_by_older_releases_are_still_recognised() {
        let l = lead();
        assert!(l.has_fingerprint(l.legacy_fingerprint(), l.fingerprint()));
        assert!(!l.has_fingerprint(l.legacy_fingerprint() ^ 1, l.fingerprint()));
    }
}
