//! Network-namespace bed for the guest-agent tests and benchmarks.
//!
//! ```text
//!              ims (2001:db8:e::53, real ims-server)
//!               |
//!   cn --- rA (radvd: 2001:db8:a::/64 on lan, 2001:db8:c::/64 on cn) --tr-- rB (own RA sender: 2001:db8:b::/64)
//!  (agent)      | lan (fe80::a)                                             | lan (fe80::b)
//!               +------ brA ----- sw ----- brB ------------------------------+
//!                        |                  |
//!                  v0 (far end of vm eth0)  v1 (far end of vm eth1)
//! ```
//!
//! `sw` holds the two site LAN bridges; the far ends of the VM's veths live
//! there and are moved between the bridges with carrier off/on (set down,
//! change master, set up), standing in for a migration. HoAs are in
//! 2001:db8:ff::/64 and routed nowhere: only the translation reaches them.
//! Every namespace is `m6a-PID-N`, removed on drop with its processes.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    dead_code,
    missing_debug_implementations
)]

use std::io::Write as _;
use std::net::{Ipv6Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mat6_tests::netns::{veth_pair, wait_for, ChildGuard, Netns};

pub const VM_HOA: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 1);
pub const CN_HOA: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 2);
pub const IMS_ADDR: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xe, 0, 0, 0, 0, 0x53);
pub const PFX_A: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xa, 0, 0, 0, 0, 0);
pub const PFX_B: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xb, 0, 0, 0, 0, 0);
pub const PFX_C: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 0);
pub const RTR_A: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0xa);
pub const RTR_B: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0xb);
pub const VM_MAC0: [u8; 6] = [0x52, 0x54, 0, 0x6a, 0, 1];
pub const VM_MAC1: [u8; 6] = [0x52, 0x54, 0, 0x6a, 0, 2];
pub const CN_MAC: [u8; 6] = [0x52, 0x54, 0, 0x6a, 0, 3];
pub const RB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];

pub fn mac_str(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

pub fn moa(prefix: Ipv6Addr, mac: [u8; 6]) -> Ipv6Addr {
    mat6_proto::mobility::moa_for(prefix, mac)
}

/// Directory of the binaries built next to the running test/bench.
pub fn bin(name: &str) -> PathBuf {
    if let Ok(d) = std::env::var("MAT6_BIN_DIR") {
        return Path::new(&d).join(name);
    }
    let exe = std::env::current_exe().unwrap();
    let mut dir = exe.parent().unwrap().to_path_buf();
    if dir.ends_with("deps") || dir.ends_with("examples") {
        dir.pop();
    }
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} not built: run `cargo build -p guest-agent -p ims-server --bins` (./test.sh builds them)",
        p.display()
    );
    p
}

fn write_private(path: &Path, text: &str) {
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(text.as_bytes()).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// A CA and a server certificate for "ims.test".
fn make_pki(dir: &Path) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let srv_key = KeyPair::generate().unwrap();
    let srv_params = CertificateParams::new(vec!["ims.test".into()]).unwrap();
    let srv = srv_params.signed_by(&srv_key, &issuer).unwrap();
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(dir.join("server.pem"), srv.pem()).unwrap();
    write_private(&dir.join("server.key"), &srv_key.serialize_pem());
}

/// A minimal RA sender: periodic RAs plus an immediate answer to every RS.
pub struct RaSender {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<mat6_tests::netns::Result<()>>>,
}

impl RaSender {
    pub fn start(
        ns: &Netns,
        ifname: &str,
        src: Ipv6Addr,
        prefix: Ipv6Addr,
        mac: [u8; 6],
        period: Duration,
    ) -> RaSender {
        let ifindex = ns.ifindex(ifname).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let handle = ns.spawn_tokio(move || async move {
            use mat6_net::icmp6::{NdpReceiver, NdpSender, ALL_NODES};
            use mat6_proto::ndp::{NdpRepr, PrefixInfo, RouterAdvert};
            let tx = NdpSender::bind(ifindex).unwrap();
            let mut rx = NdpReceiver::bind(ifindex).unwrap();
            let ra = NdpRepr::RouterAdvert(RouterAdvert {
                cur_hop_limit: 64,
                router_lifetime_s: 30,
                source_ll: Some(mac),
                prefixes: vec![PrefixInfo {
                    prefix,
                    prefix_len: 64,
                    on_link: true,
                    autonomous: true,
                    valid_lifetime_s: 86400,
                    preferred_lifetime_s: 14400,
                }],
                ..RouterAdvert::default()
            });
            let mut next = tokio::time::Instant::now();
            while !st.load(Ordering::Relaxed) {
                let wake = next.min(tokio::time::Instant::now() + Duration::from_millis(50));
                tokio::select! {
                    r = rx.recv() => {
                        match r {
                            Ok(p) => {
                                if matches!(p.repr, NdpRepr::RouterSolicit { .. }) {
                                    let _ = tx.send(&ra, Some(src), ALL_NODES).await;
                                }
                            }
                            Err(_) => break,
                        }
                    }
                    _ = tokio::time::sleep_until(wake) => {
                        if tokio::time::Instant::now() >= next {
                            let _ = tx.send(&ra, Some(src), ALL_NODES).await;
                            next = tokio::time::Instant::now() + period;
                        }
                    }
                }
            }
        });
        RaSender {
            stop,
            handle: Some(handle),
        }
    }
}

impl Drop for RaSender {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// One guest-agent process.
pub struct Agent {
    pub config: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    pub child: Option<ChildGuard>,
}

impl Agent {
    pub fn start(ns: &Netns, config: &Path, socket: &Path, log: &Path) -> Agent {
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let mut c = ns.command(bin("guest-agent"));
        c.arg("run")
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "guest_agent=debug,info")
            .stdin(std::process::Stdio::null())
            .stdout(logf.try_clone().unwrap())
            .stderr(logf);
        let child = ChildGuard::spawn(c).unwrap();
        Agent {
            config: config.to_owned(),
            socket: socket.to_owned(),
            log: log.to_owned(),
            child: Some(child),
        }
    }

    /// The status document (`guest-agent status --json`).
    pub fn status(&self) -> Option<serde_json::Value> {
        let out = std::process::Command::new(bin("guest-agent"))
            .args(["status", "--json", "--socket"])
            .arg(&self.socket)
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    pub fn active_moa(&self) -> Option<Ipv6Addr> {
        self.status()?["status"]["active_moa"]
            .as_str()?
            .parse()
            .ok()
    }

    pub fn standby_moas(&self) -> Vec<Ipv6Addr> {
        self.status()
            .and_then(|s| {
                s["status"]["standby_moas"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|x| x.as_str()?.parse().ok()).collect())
            })
            .unwrap_or_default()
    }

    pub fn peer_active(&self, hoa: Ipv6Addr) -> Option<Ipv6Addr> {
        self.status()?["status"]["peers"][hoa.to_string()]["active"]
            .as_str()?
            .parse()
            .ok()
    }

    pub fn peer_seq(&self, hoa: Ipv6Addr) -> Option<u64> {
        self.status()?["status"]["peers"][hoa.to_string()]["seq"].as_u64()
    }

    pub fn registered(&self) -> bool {
        self.status()
            .map(|s| {
                s["status"]["binding_seq"].is_u64()
                    && s["status"]["registration_pending"].as_bool() == Some(false)
            })
            .unwrap_or(false)
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.signal(nix::sys::signal::Signal::SIGTERM).unwrap();
            let st = c.wait_timeout(Duration::from_secs(10)).unwrap();
            assert!(
                st.success(),
                "guest-agent exited with {st}; log:\n{}",
                self.log_text()
            );
        }
    }

    /// SIGKILL (a crash).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.signal(nix::sys::signal::Signal::SIGKILL).unwrap();
            let _ = c.wait_timeout(Duration::from_secs(10));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Options of the bed.
#[derive(Clone, Copy)]
pub struct BedOptions {
    /// The VM's secondary starts attached to site B (a standby is prepared).
    pub standby: bool,
    /// Site A uses radvd (else the built-in RA sender).
    pub radvd: bool,
}

pub struct Bed {
    pub dir: tempfile::TempDir,
    pub sw: Netns,
    pub ra: Netns,
    pub rb: Netns,
    pub ims: Netns,
    pub cn: Netns,
    pub vm: Netns,
    pub ims_proc: Option<ChildGuard>,
    pub radvd: Option<ChildGuard>,
    pub ra_a: Option<RaSender>,
    pub ra_b: Option<RaSender>,
    pub ra_c: Option<RaSender>,
    pub ims_pk_b64: String,
    pub cn_agent: Option<Agent>,
    pub vm_agent: Option<Agent>,
    pub opts: BedOptions,
}

fn addr_nodad(ns: &Netns, dev: &str, cidr: &str) {
    ns.addr_add(dev, cidr, true).unwrap();
}

impl Bed {
    pub fn new(opts: BedOptions) -> Bed {
        let dir = tempfile::tempdir().unwrap();
        let sw = Netns::new("m6a").unwrap();
        let ra = Netns::new_router("m6a").unwrap();
        let rb = Netns::new_router("m6a").unwrap();
        let ims = Netns::new("m6a").unwrap();
        let cn = Netns::new("m6a").unwrap();
        let vm = Netns::new("m6a").unwrap();

        // Site LAN bridges in sw.
        for br in ["brA", "brB", "brX"] {
            sw.bridge(br).unwrap();
            let _ = sw.ip(&[
                "link",
                "set",
                "dev",
                br,
                "type",
                "bridge",
                "mcast_snooping",
                "0",
            ]);
        }
        // Routers' LAN legs.
        for (r, br, ll, pfx) in [
            (&ra, "brA", "fe80::a/64", "2001:db8:a::1/64"),
            (&rb, "brB", "fe80::b/64", "2001:db8:b::1/64"),
        ] {
            veth_pair(r, "lan", &sw, if br == "brA" { "ra0" } else { "rb0" }).unwrap();
            r.ip(&["link", "set", "dev", "lan", "addrgenmode", "none"])
                .unwrap();
            let leg = if br == "brA" { "ra0" } else { "rb0" };
            sw.bridge_attach(leg, br).unwrap();
            sw.link_up(leg).unwrap();
            r.link_up("lan").unwrap();
            addr_nodad(r, "lan", ll);
            addr_nodad(r, "lan", pfx);
        }
        rb.set_mac("lan", &mac_str(RB_MAC)).unwrap();
        // Transit between the routers.
        veth_pair(&ra, "tr", &rb, "tr").unwrap();
        ra.link_up("tr").unwrap();
        rb.link_up("tr").unwrap();
        addr_nodad(&ra, "tr", "2001:db8:f::1/64");
        addr_nodad(&rb, "tr", "2001:db8:f::2/64");
        ra.route_add(&["2001:db8:b::/64", "via", "2001:db8:f::2", "dev", "tr"])
            .unwrap();
        rb.route_add(&["default", "via", "2001:db8:f::1", "dev", "tr"])
            .unwrap();
        // IMS.
        veth_pair(&ra, "ims", &ims, "up").unwrap();
        ra.link_up("ims").unwrap();
        ims.link_up("up").unwrap();
        addr_nodad(&ra, "ims", "2001:db8:e::1/64");
        addr_nodad(&ims, "up", "2001:db8:e::53/64");
        ims.route_add(&["default", "via", "2001:db8:e::1", "dev", "up"])
            .unwrap();
        // CN link on router A.
        veth_pair(&ra, "cn", &cn, "eth0").unwrap();
        ra.ip(&["link", "set", "dev", "cn", "addrgenmode", "none"])
            .unwrap();
        ra.link_up("cn").unwrap();
        addr_nodad(&ra, "cn", "fe80::a/64");
        addr_nodad(&ra, "cn", "2001:db8:c::1/64");
        cn.set_mac("eth0", &mac_str(CN_MAC)).unwrap();
        // VM NICs; far ends in sw.
        veth_pair(&vm, "eth0", &sw, "v0").unwrap();
        veth_pair(&vm, "eth1", &sw, "v1").unwrap();
        vm.set_mac("eth0", &mac_str(VM_MAC0)).unwrap();
        vm.set_mac("eth1", &mac_str(VM_MAC1)).unwrap();
        sw.bridge_attach("v0", "brA").unwrap();
        sw.link_up("v0").unwrap();
        if opts.standby {
            sw.bridge_attach("v1", "brB").unwrap();
            sw.link_up("v1").unwrap();
        } else {
            // No carrier on the secondary until a move.
            sw.bridge_attach("v1", "brX").unwrap();
        }

        let mut bed = Bed {
            dir,
            sw,
            ra,
            rb,
            ims,
            cn,
            vm,
            ims_proc: None,
            radvd: None,
            ra_a: None,
            ra_b: None,
            ra_c: None,
            ims_pk_b64: String::new(),
            cn_agent: None,
            vm_agent: None,
            opts,
        };
        bed.start_routers();
        bed.start_ims();
        bed
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn start_routers(&mut self) {
        if self.opts.radvd {
            let conf = "interface lan {\n AdvSendAdvert on;\n MinRtrAdvInterval 3;\n MaxRtrAdvInterval 4;\n AdvDefaultLifetime 60;\n prefix 2001:db8:a::/64 { AdvOnLink on; AdvAutonomous on; };\n};\n\
                        interface cn {\n AdvSendAdvert on;\n MinRtrAdvInterval 3;\n MaxRtrAdvInterval 4;\n AdvDefaultLifetime 60;\n prefix 2001:db8:c::/64 { AdvOnLink on; AdvAutonomous on; };\n};\n";
            let p = self.path("radvd.conf");
            std::fs::write(&p, conf).unwrap();
            let pid = self.path("radvd.pid");
            let log = std::fs::File::create(self.path("radvd.log")).unwrap();
            let mut c = self.ra.command("radvd");
            c.arg("-n")
                .arg("-C")
                .arg(&p)
                .arg("-p")
                .arg(&pid)
                .args(["-m", "stderr"])
                .stdin(std::process::Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log);
            self.radvd = Some(ChildGuard::spawn(c).unwrap());
        } else {
            let mac = self.ra.mac_bytes("lan").unwrap();
            self.ra_a = Some(RaSender::start(
                &self.ra,
                "lan",
                RTR_A,
                PFX_A,
                mac,
                Duration::from_secs(1),
            ));
            let mac = self.ra.mac_bytes("cn").unwrap();
            self.ra_c = Some(RaSender::start(
                &self.ra,
                "cn",
                RTR_A,
                PFX_C,
                mac,
                Duration::from_secs(1),
            ));
        }
        self.ra_b = Some(RaSender::start(
            &self.rb,
            "lan",
            RTR_B,
            PFX_B,
            RB_MAC,
            Duration::from_secs(1),
        ));
    }

    fn start_ims(&mut self) {
        let d = self.dir.path().to_owned();
        make_pki(&d);
        let run = |args: &[&str]| {
            let out = std::process::Command::new(bin("ims-server"))
                .args(args)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "ims-server {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        };
        let sk = d.join("signing.pk8");
        let tok = d.join("token");
        run(&["keys", "gen-signing", "--out", sk.to_str().unwrap()]);
        run(&["keys", "gen-admin-token", "--out", tok.to_str().unwrap()]);
        let pk = run(&[
            "keys",
            "export-public",
            "--signing-key",
            sk.to_str().unwrap(),
        ]);
        self.ims_pk_b64 = pk.lines().last().unwrap_or("").trim().to_owned();
        let cfg = format!(
            "udp_listen = \"[::]:7341\"\ncontrol_listen = \"[::]:7342\"\nstore_path = \"{0}/ims.redb\"\ntls_cert = \"{0}/server.pem\"\ntls_key = \"{0}/server.key\"\nadmin_token_file = \"{0}/token\"\nsigning_key_file = \"{0}/signing.pk8\"\nready_file = \"{0}/ims-ready.json\"\n",
            d.display()
        );
        std::fs::write(d.join("ims.toml"), cfg).unwrap();
        let log = std::fs::File::create(d.join("ims.log")).unwrap();
        let mut c = self.ims.command(bin("ims-server"));
        c.args(["serve", "--config"])
            .arg(d.join("ims.toml"))
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        self.ims_proc = Some(ChildGuard::spawn(c).unwrap());
        let ready = d.join("ims-ready.json");
        wait_for("ims-server ready", Duration::from_secs(30), || {
            ready.exists()
        })
        .unwrap();
    }

    /// Provisions `hoa` at the IMS and writes its key file (mode 0600).
    pub fn provision(&self, hoa: Ipv6Addr, key_file: &Path) {
        let ca = self.path("ca.pem");
        let token = std::fs::read_to_string(self.path("token")).unwrap();
        let k = self
            .ims
            .run_tokio(move || async move {
                let tls = ims_client::TlsSettings::from_ca_pem_file(&ca, "ims.test").unwrap();
                let ctl = ims_client::ControlClient::connect("[::1]:7342".parse().unwrap(), &tls)
                    .await
                    .unwrap()
                    .with_admin_token(&token);
                ctl.key_add(hoa).await.unwrap()
            })
            .unwrap();
        write_private(key_file, &format!("{}:{}", k.key_id, k.secret_b64));
    }

    /// The IMS's view of a binding.
    pub fn ims_lookup(&self, hoa: Ipv6Addr) -> Option<ims_client::Binding> {
        let ca = self.path("ca.pem");
        self.ims
            .run_tokio(move || async move {
                let tls = ims_client::TlsSettings::from_ca_pem_file(&ca, "ims.test").unwrap();
                let ctl = ims_client::ControlClient::connect("[::1]:7342".parse().unwrap(), &tls)
                    .await
                    .unwrap();
                ctl.lookup(hoa).await.unwrap().map(|r| r.binding)
            })
            .unwrap()
    }

    pub fn agent_config(
        &self,
        name: &str,
        hoa: Ipv6Addr,
        ifaces: &[(&str, &str, &[Ipv6Addr])],
    ) -> PathBuf {
        let key = self.path(&format!("{name}.key"));
        self.provision(hoa, &key);
        let mut t = format!(
            "hoa = \"{hoa}\"\n[ims]\nupdate_addr = \"[{IMS_ADDR}]:7341\"\ncontrol_addr = \"[{IMS_ADDR}]:7342\"\nca_file = \"{ca}\"\nserver_name = \"ims.test\"\nkey_file = \"{key}\"\npublic_key = \"{pk}\"\nbinding_lifetime_s = 600\n",
            ca = self.path("ca.pem").display(),
            key = key.display(),
            pk = self.ims_pk_b64
        );
        for (n, role, allow) in ifaces {
            let a: Vec<String> = allow.iter().map(|x| format!("\"{x}\"")).collect();
            t.push_str(&format!(
                "[[interfaces]]\nname = \"{n}\"\nrole = \"{role}\"\nallowed_routers = [{}]\n",
                a.join(", ")
            ));
        }
        t.push_str(&format!(
            "[peers]\nprefixes = [\"2001:db8:ff::/64\"]\n[agent]\nstatus_socket = \"{}\"\nmetrics_addr = \"[::1]:9343\"\n",
            self.path(&format!("{name}.sock")).display()
        ));
        let p = self.path(&format!("{name}.toml"));
        std::fs::write(&p, t).unwrap();
        p
    }

    pub fn start_cn(&mut self) {
        let cfg = self.agent_config("cn", CN_HOA, &[("eth0", "primary", &[RTR_A])]);
        let a = Agent::start(&self.cn, &cfg, &self.path("cn.sock"), &self.path("cn.log"));
        self.cn_agent = Some(a);
    }

    pub fn start_vm(&mut self) {
        let cfg = if self.vm_agent.is_some() {
            self.path("vm.toml")
        } else {
            self.agent_config(
                "vm",
                VM_HOA,
                &[
                    ("eth0", "primary", &[RTR_A, RTR_B]),
                    ("eth1", "secondary", &[RTR_A, RTR_B]),
                ],
            )
        };
        let a = Agent::start(&self.vm, &cfg, &self.path("vm.sock"), &self.path("vm.log"));
        self.vm_agent = Some(a);
    }

    pub fn vm(&self) -> &Agent {
        self.vm_agent.as_ref().unwrap()
    }

    pub fn cn(&self) -> &Agent {
        self.cn_agent.as_ref().unwrap()
    }

    /// Waits until both agents are registered and know each other's
    /// binding (and the VM's standby, when one is prepared).
    pub fn wait_ready(&self) {
        let t = Duration::from_secs(20);
        let vm_a = moa(PFX_A, VM_MAC0);
        let cn_c = moa(PFX_C, CN_MAC);
        let diag = || {
            format!(
                "\n--- vm log ---\n{}\n--- cn log ---\n{}",
                self.vm().log_text(),
                self.cn().log_text()
            )
        };
        wait_for("VM active on site A", t, || {
            self.vm().active_moa() == Some(vm_a)
        })
        .unwrap_or_else(|e| panic!("{e}{}", diag()));
        wait_for("CN active on site C", t, || {
            self.cn().active_moa() == Some(cn_c)
        })
        .unwrap_or_else(|e| panic!("{e}{}", diag()));
        if self.opts.standby {
            let sb = moa(PFX_B, VM_MAC1);
            wait_for("VM standby on site B", t, || {
                self.vm().standby_moas() == vec![sb]
            })
            .unwrap_or_else(|e| panic!("{e}{}", diag()));
        }
        wait_for("both registered", t, || {
            self.vm().registered() && self.cn().registered()
        })
        .unwrap_or_else(|e| panic!("{e}{}", diag()));
        let want_sb = self.opts.standby;
        wait_for("CN knows the VM's binding", t, || {
            let s = self.cn().status();
            s.map(|s| {
                let p = &s["status"]["peers"][VM_HOA.to_string()];
                p["active"].as_str() == Some(&vm_a.to_string())
                    && (!want_sb || p["standby"].as_array().is_some_and(|a| !a.is_empty()))
            })
            .unwrap_or(false)
        })
        .unwrap_or_else(|e| panic!("{e}{}", diag()));
        wait_for("VM knows the CN's binding", t, || {
            self.vm().peer_active(CN_HOA) == Some(cn_c)
        })
        .unwrap_or_else(|e| panic!("{e}{}", diag()));
    }

    /// Planned move: the primary's carrier goes away (the VM resumed on the
    /// destination, whose primary NIC sits on a bridge with no uplink).
    pub fn cut_primary(&self) {
        self.sw.link_down("v0").unwrap();
    }

    /// Unplanned move of the primary NIC to site B: carrier off, re-plug
    /// into brB, carrier on.
    pub fn move_primary_to_b(&self) {
        self.sw.link_down("v0").unwrap();
        self.sw.bridge_attach("v0", "brB").unwrap();
        self.sw.link_up("v0").unwrap();
    }

    /// Puts the primary back on site A (after an unplanned move to B).
    pub fn move_primary_to_a(&self) {
        self.sw.link_down("v0").unwrap();
        self.sw.bridge_attach("v0", "brA").unwrap();
        self.sw.link_up("v0").unwrap();
    }

    pub fn diag(&self) -> String {
        let mut s = String::new();
        for (n, ns) in [("vm", &self.vm), ("cn", &self.cn)] {
            s.push_str(&format!("--- {n} addrs/routes/nft ---\n"));
            s.push_str(&ns.ip(&["-6", "addr"]).unwrap_or_default());
            s.push_str(&ns.ip(&["-6", "route"]).unwrap_or_default());
            s.push_str(&String::from_utf8_lossy(
                &ns.exec("nft", &["list", "ruleset"])
                    .map(|o| o.stdout)
                    .unwrap_or_default(),
            ));
        }
        if let Some(a) = &self.vm_agent {
            s.push_str(&format!("--- vm log ---\n{}", a.log_text()));
        }
        if let Some(a) = &self.cn_agent {
            s.push_str(&format!("--- cn log ---\n{}", a.log_text()));
        }
        s
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        // Agents first (they remove their state), then the rest; the Netns
        // drops kill anything left inside and delete the namespaces.
        if let Some(mut a) = self.vm_agent.take() {
            a.kill9();
        }
        if let Some(mut a) = self.cn_agent.take() {
            a.kill9();
        }
        self.ra_a.take();
        self.ra_b.take();
        self.ra_c.take();
    }
}

/// A `ping -D -i 0.01` in the background and its analysis.
pub struct Ping {
    child: ChildGuard,
    out: PathBuf,
}

#[derive(Debug, Clone)]
pub struct PingResult {
    pub sent: u64,
    pub received: u64,
    /// Runs of consecutive missing icmp_seq (first, length), ignoring the
    /// last few in flight when ping was stopped.
    pub missing_runs: Vec<(u64, u64)>,
    /// Largest gap between two consecutive replies, ms.
    pub max_gap_ms: f64,
    /// Reply timestamps (unix s) by seq.
    pub replies: Vec<(u64, f64)>,
}

impl Ping {
    pub fn start(ns: &Netns, src: Ipv6Addr, dst: Ipv6Addr, out: PathBuf) -> Ping {
        let f = std::fs::File::create(&out).unwrap();
        let mut c = ns.command("ping");
        c.args([
            "-6",
            "-D",
            "-n",
            "-i",
            "0.01",
            "-W",
            "1",
            "-I",
            &src.to_string(),
            &dst.to_string(),
        ])
        .stdin(std::process::Stdio::null())
        .stdout(f)
        .stderr(std::process::Stdio::null());
        Ping {
            child: ChildGuard::spawn(c).unwrap(),
            out,
        }
    }

    pub fn stop(mut self) -> PingResult {
        let _ = self.child.signal(nix::sys::signal::Signal::SIGINT);
        let _ = self.child.wait_timeout(Duration::from_secs(5));
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        parse_ping(&text)
    }
}

pub fn parse_ping(text: &str) -> PingResult {
    let mut replies: Vec<(u64, f64)> = Vec::new();
    let mut sent = 0;
    let mut received = 0;
    for line in text.lines() {
        if line.starts_with('[') && line.contains("icmp_seq=") {
            let ts = line[1..line.find(']').unwrap_or(1)]
                .parse::<f64>()
                .unwrap_or(0.0);
            let seq = line
                .split("icmp_seq=")
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
                .and_then(|s| s.parse::<u64>().ok());
            if let Some(seq) = seq {
                if line.contains("bytes from") {
                    replies.push((seq, ts));
                }
            }
        } else if line.contains("packets transmitted") {
            let nums: Vec<u64> = line
                .split(|c: char| !c.is_ascii_digit())
                .filter_map(|x| x.parse().ok())
                .collect();
            if nums.len() >= 2 {
                sent = nums[0];
                received = nums[1];
            }
        }
    }
    replies.sort_by_key(|r| r.0);
    replies.dedup_by_key(|r| r.0);
    let got: std::collections::BTreeSet<u64> = replies.iter().map(|r| r.0).collect();
    let first = 1u64;
    let last = sent.saturating_sub(5);
    let mut runs = Vec::new();
    let mut s = first;
    while s <= last {
        if !got.contains(&s) {
            let start = s;
            while s <= last && !got.contains(&s) {
                s += 1;
            }
            runs.push((start, s - start));
        } else {
            s += 1;
        }
    }
    let mut by_time: Vec<f64> = replies.iter().map(|r| r.1).collect();
    by_time.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let max_gap_ms = by_time
        .windows(2)
        .map(|w| (w[1] - w[0]) * 1000.0)
        .fold(0.0, f64::max);
    PingResult {
        sent,
        received,
        missing_runs: runs,
        max_gap_ms,
        replies,
    }
}

/// A TCP stream HoA -> HoA carrying a known byte pattern, verified at the
/// receiver.
pub struct TcpStream {
    stop: Arc<AtomicBool>,
    server: JoinHandle<mat6_tests::netns::Result<Result<u64, String>>>,
    client: JoinHandle<mat6_tests::netns::Result<Result<u64, String>>>,
}

pub fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(31) ^ (i >> 9)) as u8
}

impl TcpStream {
    /// `paced`: 1000 bytes every 2 ms; otherwise as fast as the receiver
    /// (which checks every byte) takes them.
    pub fn start(
        server_ns: &Netns,
        server: Ipv6Addr,
        client_ns: &Netns,
        client: Ipv6Addr,
        port: u16,
        paced: bool,
    ) -> TcpStream {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let server_h = server_ns.spawn_tokio(move || async move {
            let l = match tokio::net::TcpListener::bind(SocketAddr::from((server, port))).await {
                Ok(l) => l,
                Err(e) => return Err(format!("bind: {e}")),
            };
            let _ = ready_tx.send(());
            let (mut s, _) = match tokio::time::timeout(Duration::from_secs(20), l.accept()).await {
                Ok(Ok(x)) => x,
                Ok(Err(e)) => return Err(format!("accept: {e}")),
                Err(_) => return Err("accept timed out".into()),
            };
            let mut buf = vec![0u8; 65536];
            let mut pos = 0u64;
            loop {
                match s.read(&mut buf).await {
                    Ok(0) => return Ok(pos),
                    Ok(n) => {
                        for b in &buf[..n] {
                            if *b != pattern(pos) {
                                return Err(format!("byte {pos} corrupted"));
                            }
                            pos += 1;
                        }
                    }
                    Err(e) => return Err(format!("read after {pos} bytes: {e}")),
                }
            }
        });
        ready_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let client_h = client_ns.spawn_tokio(move || async move {
            let sock = tokio::net::TcpSocket::new_v6().map_err(|e| e.to_string())?;
            sock.bind(SocketAddr::from((client, 0)))
                .map_err(|e| format!("bind: {e}"))?;
            let mut s = tokio::time::timeout(
                Duration::from_secs(10),
                sock.connect(SocketAddr::from((server, port))),
            )
            .await
            .map_err(|_| "connect timed out".to_string())?
            .map_err(|e| format!("connect: {e}"))?;
            let mut pos = 0u64;
            let chunk = 1000u64;
            while !st.load(Ordering::Relaxed) {
                let data: Vec<u8> = (pos..pos + chunk).map(pattern).collect();
                s.write_all(&data)
                    .await
                    .map_err(|e| format!("write after {pos} bytes: {e}"))?;
                pos += chunk;
                if paced {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                } else {
                    tokio::task::yield_now().await;
                }
            }
            s.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
            Ok(pos)
        });
        TcpStream {
            stop,
            server: server_h,
            client: client_h,
        }
    }

    /// Stops sending; returns (bytes sent, bytes verified at the receiver).
    pub fn finish(self) -> (Result<u64, String>, Result<u64, String>) {
        self.stop.store(true, Ordering::Relaxed);
        let c = self.client.join().unwrap().unwrap();
        let s = self.server.join().unwrap().unwrap();
        (c, s)
    }
}

/// tcpdump on an interface, written to a pcap file.
pub struct Capture {
    child: ChildGuard,
    file: PathBuf,
}

impl Capture {
    pub fn start(ns: &Netns, ifname: &str, file: PathBuf) -> Capture {
        let mut c = ns.command("tcpdump");
        c.args(["-i", ifname, "-n", "-U", "-s", "200", "-w"])
            .arg(&file)
            .arg("ip6")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let cap = Capture {
            child: ChildGuard::spawn(c).unwrap(),
            file,
        };
        std::thread::sleep(Duration::from_millis(300));
        cap
    }

    /// Stops and returns the decoded text (`tcpdump -r -n -v`).
    pub fn stop(mut self) -> String {
        std::thread::sleep(Duration::from_millis(200));
        let _ = self.child.signal(nix::sys::signal::Signal::SIGINT);
        let _ = self.child.wait_timeout(Duration::from_secs(5));
        let out = std::process::Command::new("tcpdump")
            .args(["-r"])
            .arg(&self.file)
            .args(["-n", "-v"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

pub fn since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}
