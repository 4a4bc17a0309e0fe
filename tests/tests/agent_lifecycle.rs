//! guest-agent start/stop in network namespaces: a clean shutdown removes
//! its nft table, routes and MoAs but keeps the HoA; a restart re-adopts;
//! a crash (SIGKILL) leaves nothing that blocks the next start.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod agent_common;

use std::time::Duration;

use agent_common::*;
use mat6_tests::netns::wait_for;

fn ping_ok(bed: &Bed) -> bool {
    bed.vm
        .exec(
            "ping",
            &[
                "-6",
                "-c",
                "3",
                "-i",
                "0.2",
                "-W",
                "1",
                "-I",
                &VM_HOA.to_string(),
                &CN_HOA.to_string(),
            ],
        )
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[test]
#[ignore = "privileged: run with ./test.sh (root, netns)"]
fn shutdown_cleans_up_restart_and_crash_recover() {
    let mut bed = Bed::new(BedOptions {
        standby: true,
        radvd: true,
    });
    bed.start_cn();
    bed.start_vm();
    bed.wait_ready();
    assert!(ping_ok(&bed), "{}", bed.diag());
    // The human-readable status (once the first handover is complete).
    wait_for("first handover recorded", Duration::from_secs(10), || {
        bed.vm()
            .status()
            .and_then(|s| s["status"]["handovers"].as_array().map(|h| !h.is_empty()))
            .unwrap_or(false)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", bed.diag()));
    let out = std::process::Command::new(bin("guest-agent"))
        .args(["status", "--socket"])
        .arg(bed.path("vm.sock"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!("HoA:            {VM_HOA}")),
        "{text}"
    );
    assert!(text.contains("eth0       primary   active"), "{text}");
    assert!(text.contains("eth1       secondary standby"), "{text}");
    assert!(text.contains(&CN_HOA.to_string()), "{text}");
    assert!(text.contains("initial"), "{text}");
    // Prometheus metrics on the configured port.
    let metrics = bed
        .vm
        .run(|| {
            use std::io::{Read, Write};
            let mut c = std::net::TcpStream::connect("[::1]:9343").unwrap();
            c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            let mut s = String::new();
            c.read_to_string(&mut s).unwrap();
            s
        })
        .unwrap();
    assert!(metrics.starts_with("HTTP/1.1 200 OK"), "{metrics}");
    assert!(
        metrics.contains("mat6_agent_handovers_total 1"),
        "{metrics}"
    );
    assert!(metrics.contains("mat6_agent_peers 1"), "{metrics}");

    // Clean shutdown.
    bed.vm_agent.as_mut().unwrap().stop();
    let nft = bed
        .vm
        .exec("nft", &["list", "table", "ip6", "mat6"])
        .unwrap();
    assert!(
        !nft.status.success(),
        "nft table left behind:\n{}",
        String::from_utf8_lossy(&nft.stdout)
    );
    let addrs = bed.vm.ip(&["-6", "addr"]).unwrap();
    for m in [moa(PFX_A, VM_MAC0), moa(PFX_B, VM_MAC1)] {
        assert!(
            !addrs.contains(&m.to_string()),
            "MoA {m} left behind:\n{addrs}"
        );
    }
    assert!(addrs.contains(&VM_HOA.to_string()), "HoA dropped:\n{addrs}");
    let routes = bed.vm.ip(&["-6", "route", "show", "default"]).unwrap();
    assert!(
        !routes.contains("fe80::a") && !routes.contains("fe80::b"),
        "routes left behind:\n{routes}"
    );
    let neigh = bed
        .vm
        .ip(&["-6", "neigh", "show", "nud", "permanent"])
        .unwrap();
    assert!(
        neigh.trim().is_empty(),
        "neighbour entries left behind:\n{neigh}"
    );
    assert!(!bed.path("vm.sock").exists(), "status socket left behind");

    // Restart re-adopts.
    bed.start_vm();
    wait_for("VM active again", Duration::from_secs(10), || {
        bed.vm().active_moa() == Some(moa(PFX_A, VM_MAC0)) && bed.vm().registered()
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", bed.diag()));
    wait_for("ping after restart", Duration::from_secs(10), || {
        ping_ok(&bed)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", bed.diag()));

    // Crash: everything stays behind; the next start must still work.
    bed.vm_agent.as_mut().unwrap().kill9();
    let nft = bed
        .vm
        .exec("nft", &["list", "table", "ip6", "mat6"])
        .unwrap();
    assert!(
        nft.status.success(),
        "the crash should leave the table (it is replaced on start)"
    );
    let seq_before = bed.ims_lookup(VM_HOA).unwrap().seq;
    bed.start_vm();
    wait_for("VM active after crash", Duration::from_secs(10), || {
        bed.vm().active_moa() == Some(moa(PFX_A, VM_MAC0)) && bed.vm().registered()
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", bed.diag()));
    wait_for("ping after crash restart", Duration::from_secs(10), || {
        ping_ok(&bed)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", bed.diag()));
    let seq_after = bed.ims_lookup(VM_HOA).unwrap().seq;
    assert!(
        seq_after > seq_before,
        "seq did not move forward: {seq_before} -> {seq_after}"
    );
    // One table, not two.
    let tables = bed.vm.exec_ok("nft", &["list", "tables"]).unwrap();
    assert_eq!(tables.matches("table ip6 mat6").count(), 1, "{tables}");
}
