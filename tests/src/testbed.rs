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
use serde::Serialize;

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Same-bridge migration on site A, no mat6: the baseline.
    Lan,
    /// Site A → site B with guest-agent and `host-prep migrate` (prepared).
    Prep,
    /// Site A → site B with guest-agent, `host-prep migrate --no-prep`.
    #[serde(rename = "noprep")]
    NoPrep,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Lan => "lan",
            Mode::Prep => "prep",
            Mode::NoPrep => "noprep",
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
            _ => Err(TestbedError::Parse {
                what: "mode (lan|prep|noprep)".into(),
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
            core.link_up(&format!("c-{net}"))?;
            ns.link_up("up0")?;
            core.addr_add(&format!("c-{net}"), &format!("2001:db8:{net}::1/64"), true)?;
            ns.addr_add("up0", &format!("{host}/64"), true)?;
            ns.route_add(&["default", "via", &format!("2001:db8:{net}::1")])?;
        }
        let tb = Testbed {
            a,
            b,
            cn,
            ims,
            core,
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
        for br in [&bridge, &nouplink] {
            // The host itself takes no part in IPv6 on these bridges.
            host.sysctl(&format!("net.ipv6.conf.{br}.disable_ipv6"), "1")?;
        }
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
        "interface {ifname} {{\n  AdvSendAdvert on;\n  MinRtrAdvInterval 3;\n  MaxRtrAdvInterval 4;\n  MinDelayBetweenRAs 0.05;\n  AdvDefaultLifetime 1800;\n  AdvSourceLLAddress on;\n  prefix {prefix}/64 {{\n    AdvOnLink on;\n    AdvAutonomous on;\n  }};\n}};\n"
    );
    std::fs::write(&conf, text).map_err(io_err(format!("write {}", conf.display())))?;
    let mut c = router.command("radvd");
    c.args(["-n", "-m", "stderr", "-C"])
        .arg(&conf)
        .arg("-p")
        .arg(&pid)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
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
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
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
#[derive(Debug, Clone, Serialize)]
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
}

/// Where the host-side tools are.
#[derive(Debug, Clone)]
pub struct Tools {
    /// `mat6-probe` binary (host side).
    pub probe: PathBuf,
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
    /// for it. `back` also migrates it back (A→B→A) and measures both.
    pub fn run_migration(
        &self,
        img: &GuestImage,
        tools: &Tools,
        mode: Mode,
        mem_mb: u32,
    ) -> Result<RunResult> {
        match mode {
            Mode::Lan => self.run_lan(img, tools, mem_mb),
            Mode::Prep | Mode::NoPrep => Err(TestbedError::ModeUnavailable {
                mode,
                why:
                    "cross-subnet modes need guest-agent in the image and host-prep (not wired yet)"
                        .into(),
            }),
        }
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
    })
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
    fn modes_round_trip() {
        for m in [Mode::Lan, Mode::Prep, Mode::NoPrep] {
            assert_eq!(m.to_string().parse::<Mode>().unwrap(), m);
        }
        assert!("x".parse::<Mode>().is_err());
        assert_eq!(serde_json::to_string(&Mode::NoPrep).unwrap(), "\"noprep\"");
    }
}
