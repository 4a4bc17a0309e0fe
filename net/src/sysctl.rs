//! Per-interface IPv6 sysctls: `/proc/sys/net/ipv6/conf/<if>/<key>`.
//!
//! The values seen are those of the calling thread's network namespace.
//!
//! ```no_run
//! use mat6_net::sysctl::{self, Ipv6Key};
//! // Let a MoA be used during DAD (RFC 4429) on eth1.
//! sysctl::set(Some("eth1"), Ipv6Key::OptimisticDad, 1)?;
//! sysctl::set(Some("eth1"), Ipv6Key::UseOptimistic, 1)?;
//! assert_eq!(sysctl::get(Some("eth1"), Ipv6Key::OptimisticDad)?, 1);
//! # Ok::<(), mat6_net::sysctl::SysctlError>(())
//! ```

use std::io;
use std::path::PathBuf;

/// Root of the per-interface IPv6 settings.
pub const CONF_ROOT: &str = "/proc/sys/net/ipv6/conf";

/// Errors, naming the interface, key or file.
#[derive(Debug, thiserror::Error)]
pub enum SysctlError {
    /// The interface name cannot be a path component (empty, `/`, `..`, too long).
    #[error("invalid interface name {0:?}")]
    BadInterface(String),
    /// The key is not a plain file name.
    #[error("invalid sysctl key {0:?}")]
    BadKey(String),
    /// No such interface in this namespace (its conf directory is missing).
    #[error("no IPv6 configuration for interface {0} (missing, or IPv6 disabled)")]
    NoSuchInterface(String),
    /// Reading or writing the file failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// `"read"` or `"write"`.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The file did not hold an integer.
    #[error("{path} holds {value:?}, not an integer")]
    NotInteger {
        /// The file.
        path: PathBuf,
        /// Its content.
        value: String,
    },
}

/// The per-interface IPv6 keys mat6 touches. [`Ipv6Key::Other`] reaches the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ipv6Key {
    /// `accept_ra`: 0 off, 1 on unless forwarding, 2 on even with forwarding.
    AcceptRa,
    /// `accept_ra_defrtr`: learn the default router from RAs.
    AcceptRaDefrtr,
    /// `accept_ra_pinfo`: use prefix information from RAs.
    AcceptRaPinfo,
    /// `autoconf`: SLAAC addresses from prefix information.
    Autoconf,
    /// `forwarding`.
    Forwarding,
    /// `ignore_routes_with_linkdown`: skip routes whose link has no carrier.
    IgnoreRoutesWithLinkdown,
    /// `optimistic_dad`: RFC 4429 optimistic addresses.
    OptimisticDad,
    /// `use_optimistic`: prefer optimistic addresses as sources.
    UseOptimistic,
    /// `accept_dad`: 0 no DAD, 1 DAD, 2 DAD and disable IPv6 on failure.
    AcceptDad,
    /// `dad_transmits`: number of DAD probes.
    DadTransmits,
    /// `disable_ipv6`.
    DisableIpv6,
    /// `router_solicitations`: RSs the kernel sends (-1 = until an RA).
    RouterSolicitations,
    /// `keep_addr_on_down`: keep addresses when the link goes down.
    KeepAddrOnDown,
    /// `ndisc_notify`: send an unsolicited NA when the link or address changes.
    NdiscNotify,
    /// Any other key under the interface's directory.
    Other(&'static str),
}

impl Ipv6Key {
    /// The file name of the key.
    pub fn as_str(&self) -> &'static str {
        match self {
            Ipv6Key::AcceptRa => "accept_ra",
            Ipv6Key::AcceptRaDefrtr => "accept_ra_defrtr",
            Ipv6Key::AcceptRaPinfo => "accept_ra_pinfo",
            Ipv6Key::Autoconf => "autoconf",
            Ipv6Key::Forwarding => "forwarding",
            Ipv6Key::IgnoreRoutesWithLinkdown => "ignore_routes_with_linkdown",
            Ipv6Key::OptimisticDad => "optimistic_dad",
            Ipv6Key::UseOptimistic => "use_optimistic",
            Ipv6Key::AcceptDad => "accept_dad",
            Ipv6Key::DadTransmits => "dad_transmits",
            Ipv6Key::DisableIpv6 => "disable_ipv6",
            Ipv6Key::RouterSolicitations => "router_solicitations",
            Ipv6Key::KeepAddrOnDown => "keep_addr_on_down",
            Ipv6Key::NdiscNotify => "ndisc_notify",
            Ipv6Key::Other(k) => k,
        }
    }
}

fn valid_component(s: &str) -> bool {
    !s.is_empty() && s.len() <= 15 && s != "." && s != ".." && !s.contains('/') && !s.contains('\0')
}

/// The file of `key` for `ifname` (`None` = `all`).
pub fn path(ifname: Option<&str>, key: Ipv6Key) -> Result<PathBuf, SysctlError> {
    let ifname = ifname.unwrap_or("all");
    if !valid_component(ifname) {
        return Err(SysctlError::BadInterface(ifname.to_owned()));
    }
    let k = key.as_str();
    if k.is_empty() || k.contains('/') || k == "." || k == ".." {
        return Err(SysctlError::BadKey(k.to_owned()));
    }
    Ok(PathBuf::from(CONF_ROOT).join(ifname).join(k))
}

fn check_dir(ifname: Option<&str>) -> Result<(), SysctlError> {
    let name = ifname.unwrap_or("all");
    if PathBuf::from(CONF_ROOT).join(name).is_dir() {
        Ok(())
    } else {
        Err(SysctlError::NoSuchInterface(name.to_owned()))
    }
}

/// Reads a key as text (trimmed). `ifname` `None` = `all`; `Some("default")`
/// is the template for new interfaces.
pub fn get_str(ifname: Option<&str>, key: Ipv6Key) -> Result<String, SysctlError> {
    let p = path(ifname, key)?;
    check_dir(ifname)?;
    std::fs::read_to_string(&p)
        .map(|s| s.trim().to_owned())
        .map_err(|source| SysctlError::Io {
            op: "read",
            path: p,
            source,
        })
}

/// Reads an integer key.
pub fn get(ifname: Option<&str>, key: Ipv6Key) -> Result<i64, SysctlError> {
    let s = get_str(ifname, key)?;
    s.parse().map_err(|_| SysctlError::NotInteger {
        path: path(ifname, key).unwrap_or_default(),
        value: s,
    })
}

/// Writes a key as text.
pub fn set_str(ifname: Option<&str>, key: Ipv6Key, value: &str) -> Result<(), SysctlError> {
    let p = path(ifname, key)?;
    check_dir(ifname)?;
    std::fs::write(&p, value).map_err(|source| SysctlError::Io {
        op: "write",
        path: p,
        source,
    })
}

/// Writes an integer key.
pub fn set(ifname: Option<&str>, key: Ipv6Key, value: i64) -> Result<(), SysctlError> {
    set_str(ifname, key, &value.to_string())
}

/// Writes `value` and returns the previous value, so a caller can restore it.
pub fn replace(ifname: Option<&str>, key: Ipv6Key, value: i64) -> Result<i64, SysctlError> {
    let old = get(ifname, key)?;
    if old != value {
        set(ifname, key, value)?;
    }
    Ok(old)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn paths_and_bad_names() {
        assert_eq!(
            path(Some("eth1"), Ipv6Key::OptimisticDad).unwrap(),
            PathBuf::from("/proc/sys/net/ipv6/conf/eth1/optimistic_dad")
        );
        assert_eq!(
            path(None, Ipv6Key::Forwarding).unwrap(),
            PathBuf::from("/proc/sys/net/ipv6/conf/all/forwarding")
        );
        for bad in ["", "..", ".", "a/b", "averyveryverylongname"] {
            assert!(
                matches!(
                    path(Some(bad), Ipv6Key::AcceptRa),
                    Err(SysctlError::BadInterface(_))
                ),
                "{bad:?}"
            );
        }
        assert!(matches!(
            path(Some("eth0"), Ipv6Key::Other("../x")),
            Err(SysctlError::BadKey(_))
        ));
    }

    #[test]
    fn missing_interface_is_named() {
        let e = get(Some("m6nnosuchif0"), Ipv6Key::AcceptRa).unwrap_err();
        assert!(matches!(&e, SysctlError::NoSuchInterface(n) if n == "m6nnosuchif0"));
        assert!(e.to_string().contains("m6nnosuchif0"));
    }

    #[test]
    fn reads_lo() {
        // Every namespace has lo; reading is unprivileged.
        let v = get(Some("lo"), Ipv6Key::DisableIpv6).unwrap();
        assert!(v == 0 || v == 1, "{v}");
    }
}
