//! IMS data model: HoA → MoA bindings and the site registry.
//!
//! These are plain data types (serde) shared by the IMS server, its client and
//! the tools that read the site registry (host-prep).

use std::fmt;
use std::net::Ipv6Addr;
use std::str::FromStr;

use ipnetwork::Ipv6Network;
use serde::{Deserialize, Serialize};

/// Maximum number of standby MoAs a binding may carry (also the wire limit of
/// an update datagram).
pub const MAX_STANDBY: usize = 4;

/// A HoA → MoA binding as stored by the IMS.
///
/// `seq` only grows (per HoA); `expires_unix` is an absolute time in unix
/// seconds so it survives restarts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Binding {
    /// The Home Address applications use.
    pub hoa: Ipv6Addr,
    /// The Mobile Address currently carrying the HoA's traffic, if any.
    pub active: Option<Ipv6Addr>,
    /// Addresses prepared for a make-before-break move (at most [`MAX_STANDBY`]).
    pub standby: Vec<Ipv6Addr>,
    /// Sequence number of the update that produced this binding.
    pub seq: u64,
    /// Absolute expiry, unix seconds.
    pub expires_unix: u64,
    /// Id of the key that authenticated the update.
    pub key_id: u32,
}

impl Binding {
    /// True when `now_unix` is at or past the expiry.
    pub fn is_expired(&self, now_unix: u64) -> bool {
        now_unix >= self.expires_unix
    }
}

/// An Ethernet MAC address, serialized as `aa:bb:cc:dd:ee:ff`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MacAddr(pub [u8; 6]);

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Error parsing a MAC address string.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid MAC address {0:?} (expected aa:bb:cc:dd:ee:ff)")]
pub struct MacParseError(pub String);

impl FromStr for MacAddr {
    type Err = MacParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for b in out.iter_mut() {
            let part = parts.next().ok_or_else(|| MacParseError(s.to_owned()))?;
            if part.len() != 2 {
                return Err(MacParseError(s.to_owned()));
            }
            *b = u8::from_str_radix(part, 16).map_err(|_| MacParseError(s.to_owned()))?;
        }
        if parts.next().is_some() {
            return Err(MacParseError(s.to_owned()));
        }
        Ok(MacAddr(out))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Router Advertisement parameters a site wants announced (host-prep's RA
/// sender uses them; all optional fields fall back to host-prep defaults).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RaParams {
    /// Router lifetime in seconds.
    pub router_lifetime_s: u16,
    /// Prefix valid lifetime in seconds.
    pub prefix_valid_lifetime_s: u32,
    /// Prefix preferred lifetime in seconds.
    pub prefix_preferred_lifetime_s: u32,
    /// Interval between unsolicited RAs, milliseconds.
    pub interval_ms: u32,
    /// Link MTU to announce, if any.
    #[serde(default)]
    pub mtu: Option<u32>,
}

impl Default for RaParams {
    fn default() -> Self {
        RaParams {
            router_lifetime_s: 1800,
            prefix_valid_lifetime_s: 86400,
            prefix_preferred_lifetime_s: 14400,
            interval_ms: 1000,
            mtu: None,
        }
    }
}

/// A site in the registry (the "Migration Control Server" role of the MAT
/// design): what a VM arriving at this site will see on its link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteInfo {
    /// Unique site name.
    pub name: String,
    /// The site's on-link prefix (usually a /64).
    pub prefix: Ipv6Network,
    /// The site gateway's link-local address.
    pub gateway_ll: Ipv6Addr,
    /// The site gateway's MAC address.
    pub gateway_mac: MacAddr,
    /// Optional RA parameters.
    #[serde(default)]
    pub ra: Option<RaParams>,
}

/// Errors validating a [`SiteInfo`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SiteError {
    /// The name is empty, too long or has characters outside `[A-Za-z0-9._-]`.
    #[error("invalid site name {0:?}: use 1-64 characters from [A-Za-z0-9._-]")]
    BadName(String),
    /// The gateway address is not link-local (fe80::/10).
    #[error("gateway address {0} is not link-local (fe80::/10)")]
    GatewayNotLinkLocal(Ipv6Addr),
}

impl SiteInfo {
    /// Checks the invariants an operator could get wrong.
    pub fn validate(&self) -> Result<(), SiteError> {
        let ok_name = !self.name.is_empty()
            && self.name.len() <= 64
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
        if !ok_name {
            return Err(SiteError::BadName(self.name.clone()));
        }
        if (self.gateway_ll.segments()[0] & 0xffc0) != 0xfe80 {
            return Err(SiteError::GatewayNotLinkLocal(self.gateway_ll));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn mac_round_trip_and_errors() {
        let m: MacAddr = "02:00:5e:10:00:01".parse().unwrap();
        assert_eq!(m.0, [2, 0, 0x5e, 0x10, 0, 1]);
        assert_eq!(m.to_string(), "02:00:5e:10:00:01");
        assert!("02:00:5e:10:00".parse::<MacAddr>().is_err());
        assert!("02:00:5e:10:00:01:02".parse::<MacAddr>().is_err());
        assert!("zz:00:5e:10:00:01".parse::<MacAddr>().is_err());
    }

    #[test]
    fn site_serde_and_validate() {
        let s = SiteInfo {
            name: "site-b".into(),
            prefix: "2001:db8:b::/64".parse().unwrap(),
            gateway_ll: "fe80::1".parse().unwrap(),
            gateway_mac: "02:00:00:00:0b:01".parse().unwrap(),
            ra: Some(RaParams::default()),
        };
        s.validate().unwrap();
        let j = serde_json::to_string(&s).unwrap();
        assert!(j.contains("\"02:00:00:00:0b:01\""), "{j}");
        let back: SiteInfo = serde_json::from_str(&j).unwrap();
        assert_eq!(back, s);
        let mut bad = s.clone();
        bad.gateway_ll = "2001:db8::1".parse().unwrap();
        assert_eq!(
            bad.validate(),
            Err(SiteError::GatewayNotLinkLocal(bad.gateway_ll))
        );
        bad = s;
        bad.name = "a b".into();
        assert!(matches!(bad.validate(), Err(SiteError::BadName(_))));
    }
}
