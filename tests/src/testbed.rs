//! The two-site migration testbed and the downtime measurement.
//!
//! Topology (every namespace named `m6e<role>-PID-N`, removed on drop):
//!
//! ```text
//!                 cn (2001:db8:c::10)     ims (2001:db8:d::10)
//!                        \                 /
//!                         ------ core -----
//!              2001:db8:ffa::/64 /     \ 2001:db8:ffb::/64
//!                             rA         rB        routers, radvd, fe80::1
//!             2001:db8:a::/64 |           | 2001:db8:b::/64
//!          hostA: brA (uplink) + brA2     hostB: brB (uplink) + brB2
//!                 QEMU taps                      QEMU taps
//! ```
//!
//! `brX` is the site's real bridge (a veth to its router); `brX2` is the
//! bridge with no uplink that carries the VM's secondary NIC. Routers use
//! `fe80::1` and a fixed MAC (`02:6d:36:00:0X:01`) on their site link, so a
//! site's gateway is known in advance (the IMS site registry holds it).
//!
//! [`Testbed::run_migration`] measures one migration the way seed paper 004
//! §4.1 does, at a finer grain: ping6 every 10 ms in both directions (CN → VM
//! from the host side, VM → CN inside the guest), T_DW = the largest gap
//! between replies; a VoIP-shaped UDP echo stream (210 bytes / 20 ms, seed
//! paper 003) with lost datagrams and largest gap; a paced TCP echo stream
//! whose every byte is checked (it must survive with no reset); QEMU's own
//! total time and downtime. Modes: [`Mode::Lan`] (same bridge, no mat6: the
//! floor), [`Mode::Prep`] and [`Mode::NoPrep`] (cross-subnet with
//! guest-agent and `host-prep migrate`, with or without preparation).

use std::fmt;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};

use crate::netns::{veth_pair, ChildGuard, Netns, NetnsError};
use crate::qemu::{GuestImage, MigrationStats, NicSpec, Qemu, QemuError, VmSpec};

/// Errors of the testbed.
#[derive(Debug, thiserror::Error)]
pub enum TestbedError {
    /// A namespace/interface operation failed.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// A QEMU operation failed.
    #[error(transparent)]
    Qemu(#[from] QemuError),
    /// A file could not be written/read.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A tool printed something we could not understand.
    #[error("cannot parse {what}: {text}")]
    Parse {
        /// Which output.
        what: String,
        /// The text.
        text: String,
    },
    /// The mode needs a component that is not available.
    #[error("mode {mode} unavailable: {why}")]
    ModeUnavailable {
        /// The mode.
        mode: Mode,
        /// What is missing.
        why: String,
    },
}

/// Result alias.
pub type Result<T, E = TestbedError> = std::result::Result<T, E>;

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> TestbedError {
    let what = what.into();
    move |source| TestbedError::Io { what, source }
}

/// Migration modes of the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Same-bridge migration on site A, no mat6: the baseline.
    Lan,
    /// Site A → site B with guest-agent and `host-prep migrate` (prepared).
    Prep,
    /// Site A → site B with guest-agent, `host-prep migrate --no-prep`.
    #[serde(rename = "noprep")]
    NoPrep,
    /// Same-bridge migration on site A of the guest-agent VM (translation
    /// on, no move): what mat6 costs a migration that does not change
    /// networks. Not the baseline; it splits `prep - lan` into the cost of
    /// the translation in a just-resumed guest and the cost of the move.
    #[serde(rename = "lan-mat6")]
    LanMat6,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Lan => "lan",
            Mode::Prep => "prep",
            Mode::NoPrep => "noprep",
            Mode::LanMat6 => "lan-mat6",
        })
    }
}

impl std::str::FromStr for Mode {
    type Err = TestbedError;
    fn from_str(s: &str) -> Result<Mode> {
        match s {
            "lan" => Ok(Mode::Lan),
            "prep" => Ok(Mode::Prep),
            "noprep" => Ok(Mode::NoPrep),
            "lan-mat6" => Ok(Mode::LanMat6),
            _ => Err(TestbedError::Parse {
                what: "mode (lan|prep|noprep|lan-mat6)".into(),
                text: s.into(),
            }),
        }
    }
}

/// One site: a router namespace (radvd on the site link) and a host
/// namespace with the real bridge and the no-uplink bridge.
#[derive(Debug)]
pub struct Site {
    /// Site letter (`a`, `b`).
    pub letter: char,
    /// /64 prefix of the site link, e.g. `2001:db8:a::`.
    pub prefix: String,
    /// Gateway link-local address on the site link.
    pub gw_ll: String,
    /// Gateway MAC on the site link.
    pub gw_mac: String,
    /// Real bridge (uplink to the router) in the host namespace.
    pub bridge: String,
    /// Bridge with no uplink (the secondary NIC's) in the host namespace.
    pub nouplink: String,
    /// radvd, killed on drop.
    radvd: Option<ChildGuard>,
    /// The site's router namespace.
    pub router: Netns,
    /// The host namespace where QEMU runs.
    pub host: Netns,
}

/// Options of the testbed.
#[derive(Debug, Clone)]
pub struct TestbedOptions {
    /// Start radvd on the site routers (needed by the agent; harmless for lan).
    pub radvd: bool,
}

impl Default for TestbedOptions {
    fn default() -> Self {
        TestbedOptions { radvd: true }
    }
}

/// The whole two-site topology; everything is removed on drop.
#[derive(Debug)]
pub struct Testbed {
    /// Site A (where the VM boots).
    pub a: Site,
    /// Site B.
    pub b: Site,
    /// Correspondent node.
    pub cn: Netns,
    /// IMS namespace.
    pub ims: Netns,
    /// Core router.
    pub core: Netns,
    /// IMS, CN agent and the rest of the mat6 stack, once started.
    mat6: Option<Mat6Stack>,
    dir: PathBuf,
}

/// The correspondent's address on its link.
pub const CN_ADDR: &str = "2001:db8:c::10";
/// The IMS's address on its link.
pub const IMS_ADDR: &str = "2001:db8:d::10";
/// UDP echo port in the guest.
pub const UDP_PORT: u16 = 7400;
/// TCP echo port in the guest.
pub const TCP_PORT: u16 = 7401;

fn now_unix_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

impl Testbed {
    /// Builds the topology (about a second).
    pub fn new(opts: &TestbedOptions) -> Result<Testbed> {
        let n = std::process::id();
        let dir =
            std::env::temp_dir().join(format!("m6e-tb-{n}-{}", crate::netns::unique_ifname("t")));
        std::fs::create_dir_all(&dir).map_err(io_err(format!("mkdir {}", dir.display())))?;
        let core = Netns::new_router("m6ecore")?;
        let cn = Netns::new("m6ecn")?;
        let ims = Netns::new("m6eims")?;
        let a = Site::new('a', &core, opts, &dir)?;
        let b = Site::new('b', &core, opts, &dir)?;
        // Stub links of the CN and the IMS.
        for (ns, net, host) in [(&cn, "c", CN_ADDR), (&ims, "d", IMS_ADDR)] {
            veth_pair(&core, &format!("c-{net}"), ns, "up0")?;
            core.ip(&[
                "link",
                "set",
                "dev",
                &format!("c-{net}"),
                "addrgenmode",
                "none",
            ])?;
            core.link_up(&format!("c-{net}"))?;
            core.addr_add(&format!("c-{net}"), "fe80::1/64", true)?;
            ns.link_up("up0")?;
            core.addr_add(&format!("c-{net}"), &format!("2001:db8:{net}::1/64"), true)?;
            ns.addr_add("up0", &format!("{host}/64"), true)?;
            ns.route_add(&["default", "via", &format!("2001:db8:{net}::1")])?;
        }
        // Management links of the hosts (host-prep talks to the IMS).
        for (host, net) in [(&a.host, "fa"), (&b.host, "fb")] {
            veth_pair(&core, &format!("m-{net}"), host, "mg0")?;
            core.link_up(&format!("m-{net}"))?;
            host.link_up("mg0")?;
            core.addr_add(&format!("m-{net}"), &format!("2001:db8:{net}::1/64"), true)?;
            host.addr_add("mg0", &format!("2001:db8:{net}::10/64"), true)?;
            host.route_add(&["default", "via", &format!("2001:db8:{net}::1")])?;
        }
        let tb = Testbed {
            a,
            b,
            cn,
            ims,
            core,
            mat6: None,
            dir,
        };
        // Sanity: CN reaches both routers' site addresses (link-locals may
        // still be tentative for a moment).
        for p in [&tb.a.prefix, &tb.b.prefix] {
            let dst = format!("{p}1");
            crate::netns::wait_for(
                &format!("CN reaches {dst}"),
                Duration::from_secs(10),
                || tb.cn.ping6(&dst, 1),
            )?;
        }
        Ok(tb)
    }

    /// Scratch directory of this testbed.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The site by letter.
    pub fn site(&self, letter: char) -> &Site {
        if letter == 'b' {
            &self.b
        } else {
            &self.a
        }
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Site {
    fn new(letter: char, core: &Netns, opts: &TestbedOptions, dir: &Path) -> Result<Site> {
        let router = Netns::new_router(&format!("m6er{letter}"))?;
        let host = Netns::new(&format!("m6eh{letter}"))?;
        let prefix = format!("2001:db8:{letter}::");
        let gw_mac = format!("02:6d:36:00:0{letter}:01");
        // Transit link core <-> router.
        let tr = format!("2001:db8:ff{letter}::");
        veth_pair(core, &format!("c-{letter}"), &router, "up0")?;
        core.link_up(&format!("c-{letter}"))?;
        router.link_up("up0")?;
        core.addr_add(&format!("c-{letter}"), &format!("{tr}1/64"), true)?;
        router.addr_add("up0", &format!("{tr}2/64"), true)?;
        router.route_add(&["default", "via", &format!("{tr}1")])?;
        core.route_add(&[&format!("{prefix}/64"), "via", &format!("{tr}2")])?;
        // Site link: router "down0" <-> host "up0" in the real bridge.
        let bridge = format!("br{letter}");
        let nouplink = format!("br{letter}2");
        host.bridge(&bridge)?;
        host.bridge(&nouplink)?;
        // The host takes no part in IPv6 on the real bridge; the no-uplink
        // bridge keeps IPv6: host-prep puts the gateway's link-local on it.
        host.sysctl(&format!("net.ipv6.conf.{bridge}.disable_ipv6"), "1")?;
        host.sysctl(&format!("net.ipv6.conf.{nouplink}.accept_ra"), "0")?;
        let mut c = Command::new("ip");
        c.args(["-n", router.name(), "link", "add", "down0", "type", "veth"]);
        c.args(["peer", "name", "up0", "netns", host.name()]);
        crate::netns::run_ok(c)?;
        router.ip(&["link", "set", "dev", "down0", "addrgenmode", "none"])?;
        router.set_mac("down0", &gw_mac)?;
        router.link_up("down0")?;
        router.addr_add("down0", "fe80::1/64", true)?;
        router.addr_add("down0", &format!("{prefix}1/64"), true)?;
        host.bridge_attach("up0", &bridge)?;
        let radvd = if opts.radvd {
            Some(start_radvd(&router, "down0", &prefix, dir, letter)?)
        } else {
            None
        };
        Ok(Site {
            letter,
            prefix,
            gw_ll: "fe80::1".into(),
            gw_mac,
            bridge,
            nouplink,
            radvd,
            router,
            host,
        })
    }

    /// Whether radvd is still running.
    pub fn radvd_running(&mut self) -> bool {
        self.radvd.as_mut().is_some_and(ChildGuard::is_running)
    }
}

fn start_radvd(
    router: &Netns,
    ifname: &str,
    prefix: &str,
    dir: &Path,
    letter: char,
) -> Result<ChildGuard> {
    let conf = dir.join(format!("radvd-{letter}.conf"));
    let pid = dir.join(format!("radvd-{letter}.pid"));
    let text = format!(
        "interface {ifname} {{\n  AdvSendAdvert on;\n  MinRtrAdvInterval 3;\n  MaxRtrAdvInterval 4;\n  AdvDefaultLifetime 1800;\n  AdvSourceLLAddress on;\n  prefix {prefix}/64 {{\n    AdvOnLink on;\n    AdvAutonomous on;\n  }};\n}};\n"
    );
    std::fs::write(&conf, text).map_err(io_err(format!("write {}", conf.display())))?;
    let mut c = router.command("radvd");
    c.args(["-n", "-m", "stderr", "-C"])
        .arg(&conf)
        .arg("-p")
        .arg(&pid)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(
            std::fs::File::create(dir.join(format!("radvd-{letter}.log")))
                .map(Stdio::from)
                .unwrap_or_else(|_| Stdio::null()),
        );
    Ok(ChildGuard::spawn(c)?)
}

/// The guest's fixed identity in the testbed.
#[derive(Debug, Clone)]
pub struct VmIdentity {
    /// MAC of eth0 (nic0).
    pub mac0: String,
    /// MAC of eth1 (nic1).
    pub mac1: String,
    /// The address CN and VM ping (lan: static on eth0; agent modes: HoA).
    pub addr: String,
}

impl Default for VmIdentity {
    fn default() -> Self {
        VmIdentity {
            mac0: "52:54:00:6d:36:10".into(),
            mac1: "52:54:00:6d:36:11".into(),
            addr: "2001:db8:a::10".into(),
        }
    }
}

/// Summary of a `ping -D` log.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PingStats {
    /// Replies received.
    pub replies: u64,
    /// Largest gap between consecutive replies (ms).
    pub max_gap_ms: f64,
    /// Start of the largest gap (unix ms, the pinger's clock).
    pub gap_at_ms: f64,
    /// Timestamp of the last reply (unix ms, the pinger's clock).
    pub last_ms: f64,
}

/// Parses `ping -D` output (`[1700000000.123456] 64 bytes from ...`).
pub fn parse_ping(text: &str) -> PingStats {
    let mut st = PingStats::default();
    let mut last: Option<f64> = None;
    for line in text.lines() {
        if !line.contains("bytes from") {
            continue;
        }
        let Some(ts) = line
            .strip_prefix('[')
            .and_then(|r| r.split(']').next())
            .and_then(|t| t.parse::<f64>().ok())
        else {
            continue;
        };
        let t = ts * 1000.0;
        st.replies += 1;
        if let Some(l) = last {
            if t - l > st.max_gap_ms {
                st.max_gap_ms = t - l;
                st.gap_at_ms = l;
            }
        }
        last = Some(t);
        st.last_ms = t;
    }
    st
}

/// Parses the guest's `gapstat` line
/// (`replies=N maxgap_ms=X gap_at=T first=F last=L`).
pub fn parse_gapstat(text: &str) -> Result<PingStats> {
    let mut st = PingStats::default();
    let mut found = false;
    for word in text.split_whitespace() {
        let Some((k, v)) = word.split_once('=') else {
            continue;
        };
        let v: f64 = v.parse().map_err(|_| TestbedError::Parse {
            what: "gapstat".into(),
            text: text.into(),
        })?;
        match k {
            "replies" => {
                st.replies = v as u64;
                found = true;
            }
            "maxgap_ms" => st.max_gap_ms = v,
            "gap_at" => st.gap_at_ms = v * 1000.0,
            "last" => st.last_ms = v * 1000.0,
            _ => {}
        }
    }
    if !found {
        return Err(TestbedError::Parse {
            what: "gapstat".into(),
            text: text.into(),
        });
    }
    Ok(st)
}

/// One measured migration (a row of `bench-results/migration.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunResult {
    /// Guest memory (MiB).
    pub mem_mb: u32,
    /// Mode.
    pub mode: Mode,
    /// T_DW: the largest gap between ping replies, both directions (ms).
    pub tdw_ms: f64,
    /// T_ALL: from the start of the migration command to the VM running
    /// and switched at the destination (ms). For `lan` it is the harness's
    /// wall time from `migrate` to `RESUME`; with host-prep it is its
    /// `total_ms`.
    pub tall_ms: f64,
    /// QEMU's reported downtime (ms).
    pub qemu_downtime_ms: u64,
    /// QEMU's reported total migration time (ms).
    pub qemu_total_ms: u64,
    /// Datagrams of the VoIP-shaped stream that got no echo.
    pub udp_lost: u64,
    /// Largest gap between UDP echoes (ms).
    pub udp_max_gap_ms: f64,
    /// Whether the TCP stream survived with every byte intact, no reset.
    pub tcp_survived: bool,
    /// TCP: largest gap between echoed bytes (ms).
    pub tcp_max_gap_ms: f64,
    /// CN → VM ping.
    pub ping_cn_to_vm: PingStats,
    /// VM → CN ping (guest clock).
    pub ping_vm_to_cn: PingStats,
    /// Replies resumed after the migration, CN → VM.
    pub resumed_cn_to_vm: bool,
    /// Replies resumed after the migration, VM → CN.
    pub resumed_vm_to_cn: bool,
    /// host-prep's phase table (`--json`), when host-prep ran.
    pub host_prep: Option<serde_json::Value>,
    /// Raw probe reports.
    pub udp_report: serde_json::Value,
    /// Raw TCP probe report.
    pub tcp_report: serde_json::Value,
    /// Agent modes: how many times so far the guest-agent in the VM turned
    /// the bicast to a prepared standby on (from its log; one per prepared
    /// migration when it works).
    #[serde(default)]
    pub guest_bicasts: Option<u32>,
    /// Agent modes: how many gateway-probe answers so far identified a
    /// registered site (`guest-agent status`, counter
    /// `gateway_probe_hits`): at least one once the VM moved without
    /// preparation, when the site probe works.
    #[serde(default)]
    pub guest_probe_hits: Option<u32>,
}

/// Where the host-side tools are.
#[derive(Debug, Clone)]
pub struct Tools {
    /// `mat6-probe` binary (host side).
    pub probe: PathBuf,
    /// The mat6 binaries (needed by `prep` and `noprep`).
    pub mat6: Option<Mat6Bins>,
}

/// A VM running in the testbed (the current QEMU: the destination after a
/// migration).
#[derive(Debug)]
pub struct TestVm {
    /// The running QEMU.
    pub qemu: Qemu,
    /// Which site the VM is on now.
    pub site: char,
    /// Identity.
    pub id: VmIdentity,
    tap_seq: u32,
}

impl Testbed {
    /// Boots the VM on site A: nic0 on `brA` (real), nic1 on `brA2`.
    /// `vm_conf` is the guest's `/etc/mat6/vm.conf`.
    pub fn boot_vm(
        &self,
        img: &GuestImage,
        mem_mb: u32,
        id: &VmIdentity,
        vm_conf: &str,
    ) -> Result<TestVm> {
        let t0 = crate::netns::unique_ifname("m6et");
        let t1 = crate::netns::unique_ifname("m6et");
        let spec = VmSpec::new("vm", mem_mb)
            .nic(NicSpec::new("nic0", &id.mac0, &t0, &self.a.bridge))
            .nic(NicSpec::new("nic1", &id.mac1, &t1, &self.a.nouplink))
            .overlay(crate::qemu::Overlay::new().vm_conf(vm_conf));
        let mut qemu = Qemu::start(img, &spec, Some(&self.a.host))?;
        qemu.wait_ready(Duration::from_secs(120))?;
        Ok(TestVm {
            qemu,
            site: 'a',
            id: id.clone(),
            tap_seq: 0,
        })
    }

    /// The lan-mode guest configuration: static address on eth0, default
    /// route via the site's gateway, echo servers started.
    pub fn lan_vm_conf(&self, id: &VmIdentity) -> String {
        format!(
            "HOSTNAME=m6e-vm\nADDRS='eth0 {}/64'\nROUTES='default via {} dev eth0'\nSYSCTLS='net.ipv6.conf.all.accept_ra=0\nnet.ipv6.conf.eth0.accept_ra=0\nnet.ipv6.conf.eth1.accept_ra=0'\n{}",
            id.addr,
            self.a.gw_ll,
            ECHO_SETUP
        )
    }

    /// Same-bridge live migration (no mat6): the destination QEMU runs on
    /// the same host namespace and bridges. Returns QEMU's stats and the
    /// harness's `migrate` → `RESUME` wall time (ms).
    pub fn migrate_lan(&self, vm: &mut TestVm) -> Result<(MigrationStats, f64)> {
        let site = self.site(vm.site);
        vm.tap_seq += 1;
        let t0 = crate::netns::unique_ifname("m6et");
        let t1 = crate::netns::unique_ifname("m6et");
        let uri = vm.qemu.migration_uri();
        let spec = vm
            .qemu
            .spec()
            .clone()
            .with_attachment(0, &t0, &site.bridge)
            .with_attachment(1, &t1, &site.nouplink)
            .incoming(&uri);
        let img = vm.qemu.image().clone();
        let mut dst = Qemu::start(&img, &spec, Some(&site.host))?;
        let start = Instant::now();
        vm.qemu.migrate(&uri)?;
        let stats = vm.qemu.wait_migration(Duration::from_secs(300))?;
        dst.wait_event("RESUME", Duration::from_secs(30))?;
        let tall = start.elapsed().as_secs_f64() * 1000.0;
        let old = std::mem::replace(&mut vm.qemu, dst);
        old.quit()?;
        Ok((stats, tall))
    }
}

impl TestVm {
    /// Guest network state and console tail, for error messages.
    pub fn diag(&mut self) -> String {
        let net = self
            .qemu
            .sh(
                "ip -6 addr; ip -6 route; ip -6 neigh; ip link",
                Duration::from_secs(5),
            )
            .map(|(_, o)| o)
            .unwrap_or_else(|e| format!("(control shell: {e})"));
        format!("guest:\n{net}\nconsole:\n{}", self.qemu.console_tail(15))
    }
}

/// The guest agent's `RUST_LOG`. Debug only with `MAT6_GUEST_LOG` set: a
/// just-resumed TCG guest has an empty translation cache, and every log
/// line it formats (about 40 per migration at debug) is guest CPU taken
/// from the packets whose gap we measure.
fn guest_agent_log() -> &'static str {
    if std::env::var_os("MAT6_GUEST_LOG").is_some() {
        "guest_agent=debug,ims_client=debug,info"
    } else {
        "info"
    }
}

/// Guest shell fragment: start the echo servers for the probes.
const ECHO_SETUP: &str = "mat6_setup() {\n  mat6-probe udp-echo --listen '[::]:7400' >/tmp/udp-echo.log 2>&1 &\n  mat6-probe tcp-echo --listen '[::]:7401' >/tmp/tcp-echo.log 2>&1 &\n}\n";

/// Traffic running during a migration.
#[derive(Debug)]
struct Traffic {
    cn_ping: ChildGuard,
    udp: ChildGuard,
    tcp: ChildGuard,
}

fn spawn_piped_stdin(ns: &Netns, prog: &Path, args: &[String]) -> Result<ChildGuard> {
    let mut c = ns.command(prog);
    c.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    Ok(ChildGuard::spawn(c)?)
}

fn finish_probe(mut g: ChildGuard, what: &str) -> Result<serde_json::Value> {
    // Closing stdin stops the probe; it prints one JSON line.
    drop(g.child_mut().stdin.take());
    let _ = g.wait_timeout(Duration::from_secs(15));
    let mut out = String::new();
    if let Some(mut s) = g.child_mut().stdout.take() {
        let _ = s.read_to_string(&mut out);
    }
    serde_json::from_str(out.trim()).map_err(|_| TestbedError::Parse {
        what: format!("{what} report"),
        text: out,
    })
}

fn finish_ping(mut g: ChildGuard) -> Result<PingStats> {
    let _ = g.signal(Signal::SIGINT);
    let _ = g.wait_timeout(Duration::from_secs(5));
    let mut out = String::new();
    if let Some(mut s) = g.child_mut().stdout.take() {
        let _ = s.read_to_string(&mut out);
    }
    Ok(parse_ping(&out))
}

impl Testbed {
    fn start_traffic(&self, tools: &Tools, target: &str, bind: Option<&str>) -> Result<Traffic> {
        let mut ping_args = vec![
            "-6".to_string(),
            "-n".into(),
            "-D".into(),
            "-i".into(),
            "0.01".into(),
        ];
        if let Some(b) = bind {
            ping_args.push("-I".into());
            ping_args.push(b.into());
        }
        ping_args.push(target.into());
        let mut c = self.cn.command("ping");
        c.args(&ping_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let cn_ping = ChildGuard::spawn(c)?;
        let mut common = Vec::new();
        if let Some(b) = bind {
            common.push("--bind".to_string());
            common.push(b.to_string());
        }
        let mut ua = vec![
            "udp-probe".to_string(),
            "--to".into(),
            format!("[{target}]:{UDP_PORT}"),
            "--size".into(),
            "210".into(),
            "--interval-ms".into(),
            "20".into(),
        ];
        ua.extend(common.iter().cloned());
        let udp = spawn_piped_stdin(&self.cn, &tools.probe, &ua)?;
        let mut ta = vec![
            "tcp-probe".to_string(),
            "--to".into(),
            format!("[{target}]:{TCP_PORT}"),
            "--chunk".into(),
            "512".into(),
            "--interval-ms".into(),
            "10".into(),
        ];
        ta.extend(common);
        let tcp = spawn_piped_stdin(&self.cn, &tools.probe, &ta)?;
        Ok(Traffic { cn_ping, udp, tcp })
    }

    /// One measured migration in `mode`, with a VM of `mem_mb` MiB booted
    /// for it (site A → site B for the agent modes).
    pub fn run_migration(
        &mut self,
        img: &GuestImage,
        tools: &Tools,
        mode: Mode,
        mem_mb: u32,
    ) -> Result<RunResult> {
        match mode {
            Mode::Lan => self.run_lan(img, tools, mem_mb),
            Mode::Prep | Mode::NoPrep | Mode::LanMat6 => {
                let mut v = self.run_agent_mode(img, tools, mode, mem_mb, false)?;
                v.pop().ok_or_else(|| TestbedError::Parse {
                    what: "run".into(),
                    text: "no result".into(),
                })
            }
        }
    }

    /// A→B then B→A with the same VM (the NICs swap roles twice); one
    /// result per leg.
    pub fn run_round_trip(
        &mut self,
        img: &GuestImage,
        tools: &Tools,
        mode: Mode,
        mem_mb: u32,
    ) -> Result<Vec<RunResult>> {
        self.run_agent_mode(img, tools, mode, mem_mb, true)
    }

    fn run_lan(&self, img: &GuestImage, tools: &Tools, mem_mb: u32) -> Result<RunResult> {
        let id = VmIdentity::default();
        let mut vm = self.boot_vm(img, mem_mb, &id, &self.lan_vm_conf(&id))?;
        // Reachability before we measure anything.
        if crate::netns::wait_for("CN reaches the VM", Duration::from_secs(20), || {
            self.cn.ping6(&id.addr, 1)
        })
        .is_err()
        {
            return Err(TestbedError::Parse {
                what: "VM reachability".into(),
                text: format!("CN cannot ping the VM at {}; {}", id.addr, vm.diag()),
            });
        }
        measure(
            self,
            tools,
            &mut vm,
            &id.addr,
            None,
            CN_ADDR,
            mem_mb,
            Mode::Lan,
            |tb, vm| {
                let (stats, tall) = tb.migrate_lan(vm)?;
                Ok((stats, tall, None))
            },
        )
    }
}

/// Runs traffic, calls `migrate`, collects every figure.
#[allow(clippy::too_many_arguments)]
fn measure(
    tb: &Testbed,
    tools: &Tools,
    vm: &mut TestVm,
    target: &str,
    bind: Option<&str>,
    cn_addr: &str,
    mem_mb: u32,
    mode: Mode,
    migrate: impl FnOnce(
        &Testbed,
        &mut TestVm,
    ) -> Result<(MigrationStats, f64, Option<serde_json::Value>)>,
) -> Result<RunResult> {
    let short = Duration::from_secs(10);
    let src_bind = bind.map(|_| format!("-I {target} ")).unwrap_or_default();
    vm.qemu.sh_ok(
        &format!("ping -6 -n -D -i 0.01 {src_bind}{cn_addr} >/tmp/ping.log 2>&1 & echo $! >/tmp/ping.pid"),
        short,
    )?;
    // Optional packet captures for diagnosis: MAT6_CAPTURE_DIR=/some/dir
    // writes the CN's link and both site links (router side) as pcap files.
    let _captures = match std::env::var_os("MAT6_CAPTURE_DIR") {
        Some(d) => start_captures(tb, Path::new(&d), mode)?,
        None => Vec::new(),
    };
    let traffic = tb.start_traffic(tools, target, bind)?;
    thread::sleep(Duration::from_secs(2));
    let (stats, tall, host_prep) = migrate(tb, vm)?;
    let resumed_at = now_unix_ms();
    // Guest side: replies must keep coming after the resume.
    vm.qemu
        .wait_control_after_migration(Duration::from_secs(30))?;
    let g1 = parse_gapstat(&vm.qemu.sh_ok("gapstat /tmp/ping.log", short)?)?;
    thread::sleep(Duration::from_secs(2));
    let g2 = parse_gapstat(&vm.qemu.sh_ok("gapstat /tmp/ping.log", short)?)?;
    let resumed_vm_to_cn = g2.replies >= g1.replies + 50;
    thread::sleep(Duration::from_millis(500));
    let Traffic { cn_ping, udp, tcp } = traffic;
    let udp_report = finish_probe(udp, "udp-probe")?;
    let tcp_report = finish_probe(tcp, "tcp-probe")?;
    let ping_cn = finish_ping(cn_ping)?;
    vm.qemu
        .sh_ok("kill -INT $(cat /tmp/ping.pid); sleep 0.2", short)?;
    let ping_vm = parse_gapstat(&vm.qemu.sh_ok("gapstat /tmp/ping.log", short)?)?;
    let resumed_cn_to_vm = ping_cn.last_ms > resumed_at + 1000.0;
    let num = |v: &serde_json::Value, k: &str| {
        v.get(k).and_then(serde_json::Value::as_f64).unwrap_or(0.0)
    };
    Ok(RunResult {
        mem_mb,
        mode,
        tdw_ms: ping_cn.max_gap_ms.max(ping_vm.max_gap_ms),
        tall_ms: tall,
        qemu_downtime_ms: stats.downtime_ms,
        qemu_total_ms: stats.total_ms,
        udp_lost: num(&udp_report, "lost") as u64,
        udp_max_gap_ms: num(&udp_report, "max_gap_ms"),
        tcp_survived: tcp_report
            .get("survived")
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(false),
        tcp_max_gap_ms: num(&tcp_report, "max_gap_ms"),
        ping_cn_to_vm: ping_cn,
        ping_vm_to_cn: ping_vm,
        resumed_cn_to_vm,
        resumed_vm_to_cn,
        host_prep,
        udp_report,
        tcp_report,
        guest_bicasts: None,
        guest_probe_hits: None,
    })
}

/// tcpdump on the CN's link (core side) and on both site links (router
/// side); the guards stop them (SIGKILL after the run; `-U` flushes each
/// packet).
fn start_captures(tb: &Testbed, dir: &Path, mode: Mode) -> Result<Vec<ChildGuard>> {
    std::fs::create_dir_all(dir).map_err(io_err(format!("mkdir {}", dir.display())))?;
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let mut v = Vec::new();
    for (ns, ifname, tag) in [
        (&tb.core, "c-c", "cn"),
        (&tb.a.router, "down0", "siteA"),
        (&tb.b.router, "down0", "siteB"),
    ] {
        let file = dir.join(format!("{mode}-{stamp}-{tag}.pcap"));
        let mut c = ns.command("tcpdump");
        c.args(["-i", ifname, "-U", "-n", "-s", "128", "-w"])
            .arg(&file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        v.push(ChildGuard::spawn(c)?);
    }
    thread::sleep(Duration::from_millis(300));
    Ok(v)
}

/// Writes `text` to a file in the testbed's scratch dir; returns its path.
pub fn write_file(dir: &Path, name: &str, text: &str) -> Result<PathBuf> {
    let p = dir.join(name);
    let mut f = std::fs::File::create(&p).map_err(io_err(format!("create {}", p.display())))?;
    f.write_all(text.as_bytes())
        .map_err(io_err(format!("write {}", p.display())))?;
    Ok(p)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn parse_ping_finds_gap_and_count() {
        let t = "PING x\n[1000.000000] 64 bytes from a: icmp_seq=1\n[1000.010000] 64 bytes from a: icmp_seq=2\n[1000.090000] 64 bytes from a: icmp_seq=10\nno answer yet for icmp_seq=3\n[1000.100000] 64 bytes from a: icmp_seq=11\n";
        let s = parse_ping(t);
        assert_eq!(s.replies, 4);
        assert!((s.max_gap_ms - 80.0).abs() < 1e-6, "{s:?}");
        assert!((s.gap_at_ms - 1_000_010.0).abs() < 1e-3);
        assert!((s.last_ms - 1_000_100.0).abs() < 1e-3);
    }

    #[test]
    fn parse_gapstat_line() {
        let s =
            parse_gapstat("replies=512 maxgap_ms=46.5 gap_at=12.345 first=10.000 last=20.000\n")
                .unwrap();
        assert_eq!(s.replies, 512);
        assert!((s.max_gap_ms - 46.5).abs() < 1e-9);
        assert!((s.last_ms - 20_000.0).abs() < 1e-6);
        assert!(parse_gapstat("sh: gapstat: not found").is_err());
    }

    #[test]
    fn peer_binding_in_agent_status() {
        let doc = r#"{"status":{"peers":{"2001:db8:ff::2":{"active":"2001:db8:c::2","standby":[],"seq":3}}}}"#;
        assert!(agent_knows_peer(doc, "2001:db8:ff::2"));
        assert!(!agent_knows_peer(doc, "2001:db8:ff::9"));
        let no_active = r#"{"status":{"peers":{"2001:db8:ff::2":{"active":null,"standby":[]}}}}"#;
        assert!(!agent_knows_peer(no_active, "2001:db8:ff::2"));
        assert!(!agent_knows_peer(
            "guest-agent: not running",
            "2001:db8:ff::2"
        ));
    }

    #[test]
    fn modes_round_trip() {
        for m in [Mode::Lan, Mode::Prep, Mode::NoPrep, Mode::LanMat6] {
            assert_eq!(m.to_string().parse::<Mode>().unwrap(), m);
        }
        assert!("x".parse::<Mode>().is_err());
        assert_eq!(serde_json::to_string(&Mode::NoPrep).unwrap(), "\"noprep\"");
        assert_eq!(
            serde_json::to_string(&Mode::LanMat6).unwrap(),
            "\"lan-mat6\""
        );
    }
}

// ---------------------------------------------------------------------------
// The mat6 stack: IMS, agents, host-prep (modes `prep` and `noprep`).

/// The VM's home address in the agent modes.
pub const VM_HOA: &str = "2001:db8:ff::1";
/// The correspondent's home address in the agent modes.
pub const CN_HOA: &str = "2001:db8:ff::2";
/// TLS name of the IMS certificate.
const IMS_NAME: &str = "ims.test";

/// Paths of the mat6 binaries (release for the bench, debug for tests).
#[derive(Debug, Clone)]
pub struct Mat6Bins {
    /// `ims-server`.
    pub ims_server: PathBuf,
    /// `guest-agent` (host side: the CN's agent).
    pub guest_agent: PathBuf,
    /// `host-prep`.
    pub host_prep: PathBuf,
}

impl Mat6Bins {
    /// The three binaries in `dir`, if all exist.
    pub fn in_dir(dir: &Path) -> Option<Mat6Bins> {
        let b = Mat6Bins {
            ims_server: dir.join("ims-server"),
            guest_agent: dir.join("guest-agent"),
            host_prep: dir.join("host-prep"),
        };
        [&b.ims_server, &b.guest_agent, &b.host_prep]
            .iter()
            .all(|p| p.is_file())
            .then_some(b)
    }
}

/// Processes and files of the mat6 stack; processes die on drop.
#[derive(Debug)]
struct Mat6Stack {
    bins: Mat6Bins,
    dir: PathBuf,
    ims_pk_b64: String,
    vm_key_line: String,
    host_prep_cfg: PathBuf,
    /// Tap names of the VM's NICs (the same on both hosts, as host-prep
    /// expects).
    taps: [String; 2],
    _cn_agent: ChildGuard,
    _cn_radvd: ChildGuard,
    _ims: ChildGuard,
}

fn run_tool(ns: &Netns, prog: &Path, args: &[&str]) -> Result<String> {
    let mut c = ns.command(prog);
    c.args(args);
    Ok(crate::netns::run_ok(c)?)
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).map_err(io_err(format!("write {}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io_err(format!("chmod {}", path.display())))
}

/// Whether a `guest-agent status --json` document lists `peer` among the
/// agent's peer bindings with an active MoA.
fn agent_knows_peer(status_json: &str, peer: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(status_json.trim())
        .ok()
        .and_then(|v| v["status"]["peers"][peer]["active"].as_str().map(|_| ()))
        .is_some()
}

/// The agent configuration shared by the VM and the CN (paths differ).
fn agent_toml(
    hoa: &str,
    ca: &str,
    key: &str,
    pk: &str,
    ifaces: &[(&str, &str)],
    sock: &str,
) -> String {
    let mut t = format!(
        "hoa = \"{hoa}\"\n[ims]\nupdate_addr = \"[{IMS_ADDR}]:7341\"\ncontrol_addr = \"[{IMS_ADDR}]:7342\"\nca_file = \"{ca}\"\nserver_name = \"{IMS_NAME}\"\nkey_file = \"{key}\"\npublic_key = \"{pk}\"\nbinding_lifetime_s = 600\n"
    );
    for (name, role) in ifaces {
        t.push_str(&format!(
            "[[interfaces]]\nname = \"{name}\"\nrole = \"{role}\"\nallowed_routers = [\"fe80::1\"]\n"
        ));
    }
    // The VM's secondary is prepared on a bridge with no uplink: bicast to
    // it (the CN has one NIC, so it never has a standby to copy to).
    // MAT6_BICAST=0 turns it off, to measure what it saves.
    let bicast = std::env::var("MAT6_BICAST").map_or(true, |v| v != "0");
    // MAT6_SITE_PROBE=0 turns the site-registry gateway probe off (then an
    // unprepared move waits for the router's RA).
    let probe = std::env::var("MAT6_SITE_PROBE").map_or(true, |v| v != "0");
    t.push_str(&format!(
        "[peers]\nprefixes = [\"2001:db8:ff::/64\"]\n[agent]\nstatus_socket = \"{sock}\"\nstandby_bicast = {bicast}\nsite_probe = {probe}\n"
    ));
    // MAT6_AGENT_EXTRA: more `[agent]` keys for A/B runs, one per line
    // (a literal `\n` separates lines too), e.g. `bicast_nice = 0`.
    t.push_str(&env_toml_extra("MAT6_AGENT_EXTRA"));
    t
}

/// Extra TOML for A/B runs from environment variable `var` (a literal `\n`
/// separates lines too), on lines of its own; empty when unset.
fn env_toml_extra(var: &str) -> String {
    std::env::var(var).map_or_else(
        |_| String::new(),
        |extra| format!("\n{}\n", extra.replace("\\n", "\n")),
    )
}

impl Testbed {
    /// Starts the IMS (sites A and B registered, HoAs provisioned), radvd on
    /// the CN's link and the CN's guest-agent, and writes host-prep's config.
    pub fn start_mat6(&mut self, bins: &Mat6Bins) -> Result<()> {
        if self.mat6.is_some() {
            return Ok(());
        }
        let d = self.dir.join("mat6");
        std::fs::create_dir_all(&d).map_err(io_err(format!("mkdir {}", d.display())))?;
        let ds = d.display().to_string();
        let ims = &bins.ims_server;
        run_tool(
            &self.ims,
            ims,
            &["keys", "gen-signing", "--out", &format!("{ds}/signing.pk8")],
        )?;
        run_tool(
            &self.ims,
            ims,
            &["keys", "gen-admin-token", "--out", &format!("{ds}/token")],
        )?;
        // host-prep activates the VM's standby MoA at RESUME with this token.
        run_tool(
            &self.ims,
            ims,
            &[
                "keys",
                "gen-host-token",
                "--out",
                &format!("{ds}/host-token"),
            ],
        )?;
        run_tool(
            &self.ims,
            ims,
            &["keys", "gen-tls", "--dir", &ds, "--name", IMS_NAME],
        )?;
        let pk = run_tool(
            &self.ims,
            ims,
            &[
                "keys",
                "export-public",
                "--signing-key",
                &format!("{ds}/signing.pk8"),
            ],
        )?;
        let ims_pk_b64 = pk.lines().last().unwrap_or("").trim().to_owned();
        let cfg = format!(
            "udp_listen = \"[::]:7341\"\ncontrol_listen = \"[::]:7342\"\nstore_path = \"{ds}/ims.redb\"\ntls_cert = \"{ds}/server.pem\"\ntls_key = \"{ds}/server.key\"\nadmin_token_file = \"{ds}/token\"\nhost_token_file = \"{ds}/host-token\"\nsigning_key_file = \"{ds}/signing.pk8\"\nready_file = \"{ds}/ims-ready.json\"\n"
        );
        write_file(&d, "ims.toml", &cfg)?;
        let log = std::fs::File::create(d.join("ims.log")).map_err(io_err("ims.log"))?;
        let mut c = self.ims.command(ims);
        c.args(["serve", "--config"])
            .arg(d.join("ims.toml"))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(io_err("ims.log"))?)
            .stderr(log);
        let ims_proc = ChildGuard::spawn(c)?;
        let ready = d.join("ims-ready.json");
        crate::netns::wait_for("ims-server ready", Duration::from_secs(30), || {
            ready.exists()
        })?;
        let conn = [
            "--server",
            "[::1]:7342",
            "--server-name",
            IMS_NAME,
            "--ca",
            &format!("{ds}/ca.pem"),
            "--token-file",
            &format!("{ds}/token"),
        ]
        .map(str::to_owned);
        for site in [&self.a, &self.b] {
            let name = site.letter.to_ascii_uppercase().to_string();
            let mut args: Vec<String> = vec!["sites".into()];
            args.extend(conn.iter().cloned());
            args.extend(
                [
                    "add",
                    "--name",
                    &name,
                    "--prefix",
                    &format!("{}/64", site.prefix),
                    "--gateway-ll",
                    &site.gw_ll,
                    "--gateway-mac",
                    &site.gw_mac,
                ]
                .map(str::to_owned),
            );
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            run_tool(&self.ims, ims, &a)?;
        }
        let key_line = |hoa: &str| -> Result<String> {
            let mut args: Vec<String> = vec!["keys".into(), "add".into()];
            args.extend(conn.iter().cloned());
            args.extend(["--hoa".to_string(), hoa.to_string()]);
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = run_tool(&self.ims, ims, &a)?;
            out.lines()
                .rev()
                .map(str::trim)
                .find(|l| l.contains(':') && !l.contains(' '))
                .map(str::to_owned)
                .ok_or_else(|| TestbedError::Parse {
                    what: "ims-server keys add".into(),
                    text: out.clone(),
                })
        };
        let vm_key_line = key_line(VM_HOA)?;
        let cn_key_line = key_line(CN_HOA)?;
        // RAs on the CN's link (core's c-c, gateway fe80::1).
        let cn_radvd = start_radvd(&self.core, "c-c", "2001:db8:c::", &d, 'c')?;
        // The CN's agent.
        write_private(&d.join("cn.key"), &cn_key_line)?;
        let cn_toml = agent_toml(
            CN_HOA,
            &format!("{ds}/ca.pem"),
            &format!("{ds}/cn.key"),
            &ims_pk_b64,
            &[("up0", "primary")],
            &format!("{ds}/cn.sock"),
        );
        write_file(&d, "cn.toml", &cn_toml)?;
        let log = std::fs::File::create(d.join("cn-agent.log")).map_err(io_err("cn-agent.log"))?;
        let mut c = self.cn.command(&bins.guest_agent);
        c.args(["run", "--config"])
            .arg(d.join("cn.toml"))
            .env("RUST_LOG", "guest_agent=debug,info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(io_err("cn-agent.log"))?)
            .stderr(log);
        let cn_agent = ChildGuard::spawn(c)?;
        // host-prep's configuration (both hosts share it; --site tells).
        let taps = [
            crate::netns::unique_ifname("m6ev"),
            crate::netns::unique_ifname("m6ev"),
        ];
        let hp = bins.host_prep.display().to_string();
        let cfg_path = d.join("host-prep.toml");
        let cp = cfg_path.display().to_string();
        let recv = |site: &Site, name: &str| {
            format!(
                "[\"ip\", \"netns\", \"exec\", \"{}\", \"{hp}\", \"-c\", \"{cp}\", \"--site\", \"{name}\", \"receive\", \"--vm\", \"{{vm}}\", \"--active\", \"{{active}}\", \"--attach\", \"{{attach}}\", \"--existing\", \"--json\"]",
                site.host.name()
            )
        };
        let hp_cfg = format!(
            "state_dir = \"{ds}/hp-state\"\n\n[ims]\ncontrol = \"[{IMS_ADDR}]:7342\"\nserver_name = \"{IMS_NAME}\"\nca_cert = \"{ds}/ca.pem\"\nhost_token_file = \"{ds}/host-token\"\n\n[timeouts]\nprepare_ms = 30000\nstart_ms = 20000\nmigrate_ms = 300000\n\n[sites.A]\nbridge = \"{}\"\nstandby_bridge = \"{}\"\nreceive_command = {}\n\n[sites.B]\nbridge = \"{}\"\nstandby_bridge = \"{}\"\nreceive_command = {}\n\n[vms.vm]\nqmp = \"{ds}/{{site}}.qmp\"\nhoa = \"{VM_HOA}\"\n[[vms.vm.nics]]\nid = \"nic0\"\ntap = \"{}\"\n[[vms.vm.nics]]\nid = \"nic1\"\ntap = \"{}\"\n",
            self.a.bridge,
            self.a.nouplink,
            recv(&self.a, "A"),
            self.b.bridge,
            self.b.nouplink,
            recv(&self.b, "B"),
            taps[0],
            taps[1]
        );
        // MAT6_HOST_PREP_EXTRA: more TOML at the end of host-prep's
        // configuration for A/B runs (a literal `\n` separates lines), e.g.
        // `[migration]\nseed_gateway_neighbour = true`.
        let hp_cfg = hp_cfg + &env_toml_extra("MAT6_HOST_PREP_EXTRA");
        write_file(&d, "host-prep.toml", &hp_cfg)?;
        self.mat6 = Some(Mat6Stack {
            bins: bins.clone(),
            dir: d,
            ims_pk_b64,
            vm_key_line,
            host_prep_cfg: cfg_path,
            taps,
            _cn_agent: cn_agent,
            _cn_radvd: cn_radvd,
            _ims: ims_proc,
        });
        Ok(())
    }

    fn stack(&self, mode: Mode) -> Result<&Mat6Stack> {
        self.mat6
            .as_ref()
            .ok_or_else(|| TestbedError::ModeUnavailable {
                mode,
                why: "mat6 stack not started (Testbed::start_mat6)".into(),
            })
    }

    /// The CN agent's log (diagnostics).
    pub fn cn_agent_log(&self) -> String {
        self.mat6
            .as_ref()
            .and_then(|m| std::fs::read_to_string(m.dir.join("cn-agent.log")).ok())
            .unwrap_or_default()
    }

    /// Boots the VM on site A with guest-agent (HoA `VM_HOA`, eth0 primary,
    /// eth1 secondary) and waits until the HoAs reach each other.
    pub fn boot_agent_vm(&self, img: &GuestImage, mem_mb: u32) -> Result<TestVm> {
        let st = self.stack(Mode::Prep)?;
        if !img.has_agent {
            return Err(TestbedError::ModeUnavailable {
                mode: Mode::Prep,
                why: "the guest image has no guest-agent (images/build.sh after it builds)".into(),
            });
        }
        let ca = std::fs::read(st.dir.join("ca.pem")).map_err(io_err("read ca.pem"))?;
        let toml = agent_toml(
            VM_HOA,
            "/etc/mat6/ca.pem",
            "/etc/mat6/guest-agent.key",
            &st.ims_pk_b64,
            &[("eth0", "primary"), ("eth1", "secondary")],
            "/run/mat6/guest-agent.sock",
        );
        let id = VmIdentity {
            addr: VM_HOA.into(),
            ..VmIdentity::default()
        };
        // A fresh VM starts with nic0 active at site A.
        let _ = std::fs::remove_dir_all(st.dir.join("hp-state"));
        let spec = VmSpec::new("vm", mem_mb)
            .nic(NicSpec::new("nic0", &id.mac0, &st.taps[0], &self.a.bridge))
            .nic(NicSpec::new(
                "nic1",
                &id.mac1,
                &st.taps[1],
                &self.a.nouplink,
            ))
            .overlay(
                crate::qemu::Overlay::new()
                    .vm_conf(&format!(
                        "HOSTNAME=m6e-vm\nAGENT_LOG={}\n{ECHO_SETUP}",
                        guest_agent_log()
                    ))
                    .file("/etc/mat6/guest-agent.toml", toml, 0o644)
                    .file(
                        "/etc/mat6/guest-agent.key",
                        format!("{}\n", st.vm_key_line),
                        0o600,
                    )
                    .file("/etc/mat6/ca.pem", ca, 0o644),
            );
        let mut qemu = Qemu::start(img, &spec, Some(&self.a.host))?;
        qemu.wait_ready(Duration::from_secs(120))?;
        let mut vm = TestVm {
            qemu,
            site: 'a',
            id,
            tap_seq: 0,
        };
        let ok = crate::netns::wait_for("CN HoA reaches VM HoA", Duration::from_secs(60), || {
            self.cn
                .exec(
                    "ping",
                    &["-6", "-n", "-c", "1", "-W", "1", "-I", CN_HOA, VM_HOA],
                )
                .map(|o| o.status.success())
                .unwrap_or(false)
        });
        // That ping can succeed before the VM's agent knows the CN's
        // binding (the VM then answers from its MoA untranslated, which the
        // CN translates back). A TCP connection opened in that window is
        // MoA-based on the VM's side and is reset the moment the VM learns
        // the binding, so wait for the VM's agent to hold it.
        let pinged = ok.is_ok();
        let ok = ok.and_then(|_| {
            let mut last = String::new();
            let r = crate::netns::wait_for(
                "the VM's agent holds the CN's binding",
                Duration::from_secs(60),
                || match vm
                    .qemu
                    .sh("guest-agent status --json", Duration::from_secs(10))
                {
                    Ok((0, out)) => {
                        let has = agent_knows_peer(&out, CN_HOA);
                        last = out;
                        has
                    }
                    Ok((_, out)) => {
                        last = out;
                        false
                    }
                    Err(_) => false,
                },
            );
            if r.is_err() {
                eprintln!("last VM agent status: {last}");
            }
            r
        });
        if ok.is_err() {
            return Err(TestbedError::Parse {
                what: "HoA reachability".into(),
                text: format!(
                    "{}; {}\nguest agent log:\n{}\nCN agent log tail:\n{}",
                    if pinged {
                        format!("the VM's agent never got the CN's binding ({CN_HOA}) from the IMS")
                    } else {
                        format!("CN cannot ping the VM's HoA {VM_HOA} from {CN_HOA}")
                    },
                    vm.diag(),
                    vm.qemu
                        .sh(
                            "tail -n 40 /var/log/guest-agent.log",
                            Duration::from_secs(5)
                        )
                        .map(|(_, o)| o)
                        .unwrap_or_default(),
                    tail(&self.cn_agent_log(), 40)
                ),
            });
        }
        Ok(vm)
    }

    /// Migrates the VM to the other site with `host-prep migrate` (prepared,
    /// or `--no-prep`). The destination QEMU is started here (`--existing`)
    /// with the source's attachments; host-prep's `receive` swaps them.
    /// Returns QEMU's figures, T_ALL (ms: `migrate` → switched, without the
    /// preparation) and host-prep's JSON report.
    pub fn migrate_hostprep(
        &self,
        vm: &mut TestVm,
        prep: bool,
    ) -> Result<(MigrationStats, f64, serde_json::Value)> {
        let mode = if prep { Mode::Prep } else { Mode::NoPrep };
        let st = self.stack(mode)?;
        let (from, to) = if vm.site == 'a' {
            (&self.a, &self.b)
        } else {
            (&self.b, &self.a)
        };
        let from_name = from.letter.to_ascii_uppercase().to_string();
        let to_name = to.letter.to_ascii_uppercase().to_string();
        // Destination: same devices, taps on the same roles' bridges as now.
        let mut spec = vm.qemu.spec().clone();
        for n in spec.nics.iter_mut() {
            n.bridge = if n.bridge == from.bridge {
                to.bridge.clone()
            } else {
                to.nouplink.clone()
            };
        }
        let uri = vm.qemu.migration_uri();
        let img = vm.qemu.image().clone();
        let mut dst = Qemu::start(&img, &spec.incoming(&uri), Some(&to.host))?;
        dst.release_qmp()?;
        vm.qemu.release_qmp()?;
        for (name, q) in [(&from_name, &vm.qemu), (&to_name, &dst)] {
            let link = st.dir.join(format!("{name}.qmp"));
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(q.qmp_path(), &link)
                .map_err(io_err(format!("symlink {}", link.display())))?;
        }
        let mut c = from.host.command(&st.bins.host_prep);
        c.arg("-c").arg(&st.host_prep_cfg).args([
            "--site", &from_name, "migrate", "--vm", "vm", "--to", &to_name, "--uri", &uri,
            "--json",
        ]);
        if !prep {
            c.arg("--no-prep");
        }
        c.env("RUST_LOG", "host_prep=info,warn")
            .stdin(Stdio::null());
        let out = c.output().map_err(io_err("run host-prep migrate"))?;
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let _ = std::fs::write(
            st.dir.join(format!("host-prep-{from_name}{to_name}.log")),
            &stderr,
        );
        if !out.status.success() {
            return Err(TestbedError::Parse {
                what: "host-prep migrate".into(),
                text: format!("exit {}: {}", out.status, tail(&stderr, 30)),
            });
        }
        let report: serde_json::Value =
            serde_json::from_slice(&out.stdout).map_err(|_| TestbedError::Parse {
                what: "host-prep migrate --json".into(),
                text: String::from_utf8_lossy(&out.stdout).into_owned(),
            })?;
        dst.reconnect_qmp()?;
        let old = std::mem::replace(&mut vm.qemu, dst);
        drop(old); // host-prep quit it; kill whatever is left, remove its taps
        vm.site = to.letter;
        let f = |k: &str| {
            report
                .get(k)
                .and_then(serde_json::Value::as_f64)
                .unwrap_or(0.0)
        };
        let stats = MigrationStats {
            total_ms: f("qemu_total_ms") as u64,
            downtime_ms: f("qemu_downtime_ms") as u64,
            setup_ms: 0,
            transferred: report
                .get("transferred_bytes")
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0),
            dirty_sync_count: report
                .get("dirty_sync_count")
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0),
            wall_ms: f("migration_ms") as u64,
        };
        Ok((stats, f("migration_ms"), report))
    }

    fn run_agent_mode(
        &mut self,
        img: &GuestImage,
        tools: &Tools,
        mode: Mode,
        mem_mb: u32,
        back: bool,
    ) -> Result<Vec<RunResult>> {
        let bins = tools
            .mat6
            .clone()
            .ok_or_else(|| TestbedError::ModeUnavailable {
                mode,
                why: "ims-server, guest-agent and host-prep binaries not found".into(),
            })?;
        if !img.has_agent {
            return Err(TestbedError::ModeUnavailable {
                mode,
                why: "the guest image has no guest-agent".into(),
            });
        }
        self.start_mat6(&bins)?;
        let mut vm = self.boot_agent_vm(img, mem_mb)?;
        let prep = mode == Mode::Prep;
        let mut out = Vec::new();
        let legs = if back { 2 } else { 1 };
        for _ in 0..legs {
            let r = measure(
                self,
                tools,
                &mut vm,
                VM_HOA,
                Some(CN_HOA),
                CN_HOA,
                mem_mb,
                mode,
                |tb, vm| {
                    if mode == Mode::LanMat6 {
                        let (s, t) = tb.migrate_lan(vm)?;
                        return Ok((s, t, None));
                    }
                    let (s, t, rep) = tb.migrate_hostprep(vm, prep)?;
                    Ok((s, t, Some(rep)))
                },
            );
            match r {
                Ok(mut r) => {
                    r.guest_bicasts = vm
                        .qemu
                        .sh(
                            "grep -c 'bicast to the standby link on' /var/log/guest-agent.log",
                            Duration::from_secs(10),
                        )
                        .ok()
                        .and_then(|(_, o)| o.trim().parse().ok());
                    let status = vm.qemu.sh(
                        "guest-agent status --socket /run/mat6/guest-agent.sock --json",
                        Duration::from_secs(10),
                    );
                    r.guest_probe_hits = status
                        .as_ref()
                        .ok()
                        .and_then(|(_, o)| {
                            let doc: serde_json::Value =
                                serde_json::from_str(o.get(o.find('{')?..)?).ok()?;
                            doc["counters"]["gateway_probe_hits"].as_u64()
                        })
                        .and_then(|n| u32::try_from(n).ok());
                    if r.guest_probe_hits.is_none() {
                        eprintln!("guest-agent status (no gateway_probe_hits): {status:?}");
                    }
                    // Timing diagnosis: MAT6_GUEST_LOG=1 prints the guest
                    // agent's log tail (and the kernel's) after each leg.
                    if std::env::var_os("MAT6_GUEST_LOG").is_some() {
                        let log = vm
                            .qemu
                            .sh(
                                "grep -v 'router advertisement' /var/log/guest-agent.log | tail -n 80; dmesg | tail -n 20",
                                Duration::from_secs(5),
                            )
                            .map(|(_, o)| o)
                            .unwrap_or_default();
                        println!("guest log after the {mode} leg:\n{log}");
                    }
                    out.push(r)
                }
                Err(e) => {
                    let log = vm
                        .qemu
                        .sh(
                            "tail -n 30 /var/log/guest-agent.log",
                            Duration::from_secs(5),
                        )
                        .map(|(_, o)| o)
                        .unwrap_or_default();
                    return Err(TestbedError::Parse {
                        what: format!("{mode} migration"),
                        text: format!(
                            "{e}\nguest agent log:\n{log}\nCN agent log:\n{}",
                            tail(&self.cn_agent_log(), 30)
                        ),
                    });
                }
            }
        }
        Ok(out)
    }
}

fn tail(s: &str, n: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(n)..].join("\n")
}
