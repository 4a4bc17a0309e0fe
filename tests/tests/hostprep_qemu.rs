//! host-prep's QMP part against real QEMU (TCG) processes: a guest with two
//! NICs migrates between two "hosts" (network namespaces, each with a real
//! bridge and a bridge with no uplink); `host-prep receive` on the
//! destination swaps the attachments and turns the old active NIC's carrier
//! off on RESUME, which the guest sees; `host-prep migrate --no-prep` runs
//! the whole sequence and prints its phase table as JSON.
//!
//! Namespaces are `m6h-PID-N`; QEMU processes, taps and namespaces are
//! removed on drop (the harness guards), also when an assertion fails.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use mat6_tests::netns::{ChildGuard, Netns};
use mat6_tests::qemu::{GuestImage, NicSpec, Qemu, VmSpec};
use serde_json::Value;

const VM: &str = "m6hvm";
const TAP0: &str = "m6ht0";
const TAP1: &str = "m6ht1";

/// A private directory under `$TMPDIR`, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("m6h-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The host-prep binary next to this test binary (`cargo test --workspace`
/// builds it), or `$HOST_PREP_BIN`.
fn host_prep_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("HOST_PREP_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let bin = dir.join("host-prep");
    assert!(
        bin.is_file(),
        "{} missing: run `cargo build -p host-prep` (./test.sh builds the workspace)",
        bin.display()
    );
    bin
}

/// A host: a namespace with the real bridge `br0` and the no-uplink `brnu`.
fn host() -> Netns {
    let ns = Netns::new("m6h").unwrap();
    ns.bridge("br0").unwrap();
    ns.bridge("brnu").unwrap();
    ns
}

fn spec() -> VmSpec {
    VmSpec::new(VM, 128)
        .nic(NicSpec::new("net0", "52:54:00:6d:68:01", TAP0, "br0"))
        .nic(NicSpec::new("net1", "52:54:00:6d:68:02", TAP1, "brnu"))
}

fn write_config(dir: &Path, a: &Netns, b: &Netns, uri: &str) -> PathBuf {
    let bin = host_prep_bin();
    let cfg = format!(
        r#"
state_dir = "{dir}/state"

[timeouts]
start_ms = 20000
migrate_ms = 120000

[migration]
downtime_limit_ms = 50

[sites.A]
bridge = "br0"
standby_bridge = "brnu"
receive_command = ["ip", "netns", "exec", "{a}", "{bin}", "-c", "{dir}/host-prep.toml", "--site", "A", "receive", "--vm", "{{vm}}", "--active", "{{active}}", "--attach", "{{attach}}", "--existing", "--json"]
migrate_uri = "{uri}"

[sites.B]
bridge = "br0"
standby_bridge = "brnu"
receive_command = ["ip", "netns", "exec", "{b}", "{bin}", "-c", "{dir}/host-prep.toml", "--site", "B", "receive", "--vm", "{{vm}}", "--active", "{{active}}", "--attach", "{{attach}}", "--existing", "--json"]
migrate_uri = "{uri}"

[vms.{VM}]
qmp = "{dir}/{{site}}.qmp"
hoa = "2001:db8:100::10"
[[vms.{VM}.nics]]
id = "net0"
tap = "{TAP0}"
[[vms.{VM}.nics]]
id = "net1"
tap = "{TAP1}"
"#,
        dir = dir.display(),
        a = a.name(),
        b = b.name(),
        bin = bin.display(),
    );
    let path = dir.join("host-prep.toml");
    std::fs::write(&path, cfg).unwrap();
    path
}

/// Link-local addresses of the guest's eth0 / eth1 (EUI-64 of their MACs).
const LL0: &str = "fe80::5054:ff:fe6d:6801";
const LL1: &str = "fe80::5054:ff:fe6d:6802";

/// Does the guest NIC with link-local `ll` answer a ping sent out of
/// `bridge` in `ns`? A NIC whose link QEMU set down neither receives nor
/// sends, so this is the data-path view of its carrier.
fn answers(ns: &Netns, ll: &str, bridge: &str) -> bool {
    ns.ping6(&format!("{ll}%{bridge}"), 1)
}

fn wait_answers(ns: &Netns, ll: &str, bridge: &str, timeout: Duration) {
    let start = std::time::Instant::now();
    while !answers(ns, ll, bridge) {
        assert!(
            start.elapsed() < timeout,
            "guest {ll} does not answer on {bridge} in {} after {timeout:?}",
            ns.name()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn master_of(ns: &Netns, ifname: &str) -> String {
    let out = ns.ip(&["-o", "link", "show", "dev", ifname]).unwrap();
    out.split_whitespace()
        .skip_while(|w| *w != "master")
        .nth(1)
        .unwrap_or("")
        .to_string()
}

/// Reads JSON lines from a child's stdout until one has `"event": want`.
fn read_event(lines: &mut impl Iterator<Item = std::io::Result<String>>, want: &str) -> Value {
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Ok(v) = serde_json::from_str::<Value>(&line) {
            if v["event"] == want {
                return v;
            }
            assert_ne!(v["event"], "error", "receive failed: {v}");
        }
    }
    panic!("receive's stdout ended before event {want}");
}

fn symlink(target: &Path, link: &Path) {
    let _ = std::fs::remove_file(link);
    std::os::unix::fs::symlink(target, link).unwrap();
}

#[test]
#[ignore = "privileged: run with ./test.sh (root, netns)"]
fn receive_swaps_nics_and_turns_old_active_carrier_off_on_resume() {
    let img = GuestImage::locate().unwrap();
    let tmp = TempDir::new();
    let (a, b) = (host(), host());
    let mut src = Qemu::start(&img, &spec(), Some(&a)).unwrap();
    // Booted, both NICs up: each answers on its bridge.
    wait_answers(&a, LL0, "br0", Duration::from_secs(120));
    wait_answers(&a, LL1, "brnu", Duration::from_secs(10));

    let uri = src.migration_uri();
    // The destination QEMU starts with the source's attachments; host-prep
    // moves the taps to the swapped bridges before the VM resumes.
    let mut dst = Qemu::start(&img, &spec().incoming(&uri), Some(&b)).unwrap();
    dst.release_qmp().unwrap();
    let cfg = write_config(tmp.path(), &a, &b, &uri);
    symlink(&dst.qmp_path(), &tmp.path().join("B.qmp"));

    let mut cmd = b.command(host_prep_bin());
    cmd.args(["-c"])
        .arg(&cfg)
        .args([
            "--site",
            "B",
            "receive",
            "--vm",
            VM,
            "--active",
            "net0",
            "--attach",
            "swap",
            "--existing",
            "--json",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    let mut recv = ChildGuard::spawn(cmd).unwrap();
    let stdout = recv.child_mut().stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let listening = read_event(&mut lines, "listening");
    assert_eq!(listening["vm"], VM);
    assert_eq!(
        master_of(&b, TAP1),
        "br0",
        "standby NIC's tap moved to the real bridge"
    );
    assert_eq!(
        master_of(&b, TAP0),
        "brnu",
        "active NIC's tap moved to the no-uplink bridge"
    );

    src.migrate(&uri).unwrap();
    let stats = src.wait_migration(Duration::from_secs(120)).unwrap();
    let switched = read_event(&mut lines, "switched");
    assert_eq!(switched["old_active"], "net0");
    assert_eq!(switched["new_active"], "net1");
    let switch_ms = switched["switch_ms"].as_f64().unwrap();
    assert!(switch_ms > 0.0, "{switched}");
    let status = recv.wait_timeout(Duration::from_secs(10)).unwrap();
    assert!(status.success(), "receive exited with {status}");
    eprintln!(
        "QEMU total {} ms, downtime {} ms; RESUME -> set_link off {switch_ms:.2} ms",
        stats.total_ms, stats.downtime_ms
    );

    // On the destination, eth1 (the prepared standby, now on the real
    // bridge) answers; eth0 (the old active, carrier off) does not.
    wait_answers(&b, LL1, "br0", Duration::from_secs(10));
    assert!(
        !answers(&b, LL0, "brnu"),
        "old active NIC still passes traffic"
    );
    // The guest's own view: eth0 lost its carrier, eth1 has one.
    let carriers = dst
        .sh_ok(
            "cat /sys/class/net/eth0/carrier /sys/class/net/eth1/carrier",
            Duration::from_secs(20),
        )
        .unwrap();
    assert_eq!(
        carriers.split_whitespace().collect::<Vec<_>>(),
        ["0", "1"],
        "{carriers}"
    );
    // Control: the same ping passes once its link is set up again, so the
    // silence above was the carrier.
    dst.reconnect_qmp().unwrap();
    dst.set_link("net0", true).unwrap();
    wait_answers(&b, LL0, "brnu", Duration::from_secs(10));
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("state").join(format!("{VM}.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(state["active"], "net1");
    assert_eq!(state["site"], "B");
    dst.quit().unwrap();
    drop(src);
}

#[test]
#[ignore = "privileged: run with ./test.sh (root, netns)"]
fn migrate_without_preparation_prints_phase_table() {
    let img = GuestImage::locate().unwrap();
    let tmp = TempDir::new();
    let (a, b) = (host(), host());
    let mut src = Qemu::start(&img, &spec(), Some(&a)).unwrap();
    wait_answers(&a, LL0, "br0", Duration::from_secs(120));
    let uri = src.migration_uri();
    let mut dst = Qemu::start(&img, &spec().incoming(&uri), Some(&b)).unwrap();
    dst.release_qmp().unwrap();
    src.release_qmp().unwrap();
    let cfg = write_config(tmp.path(), &a, &b, &uri);
    symlink(&src.qmp_path(), &tmp.path().join("A.qmp"));
    symlink(&dst.qmp_path(), &tmp.path().join("B.qmp"));

    // Dry run first: the plan names the steps and changes nothing.
    let out = a
        .command(host_prep_bin())
        .arg("-c")
        .arg(&cfg)
        .args([
            "--site",
            "A",
            "migrate",
            "--vm",
            VM,
            "--to",
            "B",
            "--no-prep",
            "--dry-run",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plan = String::from_utf8_lossy(&out.stdout);
    assert!(
        plan.contains("QMP migrate") && plan.contains("dry run"),
        "{plan}"
    );
    assert!(!tmp.path().join("state").join(format!("{VM}.json")).exists());

    let out = a
        .command(host_prep_bin())
        .arg("-c")
        .arg(&cfg)
        .args([
            "--site",
            "A",
            "migrate",
            "--vm",
            VM,
            "--to",
            "B",
            "--no-prep",
            "--json",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "migrate failed: {stderr}");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("{report:#}");
    for key in [
        "prep_ms",
        "precopy_ms",
        "qemu_downtime_ms",
        "switch_ms",
        "total_ms",
    ] {
        assert!(report[key].is_f64(), "{key} missing in {report}");
    }
    assert_eq!(report["mode"], "noprep");
    assert_eq!(report["new_active"], "net0", "no swap without preparation");
    assert!(report["total_ms"].as_f64().unwrap() >= report["precopy_ms"].as_f64().unwrap());
    assert!(report["transferred_bytes"].as_u64().unwrap() > 0);
    // Attachments kept: the active NIC is on the destination's real bridge.
    assert_eq!(master_of(&b, TAP0), "br0");
    assert_eq!(master_of(&b, TAP1), "brnu");
    wait_answers(&b, LL0, "br0", Duration::from_secs(10));
    wait_answers(&b, LL1, "brnu", Duration::from_secs(10));
    dst.reconnect_qmp().unwrap();
    dst.quit().unwrap();
}

/// Kills a process we started (by PID) on drop.
struct KillOnDrop(Option<i32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

#[test]
#[ignore = "privileged: run with ./test.sh (root, netns)"]
fn receive_starts_incoming_qemu_from_template_with_swapped_taps() {
    let img = GuestImage::locate().unwrap();
    let tmp = TempDir::new();
    let (a, b) = (host(), host());
    let mut src = Qemu::start(&img, &spec(), Some(&a)).unwrap();
    wait_answers(&a, LL0, "br0", Duration::from_secs(120));
    let d = tmp.path().display().to_string();
    // The destination QEMU's command: the same machine and devices as the
    // source (as the harness starts it), taps from host-prep's placeholders.
    let initrd = src.dir().join("initrd.img");
    let argv = [
        "qemu-system-x86_64",
        "-machine",
        "q35,accel=tcg",
        "-m",
        "128",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-kernel",
        &img.kernel.display().to_string(),
        "-initrd",
        &initrd.display().to_string(),
        "-append",
        "console=ttyS0 panic=-1 quiet ",
        "-qmp",
        "unix:{qmp},server=on,wait=off",
        "-chardev",
        &format!("file,id=con,path={d}/console-{{site}}.log"),
        "-serial",
        "chardev:con",
        "-chardev",
        &format!("socket,id=ctl,path={d}/ctl-{{site}}.sock,server=on,wait=off"),
        "-device",
        "virtio-serial-pci,id=vser0,bus=pcie.0,addr=0x10",
        "-device",
        "virtconsole,chardev=ctl,id=ctl0",
        "-netdev",
        "tap,id=net0,ifname={tap:net0},script=no,downscript=no",
        "-device",
        "virtio-net-pci,netdev=net0,id=net0,mac=52:54:00:6d:68:01,romfile=,bus=pcie.0,addr=0x3",
        "-netdev",
        "tap,id=net1,ifname={tap:net1},script=no,downscript=no",
        "-device",
        "virtio-net-pci,netdev=net1,id=net1,mac=52:54:00:6d:68:02,romfile=,bus=pcie.0,addr=0x4",
        "-incoming",
        "{incoming}",
    ];
    let uri = format!("unix:{d}/mig.sock");
    let cfg = write_config(tmp.path(), &a, &b, &uri);
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    let argv_toml: Vec<String> = argv.iter().map(|s| format!("{s:?}")).collect();
    text = text.replace(
        "hoa = \"2001:db8:100::10\"\n",
        &format!(
            "hoa = \"2001:db8:100::10\"\nincoming = \"{uri}\"\nqemu_log = \"{d}/qemu-dst.log\"\nqemu_command = [{}]\n",
            argv_toml.join(", ")
        ),
    );
    std::fs::write(&cfg, text).unwrap();
    assert!(!b.link_exists(TAP0) && !b.link_exists(TAP1));

    let mut cmd = b.command(host_prep_bin());
    cmd.arg("-c")
        .arg(&cfg)
        .args([
            "--site", "B", "receive", "--vm", VM, "--active", "net0", "--json",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    let mut recv = ChildGuard::spawn(cmd).unwrap();
    let stdout = recv.child_mut().stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let listening = read_event(&mut lines, "listening");
    let pid = listening["qemu_pid"].as_i64().unwrap() as i32;
    let _qemu = KillOnDrop(Some(pid));
    // host-prep created the taps and attached them swapped.
    assert_eq!(master_of(&b, TAP1), "br0");
    assert_eq!(master_of(&b, TAP0), "brnu");

    src.migrate(&uri).unwrap();
    src.wait_migration(Duration::from_secs(120)).unwrap();
    let switched = read_event(&mut lines, "switched");
    assert_eq!(switched["new_active"], "net1");
    assert!(recv
        .wait_timeout(Duration::from_secs(10))
        .unwrap()
        .success());
    // receive exited; the QEMU it started keeps running the VM.
    assert!(nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok());
    wait_answers(&b, LL1, "br0", Duration::from_secs(10));
    assert!(!answers(&b, LL0, "brnu"));
}

#[test]
#[ignore = "privileged: run with ./test.sh (root, netns)"]
fn migrate_on_a_terminal_shows_progress_and_the_phase_table() {
    let img = GuestImage::locate().unwrap();
    let tmp = TempDir::new();
    let (a, b) = (host(), host());
    let mut src = Qemu::start(&img, &spec(), Some(&a)).unwrap();
    wait_answers(&a, LL0, "br0", Duration::from_secs(120));
    let uri = src.migration_uri();
    let mut dst = Qemu::start(&img, &spec().incoming(&uri), Some(&b)).unwrap();
    dst.release_qmp().unwrap();
    src.release_qmp().unwrap();
    let cfg = write_config(tmp.path(), &a, &b, &uri);
    symlink(&src.qmp_path(), &tmp.path().join("A.qmp"));
    symlink(&dst.qmp_path(), &tmp.path().join("B.qmp"));
    // `script` gives host-prep a terminal: the indicatif bar is drawn there.
    let cmdline = format!(
        "{} -c {} --site A migrate --vm {VM} --to B --no-prep",
        host_prep_bin().display(),
        cfg.display()
    );
    let out = a
        .command("script")
        .args(["-qefc", &cmdline, "/dev/null"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let tty = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{tty}");
    assert!(
        tty.contains("transferred,") && tty.contains("dirty-sync"),
        "no progress bar:\n{tty}"
    );
    assert!(
        tty.contains("total (T_ALL)") && tty.contains("(not prepared)"),
        "{tty}"
    );
    wait_answers(&b, LL0, "br0", Duration::from_secs(10));
    dst.reconnect_qmp().unwrap();
    dst.quit().unwrap();
}

#[test]
#[ignore = "privileged: run with ./test.sh (root, netns)"]
fn sigterm_during_precopy_cancels_and_the_vm_stays_at_the_source() {
    let img = GuestImage::locate().unwrap();
    let tmp = TempDir::new();
    let (a, b) = (host(), host());
    let mut src = Qemu::start(&img, &spec(), Some(&a)).unwrap();
    wait_answers(&a, LL0, "br0", Duration::from_secs(120));
    let uri = src.migration_uri();
    let mut dst = Qemu::start(&img, &spec().incoming(&uri), Some(&b)).unwrap();
    dst.release_qmp().unwrap();
    src.release_qmp().unwrap();
    let cfg = write_config(tmp.path(), &a, &b, &uri);
    // A slow link: the pre-copy of ~100 MB takes ~10 s.
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "downtime_limit_ms = 50",
        "downtime_limit_ms = 50\nmax_bandwidth_bytes = 10000000",
    );
    std::fs::write(&cfg, text).unwrap();
    symlink(&src.qmp_path(), &tmp.path().join("A.qmp"));
    symlink(&dst.qmp_path(), &tmp.path().join("B.qmp"));

    let mut cmd = a.command(host_prep_bin());
    cmd.arg("-c")
        .arg(&cfg)
        .args([
            "--site",
            "A",
            "migrate",
            "--vm",
            VM,
            "--to",
            "B",
            "--no-prep",
            "--json",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut mig = ChildGuard::spawn(cmd).unwrap();
    // Interrupt once host-prep has started the migration.
    let stderr = mig.child_mut().stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let mut err = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        err.push_str(&line);
        err.push('\n');
        if line.contains("migration started") {
            break;
        }
    }
    assert!(err.contains("migration started"), "{err}");
    std::thread::sleep(Duration::from_millis(500));
    mig.signal(nix::sys::signal::Signal::SIGTERM).unwrap();
    for line in lines {
        err.push_str(&line.unwrap());
        err.push('\n');
    }
    let st = mig.wait_timeout(Duration::from_secs(20)).unwrap();
    assert_eq!(st.code(), Some(1), "{err}");
    assert!(err.contains("interrupted"), "{err}");
    // The VM still runs at the source, on its active NIC.
    src.reconnect_qmp().unwrap();
    assert_eq!(src.status().unwrap(), "running");
    wait_answers(&a, LL0, "br0", Duration::from_secs(10));
    assert!(!tmp.path().join("state").join(format!("{VM}.json")).exists());
    drop(dst);
}
