//! Repeated prepared migrations A→B→A→B of a real QEMU (TCG) guest with
//! `host-prep migrate`, no manual step in between: the NICs swap roles at
//! every hop, the old active NIC (whose link QEMU carries over as "off") is
//! turned back on by the next preparation, the taps are re-attached, each
//! host keeps its own config and role state, and the source bridge is
//! restored after each hop.
//!
//! Two host namespaces (`m6h-*`, bridges `br0` + `brnu`) and an IMS
//! namespace with a real ims-server. The guest image here has no
//! guest-agent requirement: the test registers the standby MoA itself (what
//! the agent does; `hostprep_prepare.rs` runs the real agent), so the
//! preparation's IMS wait returns at once and everything else is real.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{Ipv6Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use ims_client::{BindingUpdate, ControlClient, SiteInfo, TlsSettings, UpdateClient};
use mat6_proto::update::UpdateKey;
use mat6_tests::netns::{veth_pair, wait_for, ChildGuard, Netns};
use mat6_tests::qemu::{GuestImage, NicSpec, Qemu, VmSpec};
use serde_json::Value;

const VM: &str = "m6hrt";
const TAP0: &str = "m6hr0";
const TAP1: &str = "m6hr1";
const MAC0: &str = "52:54:00:6d:72:01";
const MAC1: &str = "52:54:00:6d:72:02";
const LL0: &str = "fe80::5054:ff:fe6d:7201";
const LL1: &str = "fe80::5054:ff:fe6d:7202";
const HOA: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x72);

fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let p = dir.join(name);
    assert!(
        p.is_file(),
        "{} missing: run `cargo build --workspace --bins`",
        p.display()
    );
    p
}

struct TempDir(PathBuf);
impl TempDir {
    fn new() -> Self {
        let p = std::env::temp_dir().join(format!("m6h-rt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
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

fn run_ok(cmd: &mut std::process::Command) -> String {
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Site `letter`'s facts (prefix, gateway).
fn site(letter: char) -> SiteInfo {
    let n = if letter == 'A' { 0xa } else { 0xb };
    SiteInfo {
        name: letter.to_string(),
        prefix: format!("2001:db8:{n:x}::/64").parse().unwrap(),
        gateway_ll: format!("fe80::{n:x}").parse().unwrap(),
        gateway_mac: format!("02:00:00:00:00:{n:02x}").parse().unwrap(),
        ra: None,
    }
}

/// SLAAC (EUI-64) address of a MAC in a /64.
fn slaac(prefix: &str, mac: &str) -> Ipv6Addr {
    let m: Vec<u8> = mac
        .split(':')
        .map(|x| u8::from_str_radix(x, 16).unwrap())
        .collect();
    let p: Ipv6Addr = prefix.parse().unwrap();
    let s = p.segments();
    Ipv6Addr::new(
        s[0],
        s[1],
        s[2],
        s[3],
        u16::from_be_bytes([m[0] ^ 2, m[1]]),
        u16::from_be_bytes([m[2], 0xff]),
        u16::from_be_bytes([0xfe, m[3]]),
        u16::from_be_bytes([m[4], m[5]]),
    )
}

struct Ims {
    ns: Netns,
    _proc: ChildGuard,
    dir: PathBuf,
}

impl Ims {
    fn start(dir: &Path) -> Ims {
        let ns = Netns::new("m6h").unwrap();
        let d = dir.join("ims");
        std::fs::create_dir_all(&d).unwrap();
        let ims = bin("ims-server");
        run_ok(
            std::process::Command::new(&ims)
                .args(["keys", "gen-tls", "--name", "ims.test", "--dir"])
                .arg(&d),
        );
        run_ok(
            std::process::Command::new(&ims)
                .args(["keys", "gen-signing", "--out"])
                .arg(d.join("signing.pk8")),
        );
        run_ok(
            std::process::Command::new(&ims)
                .args(["keys", "gen-admin-token", "--out"])
                .arg(d.join("token")),
        );
        std::fs::set_permissions(d.join("server.key"), std::fs::Permissions::from_mode(0o600))
            .unwrap();
        let cfg = format!(
            "udp_listen = \"[::]:7341\"\ncontrol_listen = \"[::]:7342\"\nstore_path = \"{0}/ims.redb\"\ntls_cert = \"{0}/server.pem\"\ntls_key = \"{0}/server.key\"\nadmin_token_file = \"{0}/token\"\nsigning_key_file = \"{0}/signing.pk8\"\nready_file = \"{0}/ready.json\"\n",
            d.display()
        );
        std::fs::write(d.join("ims.toml"), cfg).unwrap();
        let mut c = ns.command(&ims);
        c.args(["serve", "--config"])
            .arg(d.join("ims.toml"))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null());
        let proc = ChildGuard::spawn(c).unwrap();
        let ready = d.join("ready.json");
        wait_for("ims-server ready", Duration::from_secs(30), || {
            ready.exists()
        })
        .unwrap();
        Ims {
            ns,
            _proc: proc,
            dir: d,
        }
    }
}

/// A host: bridges `br0` (real) and `brnu` (no uplink), and a link to the IMS.
fn host(ims: &Ims, n: u8) -> Netns {
    let ns = Netns::new("m6h").unwrap();
    ns.bridge("br0").unwrap();
    ns.bridge("brnu").unwrap();
    let far = format!("h{n}");
    veth_pair(&ns, "ims", &ims.ns, &far).unwrap();
    ns.link_up("ims").unwrap();
    ims.ns.link_up(&far).unwrap();
    ns.addr_add("ims", &format!("2001:db8:e{n}::2/64"), true)
        .unwrap();
    ims.ns
        .addr_add(&far, &format!("2001:db8:e{n}::1/64"), true)
        .unwrap();
    ns
}

fn control_addr(n: u8) -> SocketAddr {
    format!("[2001:db8:e{n}::1]:7342").parse().unwrap()
}

fn write_config(dir: &Path, me: char, other: char, other_ns: &Netns, n: u8, ims: &Ims) -> PathBuf {
    let hp = bin("host-prep");
    let cfg_other = dir.join(format!("host-{other}.toml"));
    let text = format!(
        r#"
state_dir = "{dir}/state-{me}"
local_site = "{me}"

[ims]
control = "{ctl}"
server_name = "ims.test"
ca_cert = "{ca}"

[timeouts]
prepare_ms = 10000
start_ms = 30000
migrate_ms = 120000

[sites.{me}]
bridge = "br0"
standby_bridge = "brnu"

[sites.{other}]
bridge = "br0"
standby_bridge = "brnu"
migrate_uri = "unix:{dir}/mig.sock"
receive_command = ["ip", "netns", "exec", "{ons}", "{hp}", "-c", "{cfg_other}", "receive", "--vm", "{{vm}}", "--active", "{{active}}", "--attach", "{{attach}}", "--existing", "--json"]

[vms.{VM}]
qmp = "{dir}/{{site}}.qmp"
hoa = "{HOA}"
[[vms.{VM}.nics]]
id = "net0"
tap = "{TAP0}"
[[vms.{VM}.nics]]
id = "net1"
tap = "{TAP1}"
"#,
        dir = dir.display(),
        ctl = control_addr(n),
        ca = ims.dir.join("ca.pem").display(),
        ons = other_ns.name(),
        hp = hp.display(),
        cfg_other = cfg_other.display(),
    );
    let p = dir.join(format!("host-{me}.toml"));
    std::fs::write(&p, text).unwrap();
    p
}

fn answers(ns: &Netns, ll: &str, bridge: &str) -> bool {
    ns.ping6(&format!("{ll}%{bridge}"), 1)
}

fn wait_answers(ns: &Netns, ll: &str, bridge: &str, what: &str) {
    wait_for(what, Duration::from_secs(20), || answers(ns, ll, bridge)).unwrap();
}

fn brnu_state(ns: &Netns) -> (String, Vec<String>) {
    let mac = ns.mac("brnu").unwrap();
    let addrs = ns
        .addrs6("brnu")
        .unwrap()
        .into_iter()
        .map(|(a, _)| a)
        .collect();
    (mac, addrs)
}

fn symlink(target: &Path, link: &Path) {
    let _ = std::fs::remove_file(link);
    std::os::unix::fs::symlink(target, link).unwrap();
}

#[test]
#[ignore = "privileged: run with ./test.sh (root, netns)"]
fn prepared_migrations_a_b_a_b_swap_roles_with_no_manual_step() {
    let img = GuestImage::locate().unwrap();
    let tmp = TempDir::new();
    let dir = tmp.path();
    let ims = Ims::start(dir);
    let a = host(&ims, 1);
    let b = host(&ims, 2);
    let cfg_a = write_config(dir, 'A', 'B', &b, 1, &ims);
    let cfg_b = write_config(dir, 'B', 'A', &a, 2, &ims);

    // Registry, the VM's key (what the operator provisions).
    let ca = ims.dir.join("ca.pem");
    let token = std::fs::read_to_string(ims.dir.join("token")).unwrap();
    let key = a
        .run_tokio({
            let ca = ca.clone();
            move || async move {
                let tls = TlsSettings::from_ca_pem_file(&ca, "ims.test").unwrap();
                let ctl = ControlClient::connect(control_addr(1), &tls)
                    .await
                    .unwrap()
                    .with_admin_token(&token);
                ctl.site_add(site('A')).await.unwrap();
                ctl.site_add(site('B')).await.unwrap();
                ctl.key_add(HOA).await.unwrap()
            }
        })
        .unwrap();
    // Stand-in for the guest-agent: register the standby MoA the RA on the
    // standby NIC gives (SLAAC of its MAC in the destination prefix).
    let register_standby = |ns: &Netns, n: u8, active: Ipv6Addr, standby: Ipv6Addr| {
        let (kid, secret) = (key.key_id, key.secret_b64.clone());
        ns.run_tokio(move || async move {
            let k = UpdateKey::from_b64(kid, &secret).unwrap();
            let udp: SocketAddr = format!("[2001:db8:e{n}::1]:7341").parse().unwrap();
            let mut c = UpdateClient::bind(udp, HOA, k).await.unwrap();
            c.send(&BindingUpdate::standby(Some(active), vec![standby], 600))
                .await
                .unwrap();
        })
        .unwrap();
    };

    let spec = || {
        VmSpec::new(VM, 128)
            .nic(NicSpec::new("net0", MAC0, TAP0, "br0"))
            .nic(NicSpec::new("net1", MAC1, TAP1, "brnu"))
    };
    let mut cur = Qemu::start(&img, &spec(), Some(&a)).unwrap();
    wait_answers(
        &a,
        LL0,
        "br0",
        "guest boots, net0 answers on A's real bridge",
    );

    let hops = [('A', 'B'), ('B', 'A'), ('A', 'B')];
    let mut tables = Vec::new();
    for (i, (from, to)) in hops.into_iter().enumerate() {
        let (src_ns, dst_ns, cfg, n) = if from == 'A' {
            (&a, &b, &cfg_a, 1)
        } else {
            (&b, &a, &cfg_b, 2)
        };
        let (old_mac, new_mac, old_ll, new_ll, old_id, new_id) = if i % 2 == 0 {
            (MAC0, MAC1, LL0, LL1, "net0", "net1")
        } else {
            (MAC1, MAC0, LL1, LL0, "net1", "net0")
        };
        let before = brnu_state(src_ns);
        let uri = format!("unix:{}/mig.sock", dir.display());
        let _ = std::fs::remove_file(dir.join("mig.sock"));
        let mut dst = Qemu::start(&img, &spec().incoming(&uri), Some(dst_ns)).unwrap();
        dst.release_qmp().unwrap();
        cur.release_qmp().unwrap();
        symlink(&cur.qmp_path(), &dir.join(format!("{from}.qmp")));
        symlink(&dst.qmp_path(), &dir.join(format!("{to}.qmp")));
        let src_pfx = if from == 'A' {
            "2001:db8:a::"
        } else {
            "2001:db8:b::"
        };
        let dst_pfx = if to == 'A' {
            "2001:db8:a::"
        } else {
            "2001:db8:b::"
        };
        register_standby(src_ns, n, slaac(src_pfx, old_mac), slaac(dst_pfx, new_mac));

        // The last hop prints the human phase table, the others JSON.
        let json = i + 1 < hops.len();
        let mut args = vec!["migrate", "--vm", VM, "--to"];
        let to_s = to.to_string();
        args.push(&to_s);
        if json {
            args.push("--json");
        }
        let out = src_ns
            .command(bin("host-prep"))
            .arg("-c")
            .arg(cfg)
            .args(&args)
            .env("RUST_LOG", "host_prep=debug,info")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "hop {from}->{to} failed:\n{stderr}");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let report = if json {
            let report: Value =
                serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}\n{stderr}"));
            assert_eq!(report["mode"], "prep");
            assert_eq!(report["old_active"], old_id, "{report}");
            assert_eq!(report["new_active"], new_id, "{report}");
            assert!(report["switch_ms"].as_f64().unwrap() > 0.0);
            report.to_string()
        } else {
            let head = format!("(prepared); active NIC {old_id} -> {new_id}");
            assert!(stdout.contains(&head), "{stdout}");
            for row in [
                "preparation",
                "pre-copy",
                "downtime (reported by QEMU)",
                "switch (RESUME",
                "total (T_ALL)",
            ] {
                assert!(stdout.contains(row), "{row} missing:\n{stdout}");
            }
            stdout
        };

        // Destination: the prepared NIC (its link turned on by the
        // preparation, also when it had been set off by the previous hop)
        // carries traffic on the real bridge; the old active is silent.
        wait_answers(
            dst_ns,
            new_ll,
            "br0",
            "new active NIC answers on the real bridge",
        );
        assert!(
            !answers(dst_ns, old_ll, "brnu"),
            "hop {from}->{to}: old active NIC still up"
        );
        // Source: bridge restored.
        assert_eq!(
            brnu_state(src_ns),
            before,
            "hop {from}->{to}: source brnu not restored"
        );
        eprintln!("hop {from}->{to}:\n{report}");
        tables.push(report);
        drop(cur); // QEMU already quit by host-prep; removes its taps
        cur = dst;
    }
    // Each host's own role state says where the VM is and which NIC is active.
    let st_b: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join(format!("state-B/{VM}.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(
        (st_b["site"].as_str(), st_b["active"].as_str()),
        (Some("B"), Some("net1"))
    );
    let st_a: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join(format!("state-A/{VM}.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(
        (st_a["site"].as_str(), st_a["active"].as_str()),
        (Some("B"), Some("net1"))
    );
    assert_eq!(tables.len(), 3);
    cur.reconnect_qmp().unwrap();
    cur.quit().unwrap();
}
