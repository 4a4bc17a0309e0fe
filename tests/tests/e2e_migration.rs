//! End-to-end live migration under QEMU (TCG) in the two-site testbed.
//! Privileged (root, netns, QEMU) and slow: run with `./test.sh`, or
//! `cargo test -p mat6-tests --test e2e_migration -- --include-ignored --test-threads=1 --nocapture`.
//! Needs the guest image: `images/build.sh`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use mat6_tests::qemu::GuestImage;
use mat6_tests::testbed::{Mat6Bins, Mode, RunResult, Testbed, TestbedOptions, Tools};

/// The host-side binaries: mat6-probe from this package; ims-server,
/// guest-agent and host-prep from `target/release` (what `./test.sh` builds
/// before the guest image, so host and guest run the same agent), else from
/// this profile's dir.
fn tools() -> Tools {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap().to_path_buf();
    let release = profile_dir.parent().map(|t| t.join("release"));
    let mat6 = release
        .as_deref()
        .and_then(Mat6Bins::in_dir)
        .or_else(|| Mat6Bins::in_dir(&profile_dir));
    if let Some(m) = &mat6 {
        println!("mat6 binaries: {}", m.host_prep.parent().unwrap().display());
    }
    Tools {
        probe: PathBuf::from(env!("CARGO_BIN_EXE_mat6-probe")),
        mat6,
    }
}

fn image() -> GuestImage {
    GuestImage::locate().expect("guest image (run images/build.sh)")
}

fn report(r: &RunResult) {
    println!(
        "mode={} mem={}MiB T_DW={:.1}ms (cn->vm {:.1}, vm->cn {:.1}) T_ALL={:.1}ms qemu_downtime={}ms qemu_total={}ms udp_lost={} udp_gap={:.1}ms tcp_survived={} tcp_gap={:.1}ms",
        r.mode,
        r.mem_mb,
        r.tdw_ms,
        r.ping_cn_to_vm.max_gap_ms,
        r.ping_vm_to_cn.max_gap_ms,
        r.tall_ms,
        r.qemu_downtime_ms,
        r.qemu_total_ms,
        r.udp_lost,
        r.udp_max_gap_ms,
        r.tcp_survived,
        r.tcp_max_gap_ms
    );
}

fn assert_run(r: &RunResult) {
    assert!(
        r.qemu_total_ms > 0,
        "migration did not report a total time: {r:?}"
    );
    assert!(
        r.tcp_survived,
        "TCP stream did not survive the migration: {}",
        r.tcp_report
    );
    assert!(
        r.resumed_cn_to_vm,
        "CN -> VM replies did not resume after the migration: {:?}",
        r.ping_cn_to_vm
    );
    assert!(
        r.resumed_vm_to_cn,
        "VM -> CN replies did not resume after the migration: {:?}",
        r.ping_vm_to_cn
    );
    // Both pings ran during the whole window: a few hundred replies each.
    assert!(r.ping_cn_to_vm.replies > 200, "{:?}", r.ping_cn_to_vm);
    assert!(r.ping_vm_to_cn.replies > 200, "{:?}", r.ping_vm_to_cn);
    let sent = r
        .udp_report
        .get("sent")
        .and_then(|v| v.as_u64())
        .unwrap_or(0);
    assert!(sent > 100, "UDP stream did not run: {}", r.udp_report);
    assert!(
        r.udp_lost < sent / 2,
        "UDP stream mostly lost: {}",
        r.udp_report
    );
}

#[test]
#[ignore = "privileged: run with ./test.sh (root, netns)"]
fn e2e_lan_migration_keeps_connections() {
    let img = image();
    let mut tb = Testbed::new(&TestbedOptions::default()).expect("testbed");
    let r = tb
        .run_migration(&img, &tools(), Mode::Lan, 128)
        .expect("lan migration");
    report(&r);
    assert_run(&r);
}

/// The QEMU harness itself: boot with an overlay, run commands over the
/// control shell (output and exit status), QMP status.
#[test]
#[ignore = "privileged: run with ./test.sh (root, netns)"]
fn e2e_qemu_harness_boots_and_runs_commands() {
    use mat6_tests::qemu::{Overlay, Qemu, VmSpec};
    use std::time::Duration;
    let img = image();
    let spec = VmSpec::new("harness", 128).overlay(
        Overlay::new()
            .vm_conf("HOSTNAME=m6e-harness\nmat6_setup() { echo setup-ran >/tmp/setup; }\n")
            .file("/etc/mat6/extra.txt", "hello overlay\n", 0o600),
    );
    let mut vm = Qemu::start(&img, &spec, None).expect("start qemu");
    let boot = vm.wait_ready(Duration::from_secs(120)).expect("boot");
    println!("boot to control shell: {boot:?}");
    assert_eq!(vm.status().unwrap(), "running");
    let out = vm
        .sh_ok(
            "hostname; cat /etc/mat6/extra.txt /tmp/setup",
            Duration::from_secs(10),
        )
        .unwrap();
    assert_eq!(out, "m6e-harness\nhello overlay\nsetup-ran\n");
    let (rc, _) = vm.sh("false", Duration::from_secs(10)).unwrap();
    assert_eq!(rc, 1);
    let out = vm
        .sh_ok("ls /sys/class/net", Duration::from_secs(10))
        .unwrap();
    assert_eq!(out.split_whitespace().collect::<Vec<_>>(), ["lo"]);
    // The image's tools run (dynamic libraries present): iputils ping with
    // timestamps, nft, the probe.
    let out = vm
        .sh(
            "ping -6 -n -D -c 2 -i 0.01 ::1 2>&1",
            Duration::from_secs(10),
        )
        .unwrap()
        .1;
    println!("guest ping: {out}");
    assert_eq!(out.matches("bytes from ::1").count(), 2, "{out}");
    let out = vm
        .sh_ok(
            "nft list ruleset && mat6-probe --help",
            Duration::from_secs(10),
        )
        .unwrap();
    assert!(out.contains("udp-probe"), "{out}");
}

/// The cross-subnet migration with preparation, there and back (A→B→A):
/// `host-prep migrate` with guest-agent in the guest and on the CN; ping
/// between the HoAs both ways, UDP and TCP streams between the HoAs.
#[test]
#[ignore = "privileged: run with ./test.sh (root, netns)"]
fn e2e_prep_migration_there_and_back() {
    let img = image();
    let t = tools();
    assert!(
        img.has_agent,
        "guest image without guest-agent: rebuild with images/build.sh"
    );
    assert!(
        t.mat6.is_some(),
        "build ims-server, guest-agent and host-prep first (cargo build --workspace)"
    );
    let mut tb = Testbed::new(&TestbedOptions::default()).expect("testbed");
    let legs = tb
        .run_round_trip(&img, &t, Mode::Prep, 128)
        .expect("prep migration A->B->A");
    assert_eq!(legs.len(), 2);
    for r in &legs {
        report(r);
        if let Some(hp) = &r.host_prep {
            println!("host-prep: {hp}");
        }
        assert_run(r);
    }
    // The NICs swapped roles at each migration.
    let active = |r: &RunResult| {
        r.host_prep
            .as_ref()
            .and_then(|h| h["new_active"].as_str().map(str::to_owned))
    };
    assert_eq!(active(&legs[0]).as_deref(), Some("nic1"));
    assert_eq!(active(&legs[1]).as_deref(), Some("nic0"));
    // Each prepared leg ran with the bicast to the prepared NIC (the
    // testbed's guest config turns it on; MAT6_BICAST=0 turns it off).
    if std::env::var("MAT6_BICAST").map_or(true, |v| v != "0") {
        assert_eq!(
            legs[0].guest_bicasts,
            Some(1),
            "{:?}",
            legs[0].guest_bicasts
        );
        assert_eq!(
            legs[1].guest_bicasts,
            Some(2),
            "{:?}",
            legs[1].guest_bicasts
        );
    }
}

/// Cross-subnet migration without preparation (`host-prep migrate
/// --no-prep`): the agent finds site B after the resume by itself.
#[test]
#[ignore = "privileged: run with ./test.sh (root, netns)"]
fn e2e_noprep_migration_recovers() {
    let img = image();
    let t = tools();
    assert!(
        img.has_agent,
        "guest image without guest-agent: rebuild with images/build.sh"
    );
    assert!(
        t.mat6.is_some(),
        "build ims-server, guest-agent and host-prep first (cargo build --workspace)"
    );
    let mut tb = Testbed::new(&TestbedOptions::default()).expect("testbed");
    let r = tb
        .run_migration(&img, &t, Mode::NoPrep, 128)
        .expect("noprep migration A->B");
    report(&r);
    assert_run(&r);
    let hp = r.host_prep.as_ref().expect("host-prep report");
    assert_eq!(hp["mode"], "noprep", "{hp}");
    assert_eq!(
        hp["new_active"], "nic0",
        "no NIC swap without preparation: {hp}"
    );
    // The agent fetched the IMS site registry and site B's gateway answered
    // its probe (MAT6_SITE_PROBE=0 turns the probe off).
    if std::env::var("MAT6_SITE_PROBE").map_or(true, |v| v != "0") {
        assert!(
            r.guest_probe_hits.is_some_and(|n| n >= 1),
            "site probe: {:?} registered gateways answered",
            r.guest_probe_hits
        );
    }
}
