//! Bridge helpers for host-prep: look up a bridge, check that it has no
//! uplink, make it impersonate a destination site's gateway (the gateway's
//! MAC as bridge MAC, the gateway's link-local address with `nodad`), and put
//! everything back as it was.
//!
//! Built on [`crate::netlink::Netlink`].

use std::net::Ipv6Addr;

use futures::TryStreamExt;
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo as NlLinkInfo};
use rtnetlink::LinkUnspec;

use crate::netlink::{fmt_mac, AddrSpec, LinkInfo, Netlink, NetlinkError};
use crate::nft::{self, Family, NftError};

/// Errors of the bridge helpers; each names the bridge.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// No interface with this name.
    #[error("bridge {0} does not exist")]
    Missing(String),
    /// The interface exists but is not a bridge.
    #[error("{0} is not a bridge")]
    NotABridge(String),
    /// The bridge has a port that is not allowed (an uplink): preparing it
    /// would announce the destination's gateway on a real network.
    #[error("bridge {bridge} has port {port}, which is not the VM's tap: refusing to impersonate a gateway on a bridge with an uplink")]
    Uplink {
        /// The bridge.
        bridge: String,
        /// The offending port.
        port: String,
    },
    /// The filter that keeps the bridge's traffic on the link could not be
    /// installed or removed.
    #[error("bridge {bridge}: nftables filter: {source}")]
    Filter {
        /// The bridge.
        bridge: String,
        /// The error.
        #[source]
        source: NftError,
    },
    /// A netlink request failed.
    #[error("bridge {bridge}: {source}")]
    Netlink {
        /// The bridge (or port) concerned.
        bridge: String,
        /// The error.
        #[source]
        source: NetlinkError,
    },
}

fn nl_err(bridge: &str) -> impl FnOnce(NetlinkError) -> BridgeError {
    let bridge = bridge.to_string();
    move |source| BridgeError::Netlink { bridge, source }
}

/// The bridge named `name`, which must exist and be a bridge.
pub async fn require(nl: &Netlink, name: &str) -> Result<LinkInfo, BridgeError> {
    let mut s = nl
        .handle()
        .link()
        .get()
        .match_name(name.to_owned())
        .execute();
    let msg = match s.try_next().await {
        Ok(Some(m)) => m,
        Ok(None) => return Err(BridgeError::Missing(name.to_string())),
        Err(e) => {
            let e = NetlinkError::Request {
                op: "get link",
                target: name.to_string(),
                source: e,
            };
            return Err(if e.is_not_found() || e.errno() == Some(19) {
                BridgeError::Missing(name.to_string())
            } else {
                nl_err(name)(e)
            });
        }
    };
    let is_bridge = msg.attributes.iter().any(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos
            .iter()
            .any(|i| matches!(i, NlLinkInfo::Kind(InfoKind::Bridge))),
        _ => false,
    });
    if !is_bridge {
        return Err(BridgeError::NotABridge(name.to_string()));
    }
    Ok(LinkInfo::from_message(&msg))
}

/// The ports of the bridge with index `bridge`.
pub async fn ports(nl: &Netlink, bridge: &LinkInfo) -> Result<Vec<LinkInfo>, BridgeError> {
    let links = nl.links().await.map_err(nl_err(&bridge.name))?;
    Ok(links
        .into_iter()
        .filter(|l| l.controller == Some(bridge.ifindex))
        .collect())
}

/// Fails if the bridge has a port whose name is not in `allowed`.
pub async fn check_no_uplink(
    nl: &Netlink,
    bridge: &LinkInfo,
    allowed: &[&str],
) -> Result<(), BridgeError> {
    for p in ports(nl, bridge).await? {
        if !allowed.contains(&p.name.as_str()) {
            return Err(BridgeError::Uplink {
                bridge: bridge.name.clone(),
                port: p.name,
            });
        }
    }
    Ok(())
}

/// Make `port` a port of `bridge` and set it up.
pub async fn attach(nl: &Netlink, port: &str, bridge: &str) -> Result<(), BridgeError> {
    let br = require(nl, bridge).await?;
    let p = nl.link_by_name(port).await.map_err(nl_err(port))?;
    if p.controller != Some(br.ifindex) {
        nl.handle()
            .link()
            .set(
                LinkUnspec::new_with_index(p.ifindex)
                    .controller(br.ifindex)
                    .build(),
            )
            .execute()
            .await
            .map_err(|source| BridgeError::Netlink {
                bridge: bridge.to_string(),
                source: NetlinkError::Request {
                    op: "set master",
                    target: format!("{port} -> {bridge}"),
                    source,
                },
            })?;
    }
    nl.set_up(p.ifindex).await.map_err(nl_err(port))?;
    Ok(())
}

/// What a bridge looked like before [`impersonate_gateway`], to put it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Impersonation {
    /// Bridge name.
    pub bridge: String,
    /// Bridge ifindex.
    pub ifindex: u32,
    /// MAC before (restored on [`restore`]).
    pub old_mac: Option<[u8; 6]>,
    /// MAC now (the gateway's).
    pub gateway_mac: [u8; 6],
    /// Whether the bridge was administratively up before.
    pub was_up: bool,
    /// The gateway link-local address added.
    pub gateway_ll: Ipv6Addr,
    /// Whether the address was added by us (false: it was already there and
    /// stays on restore).
    pub added_addr: bool,
}

/// Make `bridge` look like the link behind a gateway with link-local address
/// `gateway_ll` and MAC `gateway_mac`: bridge MAC = gateway MAC, the gateway's
/// link-local address (nodad, usable at once), link up. Checks first that
/// the bridge exists and has no port outside `allowed_ports`. On error,
/// whatever was already changed is put back.
pub async fn impersonate_gateway(
    nl: &Netlink,
    bridge: &str,
    gateway_ll: Ipv6Addr,
    gateway_mac: [u8; 6],
    allowed_ports: &[&str],
) -> Result<Impersonation, BridgeError> {
    let br = require(nl, bridge).await?;
    check_no_uplink(nl, &br, allowed_ports).await?;
    let existing = nl.addrs(Some(br.ifindex)).await.map_err(nl_err(bridge))?;
    let had_addr = existing.iter().any(|a| a.addr == gateway_ll);
    let mut imp = Impersonation {
        bridge: bridge.to_string(),
        ifindex: br.ifindex,
        old_mac: br.mac,
        gateway_mac,
        was_up: br.admin_up,
        gateway_ll,
        added_addr: false,
    };
    let result = async {
        if br.mac != Some(gateway_mac) {
            nl.set_mac(br.ifindex, gateway_mac)
                .await
                .map_err(nl_err(bridge))?;
            tracing::debug!(bridge, mac = %fmt_mac(&gateway_mac), "bridge MAC set");
        }
        if !br.admin_up {
            nl.set_up(br.ifindex).await.map_err(nl_err(bridge))?;
        }
        if !had_addr {
            nl.addr_add(br.ifindex, &AddrSpec::new(gateway_ll, 64).nodad())
                .await
                .map_err(nl_err(bridge))?;
            imp.added_addr = true;
        }
        Ok::<(), BridgeError>(())
    }
    .await;
    match result {
        Ok(()) => Ok(imp),
        Err(e) => {
            if let Err(re) = restore(nl, &imp).await {
                tracing::warn!(bridge, error = %re, "rollback after failed preparation failed");
            }
            Err(e)
        }
    }
}

/// Undo [`impersonate_gateway`]: remove the address if we added it, restore
/// the MAC and the admin state. Idempotent.
pub async fn restore(nl: &Netlink, imp: &Impersonation) -> Result<(), BridgeError> {
    let bridge = imp.bridge.as_str();
    let br = require(nl, bridge).await?;
    let mut first_err = None;
    if imp.added_addr {
        if let Err(e) = nl.addr_del(br.ifindex, imp.gateway_ll, 64).await {
            // Already gone: ENOENT/ESRCH, or EADDRNOTAVAIL (99) for an
            // address no longer on the link.
            if !e.is_not_found() && e.errno() != Some(99) {
                first_err.get_or_insert(nl_err(bridge)(e));
            }
        }
    }
    if let Some(mac) = imp.old_mac {
        if br.mac != Some(mac) {
            if let Err(e) = nl.set_mac(br.ifindex, mac).await {
                first_err.get_or_insert(nl_err(bridge)(e));
            }
        }
    }
    if !imp.was_up && br.admin_up {
        if let Err(e) = nl.set_down(br.ifindex).await {
            first_err.get_or_insert(nl_err(bridge)(e));
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Name of the nftables table (family `ip6`) that [`isolate`] installs for
/// `bridge`.
pub fn isolation_table(bridge: &str) -> String {
    let clean: String = bridge
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("mat6_nu_{clean}")
}

/// The ruleset of [`isolate`]: on a bridge that impersonates a gateway, the
/// host's own stack accepts Neighbor Discovery (the guest resolves the
/// gateway, solicits routers) and drops every other IPv6 packet sent to
/// it, so nothing the guest sends towards the impersonated gateway (e.g.
/// guest-agent's bicast copies) is forwarded by a host that routes. Replaces
/// a table left by a crash.
pub fn isolation_ruleset(bridge: &str) -> Result<String, NftError> {
    if bridge.is_empty()
        || bridge.len() > 15
        || bridge
            .chars()
            .any(|c| c == '"' || c == '\\' || c.is_control())
    {
        return Err(NftError::BadArgument(bridge.to_owned()));
    }
    let t = isolation_table(bridge);
    Ok(format!(
        "add table ip6 {t}\n\
         delete table ip6 {t}\n\
         table ip6 {t} {{\n\
         \tchain prerouting {{\n\
         \t\ttype filter hook prerouting priority raw; policy accept;\n\
         \t\tiifname \"{bridge}\" icmpv6 type {{ nd-router-solicit, nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert }} accept\n\
         \t\tiifname \"{bridge}\" drop\n\
         \t}}\n\
         }}\n"
    ))
}

/// Installs [`isolation_ruleset`] for `bridge`.
pub async fn isolate(bridge: &str) -> Result<(), BridgeError> {
    let err = |source| BridgeError::Filter {
        bridge: bridge.to_string(),
        source,
    };
    let rules = isolation_ruleset(bridge).map_err(err)?;
    nft::apply(&rules).await.map_err(err)?;
    Ok(())
}

/// Removes what [`isolate`] installed (no error if it is gone already).
pub async fn unisolate(bridge: &str) -> Result<(), BridgeError> {
    nft::delete_table(Family::Ip6, &isolation_table(bridge))
        .await
        .map(|_| ())
        .map_err(|source| BridgeError::Filter {
            bridge: bridge.to_string(),
            source,
        })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn isolation_accepts_nd_and_drops_the_rest() {
        let r = isolation_ruleset("br0-nu").unwrap();
        assert!(r.starts_with("add table ip6 mat6_nu_br0_nu\ndelete table ip6 mat6_nu_br0_nu\n"));
        let nd = r
            .find("iifname \"br0-nu\" icmpv6 type { nd-router-solicit")
            .unwrap();
        let drop = r.find("iifname \"br0-nu\" drop").unwrap();
        assert!(nd < drop);
        assert!(r.contains("hook prerouting priority raw; policy accept;"));
        for bad in ["", "a\"b", "a\\b", "sixteen-chars-xx"] {
            assert!(isolation_ruleset(bad).is_err(), "{bad:?}");
        }
    }
}
