//! guest-agent handovers in network namespaces: a planned switch to a
//! prepared standby and an unplanned move with nothing prepared, each under
//! 10 ms pings in both directions between the HoAs and a TCP stream, with
//! captures on the routers' links.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod agent_common;

use std::time::Duration;

use agent_common::*;
use mat6_tests::netns::wait_for;

/// Every missing reply lies in one run (the switch window) no longer than
/// `max_ms`.
fn assert_one_window(what: &str, r: &PingResult, max_ms: f64, diag: &dyn Fn() -> String) {
    assert!(r.sent > 100, "{what}: ping sent only {} packets", r.sent);
    assert!(
        r.missing_runs.len() <= 1,
        "{what}: replies lost outside the switch window: {:?}\n{}",
        r.missing_runs,
        diag()
    );
    let lost_ms = r
        .missing_runs
        .first()
        .map(|x| x.1 as f64 * 10.0)
        .unwrap_or(0.0);
    assert!(
        lost_ms <= max_ms && r.max_gap_ms <= max_ms + 50.0,
        "{what}: switch window {lost_ms} ms lost, largest gap {:.1} ms (limit {max_ms} ms)\n{}",
        r.max_gap_ms,
        diag()
    );
}

/// The captured packets carry only MoAs (no HoA) and no extra header.
fn assert_only_moas(what: &str, text: &str) {
    assert!(
        text.contains("ICMP6, echo request") || text.contains("ICMP6, echo reply"),
        "{what}: capture saw no echo traffic:\n{text}"
    );
    for hoa in [VM_HOA, CN_HOA] {
        assert!(
            !text.contains(&hoa.to_string()),
            "{what}: HoA {hoa} seen on the wire:\n{text}"
        );
    }
    // Every packet between global addresses has its transport header
    // right after the IPv6 header (no tunnel, no extension header).
    let mut checked = 0;
    for l in text.lines().filter(|l| l.contains("next-header")) {
        if l.contains("fe80::") || l.contains("ff02::") {
            continue; // link-local NDP/MLD (MLD uses a hop-by-hop header)
        }
        checked += 1;
        assert!(
            l.contains("next-header ICMPv6 (58)")
                || l.contains("next-header TCP (6)")
                || l.contains("next-header UDP (17)"),
            "{what}: unexpected next header: {l}"
        );
    }
    assert!(checked > 0, "{what}: no global packets captured:\n{text}");
}

#[test]
#[ignore = "privileged: run with ./test.sh (root, netns)"]
fn standby_switch_keeps_ping_and_tcp() {
    let mut bed = Bed::new(BedOptions {
        standby: true,
        radvd: true,
    });
    bed.start_cn();
    bed.start_vm();
    bed.wait_ready();
    let diag = || bed.diag();

    // The IMS holds the standby before the move (what host-prep waits for).
    let b = bed.ims_lookup(VM_HOA).unwrap();
    assert_eq!(b.active, Some(moa(PFX_A, VM_MAC0)));
    assert_eq!(b.standby, vec![moa(PFX_B, VM_MAC1)]);

    let cap_b = Capture::start(&bed.rb, "lan", bed.path("rb.pcap"));
    let cap_a = Capture::start(&bed.ra, "lan", bed.path("ra.pcap"));
    let p1 = Ping::start(&bed.vm, VM_HOA, CN_HOA, bed.path("ping-vm-cn.txt"));
    let p2 = Ping::start(&bed.cn, CN_HOA, VM_HOA, bed.path("ping-cn-vm.txt"));
    let tcp = TcpStream::start(&bed.cn, CN_HOA, &bed.vm, VM_HOA, 5001, true);
    std::thread::sleep(Duration::from_millis(1500));

    bed.cut_primary();
    wait_for("VM active on the standby", Duration::from_secs(5), || {
        bed.vm().active_moa() == Some(moa(PFX_B, VM_MAC1))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", diag()));
    wait_for("CN follows the VM", Duration::from_secs(5), || {
        bed.cn().peer_active(VM_HOA) == Some(moa(PFX_B, VM_MAC1))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", diag()));
    std::thread::sleep(Duration::from_millis(1500));

    let (sent, recv) = tcp.finish();
    let r1 = p1.stop();
    let r2 = p2.stop();
    let ta = cap_a.stop();
    let tb = cap_b.stop();

    let sent = sent.unwrap_or_else(|e| panic!("TCP sender: {e}\n{}", diag()));
    let recv = recv.unwrap_or_else(|e| panic!("TCP receiver: {e}\n{}", diag()));
    assert!(sent > 100_000, "TCP stream too short: {sent} bytes");
    assert_eq!(sent, recv, "TCP bytes lost or duplicated");

    eprintln!(
        "standby switch: vm->cn lost {:?} max gap {:.1} ms; cn->vm lost {:?} max gap {:.1} ms; tcp {} bytes",
        r1.missing_runs, r1.max_gap_ms, r2.missing_runs, r2.max_gap_ms, sent
    );
    assert_one_window("vm->cn", &r1, 200.0, &diag);
    assert_one_window("cn->vm", &r2, 200.0, &diag);

    assert_only_moas("router B link", &tb);
    assert_only_moas("router A link", &ta);
    // After the switch, router B's link carries the VM's standby MoA.
    assert!(tb.contains(&moa(PFX_B, VM_MAC1).to_string()), "{tb}");

    // The IMS and the status agree.
    let b = bed.ims_lookup(VM_HOA).unwrap();
    assert_eq!(b.active, Some(moa(PFX_B, VM_MAC1)));
    let st = bed.vm().status().unwrap();
    let h = st["status"]["handovers"].as_array().unwrap();
    let last = h.last().unwrap();
    assert_eq!(last["kind"], "standby", "{st}");
    assert!(last["ims_ack_us"].is_u64(), "{st}");
    assert_eq!(
        st["status"]["interfaces"][0]["state"]["state"], "down",
        "{st}"
    );
}

#[test]
#[ignore = "privileged: run with ./test.sh (root, netns)"]
fn unplanned_move_forms_new_moa_and_keeps_tcp() {
    let mut bed = Bed::new(BedOptions {
        standby: false,
        radvd: false,
    });
    bed.start_cn();
    bed.start_vm();
    bed.wait_ready();
    let diag = || bed.diag();
    assert!(bed.vm().standby_moas().is_empty());

    let p1 = Ping::start(&bed.vm, VM_HOA, CN_HOA, bed.path("ping-vm-cn.txt"));
    let p2 = Ping::start(&bed.cn, CN_HOA, VM_HOA, bed.path("ping-cn-vm.txt"));
    // Under load: the stream runs as fast as it can, so many segments from
    // the new, still unknown MoA reach the CN before it learns the binding;
    // none of them may draw a reset.
    let tcp = TcpStream::start(&bed.cn, CN_HOA, &bed.vm, VM_HOA, 5002, false);
    std::thread::sleep(Duration::from_millis(1000));

    // The primary NIC moves to site B: carrier off, re-plug, carrier on.
    bed.move_primary_to_b();
    let new = moa(PFX_B, VM_MAC0);
    wait_for("VM active on site B", Duration::from_secs(5), || {
        bed.vm().active_moa() == Some(new)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", diag()));
    wait_for("CN follows the VM", Duration::from_secs(5), || {
        bed.cn().peer_active(VM_HOA) == Some(new)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", diag()));
    std::thread::sleep(Duration::from_millis(1500));

    let (sent, recv) = tcp.finish();
    let r1 = p1.stop();
    let r2 = p2.stop();
    let sent = sent.unwrap_or_else(|e| panic!("TCP sender: {e}\n{}", diag()));
    let recv = recv.unwrap_or_else(|e| panic!("TCP receiver: {e}\n{}", diag()));
    assert_eq!(sent, recv, "TCP bytes lost or duplicated");
    eprintln!(
        "unplanned: vm->cn lost {:?} max gap {:.1} ms; cn->vm lost {:?} max gap {:.1} ms; tcp {} bytes",
        r1.missing_runs, r1.max_gap_ms, r2.missing_runs, r2.max_gap_ms, sent
    );
    assert_one_window("vm->cn", &r1, 1000.0, &diag);
    assert_one_window("cn->vm", &r2, 1000.0, &diag);

    let st = bed.vm().status().unwrap();
    let last = st["status"]["handovers"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(last["kind"], "unplanned", "{st}");
    // The old MoA is gone from the VM.
    let addrs = bed.vm.ip(&["-6", "addr", "show", "dev", "eth0"]).unwrap();
    assert!(!addrs.contains(&moa(PFX_A, VM_MAC0).to_string()), "{addrs}");
    assert!(addrs.contains(&new.to_string()), "{addrs}");
}
