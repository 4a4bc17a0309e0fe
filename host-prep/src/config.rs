//! host-prep configuration: one TOML file per host (or one shared by the
//! hosts of a testbed, with `--site` telling each host where it is).
//!
//! ```toml
//! state_dir = "/var/lib/mat6/host-prep"
//! local_site = "A"
//!
//! [ims]
//! control = "[2001:db8:ff::1]:7342"
//! server_name = "ims.example"
//! ca_cert = "/etc/mat6/ims-ca.pem"
//! host_token_file = "/etc/mat6/ims-host-token"   # optional: activate the standby at RESUME
//!
//! [sites.A]
//! bridge = "br-a"                  # the real bridge (with the uplink to site A's router)
//! standby_bridge = "br-a-nu"       # the bridge with no uplink that gets prepared
//! migrate_uri = "tcp:[2001:db8:a::2]:4444"
//! receive_command = ["ssh", "hostA", "host-prep", "receive", "--vm", "{vm}", "--active", "{active}", "--json"]
//!
//! [vms.web1]
//! qmp = "/run/mat6/web1.qmp"
//! hoa = "2001:db8:100::10"
//! incoming = "tcp:[::]:4444"
//! qemu_command = ["qemu-system-x86_64", "-qmp", "unix:{qmp},server=on,wait=off",
//!                 "-netdev", "tap,id=n0,ifname={tap:net0},script=no,downscript=no", "..."]
//! [[vms.web1.nics]]
//! id = "net0"
//! tap = "web1-n0"
//! [[vms.web1.nics]]
//! id = "net1"
//! tap = "web1-n1"
//! ```

use std::collections::BTreeMap;
use std::net::{Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Errors reading or validating the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// Path of the file.
        path: PathBuf,
        /// Underlying I/O error.
        source: std::io::Error,
    },
    /// The TOML did not parse or had unknown/missing keys.
    #[error("invalid config: {0}")]
    Toml(#[from] toml::de::Error),
    /// A VM must have exactly two NICs (primary and secondary).
    #[error("vm {vm}: needs exactly two NICs (an active one and a standby), found {found}")]
    NicCount {
        /// VM name.
        vm: String,
        /// How many NICs the config lists.
        found: usize,
    },
    /// Two NICs of one VM share an id or a tap name.
    #[error("vm {vm}: NIC ids and tap names must differ")]
    DuplicateNic {
        /// VM name.
        vm: String,
    },
    /// An interface name longer than the kernel allows.
    #[error("interface name {name:?} is longer than 15 bytes or empty")]
    IfName {
        /// The offending name.
        name: String,
    },
    /// `local_site` names a site without a `[sites.NAME]` section.
    #[error("local_site {0:?} has no [sites.{0}] section")]
    LocalSite(String),
    /// A VM's destination command template is empty.
    #[error("vm {vm}: qemu_command is empty")]
    EmptyCommand {
        /// VM name.
        vm: String,
    },
}

/// Top-level configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where per-VM role state (which NIC is active, where the VM is) lives.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// The site this host belongs to (overridable with `--site`).
    #[serde(default)]
    pub local_site: Option<String>,
    /// How to reach the IMS.
    #[serde(default)]
    pub ims: Option<ImsSettings>,
    /// Timing knobs.
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Router Advertisement sender knobs.
    #[serde(default)]
    pub ra: RaSettings,
    /// QEMU migration parameters `migrate` sets before starting.
    #[serde(default)]
    pub migration: MigrationSettings,
    /// Per-site bridges and how to reach a host of that site.
    #[serde(default)]
    pub sites: BTreeMap<String, SiteHost>,
    /// The VMs this host may migrate or receive.
    #[serde(default)]
    pub vms: BTreeMap<String, VmConfig>,
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/mat6/host-prep")
}

/// IMS control channel settings (TLS).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImsSettings {
    /// IMS TLS control address (default port 7342).
    pub control: SocketAddr,
    /// TLS server name to verify.
    #[serde(default = "default_server_name")]
    pub server_name: String,
    /// CA certificate (PEM) that signed the IMS certificate.
    pub ca_cert: PathBuf,
    /// The IMS host token (file, mode 0600; the IMS's `host_token_file`).
    /// When set, `receive` activates the VM's prepared standby MoA at the IMS
    /// right after the switch on `RESUME`, on the VM's behalf, so that peers
    /// learn the new MoA without waiting for the guest-agent.
    #[serde(default)]
    pub host_token_file: Option<PathBuf>,
}

fn default_server_name() -> String {
    "ims".to_string()
}

/// Timeouts, in milliseconds in the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    /// How long `prepare` waits for the standby MoA at the IMS.
    #[serde(default = "d_prepare")]
    pub prepare_ms: u64,
    /// How long to wait for the destination QEMU to listen / QMP to appear.
    #[serde(default = "d_start")]
    pub start_ms: u64,
    /// How long the whole migration (pre-copy + stop-and-copy) may take.
    #[serde(default = "d_migrate")]
    pub migrate_ms: u64,
    /// IMS request timeout.
    #[serde(default = "d_ims")]
    pub ims_ms: u64,
}

fn d_prepare() -> u64 {
    30_000
}
fn d_start() -> u64 {
    20_000
}
fn d_migrate() -> u64 {
    600_000
}
fn d_ims() -> u64 {
    5_000
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            prepare_ms: d_prepare(),
            start_ms: d_start(),
            migrate_ms: d_migrate(),
            ims_ms: d_ims(),
        }
    }
}

impl Timeouts {
    /// Preparation timeout.
    pub fn prepare(&self) -> Duration {
        Duration::from_millis(self.prepare_ms)
    }
    /// Destination start timeout.
    pub fn start(&self) -> Duration {
        Duration::from_millis(self.start_ms)
    }
    /// Migration timeout.
    pub fn migrate(&self) -> Duration {
        Duration::from_millis(self.migrate_ms)
    }
    /// IMS request timeout.
    pub fn ims(&self) -> Duration {
        Duration::from_millis(self.ims_ms)
    }
}

/// RA sender timing (the RA content comes from the site registry).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RaSettings {
    /// Interval of unsolicited RAs once the initial burst is over.
    #[serde(default = "d_ra_interval")]
    pub interval_ms: u64,
    /// Number of initial RAs sent `initial_interval_ms` apart.
    #[serde(default = "d_ra_initial_count")]
    pub initial_count: u32,
    /// Gap between the initial RAs.
    #[serde(default = "d_ra_initial_interval")]
    pub initial_interval_ms: u64,
    /// Minimum gap between two solicited RAs (rate limit against RS floods).
    #[serde(default = "d_ra_min_gap")]
    pub min_solicited_gap_ms: u64,
}

fn d_ra_interval() -> u64 {
    1_000
}
fn d_ra_initial_count() -> u32 {
    3
}
fn d_ra_initial_interval() -> u64 {
    100
}
fn d_ra_min_gap() -> u64 {
    20
}

impl Default for RaSettings {
    fn default() -> Self {
        Self {
            interval_ms: d_ra_interval(),
            initial_count: d_ra_initial_count(),
            initial_interval_ms: d_ra_initial_interval(),
            min_solicited_gap_ms: d_ra_min_gap(),
        }
    }
}

/// QEMU migration parameters (`migrate-set-parameters`); unset = QEMU's
/// defaults.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MigrationSettings {
    /// Largest downtime QEMU may plan for the stop-and-copy phase (ms;
    /// QEMU's default is 300).
    #[serde(default)]
    pub downtime_limit_ms: Option<u64>,
    /// Bandwidth cap (bytes/s; QEMU's default is 128 MiB/s in 7.2).
    #[serde(default)]
    pub max_bandwidth_bytes: Option<u64>,
    /// On a prepared receive, seed the destination gateway's neighbour
    /// cache with the VM's standby MoA while the migration runs
    /// ([`crate::neigh`]), so peers' first packets are forwarded at once
    /// instead of after the gateway's solicitation of the guest. Off by
    /// default: on the TCG testbed it moves the peers' traffic into the
    /// guest's slowest moments and the VM's own pings lose what the
    /// peers' gain (`./bench.sh migration`, host-prep/README.md).
    #[serde(default)]
    pub seed_gateway_neighbour: bool,
}

/// What this host (or a host of that site) has for one site.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteHost {
    /// The real bridge with the uplink to the site's router.
    pub bridge: String,
    /// The bridge with no uplink: the standby NIC's bridge, which `prepare`
    /// makes look like the destination link.
    pub standby_bridge: String,
    /// Migration URI the source QEMU sends to (`tcp:HOST:PORT` or `unix:PATH`).
    #[serde(default)]
    pub migrate_uri: Option<String>,
    /// Command (argv template) that runs `host-prep receive` on a host of
    /// this site. Placeholders: `{vm}`, `{active}`, `{site}`.
    #[serde(default)]
    pub receive_command: Vec<String>,
}

/// One VM.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// QMP socket (unix) of the QEMU running this VM on this host.
    pub qmp: PathBuf,
    /// The VM's home address (what the guest-agent registers at the IMS).
    pub hoa: Ipv6Addr,
    /// The two NICs, in their initial roles: first = active, second = standby.
    pub nics: Vec<NicConfig>,
    /// `-incoming` argument for the destination QEMU (e.g. `tcp:[::]:4444`).
    #[serde(default = "default_incoming")]
    pub incoming: String,
    /// Destination QEMU command (argv template). Placeholders: `{vm}`,
    /// `{qmp}`, `{incoming}`, `{tap:NICID}`, `{bridge:NICID}`.
    #[serde(default)]
    pub qemu_command: Vec<String>,
    /// File the destination QEMU's stdout/stderr go to (default: inherit).
    #[serde(default)]
    pub qemu_log: Option<PathBuf>,
    /// This VM's own no-uplink bridge (same name on every host), instead of
    /// the site's `standby_bridge`: needed when VMs of one host are prepared
    /// at the same time for different sites (a bridge impersonates one
    /// gateway at a time).
    #[serde(default)]
    pub standby_bridge: Option<String>,
    /// Command (argv template) that sets a NIC's link state instead of QMP
    /// `set_link`, for hypervisor managers that own the QMP socket (libvirt:
    /// `["virsh", "domif-setlink", "{vm}", "{nic}", "{state}"]`).
    /// Placeholders: `{vm}`, `{nic}` (the NIC id), `{state}` (`up`/`down`).
    #[serde(default)]
    pub link_command: Vec<String>,
}

fn default_incoming() -> String {
    "tcp:[::]:4444".to_string()
}

/// A NIC of a VM.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NicConfig {
    /// QEMU device id (used with QMP `set_link`).
    pub id: String,
    /// Host tap interface of this NIC (same name on every host).
    pub tap: String,
}

impl Config {
    /// Parse and validate a configuration from TOML text.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let cfg: Config = toml::from_str(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Read, parse and validate a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        for site in self.sites.values() {
            check_ifname(&site.bridge)?;
            check_ifname(&site.standby_bridge)?;
        }
        if let Some(local) = &self.local_site {
            if !self.sites.contains_key(local) {
                return Err(ConfigError::LocalSite(local.clone()));
            }
        }
        for (name, vm) in &self.vms {
            // The NIC count is checked when the VM is used, so that the error
            // names the problem at the operation ("VM without a secondary NIC").
            for nic in &vm.nics {
                check_ifname(&nic.tap)?;
            }
            if let Some(b) = &vm.standby_bridge {
                check_ifname(b)?;
            }
            if vm.nics.len() == 2
                && (vm.nics[0].id == vm.nics[1].id || vm.nics[0].tap == vm.nics[1].tap)
            {
                return Err(ConfigError::DuplicateNic { vm: name.clone() });
            }
        }
        Ok(())
    }
}

impl Config {
    /// Every tap of every configured VM: ports a no-uplink bridge may have.
    pub fn all_taps(&self) -> Vec<&str> {
        self.vms
            .values()
            .flat_map(|v| v.nics.iter().map(|n| n.tap.as_str()))
            .collect()
    }
}

impl VmConfig {
    /// The two NICs, or an error naming the VM when it does not have two.
    pub fn nic_pair(&self, vm: &str) -> Result<[&NicConfig; 2], ConfigError> {
        match self.nics.as_slice() {
            [a, b] => Ok([a, b]),
            other => Err(ConfigError::NicCount {
                vm: vm.to_string(),
                found: other.len(),
            }),
        }
    }

    /// The NIC with this id.
    pub fn nic(&self, id: &str) -> Option<&NicConfig> {
        self.nics.iter().find(|n| n.id == id)
    }
}

fn check_ifname(name: &str) -> Result<(), ConfigError> {
    if name.is_empty()
        || name.len() > 15
        || name.contains('/')
        || name.contains(char::is_whitespace)
    {
        return Err(ConfigError::IfName {
            name: name.to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    pub(crate) const SAMPLE: &str = r#"
state_dir = "/tmp/m6h-state"
local_site = "A"

[migration]
downtime_limit_ms = 50

[ims]
control = "[2001:db8:ff::1]:7342"
ca_cert = "/etc/mat6/ca.pem"

[sites.A]
bridge = "br-a"
standby_bridge = "br-a-nu"
migrate_uri = "tcp:[2001:db8:a::2]:4444"
receive_command = ["host-prep", "receive", "--vm", "{vm}", "--active", "{active}"]

[sites.B]
bridge = "br-b"
standby_bridge = "br-b-nu"

[vms.web1]
qmp = "/run/web1.qmp"
hoa = "2001:db8:100::10"
qemu_command = ["qemu", "-netdev", "tap,id=n0,ifname={tap:net0}"]
[[vms.web1.nics]]
id = "net0"
tap = "web1-n0"
[[vms.web1.nics]]
id = "net1"
tap = "web1-n1"
"#;

    #[test]
    fn sample_parses() {
        let cfg = Config::from_toml(SAMPLE).unwrap();
        assert_eq!(cfg.local_site.as_deref(), Some("A"));
        assert_eq!(cfg.sites["A"].standby_bridge, "br-a-nu");
        let vm = &cfg.vms["web1"];
        let [a, b] = vm.nic_pair("web1").unwrap();
        assert_eq!((a.id.as_str(), b.id.as_str()), ("net0", "net1"));
        assert_eq!(vm.incoming, "tcp:[::]:4444");
        assert_eq!(cfg.timeouts.prepare(), Duration::from_secs(30));
        assert_eq!(cfg.ra.initial_count, 3);
        assert_eq!(cfg.migration.downtime_limit_ms, Some(50));
        assert_eq!(cfg.migration.max_bandwidth_bytes, None);
        assert_eq!(cfg.ims.unwrap().host_token_file, None, "optional");
    }

    #[test]
    fn host_token_file_in_ims_section() {
        let text = SAMPLE.replace(
            "ca_cert = \"/etc/mat6/ca.pem\"\n",
            "ca_cert = \"/etc/mat6/ca.pem\"\nhost_token_file = \"/etc/mat6/host-token\"\n",
        );
        let cfg = Config::from_toml(&text).unwrap();
        assert_eq!(
            cfg.ims.unwrap().host_token_file.as_deref(),
            Some(Path::new("/etc/mat6/host-token"))
        );
        // A misspelt key is an error, not a silently disabled activation.
        let bad = SAMPLE.replace(
            "ca_cert = \"/etc/mat6/ca.pem\"\n",
            "ca_cert = \"/etc/mat6/ca.pem\"\nhost_token = \"/etc/mat6/host-token\"\n",
        );
        assert!(Config::from_toml(&bad).is_err());
    }

    #[test]
    fn shipped_example_parses() {
        let text = include_str!("../host-prep.example.toml");
        let cfg = Config::from_toml(text).unwrap();
        assert_eq!(cfg.sites.len(), 2);
        let vm = &cfg.vms["web1"];
        vm.nic_pair("web1").unwrap();
        assert!(vm.qemu_command.iter().any(|a| a.contains("{tap:net1}")));
        assert!(!cfg.sites["B"].receive_command.is_empty());
        assert!(cfg.ims.unwrap().host_token_file.is_some());
    }

    #[test]
    fn unknown_key_rejected() {
        let text = format!("{SAMPLE}\n[vms.web1.extra]\nx = 1\n");
        assert!(matches!(
            Config::from_toml(&text),
            Err(ConfigError::Toml(_))
        ));
        let text = SAMPLE.replace("local_site", "lokal_site");
        let err = Config::from_toml(&text).unwrap_err().to_string();
        assert!(err.contains("lokal_site"), "{err}");
    }

    #[test]
    fn single_nic_vm_is_named() {
        let text = SAMPLE.replace("[[vms.web1.nics]]\nid = \"net1\"\ntap = \"web1-n1\"\n", "");
        let cfg = Config::from_toml(&text).unwrap();
        let err = cfg.vms["web1"].nic_pair("web1").unwrap_err().to_string();
        assert!(err.contains("web1") && err.contains("found 1"), "{err}");
    }

    #[test]
    fn bad_names_rejected() {
        let text = SAMPLE.replace("br-a-nu", "a-very-long-bridge-name");
        assert!(matches!(
            Config::from_toml(&text),
            Err(ConfigError::IfName { .. })
        ));
        let text = SAMPLE.replace("local_site = \"A\"", "local_site = \"Z\"");
        assert!(matches!(
            Config::from_toml(&text),
            Err(ConfigError::LocalSite(_))
        ));
        let text = SAMPLE.replace("web1-n1", "web1-n0");
        assert!(matches!(
            Config::from_toml(&text),
            Err(ConfigError::DuplicateNic { .. })
        ));
    }
}
