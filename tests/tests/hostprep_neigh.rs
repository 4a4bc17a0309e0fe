//! host-prep's gateway neighbour-cache seeding (`host_prep::neigh`) against
//! a real Linux router: a host namespace with a bridge, a router namespace
//! on it (veth), and the seeding sent from the bridge. The router must then
//! hold the MoA with the VM's MAC, without having solicited anyone.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::Ipv6Addr;
use std::time::Duration;

use host_prep::neigh;
use mat6_proto::binding::{MacAddr, SiteInfo};
use mat6_proto::mobility::moa_for;
use mat6_tests::netns::{self, Netns};

const GW_LL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0xb1);
const VM_MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

fn neigh_line(router: &Netns, dev: &str, addr: Ipv6Addr) -> Option<String> {
    let out = router
        .ip(&["-6", "neigh", "show", "dev", dev, "to", &addr.to_string()])
        .unwrap();
    out.lines()
        .find(|l| l.starts_with(&addr.to_string()))
        .map(str::to_owned)
}

#[test]
#[ignore = "privileged: run with ./test.sh (root, netns)"]
fn seeding_makes_the_gateway_hold_the_moa() {
    let host = Netns::new("m6h").unwrap();
    let router = Netns::new_router("m6r").unwrap();
    host.bridge("brup").unwrap();
    netns::veth_pair(&host, "m6hup", &router, "down0").unwrap();
    host.bridge_attach("m6hup", "brup").unwrap();
    host.link_up("m6hup").unwrap();
    router.set_mac("down0", "02:00:00:00:0b:01").unwrap();
    router.link_up("down0").unwrap();
    router
        .addr_add("down0", &format!("{GW_LL}/64"), true)
        .unwrap();
    router.addr_add("down0", "2001:db8:b::1/64", true).unwrap();
    let gw_mac: MacAddr = router.mac("down0").unwrap().parse().unwrap();
    let site = SiteInfo {
        name: "B".into(),
        prefix: "2001:db8:b::/64".parse().unwrap(),
        gateway_ll: GW_LL,
        gateway_mac: gw_mac,
        ra: None,
    };
    let moa = moa_for("2001:db8:b::".parse().unwrap(), VM_MAC);
    assert_eq!(neigh_line(&router, "down0", moa), None);

    let ifindex = host.ifindex("brup").unwrap();
    host.run_tokio(|| async move { neigh::seed_gateway(ifindex, &site, moa).await })
        .unwrap()
        .unwrap();

    let mut line = None;
    netns::wait_for(
        "the router's neighbour entry",
        Duration::from_secs(3),
        || {
            line = neigh_line(&router, "down0", moa);
            line.is_some()
        },
    )
    .unwrap();
    let line = line.unwrap();
    assert!(line.contains("lladdr 52:54:00:12:34:56"), "{line}");
    // STALE as created; DELAY once the router has used it for its answer.
    assert!(
        ["STALE", "DELAY", "PROBE", "REACHABLE"]
            .iter()
            .any(|s| line.contains(s)),
        "{line}"
    );
}

#[test]
#[ignore = "privileged: run with ./test.sh (root, netns)"]
fn seeding_on_a_missing_interface_is_an_error() {
    let host = Netns::new("m6h").unwrap();
    let site = SiteInfo {
        name: "B".into(),
        prefix: "2001:db8:b::/64".parse().unwrap(),
        gateway_ll: GW_LL,
        gateway_mac: MacAddr([2, 0, 0, 0, 0x0b, 1]),
        ra: None,
    };
    let moa = moa_for("2001:db8:b::".parse().unwrap(), VM_MAC);
    let r = host.run_tokio(|| async move { neigh::seed_gateway(999_999, &site, moa).await });
    assert!(r.unwrap().is_err());
}
