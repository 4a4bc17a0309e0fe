//! RAII network-namespace test harness.
//!
//! Every object made here has a unique name (prefix + pid + counter) and is
//! removed on `Drop`, also when the test fails or panics:
//!
//! * [`Netns`]: `ip netns add NAME` with `lo` up; on drop every process still
//!   inside it is killed (they can only be ours: the namespace is) and the
//!   namespace is deleted, which destroys its interfaces (veths, bridges).
//! * [`ChildGuard`]: a process started in a namespace; killed (SIGKILL) and
//!   reaped on drop, by PID only.
//!
//! Interfaces are created *inside* the namespaces (`ip -n NS link add ...`), so
//! their names only have to be unique per namespace; [`unique_ifname`] still
//! gives names that are unique on the machine and at most 15 bytes long.
//!
//! Rust code that must open sockets inside a namespace (netlink, raw ICMPv6,
//! UDP) uses [`Netns::run`] (a closure on a fresh thread after `setns`) or
//! [`Netns::run_tokio`] / [`Netns::spawn_tokio`] (a tokio current-thread
//! runtime on such a thread; threads and sockets it creates stay in the
//! namespace).
//!
//! Everything here shells out to iproute2's `ip`: this is test code.

use std::ffi::OsStr;
use std::fs::File;
use std::future::Future;
use std::io;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use nix::sched::{setns, CloneFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Maximum length of a Linux interface name (IFNAMSIZ - 1).
pub const IFNAMSIZ_MAX: usize = 15;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Errors of the harness. Each names the command or object concerned.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// A command could not be started at all (binary missing, not root, ...).
    #[error("cannot run `{cmd}`: {source}")]
    Spawn {
        /// The command line.
        cmd: String,
        /// The OS error.
        source: io::Error,
    },
    /// A command ran and exited unsuccessfully.
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Failed {
        /// The command line.
        cmd: String,
        /// Its exit status.
        status: ExitStatus,
        /// What it printed on stderr (trimmed).
        stderr: String,
    },
    /// Entering the namespace from a thread failed.
    #[error("cannot enter namespace {ns}: {source}")]
    Setns {
        /// Namespace name.
        ns: String,
        /// The OS error.
        source: io::Error,
    },
    /// A condition did not become true in time.
    #[error("timed out after {timeout:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long we waited.
        timeout: Duration,
    },
    /// Output of a command could not be understood.
    #[error("unexpected output of `{cmd}`: {output}")]
    Parse {
        /// The command line.
        cmd: String,
        /// The output that did not parse.
        output: String,
    },
    /// Could not build a tokio runtime inside the namespace.
    #[error("cannot build tokio runtime in namespace {ns}: {source}")]
    Runtime {
        /// Namespace name.
        ns: String,
        /// The OS error.
        source: io::Error,
    },
}

/// Result alias of the harness.
pub type Result<T, E = NetnsError> = std::result::Result<T, E>;

fn next_id() -> (u32, u32) {
    (std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

fn base36(mut n: u64) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    if n == 0 {
        return "0".to_owned();
    }
    let mut out = Vec::new();
    while n > 0 {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
    }
    out.reverse();
    String::from_utf8_lossy(&out).into_owned()
}

/// A machine-unique interface name of at most 15 bytes: up to 6 bytes of
/// `prefix`, then the pid and a process-wide counter in base 36.
///
/// ```
/// let n = mat6_tests::netns::unique_ifname("m6nveth");
/// assert!(n.len() <= 15 && n.starts_with("m6nvet"));
/// ```
pub fn unique_ifname(prefix: &str) -> String {
    let (pid, n) = next_id();
    let pfx: String = prefix
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(6)
        .collect();
    // pid < 2^22 -> <= 5 base36 digits; counter gets the rest (>= 3 digits).
    let mut name = format!("{pfx}{}x{}", base36(u64::from(pid)), base36(u64::from(n)));
    name.truncate(IFNAMSIZ_MAX);
    name
}

fn cmdline(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs a command to completion and returns its output, whatever the status.
pub fn run_output(mut cmd: Command) -> Result<Output> {
    let line = cmdline(&cmd);
    cmd.stdin(Stdio::null())
        .output()
        .map_err(|source| NetnsError::Spawn { cmd: line, source })
}

/// Runs a command to completion; a non-zero exit is an error carrying stderr.
/// Returns stdout as text.
pub fn run_ok(cmd: Command) -> Result<String> {
    let line = cmdline(&cmd);
    let out = run_output(cmd)?;
    if !out.status.success() {
        return Err(NetnsError::Failed {
            cmd: line,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> Result<String> {
    let mut c = Command::new("ip");
    c.args(args);
    run_ok(c)
}

/// Polls `cond` every 10 ms until it returns true or `timeout` passes.
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    loop {
        if cond() {
            return Ok(());
        }
        if start.elapsed() >= timeout {
            return Err(NetnsError::Timeout {
                what: what.to_owned(),
                timeout,
            });
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Does a network namespace of this name exist (`/run/netns/NAME`)?
pub fn netns_exists(name: &str) -> bool {
    std::path::Path::new("/run/netns").join(name).exists()
}

/// A network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `PREFIX-PID-N` with `lo` up. Forwarding stays off (host).
    /// A name left behind by a crashed earlier process with the same pid is
    /// skipped (the next counter value is tried).
    pub fn new(prefix: &str) -> Result<Netns> {
        if prefix.is_empty() || prefix.contains('/') || prefix.contains(char::is_whitespace) {
            return Err(NetnsError::Parse {
                cmd: "Netns::new".to_owned(),
                output: format!("bad namespace prefix {prefix:?}"),
            });
        }
        let mut attempt = 0;
        let name = loop {
            let (pid, n) = next_id();
            let name = format!("{prefix}-{pid}-{n}");
            match ip(&["netns", "add", &name]) {
                Ok(_) => break name,
                Err(_) if netns_exists(&name) && attempt < 16 => attempt += 1,
                Err(e) => return Err(e),
            }
        };
        // From here on Drop cleans up, also if the next steps fail.
        let ns = Netns { name };
        ns.ip(&["link", "set", "dev", "lo", "up"])?;
        Ok(ns)
    }

    /// Like [`Netns::new`] with IPv6 forwarding on (a router namespace).
    /// Note: with forwarding on, the kernel ignores RAs unless `accept_ra=2`.
    pub fn new_router(prefix: &str) -> Result<Netns> {
        let ns = Netns::new(prefix)?;
        ns.set_forwarding(true)?;
        Ok(ns)
    }

    /// The namespace's name (as in `ip netns list`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Path of the namespace file, for `setns` or `nsenter --net=`.
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// A `Command` for `ip netns exec NAME cmd`, to customise before running.
    pub fn command(&self, cmd: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.arg("netns").arg("exec").arg(&self.name).arg(cmd);
        c
    }

    /// Runs `cmd args...` in the namespace to completion, whatever its status.
    pub fn exec<S: AsRef<OsStr>>(&self, cmd: &str, args: &[S]) -> Result<Output> {
        let mut c = self.command(cmd);
        c.args(args);
        run_output(c)
    }

    /// Runs `cmd args...` in the namespace; non-zero exit is an error.
    /// Returns stdout.
    pub fn exec_ok<S: AsRef<OsStr>>(&self, cmd: &str, args: &[S]) -> Result<String> {
        let mut c = self.command(cmd);
        c.args(args);
        run_ok(c)
    }

    /// `ip -n NAME args...`; non-zero exit is an error. Returns stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// Starts `cmd args...` in the namespace (stdin null, stdout/stderr
    /// inherited). The process is killed when the guard drops.
    pub fn spawn<S: AsRef<OsStr>>(&self, cmd: &str, args: &[S]) -> Result<ChildGuard> {
        let mut c = self.command(cmd);
        c.args(args).stdin(Stdio::null());
        ChildGuard::spawn(c)
    }

    /// Like [`Netns::spawn`] with stdout and stderr piped (read them through
    /// [`ChildGuard::child_mut`]; a child whose pipe is not read blocks once
    /// it has written 64 KiB).
    pub fn spawn_piped<S: AsRef<OsStr>>(&self, cmd: &str, args: &[S]) -> Result<ChildGuard> {
        let mut c = self.command(cmd);
        c.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        ChildGuard::spawn(c)
    }

    /// Sets a sysctl inside the namespace, e.g. `("net.ipv6.conf.all.forwarding", "1")`.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.exec_ok("sysctl", &["-q", "-w", &format!("{key}={value}")])
            .map(drop)
    }

    /// Reads a sysctl inside the namespace.
    pub fn sysctl_get(&self, key: &str) -> Result<String> {
        Ok(self.exec_ok("sysctl", &["-n", key])?.trim().to_owned())
    }

    /// IPv6 forwarding on/off for `all` and `default`.
    pub fn set_forwarding(&self, on: bool) -> Result<()> {
        let v = if on { "1" } else { "0" };
        self.sysctl("net.ipv6.conf.all.forwarding", v)?;
        self.sysctl("net.ipv6.conf.default.forwarding", v)
    }

    /// Creates a bridge (STP off, multicast snooping off so NDP multicast is
    /// always flooded) and sets it up.
    pub fn bridge(&self, name: &str) -> Result<()> {
        self.ip(&[
            "link",
            "add",
            "name",
            name,
            "type",
            "bridge",
            "stp_state",
            "0",
            "forward_delay",
            "0",
            "mcast_snooping",
            "0",
        ])?;
        self.link_up(name)
    }

    /// Enslaves `ifname` to `bridge` (both in this namespace) and sets it up.
    pub fn bridge_attach(&self, ifname: &str, bridge: &str) -> Result<()> {
        self.ip(&["link", "set", "dev", ifname, "master", bridge])?;
        self.link_up(ifname)
    }

    /// Releases `ifname` from its bridge.
    pub fn bridge_detach(&self, ifname: &str) -> Result<()> {
        self.ip(&["link", "set", "dev", ifname, "nomaster"])
            .map(drop)
    }

    /// Creates a tap device nobody opens (no carrier): a port for a bridge
    /// or a stand-in for a QEMU NIC.
    pub fn tap(&self, name: &str) -> Result<()> {
        self.ip(&["tuntap", "add", "dev", name, "mode", "tap"])
            .map(drop)
    }

    /// Adds an address, e.g. `("eth0", "2001:db8:1::2/64", true)`; with
    /// `nodad` the address is usable at once.
    pub fn addr_add(&self, ifname: &str, cidr: &str, nodad: bool) -> Result<()> {
        let mut args = vec!["addr", "add", cidr, "dev", ifname];
        if nodad {
            args.push("nodad");
        }
        self.ip(&args).map(drop)
    }

    /// Removes an address.
    pub fn addr_del(&self, ifname: &str, cidr: &str) -> Result<()> {
        self.ip(&["addr", "del", cidr, "dev", ifname]).map(drop)
    }

    /// Sets a link administratively up.
    pub fn link_up(&self, ifname: &str) -> Result<()> {
        self.ip(&["link", "set", "dev", ifname, "up"]).map(drop)
    }

    /// Sets a link administratively down. For a veth this also takes the
    /// carrier away from its peer end, which is how tests simulate a cable
    /// pull (see [`Netns::set_peer_carrier`]).
    pub fn link_down(&self, ifname: &str) -> Result<()> {
        self.ip(&["link", "set", "dev", ifname, "down"]).map(drop)
    }

    /// Carrier control for the *other* end of a veth: setting the local end
    /// `ifname` down makes the peer lose carrier, up restores it.
    pub fn set_peer_carrier(&self, ifname: &str, carrier: bool) -> Result<()> {
        if carrier {
            self.link_up(ifname)
        } else {
            self.link_down(ifname)
        }
    }

    /// Sets the MAC address of a link, e.g. `"02:00:00:00:00:01"`.
    pub fn set_mac(&self, ifname: &str, mac: &str) -> Result<()> {
        self.ip(&["link", "set", "dev", ifname, "address", mac])
            .map(drop)
    }

    /// Moves `ifname` into `other` (it arrives there down, addresses lost).
    pub fn move_link(&self, ifname: &str, other: &Netns) -> Result<()> {
        self.ip(&["link", "set", "dev", ifname, "netns", other.name()])
            .map(drop)
    }

    /// Deletes a link (a veth's peer disappears with it).
    pub fn link_del(&self, ifname: &str) -> Result<()> {
        self.ip(&["link", "del", "dev", ifname]).map(drop)
    }

    /// Does `ifname` exist in this namespace?
    pub fn link_exists(&self, ifname: &str) -> bool {
        self.ip(&["link", "show", "dev", ifname]).is_ok()
    }

    fn link_flags(&self, ifname: &str) -> Result<String> {
        let out = self.ip(&["-o", "link", "show", "dev", ifname])?;
        let start = out.find('<');
        let end = out.find('>');
        match (start, end) {
            (Some(s), Some(e)) if s < e => Ok(out[s + 1..e].to_owned()),
            _ => Err(NetnsError::Parse {
                cmd: format!("ip -n {} -o link show dev {ifname}", self.name),
                output: out,
            }),
        }
    }

    /// Does `ifname` have carrier (`LOWER_UP`, and no `NO-CARRIER`)?
    pub fn carrier(&self, ifname: &str) -> Result<bool> {
        let flags = self.link_flags(ifname)?;
        Ok(flags.split(',').any(|f| f == "LOWER_UP") && !flags.contains("NO-CARRIER"))
    }

    /// The interface index of `ifname` in this namespace.
    pub fn ifindex(&self, ifname: &str) -> Result<u32> {
        let out = self.ip(&["-o", "link", "show", "dev", ifname])?;
        out.split(':')
            .next()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| NetnsError::Parse {
                cmd: format!("ip -n {} -o link show dev {ifname}", self.name),
                output: out.clone(),
            })
    }

    /// The MAC address of `ifname` as `aa:bb:cc:dd:ee:ff`.
    pub fn mac(&self, ifname: &str) -> Result<String> {
        let out = self.ip(&["-o", "link", "show", "dev", ifname])?;
        let mut it = out.split_whitespace();
        while let Some(tok) = it.next() {
            if tok.starts_with("link/") {
                if let Some(mac) = it.next() {
                    return Ok(mac.to_owned());
                }
            }
        }
        Err(NetnsError::Parse {
            cmd: format!("ip -n {} -o link show dev {ifname}", self.name),
            output: out,
        })
    }

    /// The MAC address of `ifname` as bytes.
    pub fn mac_bytes(&self, ifname: &str) -> Result<[u8; 6]> {
        let s = self.mac(ifname)?;
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for b in out.iter_mut() {
            *b = parts
                .next()
                .and_then(|p| u8::from_str_radix(p, 16).ok())
                .ok_or_else(|| NetnsError::Parse {
                    cmd: format!("mac of {ifname}"),
                    output: s.clone(),
                })?;
        }
        Ok(out)
    }

    /// IPv6 addresses on `ifname` as `(address, flags)` where flags are the
    /// words after the prefix (`tentative`, `dadfailed`, `optimistic`, ...).
    pub fn addrs6(&self, ifname: &str) -> Result<Vec<(String, Vec<String>)>> {
        let out = self.ip(&["-o", "-6", "addr", "show", "dev", ifname])?;
        let mut v = Vec::new();
        for line in out.lines() {
            let mut words = line.split_whitespace().skip_while(|w| *w != "inet6");
            let _ = words.next();
            if let Some(addr) = words.next() {
                let flags = words
                    .take_while(|w| *w != "\\")
                    .filter(|w| !matches!(*w, "scope" | "global" | "link" | "host"))
                    .map(str::to_owned)
                    .collect();
                v.push((addr.to_owned(), flags));
            }
        }
        Ok(v)
    }

    /// Is `addr` (without prefix length) on `ifname` and no longer tentative?
    pub fn addr_ready(&self, ifname: &str, addr: &str) -> bool {
        self.addrs6(ifname)
            .map(|v| {
                v.iter().any(|(a, f)| {
                    a.split('/').next() == Some(addr) && !f.iter().any(|x| x == "tentative")
                })
            })
            .unwrap_or(false)
    }

    /// The link-local address of `ifname`, once DAD is done.
    pub fn link_local(&self, ifname: &str) -> Result<String> {
        let v = self.addrs6(ifname)?;
        v.into_iter()
            .find(|(a, f)| a.starts_with("fe80:") && !f.iter().any(|x| x == "tentative"))
            .map(|(a, _)| a.split('/').next().unwrap_or_default().to_owned())
            .ok_or_else(|| NetnsError::Parse {
                cmd: format!("ip -n {} -6 addr show dev {ifname}", self.name),
                output: "no usable link-local address".to_owned(),
            })
    }

    /// Polls `cond` every 10 ms until true or `timeout` ([`wait_for`] with
    /// the namespace's name in the error).
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        cond: impl FnMut() -> bool,
    ) -> Result<()> {
        wait_for(&format!("{what} in {}", self.name), timeout, cond)
    }

    /// Waits until `addr` on `ifname` is usable (not tentative).
    pub fn wait_addr_ready(&self, ifname: &str, addr: &str, timeout: Duration) -> Result<()> {
        wait_for(
            &format!("{addr} ready on {ifname} in {}", self.name),
            timeout,
            || self.addr_ready(ifname, addr),
        )
    }

    /// Waits until `ifname` has a usable link-local address and returns it.
    pub fn wait_link_local(&self, ifname: &str, timeout: Duration) -> Result<String> {
        let mut found = None;
        wait_for(
            &format!("link-local address on {ifname} in {}", self.name),
            timeout,
            || {
                found = self.link_local(ifname).ok();
                found.is_some()
            },
        )?;
        found.ok_or_else(|| NetnsError::Timeout {
            what: format!("link-local on {ifname}"),
            timeout,
        })
    }

    /// Waits until the carrier of `ifname` is `want`.
    pub fn wait_carrier(&self, ifname: &str, want: bool, timeout: Duration) -> Result<()> {
        wait_for(
            &format!("carrier={want} on {ifname} in {}", self.name),
            timeout,
            || self.carrier(ifname).ok() == Some(want),
        )
    }

    /// One `ping -6 -c 1 -W secs dst` from this namespace; true on a reply.
    pub fn ping6(&self, dst: &str, wait_s: u32) -> bool {
        self.exec(
            "ping",
            &["-6", "-n", "-c", "1", "-W", &wait_s.to_string(), dst],
        )
        .map(|o| o.status.success())
        .unwrap_or(false)
    }

    /// Adds a route, e.g. `route_add(&["2001:db8:2::/64", "via", "2001:db8:1::1"])`.
    pub fn route_add(&self, spec: &[&str]) -> Result<()> {
        let mut args = vec!["-6", "route", "add"];
        args.extend_from_slice(spec);
        self.ip(&args).map(drop)
    }

    /// Runs `f` on a fresh thread that has entered this namespace and waits
    /// for it. Sockets opened by `f` belong to the namespace. A panic in `f`
    /// is propagated to the caller.
    pub fn run<F, R>(&self, f: F) -> Result<R>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        let path = self.path();
        let name = self.name.clone();
        thread::scope(|s| {
            let h = s.spawn(move || {
                enter(&path, &name)?;
                Ok(f())
            });
            match h.join() {
                Ok(r) => r,
                Err(p) => std::panic::resume_unwind(p),
            }
        })
    }

    /// Runs the future made by `f` on a tokio current-thread runtime inside
    /// this namespace and waits for it. Tasks, threads (spawn_blocking) and
    /// sockets created from it stay in the namespace.
    pub fn run_tokio<F, Fut, R>(&self, f: F) -> Result<R>
    where
        F: FnOnce() -> Fut + Send,
        Fut: Future<Output = R>,
        R: Send,
    {
        let name = self.name.clone();
        self.run(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|source| NetnsError::Runtime { ns: name, source })?;
            Ok(rt.block_on(f()))
        })?
    }

    /// Starts a background thread inside this namespace running the future
    /// made by `f` on its own tokio current-thread runtime. Join the handle to
    /// get the result; make the future end (e.g. with a oneshot) before the
    /// namespace is dropped.
    pub fn spawn_tokio<F, Fut, R>(&self, f: F) -> thread::JoinHandle<Result<R>>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = R>,
        R: Send + 'static,
    {
        let path = self.path();
        let name = self.name.clone();
        thread::spawn(move || {
            enter(&path, &name)?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|source| NetnsError::Runtime { ns: name, source })?;
            Ok(rt.block_on(f()))
        })
    }

    /// PIDs of processes whose network namespace is this one.
    pub fn pids(&self) -> Vec<i32> {
        ip(&["netns", "pids", &self.name])
            .map(|s| {
                s.split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Enters the namespace at `path` on the current thread.
fn enter(path: &str, name: &str) -> Result<()> {
    let f = File::open(path).map_err(|source| NetnsError::Setns {
        ns: name.to_owned(),
        source,
    })?;
    setns(&f, CloneFlags::CLONE_NEWNET).map_err(|e| NetnsError::Setns {
        ns: name.to_owned(),
        source: io::Error::from(e),
    })
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Processes still inside are ours (the namespace is unique to us);
        // kill them by PID so the namespace can really go away.
        let me = std::process::id() as i32;
        for pid in self.pids() {
            if pid != me {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            tracing::warn!(ns = %self.name, error = %e, "cannot delete netns");
        }
    }
}

/// Creates a veth pair with one end `name_a` in `a` and the other `name_b` in
/// `b` (both down). Deleting either namespace destroys both ends.
pub fn veth_pair(a: &Netns, name_a: &str, b: &Netns, name_b: &str) -> Result<()> {
    a.ip(&[
        "link",
        "add",
        "name",
        name_a,
        "type",
        "veth",
        "peer",
        "name",
        name_b,
        "netns",
        b.name(),
    ])
    .map(drop)
}

/// A child process, killed with SIGKILL and reaped on drop (by PID).
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
    cmd: String,
}

impl ChildGuard {
    /// Spawns `cmd` and guards it.
    pub fn spawn(mut cmd: Command) -> Result<ChildGuard> {
        let line = cmdline(&cmd);
        let child = cmd.spawn().map_err(|source| NetnsError::Spawn {
            cmd: line.clone(),
            source,
        })?;
        Ok(ChildGuard { child, cmd: line })
    }

    /// Guards an already started child.
    pub fn from_child(child: Child, cmd: impl Into<String>) -> ChildGuard {
        ChildGuard {
            child,
            cmd: cmd.into(),
        }
    }

    /// The PID (`ip netns exec` execs, so this is the command's own PID).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The command line it was started with.
    pub fn cmdline(&self) -> &str {
        &self.cmd
    }

    /// The underlying child (to take stdout/stderr).
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Has it exited? Returns its status if so.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        self.child.try_wait().map_err(|source| NetnsError::Spawn {
            cmd: self.cmd.clone(),
            source,
        })
    }

    /// Is it still running?
    pub fn is_running(&mut self) -> bool {
        matches!(self.try_wait(), Ok(None))
    }

    /// Waits up to `timeout` for it to exit by itself.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(st) = self.try_wait()? {
                return Ok(st);
            }
            if start.elapsed() >= timeout {
                return Err(NetnsError::Timeout {
                    what: format!("exit of `{}`", self.cmd),
                    timeout,
                });
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends a signal (e.g. SIGTERM, SIGINT) to it.
    pub fn signal(&mut self, sig: Signal) -> Result<()> {
        if self.try_wait()?.is_some() {
            return Ok(());
        }
        kill(Pid::from_raw(self.pid() as i32), sig).map_err(|e| NetnsError::Spawn {
            cmd: self.cmd.clone(),
            source: io::Error::from(e),
        })
    }

    /// SIGTERM, wait up to `timeout`, then SIGKILL. Returns the exit status
    /// (a status from the signal if it had to be killed).
    pub fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus> {
        self.signal(Signal::SIGTERM)?;
        match self.wait_timeout(timeout) {
            Ok(st) => Ok(st),
            Err(_) => {
                let _ = self.child.kill();
                self.child.wait().map_err(|source| NetnsError::Spawn {
                    cmd: self.cmd.clone(),
                    source,
                })
            }
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn unique_ifnames_fit_and_differ() {
        let a = unique_ifname("m6nveth-long-prefix");
        let b = unique_ifname("m6nveth-long-prefix");
        assert_ne!(a, b);
        assert!(a.len() <= IFNAMSIZ_MAX, "{a}");
        assert!(a.starts_with("m6nvet"), "{a}");
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric()), "{a}");
    }

    #[test]
    fn handles_can_cross_threads() {
        fn send_sync<T: Send + Sync>() {}
        fn send<T: Send>() {}
        send_sync::<Netns>();
        send::<ChildGuard>();
        send_sync::<NetnsError>();
    }

    #[test]
    fn base36_digits() {
        assert_eq!(base36(0), "0");
        assert_eq!(base36(35), "z");
        assert_eq!(base36(36), "10");
        assert!(base36(4_194_304).len() <= 5);
    }

    #[test]
    fn wait_for_times_out_and_succeeds() {
        let mut n = 0;
        wait_for("counter", Duration::from_secs(1), || {
            n += 1;
            n >= 3
        })
        .unwrap();
        assert_eq!(n, 3);
        let e = wait_for("never", Duration::from_millis(30), || false).unwrap_err();
        assert!(matches!(e, NetnsError::Timeout { .. }), "{e}");
    }
}
