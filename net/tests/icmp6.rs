//! Privileged tests of `mat6_net::icmp6`: real radvd interop, the drop rules
//! on hand-made frames, and the sender (RS, unsolicited NA) seen on the wire.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::Ipv6Addr;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::Duration;

use mat6_net::icmp6::{
    ndp_frame, ndp_frame_with_fragment_header, DropReason, NdpReceiver, NdpSender, PacketSocket,
    ALL_NODES, ALL_ROUTERS,
};
use mat6_proto::ndp::{NdpRepr, PrefixInfo, RouterAdvert};
use mat6_tests::netns::{veth_pair, Netns};

const T: Duration = Duration::from_secs(5);

/// Router `r` (forwarding on) with `r0` <-> `eth0` in host `h`; link-locals ready.
struct Link {
    r: Netns,
    h: Netns,
    r_ll: Ipv6Addr,
    h_ll: Ipv6Addr,
    r_mac: [u8; 6],
    h_mac: [u8; 6],
    r_idx: u32,
    h_idx: u32,
}

fn link() -> Link {
    let r = Netns::new_router("m6n-ir").unwrap();
    let h = Netns::new("m6n-ih").unwrap();
    veth_pair(&r, "r0", &h, "eth0").unwrap();
    // The host must not act on RAs itself: only our receiver looks at them.
    h.sysctl("net.ipv6.conf.eth0.accept_ra", "0").unwrap();
    r.link_up("r0").unwrap();
    h.link_up("eth0").unwrap();
    let r_ll = r.wait_link_local("r0", T).unwrap().parse().unwrap();
    let h_ll = h.wait_link_local("eth0", T).unwrap().parse().unwrap();
    Link {
        r_mac: r.mac_bytes("r0").unwrap(),
        h_mac: h.mac_bytes("eth0").unwrap(),
        r_idx: r.ifindex("r0").unwrap(),
        h_idx: h.ifindex("eth0").unwrap(),
        r,
        h,
        r_ll,
        h_ll,
    }
}

fn ra(prefix: &str, source_ll: [u8; 6]) -> NdpRepr {
    NdpRepr::RouterAdvert(RouterAdvert {
        cur_hop_limit: 64,
        managed: false,
        other: false,
        router_lifetime_s: 600,
        reachable_time_ms: 0,
        retrans_timer_ms: 0,
        source_ll: Some(source_ll),
        mtu: None,
        prefixes: vec![PrefixInfo {
            prefix: prefix.parse().unwrap(),
            prefix_len: 64,
            on_link: true,
            autonomous: true,
            valid_lifetime_s: 3600,
            preferred_lifetime_s: 1800,
        }],
        other_options: vec![],
    })
}

fn first_prefix(repr: &NdpRepr) -> Option<Ipv6Addr> {
    match repr {
        NdpRepr::RouterAdvert(ra) => ra.prefixes.first().map(|p| p.prefix),
        _ => None,
    }
}

#[test]
#[ignore = "privileged: run with ./test.sh (root, netns)"]
fn receives_radvd_router_advertisement_after_our_solicitation() {
    let l = link();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("radvd.conf").to_string_lossy().into_owned();
    let pidfile = dir.path().join("radvd.pid").to_string_lossy().into_owned();
    std::fs::write(
        &conf,
        "interface r0 {\n AdvSendAdvert on;\n MinRtrAdvInterval 30;\n MaxRtrAdvInterval 60;\n \
         AdvLinkMTU 1400;\n AdvDefaultLifetime 900;\n prefix 2001:db8:a::/64 {\n  AdvOnLink on;\n  AdvAutonomous on;\n };\n};\n",
    )
    .unwrap();
    // The router also listens, to prove our RS goes out well-formed.
    let (rs_tx, rs_rx) = mpsc::channel();
    let (ready_tx, ready_rx) = mpsc::channel();
    let r_idx = l.r_idx;
    let r_listener = l.r.spawn_tokio(move || async move {
        let mut rx = NdpReceiver::bind(r_idx).unwrap();
        ready_tx.send(()).unwrap();
        let got = tokio::time::timeout(Duration::from_secs(15), async {
            loop {
                let p = rx.recv().await.unwrap();
                if matches!(p.repr, NdpRepr::RouterSolicit { .. }) {
                    return p;
                }
            }
        })
        .await
        .expect("no RS seen by the router");
        rs_tx.send(got).unwrap();
    });
    ready_rx.recv_timeout(T).unwrap();
    let h_idx = l.h_idx;
    let h_mac = l.h_mac;
    let router = &l.r;
    let got =
        l.h.run_tokio(|| async move {
            let mut rx = NdpReceiver::bind(h_idx).unwrap();
            let _radvd = router
                .spawn(
                    "radvd",
                    &["-n", "-m", "stderr", "-d", "1", "-C", &conf, "-p", &pidfile],
                )
                .unwrap();
            // Give radvd a moment to open its socket, then solicit: radvd answers
            // an RS within MAX_RA_DELAY_TIME (0.5 s) while its periodic interval
            // here is 30-60 s (its start-up burst comes too; either will do).
            tokio::time::sleep(Duration::from_millis(300)).await;
            let tx = NdpSender::bind(h_idx).unwrap();
            tx.send(
                &NdpRepr::RouterSolicit {
                    source_ll: Some(h_mac),
                },
                None,
                ALL_ROUTERS,
            )
            .await
            .unwrap();
            let p = tokio::time::timeout(Duration::from_secs(15), async {
                loop {
                    let p = rx.recv().await.unwrap();
                    if matches!(p.repr, NdpRepr::RouterAdvert(_)) {
                        return p;
                    }
                }
            })
            .await
            .expect("no RA from radvd");
            (p, rx.stats().accepted.load(Ordering::Relaxed))
        })
        .unwrap();
    let (p, accepted) = got;
    assert!(accepted >= 1);
    assert_eq!(p.src, l.r_ll, "RA source is the router's link-local");
    assert_eq!(p.src_mac, l.r_mac);
    assert_eq!(p.hop_limit, 255);
    assert_eq!(p.ifindex, l.h_idx);
    let NdpRepr::RouterAdvert(ra) = &p.repr else {
        unreachable!()
    };
    assert_eq!(ra.router_lifetime_s, 900);
    assert_eq!(ra.mtu, Some(1400));
    assert_eq!(ra.source_ll, Some(l.r_mac));
    assert_eq!(ra.prefixes.len(), 1);
    let pi = &ra.prefixes[0];
    assert_eq!(pi.prefix, "2001:db8:a::".parse::<Ipv6Addr>().unwrap());
    assert_eq!(pi.prefix_len, 64);
    assert!(pi.on_link && pi.autonomous);

    r_listener.join().unwrap().unwrap();
    let rs = rs_rx.recv_timeout(T).unwrap();
    assert_eq!(rs.src_mac, l.h_mac);
    assert_eq!(rs.dst, ALL_ROUTERS);
    assert_eq!(rs.hop_limit, 255);
    assert_eq!(
        rs.repr,
        NdpRepr::RouterSolicit {
            source_ll: Some(l.h_mac)
        }
    );
    // The kernel chose the source: the host's link-local.
    assert_eq!(rs.src, l.h_ll);
}

#[test]
#[ignore = "privileged: run with ./test.sh (root, netns)"]
fn drops_fragmented_non_link_local_and_low_hop_limit_ras() {
    let l = link();
    let (ready_tx, ready_rx) = mpsc::channel();
    let h_idx = l.h_idx;
    let receiver = l.h.spawn_tokio(move || async move {
        let mut rx = NdpReceiver::bind(h_idx).unwrap();
        ready_tx.send(()).unwrap();
        let mut verdicts = Vec::new();
        tokio::time::timeout(T, async {
            loop {
                let v = rx.recv_verdict().await.unwrap();
                let done = matches!(&v, Ok(p) if first_prefix(&p.repr) == Some("2001:db8:c::".parse().unwrap()));
                verdicts.push(v);
                if done {
                    break;
                }
            }
        })
        .await
        .expect("the good RA never arrived");
        let s = rx.stats();
        (
            verdicts,
            s.fragment.load(Ordering::Relaxed),
            s.non_link_local.load(Ordering::Relaxed),
            s.hop_limit.load(Ordering::Relaxed),
        )
    });
    ready_rx.recv_timeout(T).unwrap();
    let (r_idx, r_mac, r_ll) = (l.r_idx, l.r_mac, l.r_ll);
    let global: Ipv6Addr = "2001:db8:c::1".parse().unwrap();
    l.r.run_tokio(|| async move {
        let sock = PacketSocket::bind(r_idx).unwrap();
        let bad = ra("2001:db8:bad::", r_mac);
        let frames = [
            ndp_frame_with_fragment_header(&bad, r_mac, r_ll, ALL_NODES).unwrap(),
            ndp_frame(&bad, r_mac, None, global, ALL_NODES, 255).unwrap(),
            ndp_frame(&bad, r_mac, None, r_ll, ALL_NODES, 64).unwrap(),
            // Last, a good one, so the receiver knows when to stop.
            ndp_frame(
                &ra("2001:db8:c::", r_mac),
                r_mac,
                None,
                r_ll,
                ALL_NODES,
                255,
            )
            .unwrap(),
        ];
        for f in &frames {
            assert_eq!(sock.send_frame(f).await.unwrap(), f.len());
        }
    })
    .unwrap();
    let (verdicts, frag, nll, hop) = receiver.join().unwrap().unwrap();
    // Nothing from the bad prefix was accepted.
    for p in verdicts.iter().flatten() {
        assert_ne!(
            first_prefix(&p.repr),
            Some("2001:db8:bad::".parse().unwrap()),
            "{p:?}"
        );
    }
    assert!(
        verdicts.contains(&Err(DropReason::Fragment)),
        "{verdicts:?}"
    );
    assert!(
        verdicts.contains(&Err(DropReason::NonLinkLocalRouter(global))),
        "{verdicts:?}"
    );
    assert!(
        verdicts.contains(&Err(DropReason::HopLimit(64))),
        "{verdicts:?}"
    );
    assert_eq!((frag, nll, hop), (1, 1, 1));
    let last = verdicts.last().unwrap().as_ref().unwrap();
    assert_eq!(last.src, l.r_ll);
    assert_eq!(last.src_mac, l.r_mac);
}

#[test]
#[ignore = "privileged: run with ./test.sh (root, netns)"]
fn sender_sends_unsolicited_na_from_chosen_source_with_hop_limit_255() {
    let l = link();
    let moa: Ipv6Addr = "2001:db8:d::5".parse().unwrap();
    l.h.addr_add("eth0", "2001:db8:d::5/64", true).unwrap();
    let (ready_tx, ready_rx) = mpsc::channel();
    let r_idx = l.r_idx;
    let receiver = l.r.spawn_tokio(move || async move {
        let mut rx = NdpReceiver::bind(r_idx).unwrap();
        ready_tx.send(()).unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(T, async {
            while got.len() < 2 {
                let p = rx.recv().await.unwrap();
                if matches!(
                    p.repr,
                    NdpRepr::NeighborAdvert { .. } | NdpRepr::RouterAdvert(_)
                ) {
                    got.push(p);
                }
            }
        })
        .await
        .expect("NA/RA not received");
        got
    });
    ready_rx.recv_timeout(T).unwrap();
    let (h_idx, h_mac, h_ll, r_ll) = (l.h_idx, l.h_mac, l.h_ll, l.r_ll);
    let na = NdpRepr::NeighborAdvert {
        router: false,
        solicited: false,
        override_: true,
        target: moa,
        target_ll: Some(h_mac),
    };
    let ra_msg = ra("2001:db8:e::", h_mac);
    let (na2, ra2) = (na.clone(), ra_msg.clone());
    l.h.run_tokio(|| async move {
        let tx = NdpSender::bind(h_idx).unwrap();
        tx.send(&na2, Some(moa), ALL_NODES).await.unwrap();
        // Unicast to a link-local destination, from our link-local.
        tx.send(&ra2, Some(h_ll), r_ll).await.unwrap();
        // A source we do not own is refused by the kernel, and named.
        let e = tx
            .send(&na2, Some("2001:db8:ffff::1".parse().unwrap()), ALL_NODES)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("ff02::1"), "{e}");
    })
    .unwrap();
    let got = receiver.join().unwrap().unwrap();
    let na_in = got
        .iter()
        .find(|p| matches!(p.repr, NdpRepr::NeighborAdvert { .. }))
        .unwrap();
    assert_eq!(na_in.repr, na);
    assert_eq!(na_in.src, moa);
    assert_eq!(na_in.dst, ALL_NODES);
    assert_eq!(na_in.hop_limit, 255);
    assert_eq!(na_in.src_mac, l.h_mac);
    let ra_in = got
        .iter()
        .find(|p| matches!(p.repr, NdpRepr::RouterAdvert(_)))
        .unwrap();
    assert_eq!(ra_in.repr, ra_msg);
    assert_eq!(ra_in.src, l.h_ll);
    assert_eq!(ra_in.dst, l.r_ll);
    assert_eq!(ra_in.hop_limit, 255);
}

#[test]
#[ignore = "privileged: run with ./test.sh (root, netns)"]
fn router_solicitation_during_dad_goes_out_from_unspecified() {
    let r = Netns::new_router("m6n-dr").unwrap();
    let h = Netns::new("m6n-dh").unwrap();
    veth_pair(&r, "r0", &h, "eth0").unwrap();
    // Slow DAD: the host's link-local stays tentative during the test.
    h.sysctl("net.ipv6.conf.eth0.dad_transmits", "10").unwrap();
    h.sysctl("net.ipv6.conf.eth0.accept_ra", "0").unwrap();
    r.link_up("r0").unwrap();
    let r_idx = r.ifindex("r0").unwrap();
    let h_idx = h.ifindex("eth0").unwrap();
    let (ready_tx, ready_rx) = mpsc::channel();
    let listener = r.spawn_tokio(move || async move {
        let mut rx = NdpReceiver::bind(r_idx).unwrap();
        ready_tx.send(()).unwrap();
        tokio::time::timeout(T, async {
            loop {
                let p = rx.recv().await.unwrap();
                if matches!(p.repr, NdpRepr::RouterSolicit { .. }) {
                    return p;
                }
            }
        })
        .await
        .expect("no RS")
    });
    ready_rx.recv_timeout(T).unwrap();
    h.link_up("eth0").unwrap();
    h.wait_carrier("eth0", true, T).unwrap();
    let addrs = h.addrs6("eth0").unwrap();
    assert!(
        addrs
            .iter()
            .all(|(_, f)| f.iter().any(|x| x == "tentative")),
        "{addrs:?}"
    );
    let h_mac = h.mac_bytes("eth0").unwrap();
    h.run_tokio(|| async move {
        let tx = NdpSender::bind(h_idx).unwrap();
        // With a source link-layer option: it must be dropped for `::`.
        tx.send(
            &NdpRepr::RouterSolicit {
                source_ll: Some(h_mac),
            },
            None,
            ALL_ROUTERS,
        )
        .await
        .unwrap();
    })
    .unwrap();
    let rs = listener.join().unwrap().unwrap();
    assert_eq!(rs.src, Ipv6Addr::UNSPECIFIED);
    assert_eq!(rs.hop_limit, 255);
    assert_eq!(rs.src_mac, h_mac);
    assert_eq!(rs.repr, NdpRepr::RouterSolicit { source_ll: None });
}

#[test]
#[ignore = "privileged: run with ./test.sh (root, netns)"]
fn receiver_survives_admin_down_up_and_reports_a_removed_interface() {
    let l = link();
    let (r_idx, r_mac, r_ll, h_idx) = (l.r_idx, l.r_mac, l.r_ll, l.h_idx);
    let (step_tx, step_rx) = mpsc::channel::<&'static str>();
    let (ack_tx, ack_rx) = mpsc::channel::<()>();
    let receiver = l.h.spawn_tokio(move || async move {
        let mut rx = NdpReceiver::bind(h_idx).unwrap();
        ack_tx.send(()).unwrap();
        // First RA arrives after the interface went down and up again.
        let p = tokio::time::timeout(T, rx.recv())
            .await
            .expect("no RA after down/up");
        let p = p.expect("receiver failed after admin down/up");
        assert_eq!(first_prefix(&p.repr), Some("2001:db8:f::".parse().unwrap()));
        ack_tx.send(()).unwrap();
        // Now the interface is deleted: a typed error, not a hang.
        let e = tokio::time::timeout(T, rx.recv())
            .await
            .expect("receiver hangs on a removed interface")
            .unwrap_err();
        drop(step_rx);
        e.to_string()
    });
    ack_rx.recv_timeout(T).unwrap();
    l.h.link_down("eth0").unwrap();
    l.h.link_up("eth0").unwrap();
    l.h.wait_carrier("eth0", true, T).unwrap();
    l.r.run_tokio(|| async move {
        let sock = PacketSocket::bind(r_idx).unwrap();
        let f = ndp_frame(
            &ra("2001:db8:f::", r_mac),
            r_mac,
            None,
            r_ll,
            ALL_NODES,
            255,
        )
        .unwrap();
        sock.send_frame(&f).await.unwrap();
    })
    .unwrap();
    ack_rx.recv_timeout(T).unwrap();
    l.h.link_del("eth0").unwrap();
    let _ = step_tx.send("deleted");
    let msg = receiver.join().unwrap().unwrap();
    assert!(msg.contains(&format!("ifindex {h_idx}")), "{msg}");
}

/// host-prep's use: a bridge with no uplink impersonates a gateway. The
/// receiver on the bridge sees a port's RS; the sender on the bridge answers
/// from the gateway's link-local address with the bridge's MAC.
#[test]
#[ignore = "privileged: run with ./test.sh (root, netns)"]
fn receiver_and_sender_work_on_a_bridge() {
    let sw = Netns::new("m6n-bsw").unwrap();
    let h = Netns::new("m6n-bh").unwrap();
    sw.bridge("br0").unwrap();
    veth_pair(&sw, "port0", &h, "eth0").unwrap();
    sw.bridge_attach("port0", "br0").unwrap();
    h.sysctl("net.ipv6.conf.eth0.accept_ra", "0").unwrap();
    h.link_up("eth0").unwrap();
    let gw_mac = [0x02, 0x00, 0x5e, 0x00, 0x53, 0x01];
    sw.set_mac("br0", "02:00:5e:00:53:01").unwrap();
    sw.addr_add("br0", "fe80::1/64", true).unwrap();
    let h_ll: Ipv6Addr = h.wait_link_local("eth0", T).unwrap().parse().unwrap();
    let h_mac = h.mac_bytes("eth0").unwrap();
    let br_idx = sw.ifindex("br0").unwrap();
    let h_idx = h.ifindex("eth0").unwrap();
    let gw: Ipv6Addr = "fe80::1".parse().unwrap();

    let (ready_tx, ready_rx) = mpsc::channel();
    let router = sw.spawn_tokio(move || async move {
        let mut rx = NdpReceiver::bind(br_idx).unwrap();
        let tx = NdpSender::bind(br_idx).unwrap();
        ready_tx.send(()).unwrap();
        let rs = tokio::time::timeout(T, async {
            loop {
                let p = rx.recv().await.unwrap();
                if matches!(p.repr, NdpRepr::RouterSolicit { .. }) {
                    return p;
                }
            }
        })
        .await
        .expect("bridge did not see the RS");
        // Answer to the soliciting host directly.
        tx.send(&ra("2001:db8:b::", gw_mac), Some(gw), rs.src)
            .await
            .unwrap();
        rs
    });
    ready_rx.recv_timeout(T).unwrap();
    let got = h
        .run_tokio(|| async move {
            let mut rx = NdpReceiver::bind(h_idx).unwrap();
            let tx = NdpSender::bind(h_idx).unwrap();
            tx.send(
                &NdpRepr::RouterSolicit {
                    source_ll: Some(h_mac),
                },
                None,
                ALL_ROUTERS,
            )
            .await
            .unwrap();
            tokio::time::timeout(T, async {
                loop {
                    let p = rx.recv().await.unwrap();
                    if matches!(p.repr, NdpRepr::RouterAdvert(_)) {
                        return p;
                    }
                }
            })
            .await
            .expect("no RA from the bridge")
        })
        .unwrap();
    let rs = router.join().unwrap().unwrap();
    assert_eq!(rs.src, h_ll);
    assert_eq!(rs.src_mac, h_mac);
    assert_eq!(got.src, gw);
    assert_eq!(got.dst, h_ll);
    assert_eq!(
        got.src_mac, gw_mac,
        "the RA leaves with the bridge's (gateway's) MAC"
    );
    assert_eq!(
        first_prefix(&got.repr),
        Some("2001:db8:b::".parse().unwrap())
    );
}
