//! `host-prep prepare` in network namespaces against a real ims-server and a
//! real guest-agent (the agent tests' bed, `agent_common`): the VM's
//! secondary NIC hangs on `brX`, a bridge with no uplink in the "host"
//! namespace (`sw`); host-prep runs there, makes `brX` impersonate site B's
//! gateway, sends RAs, and waits for the agent's standby MoA at the IMS.
//! QEMU's QMP is stood in for by a small fake whose `set_link` sets the far
//! end of the VM's veth up or down (what QEMU's link state does to a NIC).
//!
//! Every error case must exit non-zero with a message naming the problem
//! and leave `brX` as it was (MAC, addresses) with no process behind.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod agent_common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent_common::*;
use mat6_tests::netns::{veth_pair, wait_for, ChildGuard};
use serde_json::Value;

const SITE_B_PFX: &str = "2001:db8:b::/64";

fn host_prep() -> PathBuf {
    bin("host-prep")
}

/// A fake QMP server on a unix socket: answers every command with success,
/// records `set_link`s, and applies them to the far end of the VM's veth in
/// the host namespace (`nic_to_port`: QEMU NIC id → interface).
struct FakeQmp {
    stop: Arc<AtomicBool>,
    links: Arc<Mutex<Vec<(String, bool)>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeQmp {
    fn start(path: &Path, host_ns: String, nic_to_port: Vec<(String, String)>) -> FakeQmp {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let links = Arc::new(Mutex::new(Vec::new()));
        let (stop2, links2) = (stop.clone(), links.clone());
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                let Ok((conn, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                conn.set_nonblocking(false).unwrap();
                let mut w = conn.try_clone().unwrap();
                let greeting = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": ["oob"]}}"#;
                if writeln!(w, "{greeting}").is_err() {
                    continue;
                }
                for line in BufReader::new(conn).lines() {
                    let Ok(line) = line else { break };
                    let Ok(cmd) = serde_json::from_str::<Value>(&line) else {
                        continue;
                    };
                    let name = cmd["execute"].as_str().unwrap_or("").to_string();
                    if name == "set_link" {
                        let nic = cmd["arguments"]["name"].as_str().unwrap_or("").to_string();
                        let up = cmd["arguments"]["up"].as_bool().unwrap_or(false);
                        if let Some((_, port)) = nic_to_port.iter().find(|(n, _)| *n == nic) {
                            let state = if up { "up" } else { "down" };
                            let _ = std::process::Command::new("ip")
                                .args(["-n", &host_ns, "link", "set", "dev", port, state])
                                .status();
                        }
                        links2.lock().unwrap().push((nic, up));
                    }
                    let mut reply = serde_json::json!({"return": {}});
                    if name == "query-status" {
                        reply =
                            serde_json::json!({"return": {"running": true, "status": "running"}});
                    }
                    if let Some(id) = cmd.get("id") {
                        reply["id"] = id.clone();
                    }
                    if writeln!(w, "{reply}").is_err() {
                        break;
                    }
                }
            }
        });
        FakeQmp {
            stop,
            links,
            thread: Some(thread),
        }
    }

    fn set_links(&self) -> Vec<(String, bool)> {
        self.links.lock().unwrap().clone()
    }
}

impl Drop for FakeQmp {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The agent bed plus what host-prep needs: a management link from the host
/// namespace (`sw`) through router A to the IMS, sites A and B in the
/// registry, and host-prep's config.
struct HostBed {
    bed: Bed,
    qmp: FakeQmp,
}

impl HostBed {
    fn new(start_agent: bool) -> HostBed {
        let mut bed = Bed::new(BedOptions {
            standby: false,
            radvd: false,
        });
        // sw (the "host") reaches the IMS through router A.
        veth_pair(&bed.sw, "mgmt", &bed.ra, "mgmt").unwrap();
        bed.sw.link_up("mgmt").unwrap();
        bed.ra.link_up("mgmt").unwrap();
        bed.sw.addr_add("mgmt", "2001:db8:d::2/64", true).unwrap();
        bed.ra.addr_add("mgmt", "2001:db8:d::1/64", true).unwrap();
        bed.sw
            .route_add(&["2001:db8:e::/64", "via", "2001:db8:d::1", "dev", "mgmt"])
            .unwrap();
        let ims = IMS_ADDR.to_string();
        wait_for(
            "IMS reachable from the host namespace",
            Duration::from_secs(10),
            || bed.sw.ping6(&ims, 1),
        )
        .unwrap();
        for (name, pfx, ll, mac) in [
            ("A", "2001:db8:a::/64", "fe80::a", "02:00:00:00:00:0a"),
            ("B", SITE_B_PFX, "fe80::b", &*mac_str(RB_MAC)),
        ] {
            let out = bed
                .ims
                .command(bin("ims-server"))
                .args([
                    "sites",
                    "--server",
                    "[::1]:7342",
                    "--server-name",
                    "ims.test",
                    "--ca",
                ])
                .arg(bed.path("ca.pem"))
                .arg("--token-file")
                .arg(bed.path("token"))
                .args([
                    "add",
                    "--name",
                    name,
                    "--prefix",
                    pfx,
                    "--gateway-ll",
                    ll,
                    "--gateway-mac",
                    mac,
                    "--ra-interval-ms",
                    "500",
                    "--router-lifetime",
                    "600",
                    "--valid-lifetime",
                    "3600",
                    "--preferred-lifetime",
                    "1800",
                ])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "sites add: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        if start_agent {
            bed.start_vm();
            let vm_a = moa(PFX_A, VM_MAC0);
            wait_for("VM active on site A", Duration::from_secs(20), || {
                bed.vm().active_moa() == Some(vm_a)
            })
            .unwrap_or_else(|e| panic!("{e}\n{}", bed.vm().log_text()));
        }
        let qmp = FakeQmp::start(
            &bed.path("A.qmp"),
            bed.sw.name().to_string(),
            vec![("net0".into(), "v0".into()), ("net1".into(), "v1".into())],
        );
        HostBed { bed, qmp }
    }

    /// Writes a host-prep config; `edit` may change the text.
    fn config(&self, edit: impl Fn(String) -> String) -> PathBuf {
        let d = self.bed.dir.path().display().to_string();
        let text = format!(
            r#"
state_dir = "{d}/hp-state"
local_site = "A"

[ims]
control = "[{IMS_ADDR}]:7342"
server_name = "ims.test"
ca_cert = "{d}/ca.pem"

[timeouts]
prepare_ms = 15000
ims_ms = 3000

[ra]
interval_ms = 500

[sites.A]
bridge = "brA"
standby_bridge = "brX"

[sites.B]
bridge = "brB"
standby_bridge = "brX"

[vms.vm]
qmp = "{d}/{{site}}.qmp"
hoa = "{VM_HOA}"
[[vms.vm.nics]]
id = "net0"
tap = "v0"
[[vms.vm.nics]]
id = "net1"
tap = "v1"
"#
        );
        let p = self.bed.path("host-prep.toml");
        std::fs::write(&p, edit(text)).unwrap();
        p
    }

    /// `(MAC, IPv6 addresses)` of brX.
    fn brx(&self) -> (String, Vec<String>) {
        let mac = self.bed.sw.mac("brX").unwrap();
        let addrs = self
            .bed
            .sw
            .addrs6("brX")
            .unwrap()
            .into_iter()
            .map(|(a, _)| a)
            .collect();
        (mac, addrs)
    }

    /// `nft list table` of the filter host-prep puts on brX while prepared.
    fn isolation_filter(&self) -> Output {
        self.bed
            .sw
            .command("nft")
            .args(["list", "table", "ip6", "mat6_nu_brX"])
            .output()
            .unwrap()
    }

    fn run(&self, cfg: &Path, args: &[&str]) -> Output {
        self.bed
            .sw
            .command(host_prep())
            .arg("-c")
            .arg(cfg)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
#[ignore = "privileged: run with ./test.sh (root, netns)"]
fn prepare_impersonates_gateway_waits_for_standby_and_undoes_on_sigterm() {
    let hb = HostBed::new(true);
    let before = hb.brx();
    let cfg = hb.config(|t| t);
    let mut c = hb.bed.sw.command(host_prep());
    c.arg("-c")
        .arg(&cfg)
        .args(["prepare", "--vm", "vm", "--to", "B", "--json"])
        .env("RUST_LOG", "host_prep=debug,info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(hb.bed.path("prepare.log")).unwrap());
    let t0 = Instant::now();
    let mut p = ChildGuard::spawn(c).unwrap();
    let out = p.child_mut().stdout.take().unwrap();
    let mut lines = BufReader::new(out).lines();
    let diag = || {
        format!(
            "\n--- host-prep ---\n{}\n--- vm agent ---\n{}",
            std::fs::read_to_string(hb.bed.path("prepare.log")).unwrap_or_default(),
            hb.bed.vm().log_text()
        )
    };
    let line = lines
        .next()
        .unwrap_or_else(|| panic!("prepare printed nothing{}", diag()))
        .unwrap();
    let ready: Value = serde_json::from_str(&line).unwrap();
    eprintln!("ready after {:?}: {ready:#}{}", t0.elapsed(), diag());
    assert_eq!(ready["event"], "ready", "{line}{}", diag());
    let want = moa(PFX_B, VM_MAC1);
    assert_eq!(ready["standby_moa"], want.to_string());
    let steps: Vec<&str> = ready["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        steps,
        [
            "site lookup",
            "bridge",
            "RA sender",
            "standby carrier on",
            "standby MoA"
        ]
    );

    // The bridge looks like site B's gateway; the standby NIC's carrier was
    // turned on through QMP; the agent has the standby; the IMS shows it.
    let (mac, addrs) = hb.brx();
    assert_eq!(mac, mac_str(RB_MAC));
    assert!(addrs.iter().any(|a| a == "fe80::b/64"), "{addrs:?}");
    assert!(hb.qmp.set_links().contains(&("net1".to_string(), true)));
    assert_eq!(hb.bed.vm().standby_moas(), vec![want]);
    let b = hb.bed.ims_lookup(VM_HOA).unwrap();
    assert!(b.standby.contains(&want), "{b:?}");
    assert_eq!(
        b.active,
        Some(moa(PFX_A, VM_MAC0)),
        "the active MoA is untouched"
    );
    // A Router Solicitation from the VM's secondary gets site B's RA.
    let rd = hb
        .bed
        .vm
        .exec("rdisc6", &["-1", "-w", "1000", "eth1"])
        .unwrap();
    let rd = String::from_utf8_lossy(&rd.stdout);
    assert!(
        rd.contains("2001:db8:b::/64") && rd.contains("fe80::b"),
        "{rd}"
    );
    assert!(rd.to_lowercase().contains(&mac_str(RB_MAC)), "{rd}");

    // Only Neighbor Discovery reaches the host's stack from the bridge: the
    // VM resolves the impersonated gateway, but a packet it sends there
    // (an echo request here, bicast copies in real use) is dropped, never
    // forwarded.
    let table = hb.isolation_filter();
    assert!(table.status.success(), "{}", stderr(&table));
    assert!(
        String::from_utf8_lossy(&table.stdout).contains("iifname \"brX\" drop"),
        "{}",
        String::from_utf8_lossy(&table.stdout)
    );
    let ping = hb
        .bed
        .vm
        .exec(
            "ping",
            &["-6", "-c", "2", "-i", "0.2", "-W", "1", "fe80::b%eth1"],
        )
        .unwrap();
    assert!(
        !ping.status.success(),
        "echo to the impersonated gateway answered: {}",
        String::from_utf8_lossy(&ping.stdout)
    );
    let neigh = hb
        .bed
        .vm
        .exec("ip", &["-6", "neigh", "show", "dev", "eth1"])
        .unwrap();
    assert!(
        String::from_utf8_lossy(&neigh.stdout).contains("fe80::b"),
        "{}",
        String::from_utf8_lossy(&neigh.stdout)
    );

    // A second preparation of the same bridge is refused while this one
    // holds it, and changes nothing.
    let held = hb.brx();
    let o = hb.run(&cfg, &["prepare", "--vm", "vm", "--to", "B"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("being prepared by another host-prep"),
        "{}",
        stderr(&o)
    );
    assert_eq!(hb.brx(), held);

    // SIGTERM undoes everything.
    p.signal(nix::sys::signal::Signal::SIGTERM).unwrap();
    let st = p.wait_timeout(Duration::from_secs(10)).unwrap();
    assert!(st.success(), "prepare exited with {st}{}", diag());
    assert_eq!(hb.brx(), before, "brX restored");
    let gone = hb.isolation_filter();
    assert!(!gone.status.success(), "isolation filter left behind");
}

#[test]
#[ignore = "privileged: run with ./test.sh (root, netns)"]
fn prepare_errors_exit_nonzero_name_the_problem_and_leave_nothing() {
    // No agent: the standby never appears (timeout case).
    let hb = HostBed::new(false);
    let before = hb.brx();
    let check = |what: &str, cfg: &Path, args: &[&str], code: i32, msg: &str| {
        let t0 = Instant::now();
        let o = hb.run(cfg, args);
        let err = stderr(&o);
        eprintln!(
            "{what}: exit {:?} after {:?}: {}",
            o.status.code(),
            t0.elapsed(),
            err.trim()
        );
        assert_eq!(o.status.code(), Some(code), "{what}: {err}");
        assert!(err.contains(msg), "{what}: {err:?} lacks {msg:?}");
        assert_eq!(hb.brx(), before, "{what}: brX changed");
        let filter = hb.isolation_filter();
        assert!(!filter.status.success(), "{what}: isolation filter left");
    };
    let prep = ["prepare", "--vm", "vm", "--to"];

    let good = hb.config(|t| t);
    check(
        "unknown site",
        &good,
        &[&prep[..], &["Z"]].concat(),
        4,
        "unknown site \"Z\"",
    );
    check(
        "unknown vm",
        &good,
        &["prepare", "--vm", "nope", "--to", "B"],
        2,
        "unknown vm",
    );

    let one_nic = hb.config(|t| t.replace("[[vms.vm.nics]]\nid = \"net1\"\ntap = \"v1\"\n", ""));
    check(
        "vm without a secondary NIC",
        &one_nic,
        &[&prep[..], &["B"]].concat(),
        2,
        "needs exactly two NICs",
    );

    let no_bridge =
        hb.config(|t| t.replace("standby_bridge = \"brX\"", "standby_bridge = \"brMissing\""));
    check(
        "missing bridge",
        &no_bridge,
        &[&prep[..], &["B"]].concat(),
        1,
        "bridge brMissing does not exist",
    );

    let bad_ims =
        hb.config(|t| t.replace(&format!("[{IMS_ADDR}]:7342"), &format!("[{IMS_ADDR}]:9")));
    check(
        "unreachable IMS",
        &bad_ims,
        &[&prep[..], &["B"]].concat(),
        4,
        "unreachable",
    );

    let short = hb.config(|t| t.replace("prepare_ms = 15000", "prepare_ms = 2000"));
    check(
        "standby timeout",
        &short,
        &[&prep[..], &["B"]].concat(),
        3,
        "timed out",
    );

    // A bridge with an uplink is refused (it would announce a foreign
    // gateway on a real network).
    hb.bed.sw.tap("m6hup0").unwrap();
    hb.bed.sw.bridge_attach("m6hup0", "brX").unwrap();
    check(
        "bridge with an uplink",
        &good,
        &[&prep[..], &["B"]].concat(),
        1,
        "has port m6hup0",
    );
    // The same port as another managed VM's tap is no uplink: preparation
    // goes on (and here times out, no agent runs).
    let two_vms = hb.config(|t| {
        format!(
            "{}{}",
            t.replace("prepare_ms = 15000", "prepare_ms = 1000"),
            "[vms.vm2]\nqmp = \"/nonexistent\"\nhoa = \"2001:db8:ff::9\"\n[[vms.vm2.nics]]\nid = \"n0\"\ntap = \"m6hup1\"\n[[vms.vm2.nics]]\nid = \"n1\"\ntap = \"m6hup0\"\n"
        )
    });
    check(
        "bridge shared with another VM's standby tap",
        &two_vms,
        &[&prep[..], &["B"]].concat(),
        3,
        "timed out",
    );
    hb.bed.sw.link_del("m6hup0").unwrap();
    assert_eq!(hb.brx(), before);
}

#[test]
#[ignore = "privileged: run with ./test.sh (root, netns)"]
fn prepare_reports_missing_qmp() {
    let hb = HostBed::new(false);
    let before = hb.brx();
    let cfg = hb.config(|t| t.replace("{site}.qmp", "nowhere.qmp"));
    let o = hb.run(&cfg, &["prepare", "--vm", "vm", "--to", "B"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("cannot connect to QMP socket"),
        "{}",
        stderr(&o)
    );
    assert_eq!(hb.brx(), before);
}

#[test]
#[ignore = "privileged: run with ./test.sh (root, netns)"]
fn failed_migration_after_preparation_undoes_it() {
    let hb = HostBed::new(true);
    let before = hb.brx();
    // Destination that dies before listening.
    let cfg = hb.config(|t| {
        t.replace(
            "[sites.B]\nbridge = \"brB\"\nstandby_bridge = \"brX\"\n",
            "[sites.B]\nbridge = \"brB\"\nstandby_bridge = \"brX\"\nmigrate_uri = \"unix:/nonexistent/m6h.sock\"\nreceive_command = [\"sh\", \"-c\", \"echo destination host unreachable >&2; exit 7\"]\n",
        )
    });
    let o = hb.run(&cfg, &["migrate", "--vm", "vm", "--to", "B", "--json"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("destination") && err.contains("exited"),
        "{err}"
    );
    assert!(
        err.contains("destination host unreachable"),
        "the destination's stderr is shown: {err}"
    );
    // The preparation had happened (the agent got its standby) and was undone.
    assert!(err.contains("bridge restored"), "{err}");
    assert_eq!(hb.brx(), before);
    assert!(o.stdout.is_empty(), "no phase table on failure");
    // No role change was recorded.
    assert!(!hb.bed.path("hp-state/vm.json").exists());
}
