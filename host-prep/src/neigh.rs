//! Seeding the destination gateway's neighbour cache with the VM's standby
//! MoA before the VM resumes.
//!
//! After a prepared migration the first packet for the standby MoA reaches
//! the destination gateway (from a peer that just learnt the new binding)
//! when the gateway has no neighbour entry for it: the gateway queues the
//! packet and multicasts a Neighbor Solicitation, and the just-resumed
//! guest answers it tens of milliseconds later (its translated code is
//! cold under TCG, and on any hypervisor it has a backlog). A Neighbor
//! Solicitation *from* the MoA, carrying the VM NIC's MAC as source
//! link-layer option, makes the gateway create that entry (STALE, RFC 4861
//! §7.2.3) so it forwards at once; its own unicast reachability probe comes
//! seconds later, when the guest has long caught up.
//!
//! The destination host sends that solicitation on its real bridge while
//! the migration runs, on the VM's behalf: the MoA is the one the IMS holds
//! as the VM's standby on this site, and the MAC is recovered from the
//! MoA's EUI-64 identifier (the only kind guest-agent forms). The Ethernet
//! source is the VM's MAC too, so a physical switch between the host and
//! the gateway learns the port the VM is about to use. The gateway's answer
//! goes to the VM's MAC, where nobody listens yet.

use std::net::Ipv6Addr;

use mat6_net::icmp6::{self, Icmp6Error, PacketSocket};
use mat6_proto::binding::SiteInfo;
use mat6_proto::mobility::mac_of_moa;
use mat6_proto::ndp::{NdpError, NdpRepr};

/// Why the gateway's neighbour cache was not seeded.
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    /// The standby MoA's interface identifier is not an EUI-64 one.
    #[error("standby MoA {0} has no EUI-64 interface identifier: cannot tell the VM's MAC")]
    NotEui64(Ipv6Addr),
    /// The frame could not be built.
    #[error("building the neighbour solicitation: {0}")]
    Frame(#[from] NdpError),
    /// The socket or the send failed.
    #[error(transparent)]
    Io(#[from] Icmp6Error),
}

/// The Ethernet frame: a unicast Neighbor Solicitation from `moa` (and the
/// VM's MAC) to the site gateway, asking for the gateway's own link-local
/// address.
pub fn seed_frame(site: &SiteInfo, moa: Ipv6Addr) -> Result<Vec<u8>, SeedError> {
    let vm_mac = mac_of_moa(moa).ok_or(SeedError::NotEui64(moa))?;
    let ns = NdpRepr::NeighborSolicit {
        target: site.gateway_ll,
        source_ll: Some(vm_mac),
    };
    Ok(icmp6::ndp_frame(
        &ns,
        vm_mac,
        Some(site.gateway_mac.0),
        moa,
        site.gateway_ll,
        255,
    )?)
}

/// Sends [`seed_frame`] out of the bridge `ifindex`.
pub async fn seed_gateway(ifindex: u32, site: &SiteInfo, moa: Ipv6Addr) -> Result<(), SeedError> {
    let frame = seed_frame(site, moa)?;
    let sock = PacketSocket::bind(ifindex)?;
    sock.send_frame(&frame).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use mat6_proto::binding::MacAddr;
    use mat6_proto::mobility::moa_for;

    fn site() -> SiteInfo {
        SiteInfo {
            name: "B".into(),
            prefix: "2001:db8:b::/64".parse().unwrap(),
            gateway_ll: "fe80::1".parse().unwrap(),
            gateway_mac: MacAddr([0x02, 0, 0, 0, 0x0b, 0x01]),
            ra: None,
        }
    }

    #[test]
    fn frame_is_a_solicitation_from_the_moa_with_the_vm_mac() {
        let vm_mac = [0x52, 0x54, 0, 0x6d, 0x36, 0x11];
        let moa = moa_for("2001:db8:b::".parse().unwrap(), vm_mac);
        let f = seed_frame(&site(), moa).unwrap();
        assert_eq!(
            &f[0..6],
            &[0x02, 0, 0, 0, 0x0b, 0x01],
            "to the gateway's MAC"
        );
        assert_eq!(&f[6..12], &vm_mac, "from the VM's MAC");
        let p = icmp6::parse_frame(&f, 7).unwrap();
        assert_eq!(p.src, moa);
        assert_eq!(p.dst, "fe80::1".parse::<Ipv6Addr>().unwrap());
        assert_eq!(p.hop_limit, 255);
        assert_eq!(
            p.repr,
            NdpRepr::NeighborSolicit {
                target: "fe80::1".parse().unwrap(),
                source_ll: Some(vm_mac),
            }
        );
    }

    #[test]
    fn a_moa_without_eui64_identifier_is_refused() {
        let moa: Ipv6Addr = "2001:db8:b::1234".parse().unwrap();
        assert!(matches!(
            seed_frame(&site(), moa),
            Err(SeedError::NotEui64(m)) if m == moa
        ));
    }
}
