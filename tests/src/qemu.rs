//! QEMU guest harness: boot the mat6 guest image (`images/build.sh`) under
//! TCG inside a network namespace, drive it over QMP, run commands in it over
//! a serial control shell, and live-migrate it between two QEMU processes.
//!
//! RAII: a [`Qemu`] owns its process (killed by PID and reaped on drop), its
//! taps (created in the namespace before QEMU starts, deleted on drop) and a
//! private work directory (QMP socket, control socket, console log, the
//! per-VM initrd overlay).
//!
//! ```text
//! let img = GuestImage::locate()?;
//! let spec = VmSpec::new("vm", 128)
//!     .nic(NicSpec::new("nic0", "52:54:00:6d:00:01", tap_a, "brA"))
//!     .overlay(Overlay::new().vm_conf("ADDRS='eth0 2001:db8:a::10/64'"));
//! let mut src = Qemu::start(&img, &spec, Some(&host_a))?;
//! src.wait_ready(Duration::from_secs(60))?;
//! let mig_uri = src.migration_uri();
//! let mut dst = Qemu::start(&img, &spec.clone().with_attachment(0, tap_b, "brB").incoming(&mig_uri), Some(&host_b))?;
//! src.migrate(&mig_uri)?;
//! let stats = src.wait_migration(Duration::from_secs(60))?;
//! dst.wait_event("RESUME", Duration::from_secs(10))?;
//! ```
//!
//! The guest contract (what the image's `/init` does with the overlay, the
//! control shell on hvc0) is in `images/README.md`. Migration URIs are unix
//! sockets in the work directory (`unix:/path`), which work across network
//! namespaces because the file system is shared.

use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

use crate::netns::Netns;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Errors of the QEMU harness; each names the VM or file concerned.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// The guest image is missing (run `images/build.sh`).
    #[error("guest image not found: {0} (run images/build.sh)")]
    NoImage(PathBuf),
    /// An I/O error on a file, socket or process.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        source: io::Error,
    },
    /// QMP answered a command with an error.
    #[error("QMP {cmd} on {vm} failed: {error}")]
    Qmp {
        /// VM name.
        vm: String,
        /// The QMP command.
        cmd: String,
        /// QMP's error object.
        error: String,
    },
    /// Something did not happen in time.
    #[error("{vm}: timed out after {timeout:?} waiting for {what}")]
    Timeout {
        /// VM name.
        vm: String,
        /// What was awaited.
        what: String,
        /// How long we waited.
        timeout: Duration,
    },
    /// The QEMU process exited.
    #[error("{vm}: QEMU exited ({status}); console tail:\n{console}")]
    Exited {
        /// VM name.
        vm: String,
        /// Exit status.
        status: String,
        /// Last lines of the guest console.
        console: String,
    },
    /// Migration ended in a state other than `completed`.
    #[error("{vm}: migration {status}: {detail}")]
    Migration {
        /// VM name.
        vm: String,
        /// QEMU's migration status.
        status: String,
        /// Error description from QEMU, if any.
        detail: String,
    },
    /// A namespace operation (tap creation) failed.
    #[error(transparent)]
    Netns(#[from] crate::netns::NetnsError),
}

/// Result alias of the harness.
pub type Result<T, E = QemuError> = std::result::Result<T, E>;

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> QemuError {
    let what = what.into();
    move |source| QemuError::Io { what, source }
}

/// The guest kernel and base initramfs built by `images/build.sh`.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// The guest kernel (`images/out/vmlinuz`).
    pub kernel: PathBuf,
    /// The base initramfs (`images/out/initramfs.gz`).
    pub initrd: PathBuf,
    /// Whether the image contains `/usr/bin/guest-agent`.
    pub has_agent: bool,
}

impl GuestImage {
    /// The repository's `images/out` (or `$MAT6_IMAGE_DIR`).
    pub fn default_dir() -> PathBuf {
        match std::env::var_os("MAT6_IMAGE_DIR") {
            Some(d) => PathBuf::from(d),
            None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/out"),
        }
    }

    /// Finds the image in [`GuestImage::default_dir`].
    pub fn locate() -> Result<GuestImage> {
        Self::in_dir(&Self::default_dir())
    }

    /// Finds the image in `dir` (`vmlinuz`, `initramfs.gz`, `image.env`).
    pub fn in_dir(dir: &Path) -> Result<GuestImage> {
        let kernel = dir.join("vmlinuz");
        let initrd = dir.join("initramfs.gz");
        for p in [&kernel, &initrd] {
            if !p.is_file() {
                return Err(QemuError::NoImage(p.clone()));
            }
        }
        let has_agent = std::fs::read_to_string(dir.join("image.env"))
            .map(|s| s.lines().any(|l| l.trim() == "AGENT=yes"))
            .unwrap_or(false);
        Ok(GuestImage {
            kernel,
            initrd,
            has_agent,
        })
    }
}

/// Files added to the guest's root file system by appending a second cpio
/// archive to the initramfs (the kernel unpacks concatenated archives).
#[derive(Debug, Clone, Default)]
pub struct Overlay {
    files: Vec<(String, Vec<u8>, u32)>,
}

impl Overlay {
    /// An empty overlay.
    pub fn new() -> Overlay {
        Overlay::default()
    }

    /// Adds a file (absolute guest path, contents, permission bits).
    pub fn file(mut self, path: &str, contents: impl Into<Vec<u8>>, mode: u32) -> Overlay {
        self.files.push((
            path.trim_start_matches('/').to_owned(),
            contents.into(),
            mode,
        ));
        self
    }

    /// Adds `/etc/mat6/vm.conf`, the shell fragment `/init` sources.
    pub fn vm_conf(self, text: &str) -> Overlay {
        self.file("/etc/mat6/vm.conf", text, 0o644)
    }

    /// Serialises the overlay as a newc cpio archive (with parent dirs).
    pub fn to_cpio(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut ino = 0x6d36_0000u32;
        let mut dirs: Vec<String> = Vec::new();
        for (path, _, _) in &self.files {
            let mut acc = String::new();
            let parts: Vec<&str> = path.split('/').collect();
            for p in &parts[..parts.len().saturating_sub(1)] {
                if !acc.is_empty() {
                    acc.push('/');
                }
                acc.push_str(p);
                if !dirs.contains(&acc) {
                    dirs.push(acc.clone());
                }
            }
        }
        for d in &dirs {
            ino += 1;
            cpio_entry(&mut out, ino, d, 0o040_755, &[]);
        }
        for (path, data, mode) in &self.files {
            ino += 1;
            cpio_entry(&mut out, ino, path, 0o100_000 | (mode & 0o7777), data);
        }
        cpio_entry(&mut out, 0, "TRAILER!!!", 0, &[]);
        while out.len() % 512 != 0 {
            out.push(0);
        }
        out
    }
}

fn cpio_entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, data: &[u8]) {
    let namesize = name.len() + 1;
    let hdr = format!(
        "070701{ino:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{namesize:08x}{:08x}",
        0, 0, 1, 0, data.len(), 0, 0, 0, 0, 0
    );
    out.extend_from_slice(hdr.as_bytes());
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    while out.len() % 4 != 0 {
        out.push(0);
    }
    out.extend_from_slice(data);
    while out.len() % 4 != 0 {
        out.push(0);
    }
}

/// One virtio-net NIC of the guest, on a tap attached to a bridge.
#[derive(Debug, Clone)]
pub struct NicSpec {
    /// QEMU device id (used by `set_link`), e.g. `nic0`. Keep it identical on
    /// the source and destination of a migration.
    pub id: String,
    /// MAC address, `52:54:00:..`.
    pub mac: String,
    /// Tap name (max 15 bytes); created in the namespace by [`Qemu::start`].
    pub tap: String,
    /// Bridge (in the same namespace) the tap is attached to.
    pub bridge: String,
}

impl NicSpec {
    /// A NIC description.
    pub fn new(id: &str, mac: &str, tap: &str, bridge: &str) -> NicSpec {
        NicSpec {
            id: id.to_owned(),
            mac: mac.to_owned(),
            tap: tap.to_owned(),
            bridge: bridge.to_owned(),
        }
    }
}

/// What to start. The same spec (except taps/bridges and `incoming`) must be
/// used on both sides of a migration: QEMU requires identical devices.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Short name (logs, error messages, work-dir name).
    pub name: String,
    /// Guest memory in MiB (>= 128 with this kernel; see TESTBED.md).
    pub mem_mb: u32,
    /// NICs in PCI order: the guest sees them as eth0, eth1, ...
    pub nics: Vec<NicSpec>,
    /// Files appended to the initramfs.
    pub overlay: Overlay,
    /// Extra kernel command-line words.
    pub append: String,
    /// `-incoming URI` (destination side), e.g. `unix:/tmp/x/mig.sock`.
    pub incoming: Option<String>,
}

impl VmSpec {
    /// A VM with no NICs yet.
    pub fn new(name: &str, mem_mb: u32) -> VmSpec {
        VmSpec {
            name: name.to_owned(),
            mem_mb,
            nics: Vec::new(),
            overlay: Overlay::new(),
            append: String::new(),
            incoming: None,
        }
    }

    /// Adds a NIC.
    pub fn nic(mut self, nic: NicSpec) -> VmSpec {
        self.nics.push(nic);
        self
    }

    /// Sets the overlay.
    pub fn overlay(mut self, o: Overlay) -> VmSpec {
        self.overlay = o;
        self
    }

    /// Makes this the destination of a migration.
    pub fn incoming(mut self, uri: &str) -> VmSpec {
        self.incoming = Some(uri.to_owned());
        self
    }

    /// The same VM with NIC `i` moved to another tap/bridge (destination side).
    pub fn with_attachment(mut self, i: usize, tap: &str, bridge: &str) -> VmSpec {
        if let Some(n) = self.nics.get_mut(i) {
            n.tap = tap.to_owned();
            n.bridge = bridge.to_owned();
        }
        self
    }
}

/// Figures from `query-migrate` once the migration completed.
#[derive(Debug, Clone, PartialEq)]
pub struct MigrationStats {
    /// Total time as QEMU reports it (ms).
    pub total_ms: u64,
    /// Downtime as QEMU reports it (ms).
    pub downtime_ms: u64,
    /// Setup time (ms).
    pub setup_ms: u64,
    /// Bytes transferred.
    pub transferred: u64,
    /// Dirty-sync iterations.
    pub dirty_sync_count: u64,
    /// Wall clock measured by the harness from `migrate` to `completed` (ms).
    pub wall_ms: u64,
}

/// A tiny blocking QMP client (JSON lines over a unix socket). Events that
/// arrive while waiting for a reply are queued for [`Qmp::wait_event`].
#[derive(Debug)]
pub struct Qmp {
    vm: String,
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    events: VecDeque<Value>,
}

impl Qmp {
    /// Connects, reads the greeting, negotiates capabilities.
    pub fn connect(vm: &str, path: &Path, timeout: Duration) -> Result<Qmp> {
        let start = Instant::now();
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if start.elapsed() < timeout => {
                    let _ = e;
                    thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(io_err(format!("connect QMP {}", path.display()))(e)),
            }
        };
        let reader = BufReader::new(stream.try_clone().map_err(io_err("clone QMP socket"))?);
        let mut q = Qmp {
            vm: vm.to_owned(),
            writer: stream,
            reader,
            events: VecDeque::new(),
        };
        let greeting = q.read_msg(Duration::from_secs(10))?;
        if greeting.get("QMP").is_none() {
            return Err(QemuError::Qmp {
                vm: vm.to_owned(),
                cmd: "greeting".into(),
                error: greeting.to_string(),
            });
        }
        q.execute("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn read_msg(&mut self, timeout: Duration) -> Result<Value> {
        self.reader
            .get_ref()
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
            .map_err(io_err("QMP timeout"))?;
        let mut line = String::new();
        loop {
            line.clear();
            match self.reader.read_line(&mut line) {
                Ok(0) => {
                    return Err(QemuError::Io {
                        what: format!("QMP of {} closed", self.vm),
                        source: io::ErrorKind::UnexpectedEof.into(),
                    })
                }
                Ok(_) => {
                    if line.trim().is_empty() {
                        continue;
                    }
                    return serde_json::from_str(&line).map_err(|e| QemuError::Qmp {
                        vm: self.vm.clone(),
                        cmd: "read".into(),
                        error: format!("bad JSON {line:?}: {e}"),
                    });
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(QemuError::Timeout {
                        vm: self.vm.clone(),
                        what: "QMP message".into(),
                        timeout,
                    })
                }
                Err(e) => return Err(io_err(format!("read QMP of {}", self.vm))(e)),
            }
        }
    }

    /// Runs a command and returns its `return` value.
    pub fn execute(&mut self, cmd: &str, args: Value) -> Result<Value> {
        let msg = if args.as_object().is_some_and(|o| o.is_empty()) {
            json!({ "execute": cmd })
        } else {
            json!({ "execute": cmd, "arguments": args })
        };
        let mut text = msg.to_string();
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .map_err(io_err(format!("write QMP {cmd}")))?;
        loop {
            let m = self.read_msg(Duration::from_secs(30))?;
            if m.get("event").is_some() {
                self.events.push_back(m);
                continue;
            }
            if let Some(r) = m.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = m.get("error") {
                return Err(QemuError::Qmp {
                    vm: self.vm.clone(),
                    cmd: cmd.to_owned(),
                    error: e.to_string(),
                });
            }
        }
    }

    /// Waits for an event by name (e.g. `RESUME`, `STOP`, `MIGRATION`);
    /// events queued earlier count. Returns the whole event object.
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(pos) = self
                .events
                .iter()
                .position(|e| e.get("event").and_then(Value::as_str) == Some(name))
            {
                // Drop this one and everything before it.
                let ev = self.events.remove(pos).unwrap_or(Value::Null);
                self.events.drain(..pos);
                return Ok(ev);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(QemuError::Timeout {
                    vm: self.vm.clone(),
                    what: format!("QMP event {name}"),
                    timeout,
                });
            }
            match self.read_msg(left) {
                Ok(m) => {
                    if m.get("event").is_some() {
                        self.events.push_back(m);
                    }
                }
                Err(QemuError::Timeout { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Events received so far and not yet consumed.
    pub fn pending_events(&self) -> impl Iterator<Item = &Value> {
        self.events.iter()
    }
}

/// The serial control shell (hvc0 of the guest image).
#[derive(Debug)]
struct Control {
    stream: UnixStream,
    buf: Vec<u8>,
}

/// A running QEMU guest. Killed (by PID) and its taps removed on drop.
#[derive(Debug)]
pub struct Qemu {
    name: String,
    child: Child,
    qmp: Qmp,
    dir: PathBuf,
    ctl_path: PathBuf,
    console_path: PathBuf,
    control: Option<Control>,
    ctl_seq: u64,
    taps: Vec<String>,
    netns: Option<String>,
    spec: VmSpec,
    image: GuestImage,
}

/// A fresh private work directory under `$TMPDIR` (removed by [`Qemu`]'s drop).
fn work_dir(name: &str) -> Result<PathBuf> {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("m6e-{name}-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(io_err(format!("mkdir {}", dir.display())))?;
    Ok(dir)
}

impl Qemu {
    /// Starts QEMU (`-machine q35,accel=tcg`) in `netns` (or the caller's
    /// namespace). Creates each NIC's tap in that namespace and attaches it to
    /// its bridge before QEMU opens it. With `spec.incoming` set, the VM waits
    /// for a migration; otherwise it boots the image.
    pub fn start(img: &GuestImage, spec: &VmSpec, netns: Option<&Netns>) -> Result<Qemu> {
        let dir = work_dir(&spec.name)?;
        let qmp_path = dir.join("qmp.sock");
        let ctl_path = dir.join("ctl.sock");
        let console_path = dir.join("console.log");
        // Per-VM initrd: base archive + overlay archive.
        let initrd = dir.join("initrd.img");
        let mut data =
            std::fs::read(&img.initrd).map_err(io_err(format!("read {}", img.initrd.display())))?;
        while data.len() % 4 != 0 {
            data.push(0);
        }
        data.extend_from_slice(&spec.overlay.to_cpio());
        std::fs::write(&initrd, &data).map_err(io_err(format!("write {}", initrd.display())))?;

        // Taps first, so that Drop removes them even if QEMU fails to start.
        let mut taps = Vec::new();
        for nic in &spec.nics {
            match netns {
                Some(ns) => {
                    ns.tap(&nic.tap)?;
                    taps.push(nic.tap.clone());
                    ns.bridge_attach(&nic.tap, &nic.bridge)?;
                }
                None => {
                    let mut c = Command::new("ip");
                    c.args(["tuntap", "add", "dev", &nic.tap, "mode", "tap"]);
                    crate::netns::run_ok(c)?;
                    taps.push(nic.tap.clone());
                    let mut c = Command::new("ip");
                    c.args(["link", "set", "dev", &nic.tap, "master", &nic.bridge, "up"]);
                    crate::netns::run_ok(c)?;
                }
            }
        }

        let mut args: Vec<String> = vec![
            "-machine".into(),
            "q35,accel=tcg".into(),
            "-m".into(),
            spec.mem_mb.to_string(),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-no-reboot".into(),
            "-kernel".into(),
            img.kernel.display().to_string(),
            "-initrd".into(),
            initrd.display().to_string(),
            "-append".into(),
            format!("console=ttyS0 panic=-1 quiet {}", spec.append),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", qmp_path.display()),
            "-chardev".into(),
            format!("file,id=con,path={}", console_path.display()),
            "-serial".into(),
            "chardev:con".into(),
            "-chardev".into(),
            format!(
                "socket,id=ctl,path={},server=on,wait=off",
                ctl_path.display()
            ),
            "-device".into(),
            "virtio-serial-pci,id=vser0,bus=pcie.0,addr=0x10".into(),
            "-device".into(),
            "virtconsole,chardev=ctl,id=ctl0".into(),
        ];
        for (i, nic) in spec.nics.iter().enumerate() {
            args.push("-netdev".into());
            args.push(format!(
                "tap,id=net{i},ifname={},script=no,downscript=no",
                nic.tap
            ));
            args.push("-device".into());
            args.push(format!(
                "virtio-net-pci,netdev=net{i},id={},mac={},romfile=,bus=pcie.0,addr={:#x}",
                nic.id,
                nic.mac,
                0x3 + i
            ));
        }
        if let Some(uri) = &spec.incoming {
            args.push("-incoming".into());
            args.push(uri.clone());
        }
        let mut cmd = match netns {
            Some(ns) => ns.command("qemu-system-x86_64"),
            None => Command::new("qemu-system-x86_64"),
        };
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(dir.join("qemu.stderr"))
                    .map(Stdio::from)
                    .unwrap_or_else(|_| Stdio::null()),
            );
        let spawned = cmd.spawn();
        let child = match spawned {
            Ok(c) => c,
            Err(e) => {
                cleanup_taps(netns.map(Netns::name), &taps);
                let _ = std::fs::remove_dir_all(&dir);
                return Err(io_err("start qemu-system-x86_64")(e));
            }
        };
        // From here, construct the guard before anything can fail.
        let mut child = Some(child);
        let qmp = match Qmp::connect(&spec.name, &qmp_path, Duration::from_secs(20)) {
            Ok(q) => q,
            Err(e) => {
                if let Some(mut c) = child.take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                let stderr = std::fs::read_to_string(dir.join("qemu.stderr")).unwrap_or_default();
                cleanup_taps(netns.map(Netns::name), &taps);
                let _ = std::fs::remove_dir_all(&dir);
                return Err(QemuError::Exited {
                    vm: spec.name.clone(),
                    status: format!("no QMP: {e}"),
                    console: stderr,
                });
            }
        };
        let Some(child) = child else {
            return Err(QemuError::Io {
                what: "qemu child".into(),
                source: io::ErrorKind::NotFound.into(),
            });
        };
        Ok(Qemu {
            name: spec.name.clone(),
            child,
            qmp,
            dir,
            ctl_path,
            console_path,
            control: None,
            ctl_seq: 0,
            taps,
            netns: netns.map(|n| n.name().to_owned()),
            spec: spec.clone(),
            image: img.clone(),
        })
    }

    /// VM name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The QEMU process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The image it was started from.
    pub fn image(&self) -> &GuestImage {
        &self.image
    }

    /// The spec it was started with.
    pub fn spec(&self) -> &VmSpec {
        &self.spec
    }

    /// The private work directory (sockets, console log).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of the QMP socket (for host-prep or another client; QMP accepts
    /// one client at a time: [`Qemu::release_qmp`] first).
    pub fn qmp_path(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }

    /// A migration URI in this VM's work dir (`unix:.../mig-N.sock`), to
    /// pass to the destination's [`VmSpec::incoming`] before calling
    /// [`Qemu::migrate`] on this (source) VM.
    pub fn migration_uri(&self) -> String {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        format!("unix:{}", self.dir.join(format!("mig-{n}.sock")).display())
    }

    /// The QMP client.
    pub fn qmp(&mut self) -> &mut Qmp {
        &mut self.qmp
    }

    /// Closes our QMP connection and reconnects later with
    /// [`Qemu::reconnect_qmp`] (QMP serves one client at a time; host-prep
    /// needs it during `host-prep migrate`).
    pub fn release_qmp(&mut self) -> Result<()> {
        let _ = self.qmp.writer.shutdown(std::net::Shutdown::Both);
        Ok(())
    }

    /// Reconnects QMP after [`Qemu::release_qmp`].
    pub fn reconnect_qmp(&mut self) -> Result<()> {
        self.qmp = Qmp::connect(&self.name, &self.qmp_path(), Duration::from_secs(10))?;
        Ok(())
    }

    /// The last `lines` lines of the guest console (ttyS0).
    pub fn console_tail(&self, lines: usize) -> String {
        let s = std::fs::read_to_string(&self.console_path).unwrap_or_default();
        let v: Vec<&str> = s.lines().collect();
        v[v.len().saturating_sub(lines)..].join("\n")
    }

    fn check_alive(&mut self) -> Result<()> {
        if let Ok(Some(st)) = self.child.try_wait() {
            return Err(QemuError::Exited {
                vm: self.name.clone(),
                status: st.to_string(),
                console: self.console_tail(30),
            });
        }
        Ok(())
    }

    fn control(&mut self) -> Result<&mut Control> {
        if self.control.is_none() {
            let s = UnixStream::connect(&self.ctl_path)
                .map_err(io_err(format!("connect {}", self.ctl_path.display())))?;
            self.control = Some(Control {
                stream: s,
                buf: Vec::new(),
            });
        }
        match self.control.as_mut() {
            Some(c) => Ok(c),
            None => Err(QemuError::Io {
                what: "control shell".into(),
                source: io::ErrorKind::NotConnected.into(),
            }),
        }
    }

    /// Runs a shell command line in the guest (control shell on hvc0) and
    /// returns `(exit status, output)`. Do not start background jobs that
    /// write to stdout: redirect them to a file.
    pub fn sh(&mut self, cmdline: &str, timeout: Duration) -> Result<(i32, String)> {
        self.check_alive()?;
        let name = self.name.clone();
        self.ctl_seq += 1;
        let marker = format!("__M6_{}_{}__", std::process::id(), self.ctl_seq);
        let ctl = self.control()?;
        // A leading newline ends any partial line left by lost bytes; the
        // marker has no quotes, so garbage cannot leave the shell inside a
        // string.
        let text = format!("\n{cmdline}\necho {marker} $?\n");
        ctl.stream
            .write_all(text.as_bytes())
            .map_err(io_err(format!("write control shell of {name}")))?;
        let deadline = Instant::now() + timeout;
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(pos) = find(&ctl.buf, marker.as_bytes()) {
                let rest = &ctl.buf[pos + marker.len()..];
                if let Some(nl) = rest.iter().position(|b| *b == b'\n') {
                    let rc = String::from_utf8_lossy(&rest[..nl])
                        .trim()
                        .parse()
                        .unwrap_or(-1);
                    let out = String::from_utf8_lossy(&ctl.buf[..pos]).replace('\r', "");
                    ctl.buf.drain(..pos + marker.len() + nl + 1);
                    return Ok((rc, out));
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(QemuError::Timeout {
                    vm: name,
                    what: format!(
                        "guest command {cmdline:?} (received so far: {:?})",
                        String::from_utf8_lossy(&ctl.buf)
                    ),
                    timeout,
                });
            }
            ctl.stream
                .set_read_timeout(Some(left.min(Duration::from_millis(50))))
                .map_err(io_err("control timeout"))?;
            match ctl.stream.read(&mut chunk) {
                Ok(0) => {
                    return Err(QemuError::Io {
                        what: format!("control shell of {name} closed"),
                        source: io::ErrorKind::UnexpectedEof.into(),
                    })
                }
                Ok(n) => ctl.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    // The idle TCG guest sometimes leaves console I/O pending
                    // until its next interrupt: an empty line (a no-op for
                    // the shell) wakes it.
                    let _ = ctl.stream.write_all(b"\n");
                }
                Err(e) => return Err(io_err(format!("read control shell of {name}"))(e)),
            }
        }
    }

    /// Like [`Qemu::sh`] but a non-zero status is an error.
    pub fn sh_ok(&mut self, cmdline: &str, timeout: Duration) -> Result<String> {
        let (rc, out) = self.sh(cmdline, timeout)?;
        if rc != 0 {
            return Err(QemuError::Io {
                what: format!(
                    "{}: guest command {cmdline:?} exited {rc}: {out}",
                    self.name
                ),
                source: io::Error::other("non-zero exit"),
            });
        }
        Ok(out)
    }

    /// Waits until the guest's control shell answers (the image has booted
    /// and run its `/init`).
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<Duration> {
        self.wait_control(timeout, true)
    }

    /// Waits until the control shell answers, without looking at the
    /// console (use on a migration's destination: its console log starts
    /// empty).
    pub fn wait_control_after_migration(&mut self, timeout: Duration) -> Result<Duration> {
        self.wait_control(timeout, false)
    }

    fn wait_control(&mut self, timeout: Duration, need_console: bool) -> Result<Duration> {
        let start = Instant::now();
        loop {
            self.check_alive()?;
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(QemuError::Timeout {
                    vm: self.name.clone(),
                    what: format!("guest boot; console tail:\n{}", self.console_tail(20)),
                    timeout,
                });
            }
            if !need_console || self.console_tail(200).contains("MAT6-READY") {
                // Bytes sent before the guest's shell opened hvc0 are lost:
                // retry on the same connection (unique markers) until one
                // answers, then forget whatever came before.
                match self.sh("true", left.min(Duration::from_secs(2))) {
                    Ok((0, _)) => {
                        thread::sleep(Duration::from_millis(300));
                        if let Some(c) = self.control.as_mut() {
                            let _ = c.stream.set_read_timeout(Some(Duration::from_millis(50)));
                            let mut junk = [0u8; 4096];
                            while matches!(c.stream.read(&mut junk), Ok(n) if n > 0) {}
                            c.buf.clear();
                        }
                        return Ok(start.elapsed());
                    }
                    Ok(_) | Err(QemuError::Timeout { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Drops the control connection (e.g. on the source after migration).
    pub fn disconnect_control(&mut self) {
        self.control = None;
    }

    /// Starts an outgoing migration to `uri` (QMP `migrate`).
    pub fn migrate(&mut self, uri: &str) -> Result<()> {
        self.qmp.execute("migrate", json!({ "uri": uri }))?;
        Ok(())
    }

    /// Sets migration parameters (QMP `migrate-set-parameters`), e.g.
    /// `json!({"downtime-limit": 300})`.
    pub fn set_migration_parameters(&mut self, params: Value) -> Result<()> {
        self.qmp.execute("migrate-set-parameters", params)?;
        Ok(())
    }

    /// QMP `query-migrate`.
    pub fn query_migrate(&mut self) -> Result<Value> {
        self.qmp.execute("query-migrate", json!({}))
    }

    /// Polls `query-migrate` until `completed` (or `failed`/`cancelled`).
    pub fn wait_migration(&mut self, timeout: Duration) -> Result<MigrationStats> {
        let start = Instant::now();
        loop {
            self.check_alive()?;
            let q = self.query_migrate()?;
            let status = q
                .get("status")
                .and_then(Value::as_str)
                .unwrap_or("none")
                .to_owned();
            match status.as_str() {
                "completed" => {
                    let u = |k: &str| q.get(k).and_then(Value::as_u64).unwrap_or(0);
                    let ram = q.get("ram").cloned().unwrap_or(Value::Null);
                    let r = |k: &str| ram.get(k).and_then(Value::as_u64).unwrap_or(0);
                    return Ok(MigrationStats {
                        total_ms: u("total-time"),
                        downtime_ms: u("downtime"),
                        setup_ms: u("setup-time"),
                        transferred: r("transferred"),
                        dirty_sync_count: r("dirty-sync-count"),
                        wall_ms: u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX),
                    });
                }
                "failed" | "cancelled" => {
                    return Err(QemuError::Migration {
                        vm: self.name.clone(),
                        status,
                        detail: q
                            .get("error-desc")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_owned(),
                    })
                }
                _ => {}
            }
            if start.elapsed() > timeout {
                return Err(QemuError::Timeout {
                    vm: self.name.clone(),
                    what: format!("migration to complete (last status {status})"),
                    timeout,
                });
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits for a QMP event (e.g. `RESUME` on the destination).
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<Value> {
        self.qmp.wait_event(name, timeout)
    }

    /// QMP `set_link` on a NIC by device id: the guest sees carrier on/off.
    pub fn set_link(&mut self, nic_id: &str, up: bool) -> Result<()> {
        self.qmp
            .execute("set_link", json!({ "name": nic_id, "up": up }))?;
        Ok(())
    }

    /// QMP `query-status` → `running`, `paused`, `inmigrate`, `postmigrate`...
    pub fn status(&mut self) -> Result<String> {
        let v = self.qmp.execute("query-status", json!({}))?;
        Ok(v.get("status")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_owned())
    }

    /// Asks QEMU to quit and waits (bounded) for the process; kills it after.
    pub fn quit(mut self) -> Result<()> {
        let _ = self.qmp.execute("quit", json!({}));
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(()) // Drop kills it.
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

fn cleanup_taps(netns: Option<&str>, taps: &[String]) {
    for t in taps {
        let mut c = Command::new("ip");
        if let Some(ns) = netns {
            c.args(["-n", ns]);
        }
        c.args(["link", "del", "dev", t]);
        let _ = c.stdout(Stdio::null()).stderr(Stdio::null()).status();
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            if let Ok(pid) = i32::try_from(self.child.id()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        let _ = self.child.wait();
        cleanup_taps(self.netns.as_deref(), &self.taps);
        if std::env::var_os("MAT6_KEEP_VM_DIR").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn cpio_overlay_is_newc_with_dirs_and_trailer() {
        let o = Overlay::new().vm_conf("A=1\n");
        let c = o.to_cpio();
        assert_eq!(c.len() % 512, 0);
        assert!(c.starts_with(b"070701"));
        let s = String::from_utf8_lossy(&c);
        assert!(s.contains("etc\0"));
        assert!(s.contains("etc/mat6\0"));
        assert!(s.contains("etc/mat6/vm.conf\0"));
        assert!(s.contains("A=1\n"));
        assert!(s.contains("TRAILER!!!\0"));
        // Every header is 110 bytes and 4-aligned.
        let first_name_len = usize::from_str_radix(&s[94..102], 16).unwrap();
        assert_eq!(first_name_len, 4); // "etc\0"
    }

    #[test]
    fn spec_builders_keep_devices_and_swap_attachment() {
        let s = VmSpec::new("vm", 128)
            .nic(NicSpec::new("nic0", "52:54:00:00:00:01", "t0", "br0"))
            .nic(NicSpec::new("nic1", "52:54:00:00:00:02", "t1", "br1"))
            .with_attachment(0, "t9", "br9")
            .incoming("unix:/x");
        assert_eq!(s.nics[0].tap, "t9");
        assert_eq!(s.nics[0].id, "nic0");
        assert_eq!(s.nics[1].bridge, "br1");
        assert_eq!(s.incoming.as_deref(), Some("unix:/x"));
    }

    #[test]
    fn find_marker() {
        assert_eq!(find(b"abc__M__ 0\n", b"__M__"), Some(3));
        assert_eq!(find(b"ab", b"abc"), None);
    }
}
