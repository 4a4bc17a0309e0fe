//! What host-prep needs from the IMS: a site of the registry, and the moment
//! a VM's standby MoA inside a prefix shows up. Behind a trait so that the
//! orchestration can be tested without a server; [`ImsRegistry`] is the real
//! one (TLS control channel via `ims-client`).

use std::future::Future;
use std::net::{Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ims_client::{
    Binding, ClientError, ControlClient, SiteInfo, TlsSettings, Watch, WatchChange, WatchFilter,
    WatchItem,
};
use ipnetwork::Ipv6Network;

use crate::config::ImsSettings;

/// Errors talking to the IMS.
#[derive(Debug, thiserror::Error)]
pub enum ImsError {
    /// The config has no `[ims]` section.
    #[error("no [ims] section in the config: host-prep needs the IMS for the site registry")]
    NotConfigured,
    /// The TLS settings (CA file, server name) are unusable.
    #[error("IMS TLS settings: {0}")]
    Tls(#[source] ClientError),
    /// The IMS could not be reached or did not answer in time.
    #[error("IMS at {addr} unreachable: {reason}")]
    Unreachable {
        /// Control address.
        addr: SocketAddr,
        /// Why (connect error, or the timeout).
        reason: String,
    },
    /// A request failed.
    #[error("IMS at {addr}: {source}")]
    Request {
        /// Control address.
        addr: SocketAddr,
        /// Error.
        #[source]
        source: ClientError,
    },
    /// The site is not in the registry.
    #[error(
        "unknown site {0:?}: not in the IMS site registry (add it with `ims-server sites add`)"
    )]
    UnknownSite(String),
    /// The site record is inconsistent.
    #[error("site {name:?} in the registry is invalid: {reason}")]
    BadSite {
        /// Site.
        name: String,
        /// Why.
        reason: String,
    },
    /// The host token file is missing, unreadable, readable by others or empty.
    #[error("IMS host token file {path}: {reason}")]
    HostToken {
        /// Path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// At the IMS, the VM's binding has no standby MoA inside the prefix.
    #[error("the IMS shows no standby MoA of {hoa} inside {prefix} (was the migration prepared?)")]
    NoStandby {
        /// HoA.
        hoa: Ipv6Addr,
        /// Destination prefix.
        prefix: Ipv6Network,
    },
    /// No standby MoA in the prefix appeared in time.
    #[error("timed out after {after:?}: the IMS shows no standby MoA of {hoa} inside {prefix} (is the guest-agent running and does the standby NIC get the RAs?); last binding: {last}")]
    StandbyTimeout {
        /// HoA.
        hoa: Ipv6Addr,
        /// Destination prefix.
        prefix: Ipv6Network,
        /// Waited.
        after: Duration,
        /// Last binding seen, for the operator.
        last: String,
    },
}

/// The IMS operations host-prep uses.
pub trait Registry {
    /// The site `name` from the registry.
    fn site(&self, name: &str) -> impl Future<Output = Result<SiteInfo, ImsError>> + Send;
    /// Wait until `hoa`'s binding lists a standby MoA inside `prefix`;
    /// returns that MoA.
    fn wait_standby(
        &self,
        hoa: Ipv6Addr,
        prefix: Ipv6Network,
        timeout: Duration,
    ) -> impl Future<Output = Result<Ipv6Addr, ImsError>> + Send;
}

/// The standby MoA of `b` inside `prefix`, if any.
pub fn standby_in(b: &Binding, prefix: &Ipv6Network) -> Option<Ipv6Addr> {
    b.standby.iter().copied().find(|a| prefix.contains(*a))
}

/// Reads the IMS host token: refused unless only its owner can read it
/// (mode 0600/0400), trimmed, non-empty.
pub fn read_host_token(path: &Path) -> Result<String, ImsError> {
    use std::os::unix::fs::PermissionsExt as _;
    let bad = |reason: String| ImsError::HostToken {
        path: path.to_owned(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(bad(format!(
            "mode {mode:04o}; it must be 0600 (chmod 600 {})",
            path.display()
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let t = text.trim();
    if t.is_empty() {
        return Err(bad("empty".into()));
    }
    Ok(t.to_owned())
}

/// The real IMS over the TLS control channel.
#[derive(Debug, Clone)]
pub struct ImsRegistry {
    addr: SocketAddr,
    tls: TlsSettings,
    client: ControlClient,
    request_timeout: Duration,
    poll_interval: Duration,
}

impl ImsRegistry {
    /// Connect to the IMS described by `settings` (fails fast when it is
    /// unreachable).
    pub async fn connect(
        settings: Option<&ImsSettings>,
        request_timeout: Duration,
    ) -> Result<Self, ImsError> {
        let s = settings.ok_or(ImsError::NotConfigured)?;
        let tls =
            TlsSettings::from_ca_pem_file(&s.ca_cert, &s.server_name).map_err(ImsError::Tls)?;
        let addr = s.control;
        let client =
            match tokio::time::timeout(request_timeout, ControlClient::connect(addr, &tls)).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    return Err(ImsError::Unreachable {
                        addr,
                        reason: e.to_string(),
                    })
                }
                Err(_) => {
                    return Err(ImsError::Unreachable {
                        addr,
                        reason: format!("no TLS connection within {request_timeout:?}"),
                    })
                }
            };
        Ok(Self {
            addr,
            tls,
            client,
            request_timeout,
            poll_interval: Duration::from_millis(500),
        })
    }

    /// The standby MoA of `hoa` inside `prefix` that the IMS holds now.
    pub async fn standby_moa(
        &self,
        hoa: Ipv6Addr,
        prefix: Ipv6Network,
    ) -> Result<Ipv6Addr, ImsError> {
        self.timed(self.client.lookup(hoa))
            .await?
            .and_then(|r| standby_in(&r.binding, &prefix))
            .ok_or(ImsError::NoStandby { hoa, prefix })
    }

    /// Activates `moa`, a registered standby MoA of `hoa`, with the host
    /// token; returns whether the binding changed (`false`: already active).
    pub async fn activate_standby(
        &self,
        token: &str,
        hoa: Ipv6Addr,
        moa: Ipv6Addr,
    ) -> Result<bool, ImsError> {
        let (_, changed) = self
            .timed(self.client.activate_standby(token, hoa, moa))
            .await?;
        Ok(changed)
    }

    async fn timed<T>(
        &self,
        f: impl Future<Output = Result<T, ClientError>>,
    ) -> Result<T, ImsError> {
        match tokio::time::timeout(self.request_timeout, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(ClientError::Closed)) => Err(ImsError::Unreachable {
                addr: self.addr,
                reason: "control connection closed".into(),
            }),
            Ok(Err(source)) => Err(ImsError::Request {
                addr: self.addr,
                source,
            }),
            Err(_) => Err(ImsError::Unreachable {
                addr: self.addr,
                reason: format!("no answer within {:?}", self.request_timeout),
            }),
        }
    }
}

impl Registry for ImsRegistry {
    async fn site(&self, name: &str) -> Result<SiteInfo, ImsError> {
        let site = self
            .timed(self.client.site_get(name))
            .await?
            .ok_or_else(|| ImsError::UnknownSite(name.to_string()))?;
        site.validate().map_err(|e| ImsError::BadSite {
            name: name.to_string(),
            reason: e.to_string(),
        })?;
        Ok(site)
    }

    async fn wait_standby(
        &self,
        hoa: Ipv6Addr,
        prefix: Ipv6Network,
        timeout: Duration,
    ) -> Result<Ipv6Addr, ImsError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut watch = Watch::start(
            self.addr,
            self.tls.clone(),
            WatchFilter {
                hoas: vec![hoa],
                prefixes: vec![],
            },
            None,
        );
        let mut last = String::from("none");
        let mut poll = tokio::time::interval(self.poll_interval);
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(ImsError::StandbyTimeout { hoa, prefix, after: timeout, last });
                }
                item = watch.next() => {
                    if let Ok(WatchItem::Event(ev)) = item {
                        if let WatchChange::Changed { record } = ev.change {
                            if record.binding.hoa == hoa {
                                if let Some(moa) = standby_in(&record.binding, &prefix) {
                                    return Ok(moa);
                                }
                                last = format!("{:?}", record.binding);
                            }
                        }
                    }
                }
                _ = poll.tick() => {
                    // Fallback when the watch stream is slow or broken.
                    if let Ok(Ok(Some(rec))) = tokio::time::timeout(self.request_timeout, self.client.lookup(hoa)).await {
                        if let Some(moa) = standby_in(&rec.binding, &prefix) {
                            return Ok(moa);
                        }
                        last = format!("{:?}", rec.binding);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn host_token_file_must_be_private_and_non_empty() {
        use std::os::unix::fs::PermissionsExt as _;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("tok");
        std::fs::write(&p, "  s3cret-host-token\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_host_token(&p).unwrap(), "s3cret-host-token");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_host_token(&p).unwrap_err().to_string();
        assert!(e.contains("0644") && e.contains("tok"), "{e}");
        std::fs::write(&p, "\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(read_host_token(&p)
            .unwrap_err()
            .to_string()
            .contains("empty"));
        assert!(read_host_token(&d.path().join("missing")).is_err());
    }

    #[test]
    fn standby_must_be_inside_the_prefix() {
        let b = Binding {
            hoa: "2001:db8:100::10".parse().unwrap(),
            active: Some("2001:db8:a::10".parse().unwrap()),
            standby: vec![
                "2001:db8:c::10".parse().unwrap(),
                "2001:db8:b::5".parse().unwrap(),
            ],
            seq: 3,
            expires_unix: 0,
            key_id: 1,
        };
        let pb: Ipv6Network = "2001:db8:b::/64".parse().unwrap();
        assert_eq!(standby_in(&b, &pb), Some("2001:db8:b::5".parse().unwrap()));
        let pa: Ipv6Network = "2001:db8:a::/64".parse().unwrap();
        assert_eq!(standby_in(&b, &pa), None, "the active MoA does not count");
    }
}
