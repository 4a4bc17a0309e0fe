//! Privileged tests of `mat6_net::netlink` and `mat6_net::sysctl`, each in
//! its own namespaces (prefix `m6n`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{Ipv6Addr, SocketAddrV6, UdpSocket};
use std::time::Duration;

use mat6_net::netlink::{AddrSpec, EventGroups, NeighState, NetEvent, NetEvents, Netlink, Route6};
use mat6_net::sysctl::{self, Ipv6Key};
use mat6_tests::netns::{veth_pair, Netns};

const T: Duration = Duration::from_secs(5);

/// Host `h` with `eth0` <-> `peer0` in `p`, both up with carrier.
fn pair() -> (Netns, Netns) {
    let h = Netns::new("m6n-nlh").unwrap();
    let p = Netns::new("m6n-nlp").unwrap();
    veth_pair(&h, "eth0", &p, "peer0").unwrap();
    h.link_up("eth0").unwrap();
    p.link_up("peer0").unwrap();
    h.wait_carrier("eth0", true, T).unwrap();
    (h, p)
}

fn bind_ok(a: Ipv6Addr) -> bool {
    UdpSocket::bind(SocketAddrV6::new(a, 0, 0, 0)).is_ok()
}

async fn next_matching(ev: &mut NetEvents, mut f: impl FnMut(&NetEvent) -> bool) -> NetEvent {
    tokio::time::timeout(T, async {
        loop {
            let e = ev.next().await.expect("event stream ended");
            if f(&e) {
                return e;
            }
        }
    })
    .await
    .expect("expected netlink event did not arrive")
}

#[test]
#[ignore = "privileged: run with ./test.sh (root, netns)"]
fn nodad_address_is_usable_at_once_and_dad_one_is_not() {
    let (h, _p) = pair();
    // DAD of 5 probes (>= 5 s): "still tentative" holds even on a loaded machine.
    h.sysctl("net.ipv6.conf.eth0.dad_transmits", "5").unwrap();
    h.run_tokio(|| async {
        let (nl, _c) = Netlink::connect().unwrap();
        let idx = nl.ifindex("eth0").await.unwrap();
        let fast: Ipv6Addr = "2001:db8:10::1".parse().unwrap();
        let slow: Ipv6Addr = "2001:db8:10::2".parse().unwrap();
        nl.addr_add(idx, &AddrSpec::new(fast, 64).nodad())
            .await
            .unwrap();
        assert!(bind_ok(fast), "nodad address must be bindable immediately");
        nl.addr_add(idx, &AddrSpec::new(slow, 64)).await.unwrap();
        // DAD runs on a link with carrier: tentative and not bindable now.
        let a = nl.addrs(Some(idx)).await.unwrap();
        let s = a.iter().find(|x| x.addr == slow).unwrap();
        assert!(s.flags.tentative && !s.usable(), "{s:?}");
        assert!(!bind_ok(slow));
        let f = a.iter().find(|x| x.addr == fast).unwrap();
        assert!(f.usable() && f.flags.nodad && !f.flags.tentative, "{f:?}");
        // Adding it again: EEXIST, named.
        let e = nl
            .addr_add(idx, &AddrSpec::new(fast, 64).nodad())
            .await
            .unwrap_err();
        assert!(e.is_exists(), "{e}");
        assert!(e.to_string().contains("2001:db8:10::1/64"), "{e}");
        // Lifetimes are applied.
        nl.addr_replace(idx, &AddrSpec::new(fast, 64).nodad().lifetimes(300, 100))
            .await
            .unwrap();
        let a = nl.addrs(Some(idx)).await.unwrap();
        let f = a.iter().find(|x| x.addr == fast).unwrap();
        assert!(
            f.valid_lft.unwrap() <= 300 && f.valid_lft.unwrap() > 250,
            "{f:?}"
        );
        assert!(f.preferred_lft.unwrap() <= 100, "{f:?}");
        nl.addr_del(idx, fast, 64).await.unwrap();
        assert!(!bind_ok(fast));
        let e = nl.addr_del(idx, fast, 64).await.unwrap_err();
        assert!(e.errno().is_some(), "{e}");
    })
    .unwrap();
}

#[test]
#[ignore = "privileged: run with ./test.sh (root, netns)"]
fn optimistic_address_is_usable_during_dad() {
    let (h, _p) = pair();
    h.run_tokio(|| async {
        sysctl::set(Some("eth0"), Ipv6Key::OptimisticDad, 1).unwrap();
        sysctl::set(Some("eth0"), Ipv6Key::UseOptimistic, 1).unwrap();
        assert_eq!(
            sysctl::get(Some("eth0"), Ipv6Key::OptimisticDad).unwrap(),
            1
        );
        let (nl, _c) = Netlink::connect().unwrap();
        let idx = nl.ifindex("eth0").await.unwrap();
        let a: Ipv6Addr = "2001:db8:11::1".parse().unwrap();
        nl.addr_add(idx, &AddrSpec::new(a, 64).optimistic())
            .await
            .unwrap();
        let info = nl
            .addrs(Some(idx))
            .await
            .unwrap()
            .into_iter()
            .find(|x| x.addr == a)
            .unwrap();
        assert!(info.flags.optimistic, "{info:?}");
        assert!(info.usable(), "{info:?}");
        assert!(bind_ok(a), "optimistic address must be bindable during DAD");
    })
    .unwrap();
}

#[test]
#[ignore = "privileged: run with ./test.sh (root, netns)"]
fn route_replace_add_delete_and_list() {
    let (h, p) = pair();
    p.addr_add("peer0", "2001:db8:12::1/64", true).unwrap();
    p.addr_add("peer0", "2001:db8:12::2/64", true).unwrap();
    h.run_tokio(|| async {
        let (nl, _c) = Netlink::connect().unwrap();
        let idx = nl.ifindex("eth0").await.unwrap();
        nl.addr_add(
            idx,
            &AddrSpec::new("2001:db8:12::10".parse().unwrap(), 64).nodad(),
        )
        .await
        .unwrap();
        let dst = Route6::to("2001:db8:99::".parse().unwrap(), 64, idx).unwrap();
        let r1 = dst.clone().via("2001:db8:12::1".parse().unwrap());
        let r2 = dst.clone().via("2001:db8:12::2".parse().unwrap());
        nl.route_add(&r1).await.unwrap();
        assert!(nl.route_add(&r2).await.unwrap_err().is_exists());
        nl.route_replace(&r2).await.unwrap();
        let routes = nl.routes(Some(254)).await.unwrap();
        let mine: Vec<_> = routes.iter().filter(|r| r.dst == dst.dst).collect();
        assert_eq!(mine.len(), 1, "{mine:?}");
        assert_eq!(mine[0].gateway, r2.gateway);
        assert_eq!(mine[0].oif, Some(idx));
        // Same destination, other metric and table: separate routes.
        nl.route_replace(&r1.clone().metric(50).table(100))
            .await
            .unwrap();
        let t100 = nl.routes(Some(100)).await.unwrap();
        assert!(t100
            .iter()
            .any(|r| r.dst == dst.dst && r.metric == Some(50) && r.gateway == r1.gateway));
        // Default route via a link-local gateway.
        let ll: Ipv6Addr = "fe80::99".parse().unwrap();
        nl.route_replace(&Route6::default_via(ll, idx))
            .await
            .unwrap();
        assert!(nl
            .routes(Some(254))
            .await
            .unwrap()
            .iter()
            .any(|r| r.dst.prefix() == 0 && r.gateway == Some(ll)));
        nl.route_del(&r2).await.unwrap();
        let e = nl.route_del(&r2).await.unwrap_err();
        assert!(e.is_not_found(), "{e}");
        assert!(e.to_string().contains("2001:db8:99::/64"), "{e}");
    })
    .unwrap();
    // Cross-check with iproute2.
    let shown = h.ip(&["-6", "route", "show", "table", "100"]).unwrap();
    assert!(
        shown.contains("2001:db8:99::/64 via 2001:db8:12::1"),
        "{shown}"
    );
}

#[test]
#[ignore = "privileged: run with ./test.sh (root, netns)"]
fn link_event_stream_reports_carrier_loss_and_addresses() {
    let (h, p) = pair();
    let (tx, rx) = std::sync::mpsc::channel::<&'static str>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    let worker = h.spawn_tokio(move || async move {
        let (mut ev, _c) = NetEvents::subscribe(EventGroups::all()).unwrap();
        let (nl, _c2) = Netlink::connect().unwrap();
        let idx = nl.ifindex("eth0").await.unwrap();
        ready_tx.send(()).unwrap();
        // 1. the peer end goes down -> carrier lost on eth0.
        let e = next_matching(
            &mut ev,
            |e| matches!(e, NetEvent::Link(l) if l.ifindex == idx && !l.carrier),
        )
        .await;
        let NetEvent::Link(l) = e else { unreachable!() };
        assert_eq!(l.name, "eth0");
        assert!(l.admin_up, "eth0 itself stays up");
        assert!(!l.notify_peers);
        assert!(l.mac.is_some());
        tx.send("down").unwrap();
        // 2. back up -> carrier.
        next_matching(
            &mut ev,
            |e| matches!(e, NetEvent::Link(l) if l.ifindex == idx && l.carrier),
        )
        .await;
        tx.send("up").unwrap();
        // 3. address added and removed through netlink; its prefix route
        // comes and goes with it (events in any order).
        let a: Ipv6Addr = "2001:db8:13::1".parse().unwrap();
        let net: ipnetwork::Ipv6Network = "2001:db8:13::/64".parse().unwrap();
        nl.addr_add(idx, &AddrSpec::new(a, 64).nodad())
            .await
            .unwrap();
        let (mut addr_seen, mut route_seen) = (false, false);
        while !(addr_seen && route_seen) {
            match next_matching(&mut ev, |e| {
                matches!(e, NetEvent::AddrAdded(x) if x.addr == a && x.ifindex == idx && x.usable())
                    || matches!(e, NetEvent::RouteAdded(r) if r.dst == net && r.oif == Some(idx))
            })
            .await
            {
                NetEvent::AddrAdded(_) => addr_seen = true,
                _ => route_seen = true,
            }
        }
        nl.addr_del(idx, a, 64).await.unwrap();
        let (mut addr_gone, mut route_gone) = (false, false);
        while !(addr_gone && route_gone) {
            match next_matching(&mut ev, |e| {
                matches!(e, NetEvent::AddrRemoved(x) if x.addr == a)
                    || matches!(e, NetEvent::RouteRemoved(r) if r.dst == net)
            })
            .await
            {
                NetEvent::AddrRemoved(_) => addr_gone = true,
                _ => route_gone = true,
            }
        }
        // 4. admin down -> event with admin_up false.
        nl.set_down(idx).await.unwrap();
        next_matching(
            &mut ev,
            |e| matches!(e, NetEvent::Link(l) if l.ifindex == idx && !l.admin_up),
        )
        .await;
        nl.set_up(idx).await.unwrap();
        next_matching(
            &mut ev,
            |e| matches!(e, NetEvent::Link(l) if l.ifindex == idx && l.admin_up),
        )
        .await;
    });
    ready_rx.recv_timeout(T).unwrap();
    p.set_peer_carrier("peer0", false).unwrap();
    assert_eq!(rx.recv_timeout(T).unwrap(), "down");
    p.set_peer_carrier("peer0", true).unwrap();
    assert_eq!(rx.recv_timeout(T).unwrap(), "up");
    worker.join().unwrap().unwrap();
}

#[test]
#[ignore = "privileged: run with ./test.sh (root, netns)"]
fn links_mac_and_neighbours() {
    let (h, _p) = pair();
    h.run_tokio(|| async {
        let (nl, _c) = Netlink::connect().unwrap();
        let eth0 = nl.link_by_name("eth0").await.unwrap();
        assert!(eth0.admin_up && eth0.carrier);
        assert_eq!(nl.link_by_index(eth0.ifindex).await.unwrap().name, "eth0");
        let all = nl.links().await.unwrap();
        assert!(all.iter().any(|l| l.name == "lo"));
        assert!(all.iter().any(|l| l.name == "eth0"));
        let e = nl.link_by_name("m6nnosuch0").await.unwrap_err();
        assert!(
            e.is_not_found() && e.to_string().contains("m6nnosuch0"),
            "{e}"
        );
        let mac = [0x02, 0x00, 0x5e, 0x10, 0x20, 0x30];
        nl.set_mac(eth0.ifindex, mac).await.unwrap();
        assert_eq!(nl.link_by_name("eth0").await.unwrap().mac, Some(mac));
        let n: Ipv6Addr = "fe80::abcd".parse().unwrap();
        nl.neigh_replace(
            eth0.ifindex,
            n,
            [2, 0, 0, 0, 0xab, 0xcd],
            NeighState::Permanent,
        )
        .await
        .unwrap();
        nl.neigh_replace(
            eth0.ifindex,
            n,
            [2, 0, 0, 0, 0xab, 0xce],
            NeighState::Permanent,
        )
        .await
        .unwrap();
    })
    .unwrap();
    let neigh = h.ip(&["-6", "neigh", "show", "dev", "eth0"]).unwrap();
    assert!(
        neigh.contains("fe80::abcd lladdr 02:00:00:00:ab:ce PERMANENT"),
        "{neigh}"
    );
    h.run_tokio(|| async {
        let (nl, _c) = Netlink::connect().unwrap();
        let idx = nl.ifindex("eth0").await.unwrap();
        nl.neigh_del(idx, "fe80::abcd".parse().unwrap())
            .await
            .unwrap();
    })
    .unwrap();
    let neigh = h.ip(&["-6", "neigh", "show", "dev", "eth0"]).unwrap();
    assert!(!neigh.contains("fe80::abcd"), "{neigh}");
    assert_eq!(h.mac("eth0").unwrap(), "02:00:5e:10:20:30");
}

#[test]
#[ignore = "privileged: run with ./test.sh (root, netns)"]
fn sysctl_reads_and_writes_in_namespace() {
    let (h, _p) = pair();
    h.run(|| {
        assert_eq!(sysctl::get(None, Ipv6Key::Forwarding).unwrap(), 0);
        let old = sysctl::replace(Some("eth0"), Ipv6Key::AcceptRa, 2).unwrap();
        assert_eq!(old, 1);
        assert_eq!(sysctl::get(Some("eth0"), Ipv6Key::AcceptRa).unwrap(), 2);
        sysctl::set(Some("eth0"), Ipv6Key::IgnoreRoutesWithLinkdown, 1).unwrap();
        let e = sysctl::get(Some("nosuch0"), Ipv6Key::AcceptRa).unwrap_err();
        assert!(e.to_string().contains("nosuch0"));
    })
    .unwrap();
    assert_eq!(h.sysctl_get("net.ipv6.conf.eth0.accept_ra").unwrap(), "2");
    assert_eq!(
        h.sysctl_get("net.ipv6.conf.eth0.ignore_routes_with_linkdown")
            .unwrap(),
        "1"
    );
}

#[test]
#[ignore = "privileged: run with ./test.sh (root, netns)"]
fn neighbour_events_report_an_unreachable_neighbour() {
    let (h, p) = pair();
    p.addr_add("peer0", "2001:db8:14::1/64", true).unwrap();
    h.addr_add("eth0", "2001:db8:14::2/64", true).unwrap();
    // Fast NUD so the test does not wait 3 s for FAILED.
    h.sysctl("net.ipv6.neigh.eth0.retrans_time_ms", "50")
        .unwrap();
    h.sysctl("net.ipv6.neigh.eth0.mcast_solicit", "2").unwrap();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    let worker = h.spawn_tokio(move || async move {
        let (mut ev, _c) = NetEvents::subscribe(EventGroups::all()).unwrap();
        ready_tx.send(()).unwrap();
        let ghost: Ipv6Addr = "2001:db8:14::99".parse().unwrap();
        let real: Ipv6Addr = "2001:db8:14::1".parse().unwrap();
        let mut seen_real = false;
        let mut seen_failed = false;
        tokio::time::timeout(T, async {
            while !(seen_real && seen_failed) {
                if let Some(NetEvent::NeighChanged(n)) = ev.next().await {
                    if n.ip == real && n.mac.is_some() {
                        seen_real = true;
                    }
                    if n.ip == ghost && n.failed() {
                        seen_failed = true;
                    }
                }
            }
        })
        .await
        .expect("neighbour events missing");
        let (nl, _c2) = Netlink::connect().unwrap();
        let idx = nl.ifindex("eth0").await.unwrap();
        let all = nl.neighbours(Some(idx)).await.unwrap();
        assert!(
            all.iter().any(|n| n.ip == real && n.mac.is_some()),
            "{all:?}"
        );
    });
    ready_rx.recv_timeout(T).unwrap();
    assert!(h.ping6("2001:db8:14::1", 2));
    assert!(!h.ping6("2001:db8:14::99", 1));
    worker.join().unwrap().unwrap();
}

/// Measures the cost of the handover's one route change (netlink
/// `route_replace` of the default route between two gateways) and prints it;
/// no timed assertion.
#[test]
#[ignore = "privileged: run with ./test.sh (root, netns)"]
fn route_replace_latency_report() {
    let (h, p) = pair();
    p.addr_add("peer0", "2001:db8:15::1/64", true).unwrap();
    p.addr_add("peer0", "2001:db8:15::2/64", true).unwrap();
    let mut t = h
        .run_tokio(|| async {
            let (nl, _c) = Netlink::connect().unwrap();
            let idx = nl.ifindex("eth0").await.unwrap();
            nl.addr_add(
                idx,
                &AddrSpec::new("2001:db8:15::10".parse().unwrap(), 64).nodad(),
            )
            .await
            .unwrap();
            let gws: [Ipv6Addr; 2] = [
                "2001:db8:15::1".parse().unwrap(),
                "2001:db8:15::2".parse().unwrap(),
            ];
            let mut t = Vec::new();
            for i in 0..400 {
                let r = Route6::default_via(gws[i % 2], idx).metric(100);
                let s = std::time::Instant::now();
                nl.route_replace(&r).await.unwrap();
                t.push(s.elapsed());
            }
            let now = nl.routes(Some(254)).await.unwrap();
            assert!(now.iter().any(|r| r.dst.prefix() == 0
                && r.gateway == Some(gws[1])
                && r.metric == Some(100)));
            t
        })
        .unwrap();
    t.sort();
    let q = |x: f64| t[((t.len() - 1) as f64 * x) as usize].as_secs_f64() * 1e3;
    println!(
        "netlink default-route replace: p50 {:.3} ms p99 {:.3} ms ({} changes)",
        q(0.5),
        q(0.99),
        t.len()
    );
}
