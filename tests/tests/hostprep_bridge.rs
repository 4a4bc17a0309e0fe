//! `mat6_net::bridge` (host-prep's bridge helpers) in a namespace of its own
//! (`m6h-PID-N`): gateway impersonation and its exact undo, the uplink
//! check, a bridge that was down, an address that was already there, and
//! the errors for a missing interface and for one that is not a bridge.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::Ipv6Addr;

use mat6_net::bridge::{self, BridgeError};
use mat6_net::netlink::Netlink;
use mat6_tests::netns::Netns;

const GW_LL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0xb1);
const GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x0b, 0x01];

fn snapshot(ns: &Netns, dev: &str) -> (String, Vec<String>, String) {
    let mac = ns.mac(dev).unwrap();
    let mut addrs: Vec<String> = ns
        .addrs6(dev)
        .unwrap()
        .into_iter()
        .map(|(a, _)| a)
        .collect();
    addrs.sort();
    let flags = ns.ip(&["-o", "link", "show", "dev", dev]).unwrap();
    let up = if flags.contains(",UP") || flags.contains("<UP") {
        "up"
    } else {
        "down"
    };
    (mac, addrs, up.to_string())
}

#[test]
#[ignore = "privileged: run with ./test.sh (root, netns)"]
fn impersonate_then_restore_is_exact() {
    let ns = Netns::new("m6h").unwrap();
    ns.bridge("brnu").unwrap();
    ns.tap("m6hvt").unwrap();
    ns.bridge_attach("m6hvt", "brnu").unwrap();
    let before = snapshot(&ns, "brnu");
    ns.run_tokio(|| async {
        let (nl, task) = Netlink::connect().unwrap();
        let imp = bridge::impersonate_gateway(&nl, "brnu", GW_LL, GW_MAC, &["m6hvt"])
            .await
            .unwrap();
        assert!(imp.added_addr);
        let addrs = nl.addrs(Some(imp.ifindex)).await.unwrap();
        let gw = addrs
            .iter()
            .find(|a| a.addr == GW_LL)
            .expect("gateway address added");
        assert!(gw.flags.nodad && gw.usable(), "{gw:?}");
        let l = nl.link_by_name("brnu").await.unwrap();
        assert_eq!(l.mac, Some(GW_MAC));
        bridge::restore(&nl, &imp).await.unwrap();
        // Idempotent.
        bridge::restore(&nl, &imp).await.unwrap();
        task.abort();
    })
    .unwrap();
    assert_eq!(snapshot(&ns, "brnu"), before);
}

#[test]
#[ignore = "privileged: run with ./test.sh (root, netns)"]
fn existing_address_stays_and_a_down_bridge_goes_down_again() {
    let ns = Netns::new("m6h").unwrap();
    // An address that was there before is not ours to remove.
    ns.bridge("brnu").unwrap();
    ns.addr_add("brnu", &format!("{GW_LL}/64"), true).unwrap();
    let before = snapshot(&ns, "brnu");
    assert!(
        before.1.iter().any(|a| a.starts_with(&format!("{GW_LL}/"))),
        "{:?}",
        before.1
    );
    // A bridge that was down (IPv6 addresses are flushed while down).
    ns.bridge("brdown").unwrap();
    ns.link_down("brdown").unwrap();
    let before_down = snapshot(&ns, "brdown");
    ns.run_tokio(|| async {
        let (nl, task) = Netlink::connect().unwrap();
        let imp = bridge::impersonate_gateway(&nl, "brnu", GW_LL, GW_MAC, &[])
            .await
            .unwrap();
        assert!(!imp.added_addr);
        bridge::restore(&nl, &imp).await.unwrap();
        let imp = bridge::impersonate_gateway(&nl, "brdown", GW_LL, GW_MAC, &[])
            .await
            .unwrap();
        assert!(imp.added_addr && !imp.was_up);
        assert!(nl.link_by_name("brdown").await.unwrap().admin_up);
        bridge::restore(&nl, &imp).await.unwrap();
        task.abort();
    })
    .unwrap();
    assert_eq!(snapshot(&ns, "brnu"), before);
    assert_eq!(snapshot(&ns, "brdown"), before_down);
}

#[test]
#[ignore = "privileged: run with ./test.sh (root, netns)"]
fn refuses_uplinks_missing_bridges_and_non_bridges() {
    let ns = Netns::new("m6h").unwrap();
    ns.bridge("brnu").unwrap();
    ns.tap("m6hvt").unwrap();
    ns.tap("m6hup").unwrap();
    ns.bridge_attach("m6hvt", "brnu").unwrap();
    ns.bridge_attach("m6hup", "brnu").unwrap();
    let before = snapshot(&ns, "brnu");
    ns.run_tokio(|| async {
        let (nl, task) = Netlink::connect().unwrap();
        match bridge::impersonate_gateway(&nl, "brnu", GW_LL, GW_MAC, &["m6hvt"]).await {
            Err(BridgeError::Uplink { bridge, port }) => {
                assert_eq!((bridge.as_str(), port.as_str()), ("brnu", "m6hup"))
            }
            other => panic!("{other:?}"),
        }
        match bridge::require(&nl, "brnope").await {
            Err(e @ BridgeError::Missing(_)) => assert!(e.to_string().contains("brnope")),
            other => panic!("{other:?}"),
        }
        match bridge::require(&nl, "m6hvt").await {
            Err(e @ BridgeError::NotABridge(_)) => {
                assert!(e.to_string().contains("m6hvt is not a bridge"))
            }
            other => panic!("{other:?}"),
        }
        // attach moves a port between bridges.
        bridge::attach(&nl, "m6hup", "brnu").await.unwrap();
        task.abort();
    })
    .unwrap();
    assert_eq!(snapshot(&ns, "brnu"), before);
}
