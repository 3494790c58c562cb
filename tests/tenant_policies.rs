//! The example tenant policies under `config/tenants/` are valid, spell out every key
//! with a comment, and carry the numbers of the marketplaces they model.

use rota::core::policy::{ChargeOn, RawPolicy};
use rota::core::{DispatchMode, Policy, PolicyError};
use std::collections::BTreeSet;
use std::path::PathBuf;

fn tenant_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/tenants")
}

fn load(name: &str) -> Policy {
    let text = std::fs::read_to_string(tenant_dir().join(name)).expect("tenant file exists");
    Policy::from_toml(&text).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Dotted key paths of a TOML table (tables themselves are not keys).
fn key_paths(prefix: &str, t: &toml::Table, out: &mut BTreeSet<String>) {
    for (k, v) in t {
        let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
        match v {
            // `required_details` is a map of categories: its entries are data, not keys.
            toml::Value::Table(sub) if k != "required_details" => key_paths(&path, sub, out),
            _ => {
                out.insert(path);
            }
        }
    }
}

#[test]
fn every_tenant_file_is_valid_and_spells_out_every_key_with_a_comment() {
    // Every key the policy has, from a fully serialised RawPolicy.
    let full = RawPolicy::from_toml("tenant = \"x\"\nmode = \"shared\"\n").unwrap();
    let full: toml::Table = toml::Table::try_from(&full).expect("RawPolicy serialises");
    let mut all_keys = BTreeSet::new();
    key_paths("", &full, &mut all_keys);

    let mut files = 0;
    for entry in std::fs::read_dir(tenant_dir()).expect("config/tenants exists") {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        files += 1;
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let text = std::fs::read_to_string(&path).unwrap();
        let policy = Policy::from_toml(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(format!("{}.toml", policy.tenant), name, "{name}: file name is the tenant id");

        let table: toml::Table = text.parse().unwrap();
        let mut keys = BTreeSet::new();
        key_paths("", &table, &mut keys);
        let missing: Vec<_> = all_keys.difference(&keys).collect();
        assert!(missing.is_empty(), "{name}: keys left to defaults: {missing:?}");

        // Every `key = value` line directly follows a comment saying what it does.
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let l = line.trim();
            let in_details = lines[..i].iter().rev().find(|l| l.trim().starts_with('[')).map(|h| h.trim())
                == Some("[gate.required_details]");
            if l.is_empty() || l.starts_with('#') || l.starts_with('[') || in_details {
                continue;
            }
            let prev = if i > 0 { lines[i - 1].trim() } else { "" };
            assert!(prev.starts_with('#'), "{name}:{}: `{l}` has no comment above it", i + 1);
        }
    }
    assert!(files >= 4, "expected the four example tenants, found {files}");
}

#[test]
fn r5_r6_r7_r9_the_prontopro_file_sets_shared_leads_with_a_head_start() {
    let p = load("prontopro.toml");
    assert_eq!(p.mode, DispatchMode::Shared);
    assert_eq!(p.head_start, 30 * 60 * 1000);
    assert_eq!(p.max_responders, 5);
    assert_eq!(p.lead_ttl, 48 * 3600 * 1000);
    assert!(p.require_verified_phone);
    assert_eq!(p.charge_on, ChargeOn::Response);
    assert_eq!(p.offer_fanout, None);
}

#[test]
fn r13_r15_the_shopify_experts_file_sets_free_matched_jobs_with_a_72h_window() {
    let p = load("shopify-experts.toml");
    assert_eq!(p.mode, DispatchMode::Matched);
    assert_eq!(p.offer_fanout, Some(3));
    assert_eq!(p.response_window, Some(72 * 3600 * 1000));
    assert_eq!(p.charge_on, ChargeOn::Never);
}

#[test]
fn r21_r22_the_habitissimo_file_sets_auto_buy_in_groups_of_four() {
    let p = load("habitissimo.toml");
    assert_eq!(p.mode, DispatchMode::AutoBuy);
    assert_eq!(p.group_size, 4);
    assert_eq!(p.retry_window, 24 * 3600 * 1000);
    assert_eq!(p.charge_on, ChargeOn::Dispatch);
}

#[test]
fn r25_the_fiverr_file_sets_matched_jobs_with_per_pro_approval_rules() {
    let p = load("fiverr.toml");
    assert_eq!(p.mode, DispatchMode::Matched);
    assert!(p.response_window.is_some());
    let text = std::fs::read_to_string(tenant_dir().join("fiverr.toml")).unwrap();
    assert!(text.contains("per seller"), "the file says approval rules are per pro");
}

#[test]
fn an_unknown_key_in_a_tenant_file_is_refused_with_its_name() {
    let text = std::fs::read_to_string(tenant_dir().join("prontopro.toml")).unwrap();
    let bad = text.replace("max_responders = 5", "max_responders = 5\nmax_responder = 5");
    match Policy::from_toml(&bad) {
        Err(PolicyError::Parse(msg)) => assert!(msg.contains("max_responder"), "{msg}"),
        other => panic!("expected a parse error naming the key, got {other:?}"),
    }
}

#[test]
fn r11_r12_the_zaask_file_sets_category_statistics_and_a_guarantee() {
    let p = load("zaask.toml");
    let pricing = p.pricing.as_ref().expect("zaask prices from category statistics (R11)");
    let painting = pricing.stats(&rota::ids::CategoryId::new("painting"));
    assert_eq!(painting.avg_job_value_cents, 120_000);
    assert_eq!(p.guarantee_window, Some(7 * 24 * 3600 * 1000), "R12 guarantee window");
    assert_eq!(p.head_start, 0);
}
