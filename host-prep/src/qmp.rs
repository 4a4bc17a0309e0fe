//! QMP client on top of the `qapi` crate: commands go through its service,
//! events are read by a task and handed over a channel stamped with the local
//! time they arrived (the `RESUME` → `set_link` switch is timed from it).
//!
//! Commands whose replies changed shape between QEMU releases (`query-migrate`,
//! `query-status`) are declared here with only the fields host-prep reads, all
//! optional, so that QEMU 7.2 (Debian 12) and newer both work.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use qapi::futures::{QapiService, QmpStreamTokio};
use serde::{Deserialize, Serialize};
use tokio::io::WriteHalf;
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Errors talking QMP.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// Could not connect to the QMP socket.
    #[error("cannot connect to QMP socket {path}: {source}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// I/O error.
        source: io::Error,
    },
    /// A command failed (QEMU answered with an error, or the stream broke).
    #[error("QMP {command} failed: {message}")]
    Command {
        /// Command name.
        command: &'static str,
        /// QEMU's error description (or the I/O error).
        message: String,
    },
    /// The QMP connection closed (QEMU exited?).
    #[error("QMP connection to {0} closed")]
    Closed(PathBuf),
    /// Waited too long for an event or a state.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: &'static str,
        /// How long.
        after: Duration,
    },
}

/// The QMP events host-prep cares about, stamped with their arrival time.
#[derive(Debug, Clone, PartialEq)]
pub enum QmpEvent {
    /// The VM resumed (destination: migration done).
    Resume,
    /// The VM stopped (source: stop-and-copy starts).
    Stop,
    /// Migration status change (needs the `events` capability).
    Migration(String),
    /// QEMU is shutting down.
    Shutdown,
    /// Any other event, by name.
    Other(String),
}

/// An event and when it arrived here.
#[derive(Debug, Clone)]
pub struct Stamped {
    /// The event.
    pub event: QmpEvent,
    /// Local arrival time.
    pub at: Instant,
    /// When QEMU emitted it (its wall-clock timestamp), if readable.
    pub qemu_time: Option<SystemTime>,
}

/// QEMU's event timestamp as a `SystemTime` (the type keeps its fields
/// private; its serde form is `{"seconds": .., "microseconds": ..}`).
fn qemu_time(ev: &qapi::qmp::Event) -> Option<SystemTime> {
    let v = serde_json::to_value(ev.timestamp()).ok()?;
    let s = v.get("seconds")?.as_u64()?;
    let us = v.get("microseconds")?.as_u64()?;
    UNIX_EPOCH.checked_add(Duration::from_secs(s) + Duration::from_micros(us))
}

type Writer = QmpStreamTokio<WriteHalf<UnixStream>>;

/// How long a connected QMP socket may take to greet.
const GREETING_TIMEOUT: Duration = Duration::from_secs(5);

/// A negotiated QMP connection.
pub struct Qmp {
    path: PathBuf,
    service: QapiService<Writer>,
    events: mpsc::UnboundedReceiver<Stamped>,
    reader: JoinHandle<()>,
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp").field("path", &self.path).finish()
    }
}

impl Drop for Qmp {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// `query-migrate` reply: the fields host-prep reads.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
pub struct MigrateInfo {
    /// `setup`, `active`, `completed`, `failed`, ...
    #[serde(default)]
    pub status: Option<String>,
    /// Total time so far / in all (ms).
    #[serde(default, rename = "total-time")]
    pub total_time: Option<i64>,
    /// Downtime (ms), once completed.
    #[serde(default)]
    pub downtime: Option<i64>,
    /// Expected downtime (ms), while active.
    #[serde(default, rename = "expected-downtime")]
    pub expected_downtime: Option<i64>,
    /// Setup time (ms).
    #[serde(default, rename = "setup-time")]
    pub setup_time: Option<i64>,
    /// RAM statistics.
    #[serde(default)]
    pub ram: Option<RamStats>,
    /// Error description when failed.
    #[serde(default, rename = "error-desc")]
    pub error_desc: Option<String>,
}

/// RAM part of `query-migrate`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
pub struct RamStats {
    /// Bytes transferred.
    #[serde(default)]
    pub transferred: i64,
    /// Bytes remaining.
    #[serde(default)]
    pub remaining: i64,
    /// Total guest RAM bytes.
    #[serde(default)]
    pub total: i64,
    /// Dirty-bitmap sync rounds.
    #[serde(default, rename = "dirty-sync-count")]
    pub dirty_sync_count: i64,
}

#[derive(Debug, Serialize)]
struct QueryMigrate {}
impl qapi::Command for QueryMigrate {
    type Ok = MigrateInfo;
    const NAME: &'static str = "query-migrate";
    const ALLOW_OOB: bool = false;
}
impl qapi::qmp::QmpCommand for QueryMigrate {}

/// `query-status` reply.
#[derive(Debug, Clone, Deserialize)]
pub struct StatusInfo {
    /// Whether the VM runs.
    pub running: bool,
    /// Run state (`running`, `inmigrate`, `postmigrate`, `paused`, ...).
    pub status: String,
}

#[derive(Debug, Serialize)]
struct QueryStatus {}
impl qapi::Command for QueryStatus {
    type Ok = StatusInfo;
    const NAME: &'static str = "query-status";
    const ALLOW_OOB: bool = false;
}
impl qapi::qmp::QmpCommand for QueryStatus {}

#[derive(Debug, Serialize)]
struct SetLink {
    name: String,
    up: bool,
}
impl qapi::Command for SetLink {
    type Ok = qapi::Empty;
    const NAME: &'static str = "set_link";
    const ALLOW_OOB: bool = false;
}
impl qapi::qmp::QmpCommand for SetLink {}

#[derive(Debug, Serialize)]
struct Migrate {
    uri: String,
}
impl qapi::Command for Migrate {
    type Ok = qapi::Empty;
    const NAME: &'static str = "migrate";
    const ALLOW_OOB: bool = false;
}
impl qapi::qmp::QmpCommand for Migrate {}

#[derive(Debug, Default, Serialize)]
struct MigrateSetParameters {
    #[serde(rename = "downtime-limit", skip_serializing_if = "Option::is_none")]
    downtime_limit: Option<u64>,
    #[serde(rename = "max-bandwidth", skip_serializing_if = "Option::is_none")]
    max_bandwidth: Option<u64>,
    #[serde(rename = "announce-rounds", skip_serializing_if = "Option::is_none")]
    announce_rounds: Option<u64>,
}
impl qapi::Command for MigrateSetParameters {
    type Ok = qapi::Empty;
    const NAME: &'static str = "migrate-set-parameters";
    const ALLOW_OOB: bool = false;
}
impl qapi::qmp::QmpCommand for MigrateSetParameters {}

/// `announce-self` arguments (QEMU >= 4.0; `interfaces` >= 4.1): `rounds`
/// announcements, the first at once, the next `initial` ms later, each gap
/// `step` ms longer than the one before, at most `max` ms.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AnnounceParams {
    /// Delay before the second round, ms.
    pub initial: u64,
    /// Longest gap between rounds, ms.
    pub max: u64,
    /// Number of rounds.
    pub rounds: u64,
    /// Gap increase per round, ms.
    pub step: u64,
    /// Only these NICs (QEMU device ids); all when empty.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<String>,
}

impl qapi::Command for AnnounceParams {
    type Ok = qapi::Empty;
    const NAME: &'static str = "announce-self";
    const ALLOW_OOB: bool = false;
}
impl qapi::qmp::QmpCommand for AnnounceParams {}

#[derive(Debug, Serialize)]
struct MigrateCancel {}
impl qapi::Command for MigrateCancel {
    type Ok = qapi::Empty;
    const NAME: &'static str = "migrate_cancel";
    const ALLOW_OOB: bool = false;
}
impl qapi::qmp::QmpCommand for MigrateCancel {}

#[derive(Debug, Serialize)]
struct Quit {}
impl qapi::Command for Quit {
    type Ok = qapi::Empty;
    const NAME: &'static str = "quit";
    const ALLOW_OOB: bool = false;
}
impl qapi::qmp::QmpCommand for Quit {}

#[derive(Debug, Serialize)]
struct Cont {}
impl qapi::Command for Cont {
    type Ok = qapi::Empty;
    const NAME: &'static str = "cont";
    const ALLOW_OOB: bool = false;
}
impl qapi::qmp::QmpCommand for Cont {}

fn classify(ev: &qapi::qmp::Event) -> QmpEvent {
    use qapi::qmp::Event;
    match ev {
        Event::RESUME { .. } => QmpEvent::Resume,
        Event::STOP { .. } => QmpEvent::Stop,
        Event::SHUTDOWN { .. } => QmpEvent::Shutdown,
        Event::MIGRATION { data, .. } => QmpEvent::Migration(
            serde_json::to_value(data.status)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
        ),
        other => QmpEvent::Other(
            serde_json::to_value(other)
                .ok()
                .and_then(|v| v.get("event").and_then(|e| e.as_str().map(str::to_string)))
                .unwrap_or_default(),
        ),
    }
}

impl Qmp {
    /// Connect to a QMP unix socket and negotiate capabilities.
    pub async fn connect(path: &Path) -> Result<Self, QmpError> {
        let connect_err = |source| QmpError::Connect {
            path: path.to_path_buf(),
            source,
        };
        // QEMU serves one QMP client at a time: while another is connected,
        // the greeting never comes. Do not wait for it forever.
        let handshake = async {
            let negotiation = QmpStreamTokio::open_uds(path).await?;
            negotiation.negotiate().await
        };
        let stream = match tokio::time::timeout(GREETING_TIMEOUT, handshake).await {
            Ok(r) => r.map_err(connect_err)?,
            Err(_) => {
                return Err(connect_err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "no QMP greeting within {GREETING_TIMEOUT:?} (is another QMP client connected?)"
                    ),
                )))
            }
        };
        let (service, mut events) = stream.into_parts();
        let (tx, rx) = mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            while let Some(item) = events.next().await {
                match item {
                    Ok(ev) => {
                        let stamped = Stamped {
                            event: classify(&ev),
                            at: Instant::now(),
                            qemu_time: qemu_time(&ev),
                        };
                        tracing::debug!(event = ?stamped.event, "QMP event");
                        if tx.send(stamped).is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "QMP stream error");
                        break;
                    }
                }
            }
        });
        Ok(Self {
            path: path.to_path_buf(),
            service,
            events: rx,
            reader,
        })
    }

    /// Connect, retrying until `timeout` (the socket appears when QEMU starts).
    pub async fn connect_retry(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let deadline = Instant::now() + timeout;
        loop {
            match Self::connect(path).await {
                Ok(q) => return Ok(q),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    async fn run<C>(&self, command: C) -> Result<C::Ok, QmpError>
    where
        C: qapi::qmp::QmpCommand,
    {
        let name = C::NAME;
        self.service
            .execute(command)
            .await
            .map_err(|e| QmpError::Command {
                command: name,
                message: e.to_string(),
            })
    }

    /// `set_link name up|down`.
    pub async fn set_link(&self, name: &str, up: bool) -> Result<(), QmpError> {
        self.run(SetLink {
            name: name.to_string(),
            up,
        })
        .await
        .map(drop)
    }

    /// Start an outgoing migration to `uri`.
    pub async fn migrate(&self, uri: &str) -> Result<(), QmpError> {
        self.run(Migrate {
            uri: uri.to_string(),
        })
        .await
        .map(drop)
    }

    /// `migrate-set-parameters` with the given downtime limit (ms) and
    /// bandwidth cap (bytes/s); `None` leaves a parameter as it is.
    pub async fn set_migration_parameters(
        &self,
        downtime_limit_ms: Option<u64>,
        max_bandwidth: Option<u64>,
    ) -> Result<(), QmpError> {
        if downtime_limit_ms.is_none() && max_bandwidth.is_none() {
            return Ok(());
        }
        self.run(MigrateSetParameters {
            downtime_limit: downtime_limit_ms,
            max_bandwidth,
            ..Default::default()
        })
        .await
        .map(drop)
    }

    /// `migrate-set-parameters announce-rounds`: how many self-announce
    /// rounds (QEMU's RARPs and, for virtio-net, guest announcements) the
    /// VM makes after an incoming migration. Set on the destination before
    /// the migration completes.
    pub async fn set_announce_rounds(&self, rounds: u64) -> Result<(), QmpError> {
        self.run(MigrateSetParameters {
            announce_rounds: Some(rounds),
            ..Default::default()
        })
        .await
        .map(drop)
    }

    /// `announce-self`: QEMU sends RARPs for the NICs and asks virtio-net
    /// guests (VIRTIO_NET_F_GUEST_ANNOUNCE) to announce themselves, which
    /// makes a Linux guest emit an RTM_NEWLINK with
    /// `IFLA_EVENT_NOTIFY_PEERS` and the current carrier at once.
    pub async fn announce_self(&self, params: &AnnounceParams) -> Result<(), QmpError> {
        self.run(params.clone()).await.map(drop)
    }

    /// `migrate_cancel`: the VM keeps running here.
    pub async fn migrate_cancel(&self) -> Result<(), QmpError> {
        self.run(MigrateCancel {}).await.map(drop)
    }

    /// `query-migrate`.
    pub async fn query_migrate(&self) -> Result<MigrateInfo, QmpError> {
        self.run(QueryMigrate {}).await
    }

    /// `query-status`.
    pub async fn query_status(&self) -> Result<StatusInfo, QmpError> {
        self.run(QueryStatus {}).await
    }

    /// `cont`.
    pub async fn cont(&self) -> Result<(), QmpError> {
        self.run(Cont {}).await.map(drop)
    }

    /// `quit` (the connection closes right after; a closed stream counts as done).
    pub async fn quit(&self) -> Result<(), QmpError> {
        match self.run(Quit {}).await {
            Ok(_) => Ok(()),
            Err(QmpError::Command { message, .. })
                if message.contains("EOF") || message.contains("disconnected") =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Next event, or `None` when the connection closed.
    pub async fn next_event(&mut self) -> Option<Stamped> {
        self.events.recv().await
    }

    /// Wait for an event matching `want`, until `timeout`.
    pub async fn wait_event(
        &mut self,
        what: &'static str,
        timeout: Duration,
        want: impl Fn(&QmpEvent) -> bool,
    ) -> Result<Stamped, QmpError> {
        let fut = async {
            while let Some(ev) = self.events.recv().await {
                if want(&ev.event) {
                    return Ok(ev);
                }
            }
            Err(QmpError::Closed(self.path.clone()))
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| QmpError::Timeout {
                what,
                after: timeout,
            })?
    }

    /// Events received so far that nobody consumed (non-blocking).
    pub fn drain_events(&mut self) -> Vec<Stamped> {
        std::iter::from_fn(|| self.events.try_recv().ok()).collect()
    }
}

/// How host-prep turns a NIC's link (carrier) on or off: QMP `set_link`, or
/// a configured command (libvirt owns QMP: `virsh domif-setlink`).
#[derive(Debug)]
pub enum LinkControl<'a> {
    /// Through this QMP connection.
    Qmp(&'a Qmp),
    /// Through a command template (`{vm}`, `{nic}`, `{state}`).
    Command {
        /// VM name.
        vm: &'a str,
        /// The argv template.
        argv: &'a [String],
    },
}

impl LinkControl<'_> {
    /// Set `nic`'s link up or down.
    pub async fn set_link(&self, nic: &str, up: bool) -> Result<(), QmpError> {
        match self {
            LinkControl::Qmp(q) => q.set_link(nic, up).await,
            LinkControl::Command { vm, argv } => {
                let mut vars = std::collections::BTreeMap::new();
                vars.insert("vm".to_string(), vm.to_string());
                vars.insert("nic".to_string(), nic.to_string());
                vars.insert(
                    "state".to_string(),
                    if up { "up" } else { "down" }.to_string(),
                );
                let fail = |message: String| QmpError::Command {
                    command: "set_link (link_command)",
                    message,
                };
                let argv = crate::template::expand(argv, &vars).map_err(|e| fail(e.to_string()))?;
                let (prog, args) = argv
                    .split_first()
                    .ok_or_else(|| fail("empty command".into()))?;
                let out = tokio::process::Command::new(prog)
                    .args(args)
                    .stdin(std::process::Stdio::null())
                    .output()
                    .await
                    .map_err(|e| fail(format!("{prog}: {e}")))?;
                if out.status.success() {
                    Ok(())
                } else {
                    Err(fail(format!(
                        "{} exited with {}: {}",
                        argv.join(" "),
                        out.status,
                        String::from_utf8_lossy(&out.stderr).trim()
                    )))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[tokio::test]
    async fn link_command_expands_and_reports_failure() {
        let dir = std::env::temp_dir().join(format!("m6h-link-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("out");
        let argv: Vec<String> = vec![
            "sh".into(),
            "-c".into(),
            format!("echo \"$0 $1 $2\" > {}", out.display()),
            "{vm}".into(),
            "{nic}".into(),
            "{state}".into(),
        ];
        let lc = LinkControl::Command {
            vm: "web1",
            argv: &argv,
        };
        lc.set_link("52:54:00:00:00:02", false).await.unwrap();
        assert_eq!(
            std::fs::read_to_string(&out).unwrap().trim(),
            "web1 52:54:00:00:00:02 down"
        );
        let bad: Vec<String> = vec![
            "sh".into(),
            "-c".into(),
            "echo no such interface >&2; exit 1".into(),
        ];
        let err = LinkControl::Command {
            vm: "web1",
            argv: &bad,
        }
        .set_link("x", true)
        .await
        .unwrap_err()
        .to_string();
        assert!(err.contains("no such interface"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_socket_that_never_greets_is_an_error_not_a_hang() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("busy.qmp");
        // Accepts (the kernel does, from the backlog) but never greets, like
        // QEMU while another QMP client is connected.
        let _listener = tokio::net::UnixListener::bind(&path).unwrap();
        let t = Instant::now();
        let err = Qmp::connect(&path).await.unwrap_err().to_string();
        assert!(
            err.contains("no QMP greeting") && err.contains("busy.qmp"),
            "{err}"
        );
        assert!(t.elapsed() >= GREETING_TIMEOUT);
        let err = Qmp::connect(&dir.path().join("none.qmp"))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot connect to QMP socket"), "{err}");
    }

    #[test]
    fn migrate_info_tolerates_qemu_7_2_and_newer_fields() {
        // query-migrate as QEMU 7.2 answers it (no downtime-bytes etc.) plus
        // a field only newer releases send.
        let j = r#"{"expected-downtime": 300, "status": "completed", "setup-time": 2,
            "total-time": 672, "downtime": 69, "future-field": 1,
            "ram": {"total": 135012352, "remaining": 0, "transferred": 102462915,
                    "dirty-sync-count": 3, "mbps": 1200.5, "page-size": 4096}}"#;
        let m: MigrateInfo = serde_json::from_str(j).unwrap();
        assert_eq!(m.status.as_deref(), Some("completed"));
        assert_eq!(m.downtime, Some(69));
        let ram = m.ram.unwrap();
        assert_eq!((ram.transferred, ram.dirty_sync_count), (102_462_915, 3));
    }
}
