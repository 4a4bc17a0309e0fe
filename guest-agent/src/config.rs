//! The agent's TOML configuration.
//!
//! ```toml
//! hoa = "2001:db8:ff::1"
//!
//! [ims]
//! update_addr = "[2001:db8:1::53]:7341"
//! control_addr = "[2001:db8:1::53]:7342"
//! ca_file = "/etc/mat6/ims-ca.pem"
//! server_name = "ims.example"
//! key_file = "/etc/mat6/guest-agent.key"   # KEY_ID:BASE64, mode 0600
//! public_key = "base64 Ed25519 key of the IMS"
//!
//! [[interfaces]]
//! name = "eth0"
//! role = "primary"
//! allowed_routers = ["fe80::1"]
//!
//! [[interfaces]]
//! name = "eth1"
//! role = "secondary"
//!
//! [peers]
//! hoas = ["2001:db8:ff::2"]
//! prefixes = ["2001:db8:ff::/64"]
//! ```

use std::net::{Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use ipnetwork::Ipv6Network;
use mat6_proto::mobility::Role;
use mat6_proto::update::UpdateKey;
use serde::Deserialize;

/// Default status socket.
pub const DEFAULT_STATUS_SOCKET: &str = "/run/mat6/guest-agent.sock";

/// Errors loading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// TOML syntax or an unknown/missing field.
    #[error("invalid configuration {path}: {source}")]
    Parse {
        /// File (or `<string>`).
        path: PathBuf,
        /// Cause.
        source: Box<toml::de::Error>,
    },
    /// A value is out of range or inconsistent.
    #[error("invalid configuration: {0}")]
    Invalid(&'static str),
    /// The key file is readable by others.
    #[error(
        "key file {path} has mode {mode:o}; it must not be readable by group or others (chmod 600)"
    )]
    InsecureKeyFile {
        /// File.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
    },
    /// The key file does not hold `KEY_ID:BASE64`.
    #[error("key file {0} does not hold KEY_ID:BASE64 with a 32-byte secret")]
    BadKey(PathBuf),
    /// The IMS public key is not base64 of 32 bytes.
    #[error("ims.public_key is not a base64 Ed25519 public key")]
    BadPublicKey,
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The Home Address (put on `lo` as a /128).
    pub hoa: Ipv6Addr,
    /// The IMS.
    pub ims: ImsConfig,
    /// Managed interfaces (one primary, at most one secondary).
    pub interfaces: Vec<InterfaceConfig>,
    /// Peers to follow.
    #[serde(default)]
    pub peers: PeersConfig,
    /// Daemon settings.
    #[serde(default)]
    pub agent: DaemonConfig,
}

/// How to reach the IMS.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ImsConfig {
    /// UDP update endpoint (port 7341 by default).
    pub update_addr: SocketAddr,
    /// TLS control endpoint (port 7342 by default); lookups and the watch.
    pub control_addr: Option<SocketAddr>,
    /// CA certificate (PEM) that signed the IMS certificate.
    pub ca_file: Option<PathBuf>,
    /// Name in the IMS certificate.
    #[serde(default = "default_server_name")]
    pub server_name: String,
    /// `KEY_ID:BASE64` update key of the HoA; mode 0600.
    pub key_file: PathBuf,
    /// The IMS's Ed25519 public key (base64), for verifying peers' bindings.
    pub public_key: String,
    /// Binding lifetime requested, seconds.
    #[serde(default = "default_lifetime")]
    pub binding_lifetime_s: u32,
}

fn default_server_name() -> String {
    "ims".to_owned()
}
fn default_lifetime() -> u32 {
    600
}

/// One managed interface.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct InterfaceConfig {
    /// Interface name.
    pub name: String,
    /// Primary or secondary.
    pub role: Role,
    /// Routers (link-local addresses) whose RAs are accepted; empty = any.
    #[serde(default)]
    pub allowed_routers: Vec<Ipv6Addr>,
}

/// Peers whose bindings the agent follows (IMS lookups and watch) and
/// translates.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PeersConfig {
    /// Exact peer HoAs.
    #[serde(default)]
    pub hoas: Vec<Ipv6Addr>,
    /// Peer HoA prefixes (also routed with source hint = our HoA).
    #[serde(default)]
    pub prefixes: Vec<Ipv6Network>,
}

/// Daemon settings.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    /// UDP port for peer notifications.
    #[serde(default = "default_notify_port")]
    pub notify_port: u16,
    /// Unix socket for `guest-agent status`.
    #[serde(default = "default_status_socket")]
    pub status_socket: PathBuf,
    /// Prometheus metrics listener (off when absent).
    #[serde(default)]
    pub metrics_addr: Option<SocketAddr>,
    /// nftables table name (family ip6).
    #[serde(default = "default_table")]
    pub nft_table: String,
    /// Route metric of the active interface.
    #[serde(default = "default_active_metric")]
    pub active_metric: u32,
    /// Route metric of a standby interface.
    #[serde(default = "default_standby_metric")]
    pub standby_metric: u32,
    /// Router Solicitation interval, milliseconds.
    #[serde(default = "default_rs_interval")]
    pub rs_interval_ms: u64,
    /// Copy the active link's outgoing HoA traffic to the standby link
    /// while a standby is ready (see the README, "Bicast"). On for a VM
    /// whose standby host-prep prepares on a bridge with no uplink; leave
    /// it off when the secondary is a live link of its own.
    #[serde(default)]
    pub standby_bicast: bool,
    /// With the bicast on, how long the switch waits after a carrier loss
    /// that arrives with a hypervisor announce (a live migration whose
    /// destination cut the old NIC: host-prep, which also activates the
    /// standby at the IMS at resume), milliseconds. The copies carry the
    /// traffic meanwhile; the just-resumed guest's vCPU goes to the
    /// packets first. 0 switches at once.
    #[serde(default = "default_migration_switch_delay")]
    pub migration_switch_delay_ms: u64,
    /// The agent's nice value while the bicast is on (0..=19; 0 leaves
    /// the priority alone). Right after a migration the copies carry the
    /// traffic and a just-resumed guest is slow: the packets get its CPU
    /// before the agent's switch work. Restoring the priority afterwards
    /// needs CAP_SYS_NICE.
    #[serde(default = "default_bicast_nice")]
    pub bicast_nice: i32,
    /// After a link event, probe the gateways of the IMS site registry
    /// (one Neighbor Solicitation each) and take a gateway's answer as
    /// that site's RA: an unprepared move then forms its MoA one round
    /// trip after the link event, not after the router's solicited RA
    /// (delayed up to 0.5 s by RFC 4861). Needs `ims.control_addr`.
    #[serde(default = "default_true")]
    pub site_probe: bool,
}

fn default_true() -> bool {
    true
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            notify_port: default_notify_port(),
            status_socket: default_status_socket(),
            metrics_addr: None,
            nft_table: default_table(),
            active_metric: default_active_metric(),
            standby_metric: default_standby_metric(),
            rs_interval_ms: default_rs_interval(),
            standby_bicast: false,
            migration_switch_delay_ms: default_migration_switch_delay(),
            bicast_nice: default_bicast_nice(),
            site_probe: true,
        }
    }
}

fn default_notify_port() -> u16 {
    mat6_proto::notify::DEFAULT_PORT
}
fn default_status_socket() -> PathBuf {
    PathBuf::from(DEFAULT_STATUS_SOCKET)
}
fn default_table() -> String {
    "mat6".to_owned()
}
fn default_active_metric() -> u32 {
    100
}
fn default_standby_metric() -> u32 {
    200
}
fn default_rs_interval() -> u64 {
    250
}
fn default_migration_switch_delay() -> u64 {
    300
}
fn default_bicast_nice() -> i32 {
    19
}

impl AgentConfig {
    /// Parses and validates a TOML document.
    pub fn from_toml(s: &str) -> Result<Self, ConfigError> {
        Self::parse(s, Path::new("<string>"))
    }

    /// Reads, parses and validates a file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let s = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&s, path)
    }

    fn parse(s: &str, path: &Path) -> Result<Self, ConfigError> {
        let c: AgentConfig = toml::from_str(s).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(e),
        })?;
        c.validate()?;
        Ok(c)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.hoa.is_unspecified() || self.hoa.is_multicast() || self.hoa.is_loopback() {
            return Err(ConfigError::Invalid("hoa must be a global unicast address"));
        }
        let primaries = self
            .interfaces
            .iter()
            .filter(|i| i.role == Role::Primary)
            .count();
        let secondaries = self.interfaces.len() - primaries;
        if primaries != 1 || secondaries > 1 {
            return Err(ConfigError::Invalid(
                "interfaces: exactly one primary and at most one secondary",
            ));
        }
        let mut names: Vec<&str> = self.interfaces.iter().map(|i| i.name.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        if names.len() != self.interfaces.len() {
            return Err(ConfigError::Invalid("interfaces: names must be unique"));
        }
        if self
            .interfaces
            .iter()
            .any(|i| i.name.is_empty() || i.name.len() > 15)
        {
            return Err(ConfigError::Invalid(
                "interfaces: a name must have 1 to 15 characters",
            ));
        }
        for i in &self.interfaces {
            if i.allowed_routers
                .iter()
                .any(|r| (r.segments()[0] & 0xffc0) != 0xfe80)
            {
                return Err(ConfigError::Invalid(
                    "interfaces.allowed_routers must be link-local addresses",
                ));
            }
        }
        if self.ims.binding_lifetime_s < 10 {
            return Err(ConfigError::Invalid("ims.binding_lifetime_s must be >= 10"));
        }
        if self.agent.active_metric >= self.agent.standby_metric {
            return Err(ConfigError::Invalid(
                "agent.active_metric must be lower than agent.standby_metric",
            ));
        }
        if self.agent.migration_switch_delay_ms > 5_000 {
            return Err(ConfigError::Invalid(
                "agent.migration_switch_delay_ms must be at most 5000 (the IMS activation and peer notifications wait for it)",
            ));
        }
        if !(0..=19).contains(&self.agent.bicast_nice) {
            return Err(ConfigError::Invalid(
                "agent.bicast_nice must be within 0..=19",
            ));
        }
        if self.agent.rs_interval_ms == 0 {
            return Err(ConfigError::Invalid("agent.rs_interval_ms must be > 0"));
        }
        if self.agent.nft_table.is_empty()
            || !self
                .agent
                .nft_table
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(ConfigError::Invalid(
                "agent.nft_table must be letters, digits and _",
            ));
        }
        if self.ims.control_addr.is_some() && self.ims.ca_file.is_none() {
            return Err(ConfigError::Invalid(
                "ims.ca_file is required with ims.control_addr",
            ));
        }
        self.ims_public_key()?;
        Ok(())
    }

    /// The IMS public key.
    pub fn ims_public_key(&self) -> Result<[u8; 32], ConfigError> {
        mat6_proto::assertion::public_key_from_b64(self.ims.public_key.trim())
            .map_err(|_| ConfigError::BadPublicKey)
    }

    /// Reads the update key, refusing a file readable by group or others.
    pub fn load_key(&self) -> Result<UpdateKey, ConfigError> {
        read_key_file(&self.ims.key_file)
    }

    /// Every peer prefix to route with source hint = HoA (exact HoAs as /128).
    pub fn peer_prefixes(&self) -> Vec<(Ipv6Addr, u8)> {
        let mut v: Vec<(Ipv6Addr, u8)> = self
            .peers
            .prefixes
            .iter()
            .map(|p| (p.network(), p.prefix()))
            .chain(self.peers.hoas.iter().map(|h| (*h, 128)))
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

/// Reads a `KEY_ID:BASE64` key file whose mode must be 0600 or stricter.
pub fn read_key_file(path: &Path) -> Result<UpdateKey, ConfigError> {
    use std::os::unix::fs::PermissionsExt as _;
    let meta = std::fs::metadata(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(ConfigError::InsecureKeyFile {
            path: path.to_owned(),
            mode,
        });
    }
    let s = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    UpdateKey::from_key_string(&s).map_err(|_| ConfigError::BadKey(path.to_owned()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    const PK: &str = "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=";

    fn sample() -> String {
        format!(
            r#"
hoa = "2001:db8:ff::1"
[ims]
update_addr = "[2001:db8:1::53]:7341"
control_addr = "[2001:db8:1::53]:7342"
ca_file = "/etc/mat6/ims-ca.pem"
server_name = "ims.test"
key_file = "/etc/mat6/agent.key"
public_key = "{PK}"
[[interfaces]]
name = "eth0"
role = "primary"
allowed_routers = ["fe80::1"]
[[interfaces]]
name = "eth1"
role = "secondary"
[peers]
hoas = ["2001:db8:ff::2"]
prefixes = ["2001:db8:fe::/64"]
"#
        )
    }

    #[test]
    fn parses_sample() {
        let c = AgentConfig::from_toml(&sample()).unwrap();
        assert_eq!(c.hoa, "2001:db8:ff::1".parse::<Ipv6Addr>().unwrap());
        assert_eq!(c.interfaces.len(), 2);
        assert_eq!(c.interfaces[1].role, Role::Secondary);
        assert_eq!(c.agent.notify_port, 7343);
        assert_eq!(c.agent.status_socket, PathBuf::from(DEFAULT_STATUS_SOCKET));
        assert_eq!(c.ims.binding_lifetime_s, 600);
        assert_eq!(
            c.peer_prefixes(),
            vec![
                ("2001:db8:fe::".parse().unwrap(), 64),
                ("2001:db8:ff::2".parse().unwrap(), 128)
            ]
        );
    }

    #[test]
    fn rejects_unknown_fields_and_bad_values() {
        let bad = sample().replace("role = \"secondary\"", "role = \"secondary\"\nfoo = 1");
        assert!(matches!(
            AgentConfig::from_toml(&bad),
            Err(ConfigError::Parse { .. })
        ));
        let two_primaries = sample().replace("\"secondary\"", "\"primary\"");
        assert!(matches!(
            AgentConfig::from_toml(&two_primaries),
            Err(ConfigError::Invalid(_))
        ));
        let global_router = sample().replace("fe80::1", "2001:db8::1");
        assert!(matches!(
            AgentConfig::from_toml(&global_router),
            Err(ConfigError::Invalid(_))
        ));
        let bad_pk = sample().replace(PK, "abc");
        assert!(matches!(
            AgentConfig::from_toml(&bad_pk),
            Err(ConfigError::BadPublicKey)
        ));
        let e = AgentConfig::from_toml(&sample().replace("hoa = ", "home = "))
            .unwrap_err()
            .to_string();
        assert!(e.contains("home"), "{e}");
    }

    #[test]
    fn switch_delay_and_bicast_nice_defaults_and_bounds() {
        let c = AgentConfig::from_toml(&sample()).unwrap();
        assert_eq!(c.agent.migration_switch_delay_ms, 300);
        let with = |v: u64| format!("{}\n[agent]\nmigration_switch_delay_ms = {v}\n", sample());
        assert_eq!(
            AgentConfig::from_toml(&with(0))
                .unwrap()
                .agent
                .migration_switch_delay_ms,
            0
        );
        let e = AgentConfig::from_toml(&with(60_000)).unwrap_err();
        assert!(e.to_string().contains("migration_switch_delay_ms"), "{e}");
        assert_eq!(c.agent.bicast_nice, 19);
        let nice = |v: i32| format!("{}\n[agent]\nbicast_nice = {v}\n", sample());
        assert_eq!(
            AgentConfig::from_toml(&nice(0)).unwrap().agent.bicast_nice,
            0
        );
        let e = AgentConfig::from_toml(&nice(-5)).unwrap_err();
        assert!(e.to_string().contains("bicast_nice"), "{e}");
    }

    #[test]
    fn key_file_must_be_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        let key = UpdateKey {
            key_id: 4,
            secret: [9; 32],
        };
        std::fs::write(&p, key.to_key_string()).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_key_file(&p).unwrap_err();
        assert!(matches!(
            e,
            ConfigError::InsecureKeyFile { mode: 0o644, .. }
        ));
        assert!(e.to_string().contains("chmod 600"));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_key_file(&p).unwrap(), key);
        std::fs::write(&p, "garbage").unwrap();
        assert!(matches!(read_key_file(&p), Err(ConfigError::BadKey(_))));
        assert!(matches!(
            read_key_file(&dir.path().join("missing")),
            Err(ConfigError::Read { .. })
        ));
    }
}
