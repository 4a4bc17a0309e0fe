//! `serve` configuration (TOML, `deny_unknown_fields`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The `serve` configuration file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    /// UDP update listener.
    #[serde(default = "default_udp")]
    pub udp_listen: SocketAddr,
    /// TLS control listener.
    #[serde(default = "default_control")]
    pub control_listen: SocketAddr,
    /// Prometheus `/metrics` listener (absent: disabled).
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// redb store file (created if missing).
    pub store_path: PathBuf,
    /// TLS certificate chain (PEM).
    pub tls_cert: PathBuf,
    /// TLS private key (PEM, PKCS#8/SEC1/PKCS#1).
    pub tls_key: PathBuf,
    /// Admin token file (must be mode 0600).
    pub admin_token_file: PathBuf,
    /// Host token file (mode 0600; absent: no host token). The host token
    /// authorizes nothing but `activate_standby` (host-prep switches a VM to
    /// its prepared standby MoA when the VM resumes on the destination).
    #[serde(default)]
    pub host_token_file: Option<PathBuf>,
    /// IMS Ed25519 signing key (PKCS#8 DER, mode 0600; `ims-server keys gen-signing`).
    pub signing_key_file: PathBuf,
    /// Longest lifetime an update may ask for.
    #[serde(default = "default_max_lifetime")]
    pub max_lifetime_s: u32,
    /// Update datagrams per second per source address.
    #[serde(default = "default_rate")]
    pub rate_limit_per_s: f64,
    /// Token-bucket depth per source address.
    #[serde(default = "default_burst")]
    pub rate_limit_burst: f64,
    /// redb page cache, MiB.
    #[serde(default = "default_cache")]
    pub store_cache_mb: usize,
    /// Most jobs in one group commit.
    #[serde(default = "default_batch")]
    pub max_batch: usize,
    /// Threads receiving, verifying and signing updates (they share one socket).
    #[serde(default = "default_udp_threads")]
    pub udp_threads: usize,
    /// If set, a JSON file with the bound addresses and pid is written here
    /// once the server is ready (tests and scripts use it with port 0).
    #[serde(default)]
    pub ready_file: Option<PathBuf>,
}

fn default_udp() -> SocketAddr {
    SocketAddr::from(([0u16; 8], 7341))
}
fn default_control() -> SocketAddr {
    SocketAddr::from(([0u16; 8], 7342))
}
fn default_max_lifetime() -> u32 {
    86_400
}
fn default_rate() -> f64 {
    1_000.0
}
fn default_burst() -> f64 {
    2_000.0
}
fn default_cache() -> usize {
    16
}
fn default_udp_threads() -> usize {
    2
}
fn default_batch() -> usize {
    4096
}

/// Configuration errors.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// Path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The TOML is invalid or has unknown keys.
    #[error("invalid config {path} line {line}: {message}")]
    Parse {
        /// Path.
        path: PathBuf,
        /// 1-based line of the problem (0 if unknown).
        line: usize,
        /// What is wrong (one line).
        message: String,
    },
    /// A value is out of range.
    #[error("invalid config: {0}")]
    Invalid(&'static str),
}

impl ServeConfig {
    /// Parses TOML text.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let c: ServeConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<inline>"),
            line: e.span().map_or(0, |s| {
                text[..s.start.min(text.len())].matches('\n').count() + 1
            }),
            message: e.message().replace('\n', " "),
        })?;
        c.validate()?;
        Ok(c)
    }

    /// Reads and parses a file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { line, message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                line,
                message,
            },
            e => e,
        })
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let rate_ok = self.rate_limit_per_s > 0.0 && self.rate_limit_per_s.is_finite();
        let burst_ok = self.rate_limit_burst >= 1.0 && self.rate_limit_burst.is_finite();
        if !rate_ok || !burst_ok {
            return Err(ConfigError::Invalid(
                "rate_limit_per_s must be > 0 and rate_limit_burst >= 1",
            ));
        }
        if self.udp_threads == 0 || self.udp_threads > 64 {
            return Err(ConfigError::Invalid("udp_threads must be 1..=64"));
        }
        if self.max_batch == 0 {
            return Err(ConfigError::Invalid("max_batch must be >= 1"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    const MIN: &str = r#"
store_path = "/var/lib/mat6/ims.redb"
tls_cert = "/etc/mat6/ims.crt"
tls_key = "/etc/mat6/ims.key"
admin_token_file = "/etc/mat6/admin-token"
signing_key_file = "/etc/mat6/ims-signing.pk8"
"#;

    #[test]
    fn defaults_and_unknown_fields() {
        let c = ServeConfig::from_toml(MIN).unwrap();
        assert_eq!(c.udp_listen.port(), 7341);
        assert_eq!(c.control_listen.port(), 7342);
        assert_eq!(c.metrics_listen, None);
        assert_eq!(c.host_token_file, None);
        let with_host = format!("{MIN}host_token_file = \"/etc/mat6/host-token\"\n");
        let c = ServeConfig::from_toml(&with_host).unwrap();
        assert_eq!(
            c.host_token_file.as_deref(),
            Some(Path::new("/etc/mat6/host-token"))
        );
        let bad = format!("{MIN}\nbogus = 1\n");
        let e = ServeConfig::from_toml(&bad).unwrap_err().to_string();
        assert!(e.contains("bogus") && e.contains("line 8"), "{e}");
        assert_eq!(e.lines().count(), 1, "{e}");
        let bad = format!("{MIN}\nmax_batch = 0\n");
        assert!(ServeConfig::from_toml(&bad).is_err());
    }
}
