//! host-prep's top-level error: every layer's typed error, plus the
//! orchestration's own cases, each naming what to fix. Mapped to the exit
//! code in `main`.

use std::path::PathBuf;

use mat6_net::bridge::BridgeError;
use mat6_net::icmp6::Icmp6Error;
use mat6_net::netlink::NetlinkError;

use crate::config::ConfigError;
use crate::ims::ImsError;
use crate::qmp::QmpError;
use crate::state::StateError;
use crate::template::TemplateError;

/// Everything that can make a host-prep command fail.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Role state file problem.
    #[error(transparent)]
    State(#[from] StateError),
    /// The VM is not in the config.
    #[error("unknown vm {0:?}: no [vms.{0}] section in the config")]
    UnknownVm(String),
    /// Neither `local_site` nor `--site` says where this host is.
    #[error("this host's site is unknown: set local_site in the config or pass --site")]
    NoLocalSite,
    /// The local site has no `[sites.NAME]` section.
    #[error("site {0:?} has no [sites.{0}] section in the config (bridges of this host)")]
    UnknownLocalSite(String),
    /// Source and destination are the same site.
    #[error("vm {vm} already runs at site {site}: nothing to prepare")]
    SameSite {
        /// VM.
        vm: String,
        /// Site.
        site: String,
    },
    /// The destination site section lacks what `migrate` needs.
    #[error("[sites.{site}] needs {what} for `migrate --to {site}`")]
    DestinationIncomplete {
        /// Site.
        site: String,
        /// Missing key.
        what: &'static str,
    },
    /// The standby NIC's tap is not a port of the standby bridge.
    #[error("tap {tap} of vm {vm}'s standby NIC {nic} is not a port of bridge {bridge}: RAs would not reach the VM")]
    StandbyNotOnBridge {
        /// VM.
        vm: String,
        /// NIC id.
        nic: String,
        /// Tap.
        tap: String,
        /// Bridge.
        bridge: String,
    },
    /// QEMU does not know the NIC (VM without a secondary NIC, or wrong id).
    #[error("vm {vm}: QEMU has no NIC {nic:?} ({source})")]
    NoSuchNic {
        /// VM.
        vm: String,
        /// NIC id.
        nic: String,
        /// QMP error.
        source: Box<QmpError>,
    },
    /// Another host-prep holds the bridge (a preparation is in progress).
    #[error("bridge {bridge} is being prepared by another host-prep (lock {lock}); a bridge impersonates one gateway at a time")]
    BridgeBusy {
        /// Bridge.
        bridge: String,
        /// Lock file.
        lock: PathBuf,
    },
    /// A NIC id the VM's config does not list.
    #[error("vm {vm} has no NIC {nic:?} in the config")]
    UnknownNic {
        /// VM.
        vm: String,
        /// NIC id.
        nic: String,
    },
    /// IMS error.
    #[error(transparent)]
    Ims(Box<ImsError>),
    /// Bridge error.
    #[error(transparent)]
    Bridge(Box<BridgeError>),
    /// Netlink error.
    #[error(transparent)]
    Netlink(Box<NetlinkError>),
    /// RA sender socket error.
    #[error("RA sender: {0}")]
    Ra(Box<Icmp6Error>),
    /// QMP error.
    #[error(transparent)]
    Qmp(Box<QmpError>),
    /// Command template error.
    #[error(transparent)]
    Template(#[from] TemplateError),
    /// A process could not be started or waited for.
    #[error("{what}: {source}")]
    Process {
        /// What (names the program).
        what: String,
        /// Error.
        source: std::io::Error,
    },
    /// The destination side failed or went away.
    #[error("destination: {0}")]
    Destination(String),
    /// The migration failed in QEMU.
    #[error("migration of vm {vm} failed: status {status}{}", .desc.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    MigrationFailed {
        /// VM.
        vm: String,
        /// Final status.
        status: String,
        /// QEMU's error description.
        desc: Option<String>,
    },
    /// A wait ran out.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What.
        what: String,
        /// How long.
        after: std::time::Duration,
    },
    /// Interrupted by a signal.
    #[error("interrupted")]
    Interrupted,
    /// Writing output failed.
    #[error("cannot write {path}: {source}")]
    Output {
        /// Where.
        path: PathBuf,
        /// Error.
        source: std::io::Error,
    },
}

impl Error {
    /// Process exit code: 2 for configuration/usage problems, 3 for
    /// timeouts, 4 for IMS problems, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Config(_)
            | Error::UnknownVm(_)
            | Error::NoLocalSite
            | Error::UnknownLocalSite(_)
            | Error::DestinationIncomplete { .. }
            | Error::UnknownNic { .. }
            | Error::Template(_) => 2,
            Error::Timeout { .. } => 3,
            Error::Ims(e) if matches!(**e, ImsError::StandbyTimeout { .. }) => 3,
            Error::Ims(_) => 4,
            _ => 1,
        }
    }
}

macro_rules! boxed_from {
    ($($ty:ty => $variant:ident),* $(,)?) => {$(
        impl From<$ty> for Error {
            fn from(e: $ty) -> Self {
                Error::$variant(Box::new(e))
            }
        }
    )*};
}

boxed_from! {
    ImsError => Ims,
    BridgeError => Bridge,
    NetlinkError => Netlink,
    QmpError => Qmp,
    Icmp6Error => Ra,
}
