//! Bad input is refused with the specific error (`Reject::code()` and the field name) and
//! leaves the shard exactly as it was (compared with a clone taken before).

mod common;

use common::*;
use rota::core::*;
use rota::ids::{LeadId, ProId};

/// A shard with two pros and one open lead offered to both.
fn setup() -> Harness {
    let mut h = Harness::new(shared_policy());
    h.add_pro(pro("anna"));
    h.add_pro(pro("bruno"));
    h.publish(T0, lead("L1", T0));
    h
}

/// Decides `cmd`, requires the refusal `code` (and `field` for `invalid_field`), and
/// checks the shard did not change.
fn refused(h: &mut Harness, cmd: Command, code: &str, field: Option<&str>) {
    let before = h.shard.clone();
    let e = h.err(T0 + M, cmd.clone());
    assert_eq!(e.code(), code, "{cmd:?}: {e}");
    if let Some(field) = field {
        match &e {
            Reject::InvalidField(f) => assert_eq!(f.field, field, "{cmd:?}"),
            other => panic!("{cmd:?}: expected invalid field {field}, got {other:?}"),
        }
    }
    assert!(h.shard == before, "{cmd:?} was refused but changed the shard");
}

#[test]
fn unknown_pro_is_refused() {
    let mut h = setup();
    refused(&mut h, Command::RemovePro { pro: pid("zeno") }, "unknown_pro", None);
    refused(
        &mut h,
        Command::SetAvailability { pro: pid("zeno"), availability: Availability::default() },
        "unknown_pro",
        None,
    );
    refused(
        &mut h,
        Command::Offer { lead: lid("L1"), pro: pid("zeno"), action: OfferAction::Respond },
        "not_offered",
        None,
    );
}

#[test]
fn unknown_lead_is_refused() {
    let mut h = setup();
    refused(
        &mut h,
        Command::Offer { lead: lid("L404"), pro: pid("anna"), action: OfferAction::Open },
        "unknown_lead",
        None,
    );
    assert_eq!(h.shard.explain(&lid("L404")).unwrap_err().code(), "unknown_lead");
    assert_eq!(h.shard.offer_view(&lid("L404"), &pid("anna")).unwrap_err().code(), "unknown_lead");
}

#[test]
fn malformed_location_is_refused_with_the_field() {
    let mut h = setup();
    let mut l = lead("L2", T0);
    l.location = Some(GeoPoint { lat: 91.0, lon: 11.0 });
    refused(
        &mut h,
        Command::PublishLead { lead: l.clone().into() },
        "invalid_field",
        Some("lead.location.lat"),
    );
    l.location = Some(GeoPoint { lat: 44.0, lon: f64::NAN });
    refused(&mut h, Command::PublishLead { lead: l.into() }, "invalid_field", Some("lead.location.lon"));
    let mut p = pro("carla");
    p.base = Some(GeoPoint { lat: 0.0, lon: 181.0 });
    refused(&mut h, Command::UpsertPro { pro: p }, "invalid_field", Some("pro.base.lon"));
}

#[test]
fn r1_empty_lead_id_is_refused() {
    let mut h = setup();
    refused(&mut h, Command::PublishLead { lead: lead("", T0).into() }, "invalid_field", Some("lead.id"));
    let mut l = lead("L3", T0);
    l.direct = vec![ProId::new("")];
    refused(&mut h, Command::PublishLead { lead: l.into() }, "invalid_field", Some("lead.direct[0]"));
    let mut l = lead("L4", T0);
    l.direct = vec![pid("anna"), pid("anna")];
    refused(&mut h, Command::PublishLead { lead: l.into() }, "invalid_field", Some("lead.direct[1]"));
    refused(
        &mut h,
        Command::PublishLead { lead: lead("L5", 0).into() },
        "invalid_field",
        Some("lead.created_at"),
    );
}

#[test]
fn r4_negative_or_missing_radius_is_refused() {
    let mut h = setup();
    let mut p = pro("carla");
    p.base = Some(GeoPoint { lat: 44.49, lon: 11.34 });
    p.radius_km = Some(-5.0);
    refused(&mut h, Command::UpsertPro { pro: p.clone() }, "invalid_field", Some("pro.radius_km"));
    p.radius_km = Some(f64::INFINITY);
    refused(&mut h, Command::UpsertPro { pro: p.clone() }, "invalid_field", Some("pro.radius_km"));
    p.base = None;
    p.radius_km = Some(10.0);
    refused(&mut h, Command::UpsertPro { pro: p }, "invalid_field", Some("pro.base"));
}

#[test]
fn r4_inverted_schedule_is_refused() {
    let mut h = setup();
    let inverted = WeeklyWindows {
        time_zone: "Europe/Rome".into(),
        intervals: vec![WeeklyInterval { day: Weekday::Mon, start_min: 22 * 60, end_min: 6 * 60 }],
    };
    let availability = Availability { schedule: Some(inverted.clone()), ..Default::default() };
    refused(
        &mut h,
        Command::SetAvailability { pro: pid("anna"), availability: availability.clone() },
        "invalid_field",
        Some("availability.schedule.intervals[0]"),
    );
    let mut p = pro("carla");
    p.availability = availability;
    refused(
        &mut h,
        Command::UpsertPro { pro: p },
        "invalid_field",
        Some("pro.availability.schedule.intervals[0]"),
    );
    let bad_zone = WeeklyWindows { time_zone: "Mars/Olympus".into(), intervals: vec![] };
    refused(
        &mut h,
        Command::SetAvailability {
            pro: pid("anna"),
            availability: Availability { schedule: Some(bad_zone), ..Default::default() },
        },
        "invalid_field",
        Some("availability.schedule.time_zone"),
    );
}

#[test]
fn pro_or_lead_of_another_shard_is_refused() {
    let mut h = setup();
    let mut p = pro("carla");
    p.zones = vec!["milano".into()];
    refused(&mut h, Command::UpsertPro { pro: p }, "invalid_field", Some("pro.zones"));
    let mut l = lead("L6", T0);
    l.category = "plumbing".into();
    refused(&mut h, Command::PublishLead { lead: l.into() }, "invalid_field", Some("lead.zone"));
}

#[test]
fn r18_bad_notes_are_refused() {
    let mut h = setup();
    let note = |text: String| Command::Offer {
        lead: LeadId::new("L1"),
        pro: pid("anna"),
        action: OfferAction::AddNote { text },
    };
    refused(&mut h, note(String::new()), "invalid_field", Some("text"));
    refused(&mut h, note("x".repeat(5000)), "invalid_field", Some("text"));
}

#[test]
fn unknown_policy_key_is_refused_with_its_name() {
    let e = Policy::from_toml("tenant = \"t\"\nmode = \"shared\"\n[leads]\nhead_start_minutes = 30\n")
        .unwrap_err();
    assert!(matches!(e, PolicyError::Parse(_)), "{e:?}");
    assert!(e.to_string().contains("head_start_minutes"), "{e}");
    let e = Policy::from_toml("tenant = \"t\"\nmode = \"sharded\"\n").unwrap_err();
    assert!(e.to_string().contains("sharded"), "{e}");
}

#[test]
fn invalid_policy_values_name_the_key() {
    let cases = [
        ("mode = \"auto_buy\"\n[money]\ncharge_on = \"response\"", "money.charge_on"),
        ("mode = \"shared\"\n[money]\ncharge_on = \"dispatch\"", "money.charge_on"),
        ("mode = \"shared\"\n[money]\nflat_price_credits = 0", "money.flat_price_credits"),
        ("mode = \"shared\"\n[leads]\nresponse_window_s = -1", "leads.response_window_s"),
        ("mode = \"shared\"\n[ranking]\ndecline_penalty_permille = 1001", "ranking.decline_penalty_permille"),
        ("mode = \"shared\"\n[ranking]\nbase_weight = 500", "ranking.base_weight"),
    ];
    for (body, key) in cases {
        match Policy::from_toml(&format!("tenant = \"t\"\n{body}\n")) {
            Err(PolicyError::Invalid { key: k, .. }) => assert_eq!(k, key, "{body}"),
            other => panic!("{body}: expected invalid {key}, got {other:?}"),
        }
    }
}

#[test]
fn r9_insufficient_credits_changes_nothing() {
    let mut h = setup();
    h.funds.set_credits("anna", 3);
    refused(
        &mut h,
        Command::Offer { lead: LeadId::new("L1"), pro: pid("anna"), action: OfferAction::Respond },
        "insufficient_credits",
        None,
    );
    assert_eq!(h.funds.credits(&pid("anna")), 3);
}

#[test]
fn r4_oversized_attribute_lists_are_refused_with_the_field_named() {
    let mut lead = common::lead("L-attr", 1_764_000_000_000);
    lead.attributes = (0..65).map(|i| format!("a{i}")).collect();
    assert_eq!(lead.validate().unwrap_err().field, "lead.attributes");
    lead.attributes = vec![String::new()];
    assert_eq!(lead.validate().unwrap_err().field, "lead.attributes");
}

/// R3/R4: a profile is bounded where every decision on the pro pays for it: a schedule
/// of at most 168 intervals (one an hour of the week; each is a time conversion under
/// the shard's lock), and at most 1,024 zone and category pairs (each a shard the pro
/// joins, with its own copy of the profile).
#[test]
fn r3_r4_oversized_schedules_and_coverage_are_refused_with_the_field_named() {
    let mut h = setup();
    let hourly = |n: usize| WeeklyWindows {
        time_zone: "Europe/Rome".into(),
        intervals: (0..n)
            .map(|i| WeeklyInterval { day: Weekday::Mon, start_min: (i % 1440) as u16, end_min: 1440 })
            .collect(),
    };
    let availability = |n: usize| Availability { schedule: Some(hourly(n)), ..Default::default() };
    h.ok(T0 + M, Command::SetAvailability { pro: pid("anna"), availability: availability(168) });
    refused(
        &mut h,
        Command::SetAvailability { pro: pid("anna"), availability: availability(169) },
        "invalid_field",
        Some("availability.schedule.intervals"),
    );
    let mut p = pro("carla");
    p.zones.extend((0..32).map(|i| rota::ids::ZoneId::new(format!("z{i}"))));
    p.categories.extend((0..31).map(|i| rota::ids::CategoryId::new(format!("c{i}"))));
    assert_eq!(p.zones.len() * p.categories.len(), 33 * 32);
    refused(&mut h, Command::UpsertPro { pro: p.clone() }, "invalid_field", Some("pro.zones"));
    p.zones.truncate(32);
    h.ok(T0 + M, Command::UpsertPro { pro: p });
}

/// R1: a lead's creation time far ahead of the daemon's clock (seconds or microseconds
/// where milliseconds are meant) is refused naming the field, and changes nothing: its
/// lifetime, head start and duplicate window count from it, so it would never close.
/// A platform clock a few minutes ahead is accepted.
#[test]
fn r1_a_creation_time_far_ahead_of_the_clock_is_refused_with_the_field_named() {
    let mut h = setup();
    let now = T0 + M;
    for ahead in [MAX_CREATED_AHEAD_MS + 1, 10 * 365 * rota::ids::DAY_MS, now * 999] {
        let l = lead("L-future", now + ahead);
        refused(&mut h, Command::PublishLead { lead: l.into() }, "invalid_field", Some("lead.created_at"));
    }
    let l = lead("L-far", i64::MAX);
    refused(&mut h, Command::PublishLead { lead: l.into() }, "invalid_field", Some("lead.created_at"));
    h.publish(now, lead("L-skewed", now + MAX_CREATED_AHEAD_MS));
}

/// R16, R24: pauses and vacations end at a real time: a "for ever" written as
/// `i64::MAX` (or a negative time) is refused naming the field, in the pro's
/// availability and in an auto-buy config.
#[test]
fn r16_r24_pause_and_vacation_ends_past_year_9999_are_refused_with_the_field_named() {
    let mut h = setup();
    let refuse = |h: &mut Harness, availability: Availability, field: &str| {
        refused(h, Command::SetAvailability { pro: pid("anna"), availability }, "invalid_field", Some(field));
    };
    refuse(
        &mut h,
        Availability { paused_until: Some(i64::MAX), ..Default::default() },
        "availability.paused_until",
    );
    refuse(
        &mut h,
        Availability { vacation: Some((T0, i64::MAX)), ..Default::default() },
        "availability.vacation",
    );
    refuse(&mut h, Availability { vacation: Some((-5, T0)), ..Default::default() }, "availability.vacation");
    h.ok(
        T0 + M,
        Command::SetAvailability {
            pro: pid("anna"),
            availability: Availability { paused_until: Some(MAX_TIME_MS), ..Default::default() },
        },
    );
    let mut p = pro("anna");
    p.autobuy = vec![AutoBuyConfig { paused_until: Some(i64::MAX), ..autobuy("week", 100) }];
    refused(&mut h, Command::UpsertPro { pro: p }, "invalid_field", Some("pro.autobuy[0].paused_until"));
}

/// R19: a pro's auto-buy configs are bounded like its other lists (the profile is
/// copied into every shard it covers and logged with each): at most 64 configs, 1,024
/// zones and 256 categories each, 4,096 entries over all, every id a valid id.
#[test]
fn r19_oversized_or_malformed_autobuy_lists_are_refused_with_the_field_named() {
    let mut h = setup();
    let with = |configs: Vec<AutoBuyConfig>| {
        let mut p = pro("anna");
        p.autobuy = configs;
        Command::UpsertPro { pro: p }
    };
    let many = |n: usize| (0..n).map(|i| autobuy(&format!("c{i}"), 100)).collect::<Vec<_>>();
    refused(&mut h, with(many(65)), "invalid_field", Some("pro.autobuy"));
    h.ok(T0 + M, with(many(64)));
    let zones = |n: usize| (0..n).map(|i| rota::ids::ZoneId::new(format!("z{i}"))).collect::<Vec<_>>();
    let wide = AutoBuyConfig { zones: zones(1025), ..autobuy("wide", 100) };
    refused(&mut h, with(vec![wide]), "invalid_field", Some("pro.autobuy[0].zones"));
    let cats = (0..257).map(|i| rota::ids::CategoryId::new(format!("c{i}"))).collect();
    let broad = AutoBuyConfig { categories: cats, ..autobuy("broad", 100) };
    refused(&mut h, with(vec![broad]), "invalid_field", Some("pro.autobuy[0].categories"));
    let blank = AutoBuyConfig {
        zones: vec![rota::ids::ZoneId::new("bologna"), rota::ids::ZoneId::new("")],
        ..autobuy("blank", 100)
    };
    refused(&mut h, with(vec![autobuy("ok", 100), blank]), "invalid_field", Some("pro.autobuy[1].zones[1]"));
    let five: Vec<_> =
        (0..5).map(|i| AutoBuyConfig { zones: zones(1000), ..autobuy(&format!("c{i}"), 100) }).collect();
    refused(&mut h, with(five), "invalid_field", Some("pro.autobuy"));
}

/// R22, R24: a profile logged before times were bounded, with an auto-buy config
/// paused "for ever" (`i64::MAX`), parks the pro until that time, not as if its budget
/// were spent: a budget-parked pro is retried when budget comes back, and would then
/// buy the leads released while its config was paused.
#[test]
fn r22_r24_an_old_profile_paused_until_i64_max_is_not_parked_for_budget_nor_retried() {
    let mut h = Harness::new(autobuy_policy(2));
    let buying = |id: &str| {
        let mut p = pro(id);
        p.autobuy = vec![autobuy("week", 1_000)];
        p
    };
    h.add_pro(buying("anna"));
    let mut paused = buying("bruno");
    paused.autobuy[0].paused_until = Some(i64::MAX);
    // As replay applies it: the profile was accepted by an older release.
    apply_checked(
        &mut h.shard,
        &Event::ProUpserted { pro: std::sync::Arc::new(paused), at: T0, reuse_slot: true },
    );
    let d = h.publish(T0 + M, lead("L1", T0 + M));
    assert_eq!(offered(&d), [("anna".to_string(), OfferKind::AutoBuy)], "a group left short");
    assert_eq!(h.shard.budget_parked_pros(), 0, "bruno is paused, not out of budget");

    h.ok(T0 + 2 * M, Command::UpsertPro { pro: buying("bruno") });
    let d = h.ok(T0 + 3 * M, Command::BudgetAvailable { pros: vec![pid("bruno")] });
    assert!(offered(&d).is_empty(), "bruno bought a lead released while it was paused: {d:?}");
}

/// R1, R8: a lead's client is bounded like its other text (its name, phone and address
/// are kept with the lead and copied into the offer views once revealed): a name of at
/// most 256 bytes, a phone of at most 64, an address of at most 1,024. One byte more is
/// refused naming the field; the bound itself is accepted.
#[test]
fn r1_r8_a_clients_name_phone_and_address_are_bounded_with_the_field_named() {
    let mut h = setup();
    let with = |id: &str, name: usize, phone: usize, address: usize| {
        let mut l = lead(id, T0);
        l.client.name = "n".repeat(name);
        l.client.phone = "1".repeat(phone);
        l.client.address = Some("a".repeat(address));
        Command::PublishLead { lead: l.into() }
    };
    let (name, phone, address) = (MAX_CLIENT_NAME_BYTES, MAX_CLIENT_PHONE_BYTES, MAX_CLIENT_ADDRESS_BYTES);
    assert_eq!((name, phone, address), (256, 64, 1024));
    refused(&mut h, with("L7", name + 1, phone, address), "invalid_field", Some("lead.client.name"));
    refused(&mut h, with("L7", name, phone + 1, address), "invalid_field", Some("lead.client.phone"));
    refused(&mut h, with("L7", name, phone, address + 1), "invalid_field", Some("lead.client.address"));
    h.ok(T0 + M, with("L7", name, phone, address));
}

/// R3: a pro's lists are named where they are wrong: an entry that is not a valid id by
/// its index (`pro.zones[2]`), a list longer than its bound by the list itself (257
/// categories is `pro.categories`, not `pro.zones`).
#[test]
fn r3_a_pros_bad_list_entry_is_named_by_its_index_and_a_long_list_by_its_name() {
    let mut h = setup();
    let mut p = pro("carla");
    p.zones = vec![ZONE.into(), "ferrara".into(), "".into()];
    refused(&mut h, Command::UpsertPro { pro: p }, "invalid_field", Some("pro.zones[2]"));
    let mut p = pro("carla");
    p.categories.push("x".repeat(129).as_str().into());
    refused(&mut h, Command::UpsertPro { pro: p }, "invalid_field", Some("pro.categories[1]"));
    let mut p = pro("carla");
    p.categories.extend((0..MAX_CATEGORIES_PER_PRO).map(|i| rota::ids::CategoryId::new(format!("c{i}"))));
    refused(&mut h, Command::UpsertPro { pro: p }, "invalid_field", Some("pro.categories"));
    let mut p = pro("carla");
    p.zones.extend((0..MAX_ZONES_PER_PRO).map(|i| rota::ids::ZoneId::new(format!("z{i}"))));
    refused(&mut h, Command::UpsertPro { pro: p }, "invalid_field", Some("pro.zones"));
}

/// R19: an auto-buy config's highest price is 1..=10^12 credits, or left out (any
/// price): 0 would never buy (`active: false` says that), and a price past the bound of
/// every amount is a client's mistake.
#[test]
fn r19_an_auto_buy_configs_highest_price_is_bounded_with_the_field_named() {
    let mut h = setup();
    for bad in [0, 1_000_000_000_001] {
        let mut p = pro("carla");
        p.autobuy = vec![AutoBuyConfig { max_price_credits: Some(bad), ..autobuy("week", 100) }];
        refused(
            &mut h,
            Command::UpsertPro { pro: p },
            "invalid_field",
            Some("pro.autobuy[0].max_price_credits"),
        );
    }
}
