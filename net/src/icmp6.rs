//! Sockets for Neighbor Discovery.
//!
//! * [`NdpReceiver`]: an `AF_PACKET` socket bound to one interface (so it
//!   sees the link layer: the sender's MAC), with a classic BPF filter that
//!   passes only incoming IPv6 frames carrying ICMPv6 NDP (types 133–136) or an
//!   extension header. Every frame is then checked in user space by
//!   [`parse_frame`]: frames with a **fragment header** are dropped (RFC 6980),
//!   so are NDP messages whose **hop limit is not 255** and Router
//!   Advertisements whose **source is not link-local** (RFC 4861 §6.1.2);
//!   the ICMPv6 bytes then go through [`mat6_proto::ndp::NdpRepr::parse`]
//!   (code, checksum, options).
//! * [`NdpSender`]: a raw ICMPv6 socket bound to one interface, hop limit 255
//!   for unicast and multicast, that sends an [`NdpRepr`] from a chosen source
//!   address (`IPV6_PKTINFO`) to `ff02::1`, `ff02::2`, a solicited-node group
//!   or a unicast address. The kernel fills in the checksum.
//! * [`PacketSocket`]: the bound `AF_PACKET` socket itself, to send or
//!   receive whole Ethernet frames (tests craft malformed RAs with it; an RA
//!   sender that must use a MAC other than the interface's can too).
//!
//! All are tokio-based (`AsyncFd`) and live in the network namespace of the
//! thread that created them. Creating them needs `CAP_NET_RAW`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), mat6_net::icmp6::Icmp6Error> {
//! use mat6_net::icmp6::{NdpReceiver, NdpSender, ALL_ROUTERS};
//! use mat6_proto::ndp::NdpRepr;
//! let mut rx = NdpReceiver::bind(3)?;
//! let tx = NdpSender::bind(3)?;
//! tx.send(&NdpRepr::RouterSolicit { source_ll: Some([2, 0, 0, 0, 0, 1]) }, None, ALL_ROUTERS).await?;
//! let ra = rx.recv().await?;
//! println!("{:?} from {} ({:02x?})", ra.repr, ra.src, ra.src_mac);
//! # Ok(()) }
//! ```

use std::io::{self, IoSlice};
use std::net::{Ipv6Addr, SocketAddrV6};
use std::num::NonZeroU32;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use etherparse::{EtherType, Ethernet2Slice, IpNumber, Ipv6ExtensionSlice, Ipv6Slice};
use mat6_proto::ndp::{is_link_local, NdpError, NdpRepr};
use nix::sys::socket::{
    getsockname, recvfrom, sendmsg, ControlMessage, LinkAddr, MsgFlags, SockaddrIn6,
    SockaddrStorage,
};
use socket2::{Domain, Protocol, SockFilter, Socket, Type};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// `ff02::1`, all nodes.
pub const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
/// `ff02::2`, all routers.
pub const ALL_ROUTERS: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 2);

/// EtherType of IPv6.
pub const ETH_P_IPV6: u16 = 0x86dd;

const PACKET_OUTGOING: u8 = 4;
const ICMPV6: u8 = 58;

/// The solicited-node multicast group of `addr` (`ff02::1:ffXX:XXXX`).
pub fn solicited_node(addr: &Ipv6Addr) -> Ipv6Addr {
    let o = addr.octets();
    Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(o[13]),
        (u16::from(o[14]) << 8) | u16::from(o[15]),
    )
}

/// The Ethernet multicast MAC of an IPv6 multicast group (`33:33:` + low 32 bits).
pub fn multicast_mac(group: &Ipv6Addr) -> [u8; 6] {
    let o = group.octets();
    [0x33, 0x33, o[12], o[13], o[14], o[15]]
}

/// Errors of the socket layer, naming the interface.
#[derive(Debug, thiserror::Error)]
pub enum Icmp6Error {
    /// Creating or configuring the socket failed (needs CAP_NET_RAW).
    #[error("{what} on ifindex {ifindex}: {source}")]
    Socket {
        /// What was being set up.
        what: &'static str,
        /// Interface index.
        ifindex: u32,
        /// The OS error.
        source: io::Error,
    },
    /// Receiving failed.
    #[error("receive on ifindex {ifindex}: {source}")]
    Recv {
        /// Interface index.
        ifindex: u32,
        /// The OS error.
        source: io::Error,
    },
    /// Sending failed.
    #[error("send to {dst} on ifindex {ifindex}: {source}")]
    Send {
        /// Destination (address or `frame`).
        dst: String,
        /// Interface index.
        ifindex: u32,
        /// The OS error.
        source: io::Error,
    },
    /// The message could not be written.
    #[error("cannot encode NDP message: {0}")]
    Encode(#[from] NdpError),
    /// Interface index 0 is not an interface.
    #[error("interface index 0 is invalid")]
    NoInterface,
    /// The interface was deleted or moved to another namespace: open a new
    /// socket on its successor.
    #[error("interface ifindex {ifindex} is gone")]
    InterfaceGone {
        /// Interface index it had.
        ifindex: u32,
    },
}

/// Why a received frame was not handed to the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DropReason {
    /// Not an Ethernet II frame carrying IPv6 (or truncated).
    #[error("not an IPv6 frame")]
    NotIpv6,
    /// The IPv6 header or its extension headers did not parse.
    #[error("malformed IPv6 packet")]
    Malformed,
    /// A fragment header was present (RFC 6980: NDP must not be fragmented).
    #[error("fragment header present")]
    Fragment,
    /// Not ICMPv6 after the extension headers.
    #[error("not ICMPv6 (next header {0})")]
    NotIcmpv6(u8),
    /// ICMPv6 but not an NDP type this module handles.
    #[error("ICMPv6 type {0} is not NDP")]
    NotNdp(u8),
    /// Hop limit not 255: the message crossed a router, or was forged off-link.
    #[error("hop limit {0}, must be 255")]
    HopLimit(u8),
    /// A Router Advertisement from a non-link-local source.
    #[error("router advertisement from non-link-local {0}")]
    NonLinkLocalRouter(Ipv6Addr),
    /// The NDP message itself was rejected (checksum, code, options).
    #[error("bad NDP message: {0}")]
    Ndp(NdpError),
}

/// One accepted NDP message and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NdpPacketIn {
    /// The message.
    pub repr: NdpRepr,
    /// IPv6 source address.
    pub src: Ipv6Addr,
    /// IPv6 destination address.
    pub dst: Ipv6Addr,
    /// Ethernet source MAC.
    pub src_mac: [u8; 6],
    /// Interface it arrived on.
    pub ifindex: u32,
    /// IPv6 hop limit (always 255 once accepted).
    pub hop_limit: u8,
}

/// Checks one Ethernet frame received on `ifindex` and parses its NDP
/// message. Pure: used by [`NdpReceiver`] and by tests and fuzzers.
pub fn parse_frame(frame: &[u8], ifindex: u32) -> Result<NdpPacketIn, DropReason> {
    let eth = Ethernet2Slice::from_slice_without_fcs(frame).map_err(|_| DropReason::NotIpv6)?;
    if eth.ether_type() != EtherType::IPV6 {
        return Err(DropReason::NotIpv6);
    }
    let ip = Ipv6Slice::from_slice(eth.payload().payload).map_err(|e| {
        // A fragment that etherparse cannot follow is still a fragment.
        if first_is_fragment(eth.payload().payload) {
            DropReason::Fragment
        } else {
            tracing::trace!(error = %e, "malformed IPv6");
            DropReason::Malformed
        }
    })?;
    if ip
        .extensions()
        .clone()
        .into_iter()
        .any(|x| matches!(x, Ipv6ExtensionSlice::Fragment(_)))
        || ip.payload().fragmented
        || ip.payload().ip_number == IpNumber::IPV6_FRAGMENTATION_HEADER
    {
        return Err(DropReason::Fragment);
    }
    let next = ip.payload().ip_number.0;
    if next != ICMPV6 {
        return Err(DropReason::NotIcmpv6(next));
    }
    let icmp = ip.payload().payload;
    let kind = icmp.first().copied().ok_or(DropReason::Malformed)?;
    if !(133..=137).contains(&kind) || kind == 137 {
        return Err(DropReason::NotNdp(kind));
    }
    let hdr = ip.header();
    let (src, dst, hop_limit) = (hdr.source_addr(), hdr.destination_addr(), hdr.hop_limit());
    if hop_limit != 255 {
        return Err(DropReason::HopLimit(hop_limit));
    }
    if kind == mat6_proto::ndp::TYPE_ROUTER_ADVERT && !is_link_local(&src) {
        return Err(DropReason::NonLinkLocalRouter(src));
    }
    let repr = NdpRepr::parse(icmp, src, dst).map_err(|e| match e {
        NdpError::NonLinkLocalRouter(a) => DropReason::NonLinkLocalRouter(a),
        e => DropReason::Ndp(e),
    })?;
    Ok(NdpPacketIn {
        repr,
        src,
        dst,
        src_mac: eth.source(),
        ifindex,
        hop_limit,
    })
}

/// Builds a whole Ethernet frame carrying `repr` (IPv6 header, ICMPv6 with
/// checksum). `dst_mac` `None` = the multicast MAC of `dst` (use it for
/// multicast destinations). For sending through a [`PacketSocket`] when the
/// Ethernet source must be chosen, and for tests.
pub fn ndp_frame(
    repr: &NdpRepr,
    src_mac: [u8; 6],
    dst_mac: Option<[u8; 6]>,
    src: Ipv6Addr,
    dst: Ipv6Addr,
    hop_limit: u8,
) -> Result<Vec<u8>, NdpError> {
    build_frame(repr, src_mac, dst_mac, src, dst, hop_limit, false)
}

/// Like [`ndp_frame`] with an atomic fragment header (offset 0, M=0) before
/// the ICMPv6 message: what RFC 6980 says receivers must drop. Negative tests
/// only.
pub fn ndp_frame_with_fragment_header(
    repr: &NdpRepr,
    src_mac: [u8; 6],
    src: Ipv6Addr,
    dst: Ipv6Addr,
) -> Result<Vec<u8>, NdpError> {
    build_frame(repr, src_mac, None, src, dst, 255, true)
}

fn build_frame(
    repr: &NdpRepr,
    src_mac: [u8; 6],
    dst_mac: Option<[u8; 6]>,
    src: Ipv6Addr,
    dst: Ipv6Addr,
    hop_limit: u8,
    fragment: bool,
) -> Result<Vec<u8>, NdpError> {
    let icmp = repr.to_bytes(src, dst)?;
    let ext_len = if fragment { 8 } else { 0 };
    let payload_len = u16::try_from(icmp.len() + ext_len).map_err(|_| NdpError::OptionTooLong)?;
    let mut f = Vec::with_capacity(14 + 40 + usize::from(payload_len));
    f.extend_from_slice(&dst_mac.unwrap_or_else(|| multicast_mac(&dst)));
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
    f.extend_from_slice(&[0x60, 0, 0, 0]); // version 6, class 0, flow 0
    f.extend_from_slice(&payload_len.to_be_bytes());
    f.push(if fragment { 44 } else { ICMPV6 });
    f.push(hop_limit);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    if fragment {
        // next header, reserved, offset 0 / M=0, identification
        f.extend_from_slice(&[ICMPV6, 0, 0, 0, 0, 0, 0x12, 0x34]);
    }
    f.extend_from_slice(&icmp);
    Ok(f)
}

fn first_is_fragment(ipv6: &[u8]) -> bool {
    ipv6.get(6) == Some(&44)
}

/// Counters of an [`NdpReceiver`].
#[derive(Debug, Default)]
pub struct NdpRxStats {
    /// Messages handed to the caller.
    pub accepted: AtomicU64,
    /// Dropped: fragment header.
    pub fragment: AtomicU64,
    /// Dropped: hop limit not 255.
    pub hop_limit: AtomicU64,
    /// Dropped: RA from a non-link-local source.
    pub non_link_local: AtomicU64,
    /// Dropped: bad NDP message (checksum, code, options).
    pub bad_ndp: AtomicU64,
    /// Dropped: anything else (not NDP, malformed IPv6).
    pub other: AtomicU64,
}

impl NdpRxStats {
    fn count(&self, r: &Result<NdpPacketIn, DropReason>) {
        let c = match r {
            Ok(_) => &self.accepted,
            Err(DropReason::Fragment) => &self.fragment,
            Err(DropReason::HopLimit(_)) => &self.hop_limit,
            Err(DropReason::NonLinkLocalRouter(_)) => &self.non_link_local,
            Err(DropReason::Ndp(_)) => &self.bad_ndp,
            Err(_) => &self.other,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Total dropped frames.
    pub fn dropped(&self) -> u64 {
        self.fragment.load(Ordering::Relaxed)
            + self.hop_limit.load(Ordering::Relaxed)
            + self.non_link_local.load(Ordering::Relaxed)
            + self.bad_ndp.load(Ordering::Relaxed)
            + self.other.load(Ordering::Relaxed)
    }
}

/// A frame received on a [`PacketSocket`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameIn {
    /// Bytes received (Ethernet header included).
    pub len: usize,
    /// Interface it arrived on.
    pub ifindex: u32,
    /// `PACKET_HOST`, `PACKET_MULTICAST`, `PACKET_OUTGOING`, ...
    pub pkttype: u8,
}

impl FrameIn {
    /// Was this frame sent by this host (AF_PACKET sees outgoing frames too)?
    pub fn outgoing(&self) -> bool {
        self.pkttype == PACKET_OUTGOING
    }
}

/// An `AF_PACKET`/`SOCK_RAW` socket bound to one interface and one EtherType.
#[derive(Debug)]
pub struct PacketSocket {
    fd: AsyncFd<Socket>,
    ifindex: u32,
}

impl PacketSocket {
    /// Binds to `ifindex` for IPv6 frames.
    pub fn bind(ifindex: u32) -> Result<PacketSocket, Icmp6Error> {
        Self::bind_with_filter(ifindex, &[])
    }

    /// Binds to `ifindex` for IPv6 frames, with a classic BPF filter attached
    /// before the bind so no frame slips past it.
    pub fn bind_with_filter(
        ifindex: u32,
        filter: &[SockFilter],
    ) -> Result<PacketSocket, Icmp6Error> {
        if ifindex == 0 {
            return Err(Icmp6Error::NoInterface);
        }
        let err = |what| {
            move |source| Icmp6Error::Socket {
                what,
                ifindex,
                source,
            }
        };
        // Protocol 0: receives nothing until bound, so the filter is in place first.
        let s = Socket::new(Domain::PACKET, Type::RAW.nonblocking().cloexec(), None)
            .map_err(err("AF_PACKET socket"))?;
        if !filter.is_empty() {
            s.attach_filter(filter).map_err(err("attach BPF filter"))?;
        }
        sys::bind_packet(&s, ifindex, ETH_P_IPV6).map_err(err("bind AF_PACKET"))?;
        let fd = sys::async_fd(s).map_err(err("register with tokio"))?;
        Ok(PacketSocket { fd, ifindex })
    }

    /// The interface index.
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// The interface's current MAC address (from the bound socket's name).
    pub fn mac(&self) -> Result<[u8; 6], Icmp6Error> {
        let ifindex = self.ifindex;
        // The kernel returns a sockaddr_ll shortened to the MAC's length,
        // which `LinkAddr` refuses; the storage type pads it.
        let addr = getsockname::<SockaddrStorage>(self.fd.get_ref().as_raw_fd()).map_err(|e| {
            Icmp6Error::Socket {
                what: "getsockname",
                ifindex,
                source: io::Error::from(e),
            }
        })?;
        addr.as_link_addr()
            .and_then(LinkAddr::addr)
            .ok_or(Icmp6Error::Socket {
                what: "read MAC address",
                ifindex,
                source: io::Error::from(io::ErrorKind::InvalidData),
            })
    }

    /// Receives one frame into `buf` (frames longer than `buf` are truncated).
    ///
    /// When the interface goes administratively down the socket waits for it
    /// to come back; if it is deleted or moved to another namespace instead,
    /// this returns [`Icmp6Error::InterfaceGone`] (checked every 500 ms while
    /// the interface is down).
    pub async fn recv_frame(&self, buf: &mut [u8]) -> Result<FrameIn, Icmp6Error> {
        let ifindex = self.ifindex;
        let mut down = false;
        loop {
            if down && !self.still_bound() {
                return Err(Icmp6Error::InterfaceGone { ifindex });
            }
            // ERROR too: a socket error alone (ENETDOWN when the interface
            // goes down) does not make the socket readable.
            let io = self.fd.async_io(Interest::READABLE | Interest::ERROR, |s| {
                recvfrom::<SockaddrStorage>(s.as_raw_fd(), buf).map_err(io::Error::from)
            });
            let r = if down {
                match tokio::time::timeout(Duration::from_millis(500), io).await {
                    Ok(r) => r,
                    Err(_) => continue,
                }
            } else {
                io.await
            };
            match r {
                Ok((len, addr)) => {
                    let (ifi, pkttype) = addr
                        .as_ref()
                        .and_then(SockaddrStorage::as_link_addr)
                        .map(|a| (u32::try_from(a.ifindex()).unwrap_or(0), a.pkttype()))
                        .unwrap_or((ifindex, 0));
                    return Ok(FrameIn {
                        len,
                        ifindex: ifi,
                        pkttype,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // Down (admin down, or the first step of a deletion): the
                // kernel reports it once and resumes delivery when it is up.
                Err(e) if e.raw_os_error() == Some(nix::libc::ENETDOWN) => {
                    tracing::debug!(ifindex, "interface down; packet socket waits for it");
                    down = true;
                }
                Err(e) if e.raw_os_error() == Some(nix::libc::ENODEV) => {
                    return Err(Icmp6Error::InterfaceGone { ifindex })
                }
                Err(source) => return Err(Icmp6Error::Recv { ifindex, source }),
            }
        }
    }

    /// Is the socket still bound to its interface? (The kernel resets the
    /// binding to -1 when the interface is unregistered.)
    fn still_bound(&self) -> bool {
        match getsockname::<SockaddrStorage>(self.fd.get_ref().as_raw_fd()) {
            Ok(a) => a
                .as_link_addr()
                .is_some_and(|l| l.ifindex() == self.ifindex as usize),
            Err(_) => true,
        }
    }

    /// Sends one whole Ethernet frame (header included) out of the interface.
    pub async fn send_frame(&self, frame: &[u8]) -> Result<usize, Icmp6Error> {
        let ifindex = self.ifindex;
        let mut retried = false;
        loop {
            let r = self
                .fd
                .async_io(Interest::WRITABLE, |s| s.send(frame))
                .await;
            match r {
                Ok(n) => return Ok(n),
                // A pending ENETDOWN from an earlier down/up is reported (and
                // cleared) by the first send after it: try once more.
                Err(e) if !retried && is_async_socket_error(&e) => retried = true,
                Err(e) if e.raw_os_error() == Some(nix::libc::ENODEV) => {
                    return Err(Icmp6Error::InterfaceGone { ifindex })
                }
                Err(source) => {
                    return Err(Icmp6Error::Send {
                        dst: "frame".to_owned(),
                        ifindex,
                        source,
                    })
                }
            }
        }
    }
}

/// The BPF program of [`NdpReceiver`] as `(code, jt, jf, k)`: accept
/// incoming IPv6 frames whose next header is ICMPv6 with type 133..=136, or
/// any extension header (hop-by-hop, routing, fragment, destination options)
/// so user space can apply the full rules; reject everything else and every
/// outgoing frame.
pub fn ndp_filter_program() -> [(u16, u8, u8, u32); 17] {
    const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const LD_H_ABS: u16 = 0x28; // BPF_LD | BPF_H | BPF_ABS
    const LD_B_ABS: u16 = 0x30; // BPF_LD | BPF_B | BPF_ABS
    const JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const JGE_K: u16 = 0x35; // BPF_JMP | BPF_JGE | BPF_K
    const JGT_K: u16 = 0x25; // BPF_JMP | BPF_JGT | BPF_K
    const RET_K: u16 = 0x06; // BPF_RET | BPF_K
    const SKF_AD_PKTTYPE: u32 = 0xffff_f000 + 4; // SKF_AD_OFF + SKF_AD_PKTTYPE
    const ACCEPT: u32 = 0x0004_0000;
    // Offsets from the start of the Ethernet frame.
    const ETHERTYPE: u32 = 12;
    const NEXT_HEADER: u32 = 14 + 6;
    const ICMP_TYPE: u32 = 14 + 40;
    // A jump goes to pc + 1 + offset.
    [
        /* 0 */ (LD_W_ABS, 0, 0, SKF_AD_PKTTYPE),
        /* 1 */ (JEQ_K, 14, 0, PACKET_OUTGOING as u32), // outgoing -> 16
        /* 2 */ (LD_H_ABS, 0, 0, ETHERTYPE),
        /* 3 */ (JEQ_K, 0, 12, ETH_P_IPV6 as u32), // not IPv6 -> 16
        /* 4 */ (LD_B_ABS, 0, 0, NEXT_HEADER),
        /* 5 */ (JEQ_K, 5, 0, ICMPV6 as u32), // ICMPv6 -> 11
        /* 6 */ (JEQ_K, 8, 0, 0), // hop-by-hop -> 15
        /* 7 */ (JEQ_K, 7, 0, 43), // routing -> 15
        /* 8 */ (JEQ_K, 6, 0, 44), // fragment -> 15
        /* 9 */ (JEQ_K, 5, 0, 60), // destination options -> 15
        /* 10 */ (RET_K, 0, 0, 0), // anything else: reject
        /* 11 */ (LD_B_ABS, 0, 0, ICMP_TYPE),
        /* 12 */ (JGE_K, 0, 3, 133), // < 133 -> 16
        /* 13 */ (JGT_K, 2, 0, 136), // > 136 -> 16
        /* 14 */ (RET_K, 0, 0, ACCEPT),
        /* 15 */ (RET_K, 0, 0, ACCEPT),
        /* 16 */ (RET_K, 0, 0, 0),
    ]
}

/// [`ndp_filter_program`] as socket filter instructions.
pub fn ndp_filter() -> Vec<SockFilter> {
    ndp_filter_program()
        .iter()
        .map(|&(c, jt, jf, k)| SockFilter::new(c, jt, jf, k))
        .collect()
}

/// Receives NDP messages on one interface; see the module documentation for
/// what is dropped.
#[derive(Debug)]
pub struct NdpReceiver {
    sock: PacketSocket,
    buf: Vec<u8>,
    stats: NdpRxStats,
}

impl NdpReceiver {
    /// Opens the receiver on `ifindex` (needs CAP_NET_RAW).
    pub fn bind(ifindex: u32) -> Result<NdpReceiver, Icmp6Error> {
        let sock = PacketSocket::bind_with_filter(ifindex, &ndp_filter())?;
        Ok(NdpReceiver {
            sock,
            buf: vec![0u8; 65536],
            stats: NdpRxStats::default(),
        })
    }

    /// The interface index.
    pub fn ifindex(&self) -> u32 {
        self.sock.ifindex
    }

    /// Counters of accepted and dropped frames.
    pub fn stats(&self) -> &NdpRxStats {
        &self.stats
    }

    /// The next frame's verdict: an accepted message or why it was dropped.
    /// Outgoing frames (our own sends) are skipped silently.
    pub async fn recv_verdict(&mut self) -> Result<Result<NdpPacketIn, DropReason>, Icmp6Error> {
        loop {
            let f = self.sock.recv_frame(&mut self.buf).await?;
            if f.outgoing() || f.ifindex != self.sock.ifindex {
                continue;
            }
            let frame = self.buf.get(..f.len).unwrap_or(&[]);
            let r = parse_frame(frame, f.ifindex);
            self.stats.count(&r);
            if let Err(reason) = &r {
                tracing::debug!(ifindex = f.ifindex, %reason, "NDP frame dropped");
            }
            return Ok(r);
        }
    }

    /// The next accepted NDP message (dropped frames are counted and skipped).
    pub async fn recv(&mut self) -> Result<NdpPacketIn, Icmp6Error> {
        loop {
            if let Ok(p) = self.recv_verdict().await? {
                return Ok(p);
            }
        }
    }
}

/// Sends NDP messages out of one interface with hop limit 255.
#[derive(Debug)]
pub struct NdpSender {
    fd: AsyncFd<Socket>,
    ifindex: u32,
    /// For messages from `::` when the kernel has no source to give.
    link: PacketSocket,
}

impl NdpSender {
    /// Opens a raw ICMPv6 socket bound to `ifindex` (needs CAP_NET_RAW).
    pub fn bind(ifindex: u32) -> Result<NdpSender, Icmp6Error> {
        let nz = NonZeroU32::new(ifindex).ok_or(Icmp6Error::NoInterface)?;
        let err = |what| {
            move |source| Icmp6Error::Socket {
                what,
                ifindex,
                source,
            }
        };
        let s = Socket::new(
            Domain::IPV6,
            Type::RAW.nonblocking().cloexec(),
            Some(Protocol::ICMPV6),
        )
        .map_err(err("raw ICMPv6 socket"))?;
        s.bind_device_by_index_v6(Some(nz))
            .map_err(err("SO_BINDTOIFINDEX"))?;
        s.set_multicast_if_v6(ifindex)
            .map_err(err("IPV6_MULTICAST_IF"))?;
        s.set_multicast_hops_v6(255)
            .map_err(err("IPV6_MULTICAST_HOPS"))?;
        s.set_unicast_hops_v6(255)
            .map_err(err("IPV6_UNICAST_HOPS"))?;
        s.set_multicast_loop_v6(false)
            .map_err(err("IPV6_MULTICAST_LOOP"))?;
        // This socket only sends: keep the copy of every incoming ICMPv6
        // message the kernel queues to raw sockets small.
        s.set_recv_buffer_size(1).map_err(err("SO_RCVBUF"))?;
        let fd = sys::async_fd(s).map_err(err("register with tokio"))?;
        // Send-only: a filter that accepts nothing keeps its queue empty.
        let link = PacketSocket::bind_with_filter(ifindex, &[SockFilter::new(0x06, 0, 0, 0)])?;
        Ok(NdpSender { fd, ifindex, link })
    }

    /// The interface index.
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// Sends `repr` to `dst`. `src` = `None` lets the kernel choose;
    /// `Some(a)` sends from `a`, which must be assigned to this host (an
    /// optimistic or nodad address is fine). Link-local and multicast
    /// destinations are scoped to this interface.
    ///
    /// When the interface has no usable address yet (its link-local is
    /// tentative, e.g. right after carrier came back) and `src` is `None` or
    /// `::`, the kernel refuses (EADDRNOTAVAIL); a message to a multicast
    /// group is then sent from `::` as a whole Ethernet frame, as RFC 4861
    /// allows for RS and NS, with the source link-layer option removed (it
    /// must not accompany an unspecified source). Returns the ICMPv6 length.
    pub async fn send(
        &self,
        repr: &NdpRepr,
        src: Option<Ipv6Addr>,
        dst: Ipv6Addr,
    ) -> Result<usize, Icmp6Error> {
        let bytes = repr.to_bytes(src.unwrap_or(Ipv6Addr::UNSPECIFIED), dst)?;
        match self.send_raw(&bytes, src, dst).await {
            Err(Icmp6Error::Send { source, .. })
                if source.raw_os_error() == Some(nix::libc::EADDRNOTAVAIL)
                    && src.is_none_or(|s| s.is_unspecified())
                    && dst.is_multicast() =>
            {
                self.send_from_unspecified(repr, dst).await
            }
            r => r,
        }
    }

    async fn send_from_unspecified(
        &self,
        repr: &NdpRepr,
        dst: Ipv6Addr,
    ) -> Result<usize, Icmp6Error> {
        let repr = match repr {
            NdpRepr::RouterSolicit { .. } => NdpRepr::RouterSolicit { source_ll: None },
            NdpRepr::NeighborSolicit { target, .. } => NdpRepr::NeighborSolicit {
                target: *target,
                source_ll: None,
            },
            other => other.clone(),
        };
        let mac = self.link.mac()?;
        let frame = ndp_frame(&repr, mac, None, Ipv6Addr::UNSPECIFIED, dst, 255)?;
        self.link.send_frame(&frame).await?;
        Ok(repr.buffer_len())
    }

    /// Sends ICMPv6 bytes as they are (the kernel rewrites the checksum).
    pub async fn send_raw(
        &self,
        icmp: &[u8],
        src: Option<Ipv6Addr>,
        dst: Ipv6Addr,
    ) -> Result<usize, Icmp6Error> {
        let ifindex = self.ifindex;
        let scope = if is_link_local(&dst) || dst.is_multicast() {
            ifindex
        } else {
            0
        };
        let to = SockaddrIn6::from(SocketAddrV6::new(dst, 0, 0, scope));
        let info = src.map(|a| nix::libc::in6_pktinfo {
            ipi6_addr: nix::libc::in6_addr {
                s6_addr: a.octets(),
            },
            ipi6_ifindex: ifindex,
        });
        let iov = [IoSlice::new(icmp)];
        let mut retried = false;
        loop {
            let r = self
                .fd
                .async_io(Interest::WRITABLE, |s| {
                    let cmsgs: Vec<ControlMessage<'_>> =
                        info.iter().map(ControlMessage::Ipv6PacketInfo).collect();
                    sendmsg(s.as_raw_fd(), &iov, &cmsgs, MsgFlags::empty(), Some(&to))
                        .map_err(io::Error::from)
                })
                .await;
            match r {
                Ok(n) => return Ok(n),
                // An ICMPv6 error about an earlier message (or an earlier
                // down/up) is left pending on a raw socket and fails the next
                // send once, whatever it is: retry that once.
                Err(e) if !retried && is_async_socket_error(&e) => retried = true,
                Err(e) if e.raw_os_error() == Some(nix::libc::ENODEV) => {
                    return Err(Icmp6Error::InterfaceGone { ifindex })
                }
                Err(source) => {
                    return Err(Icmp6Error::Send {
                        dst: dst.to_string(),
                        ifindex,
                        source,
                    })
                }
            }
        }
    }
}

/// Errors a socket can hold from an earlier event (ICMP errors, link down).
fn is_async_socket_error(e: &io::Error) -> bool {
    use nix::libc::{ECONNREFUSED, EHOSTUNREACH, ENETDOWN, ENETUNREACH, EPROTO};
    matches!(
        e.raw_os_error(),
        Some(ECONNREFUSED | EHOSTUNREACH | ENETDOWN | ENETUNREACH | EPROTO)
    )
}

/// The one place that needs `unsafe`: binding an `AF_PACKET` socket takes a
/// `sockaddr_ll`, which neither nix nor socket2 can build safely.
mod sys {
    #![allow(unsafe_code)]
    use std::io;
    use std::os::fd::AsRawFd;

    use nix::errno::Errno;
    use nix::libc;
    use socket2::Socket;
    use tokio::io::unix::AsyncFd;

    /// Registers an owned socket with tokio.
    pub(super) fn async_fd(s: Socket) -> io::Result<AsyncFd<Socket>> {
        // SAFETY: `Socket` owns its file descriptor: it is open and valid for
        // the whole life of the `Socket`, which the `AsyncFd` owns, and
        // `as_raw_fd` always returns that same descriptor.
        unsafe { AsyncFd::register(s) }.map_err(io::Error::from)
    }

    pub(super) fn bind_packet(s: &Socket, ifindex: u32, ethertype: u16) -> io::Result<()> {
        let ifindex =
            i32::try_from(ifindex).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: sockaddr_ll is a plain C struct of integers and byte arrays;
        // all-zero is a valid value.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = ethertype.to_be();
        sll.sll_ifindex = ifindex;
        let len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: `sll` is a fully initialised sockaddr_ll that lives across
        // the call, `len` is its exact size, and the fd is a valid open socket
        // borrowed from `s`.
        let r = unsafe {
            libc::bind(
                s.as_raw_fd(),
                (&raw const sll).cast::<libc::sockaddr>(),
                len,
            )
        };
        Errno::result(r).map(drop).map_err(io::Error::from)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use mat6_proto::ndp::{PrefixInfo, RouterAdvert};

    const RMAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

    fn ra() -> NdpRepr {
        NdpRepr::RouterAdvert(RouterAdvert {
            cur_hop_limit: 64,
            managed: false,
            other: false,
            router_lifetime_s: 1800,
            reachable_time_ms: 0,
            retrans_timer_ms: 0,
            source_ll: Some(RMAC),
            mtu: Some(1500),
            prefixes: vec![PrefixInfo {
                prefix: "2001:db8:b::".parse().unwrap(),
                prefix_len: 64,
                on_link: true,
                autonomous: true,
                valid_lifetime_s: 86400,
                preferred_lifetime_s: 14400,
            }],
            other_options: vec![],
        })
    }

    fn frame(repr: &NdpRepr, src: Ipv6Addr, dst: Ipv6Addr, hop: u8, frag: bool) -> Vec<u8> {
        if frag {
            ndp_frame_with_fragment_header(repr, RMAC, src, dst).unwrap()
        } else {
            ndp_frame(repr, RMAC, None, src, dst, hop).unwrap()
        }
    }

    #[test]
    fn frames_match_etherparse() {
        // Cross-check the hand-written IPv6 header against etherparse.
        let f = frame(&ra(), "fe80::1".parse().unwrap(), ALL_NODES, 255, false);
        let eth = Ethernet2Slice::from_slice_without_fcs(&f).unwrap();
        assert_eq!(eth.destination(), [0x33, 0x33, 0, 0, 0, 1]);
        let ip = Ipv6Slice::from_slice(eth.payload().payload).unwrap();
        assert_eq!(ip.header().hop_limit(), 255);
        assert_eq!(ip.payload().ip_number, IpNumber::IPV6_ICMP);
        let f = frame(&ra(), "fe80::1".parse().unwrap(), ALL_NODES, 255, true);
        let eth = Ethernet2Slice::from_slice_without_fcs(&f).unwrap();
        let ip = Ipv6Slice::from_slice(eth.payload().payload).unwrap();
        assert!(ip
            .extensions()
            .clone()
            .into_iter()
            .any(|x| matches!(x, Ipv6ExtensionSlice::Fragment(_))));
    }

    #[test]
    fn accepts_good_ra_with_mac_and_hop_limit() {
        let src: Ipv6Addr = "fe80::1".parse().unwrap();
        let f = frame(&ra(), src, ALL_NODES, 255, false);
        let p = parse_frame(&f, 5).unwrap();
        assert_eq!(p.repr, ra());
        assert_eq!(p.src, src);
        assert_eq!(p.dst, ALL_NODES);
        assert_eq!(p.src_mac, RMAC);
        assert_eq!(p.ifindex, 5);
        assert_eq!(p.hop_limit, 255);
    }

    #[test]
    fn drops_fragment_header_even_atomic() {
        let f = frame(&ra(), "fe80::1".parse().unwrap(), ALL_NODES, 255, true);
        assert_eq!(parse_frame(&f, 5), Err(DropReason::Fragment));
    }

    #[test]
    fn drops_hop_limit_below_255() {
        let f = frame(&ra(), "fe80::1".parse().unwrap(), ALL_NODES, 254, false);
        assert_eq!(parse_frame(&f, 5), Err(DropReason::HopLimit(254)));
        let rs = NdpRepr::RouterSolicit { source_ll: None };
        let f = frame(&rs, "fe80::2".parse().unwrap(), ALL_ROUTERS, 64, false);
        assert_eq!(parse_frame(&f, 5), Err(DropReason::HopLimit(64)));
    }

    #[test]
    fn drops_ra_from_global_source_but_not_na() {
        let g: Ipv6Addr = "2001:db8:b::1".parse().unwrap();
        let f = frame(&ra(), g, ALL_NODES, 255, false);
        assert_eq!(parse_frame(&f, 5), Err(DropReason::NonLinkLocalRouter(g)));
        let na = NdpRepr::NeighborAdvert {
            router: false,
            solicited: false,
            override_: true,
            target: g,
            target_ll: Some(RMAC),
        };
        let f = frame(&na, g, ALL_NODES, 255, false);
        assert_eq!(parse_frame(&f, 5).unwrap().repr, na);
    }

    #[test]
    fn drops_bad_checksum_and_junk() {
        let mut f = frame(&ra(), "fe80::1".parse().unwrap(), ALL_NODES, 255, false);
        let last = f.len() - 1;
        f[last] ^= 0xff;
        assert!(matches!(parse_frame(&f, 5), Err(DropReason::Ndp(_))));
        assert_eq!(parse_frame(&[0u8; 10], 5), Err(DropReason::NotIpv6));
        let mut arp = frame(&ra(), "fe80::1".parse().unwrap(), ALL_NODES, 255, false);
        arp[12] = 0x08;
        arp[13] = 0x06;
        assert_eq!(parse_frame(&arp, 5), Err(DropReason::NotIpv6));
        // Truncated anywhere: never a panic, never accepted.
        let good = frame(&ra(), "fe80::1".parse().unwrap(), ALL_NODES, 255, false);
        for n in 0..good.len() {
            assert!(parse_frame(&good[..n], 5).is_err(), "len {n}");
        }
    }

    #[test]
    fn helpers() {
        let a: Ipv6Addr = "2001:db8::1234:5678".parse().unwrap();
        assert_eq!(
            solicited_node(&a),
            "ff02::1:ff34:5678".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(multicast_mac(&ALL_NODES), [0x33, 0x33, 0, 0, 0, 1]);
    }

    /// Runs the BPF program in a tiny interpreter (only the opcodes it uses)
    /// so the jump offsets are checked without a socket.
    fn run_bpf(frame: &[u8], pkttype: u8) -> u32 {
        let prog = ndp_filter_program();
        let mut pc = 0usize;
        let mut a: u32 = 0;
        loop {
            let (code, jt, jf, k) = prog[pc];
            let byte = |off: u32| frame.get(off as usize).copied().map(u32::from);
            match code {
                0x20 => {
                    assert_eq!(k, 0xffff_f004, "only the pkttype ancillary load");
                    a = u32::from(pkttype);
                    pc += 1;
                }
                0x28 => {
                    a = match (byte(k), byte(k + 1)) {
                        (Some(h), Some(l)) => (h << 8) | l,
                        _ => return 0,
                    };
                    pc += 1;
                }
                0x30 => {
                    a = match byte(k) {
                        Some(b) => b,
                        None => return 0,
                    };
                    pc += 1;
                }
                0x15 | 0x35 | 0x25 => {
                    let t = match code {
                        0x15 => a == k,
                        0x35 => a >= k,
                        _ => a > k,
                    };
                    pc += 1 + usize::from(if t { jt } else { jf });
                }
                0x06 => return k,
                other => panic!("opcode {other:#x}"),
            }
        }
    }

    #[test]
    fn bpf_filter_accepts_ndp_and_extension_headers_only() {
        assert_eq!(ndp_filter().len(), ndp_filter_program().len());
        let ll: Ipv6Addr = "fe80::1".parse().unwrap();
        let good = frame(&ra(), ll, ALL_NODES, 255, false);
        assert_ne!(run_bpf(&good, 2), 0);
        assert_eq!(run_bpf(&good, PACKET_OUTGOING), 0, "outgoing");
        let frag = frame(&ra(), ll, ALL_NODES, 255, true);
        assert_ne!(run_bpf(&frag, 2), 0, "extension headers reach user space");
        let rs = frame(
            &NdpRepr::RouterSolicit { source_ll: None },
            ll,
            ALL_ROUTERS,
            255,
            false,
        );
        assert_ne!(run_bpf(&rs, 2), 0);
        let mut echo = good.clone();
        echo[54] = 128;
        assert_eq!(run_bpf(&echo, 0), 0, "echo request");
        echo[54] = 137;
        assert_eq!(run_bpf(&echo, 0), 0, "redirect");
        echo[54] = 132;
        assert_eq!(run_bpf(&echo, 0), 0, "below 133");
        let mut udp = good.clone();
        udp[20] = 17;
        assert_eq!(run_bpf(&udp, 0), 0, "udp");
        let mut v4 = good;
        v4[12] = 0x08;
        v4[13] = 0x00;
        assert_eq!(run_bpf(&v4, 0), 0, "ipv4");
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        fn arb_ra() -> impl Strategy<Value = NdpRepr> {
            (
                any::<u8>(),
                any::<bool>(),
                any::<u16>(),
                proptest::option::of(any::<[u8; 6]>()),
                proptest::option::of(any::<u32>()),
                proptest::collection::vec(
                    (any::<u128>(), 0u8..=128, any::<u32>(), any::<u32>()),
                    0..4,
                ),
            )
                .prop_map(|(hl, m, lt, sll, mtu, pfx)| {
                    NdpRepr::RouterAdvert(RouterAdvert {
                        cur_hop_limit: hl,
                        managed: m,
                        other: !m,
                        router_lifetime_s: lt,
                        reachable_time_ms: 0,
                        retrans_timer_ms: 0,
                        source_ll: sll,
                        mtu,
                        prefixes: pfx
                            .into_iter()
                            .map(|(p, len, v, pr)| PrefixInfo {
                                prefix: Ipv6Addr::from(p),
                                prefix_len: len,
                                on_link: true,
                                autonomous: len == 64,
                                valid_lifetime_s: v,
                                preferred_lifetime_s: pr,
                            })
                            .collect(),
                        other_options: vec![],
                    })
                })
        }

        proptest! {
            #[test]
            fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
                let _ = parse_frame(&bytes, 1);
            }

            #[test]
            fn valid_ras_round_trip(ra in arb_ra(), ll in any::<u64>()) {
                let src = Ipv6Addr::from((0xfe80u128 << 112) | u128::from(ll));
                let f = frame(&ra, src, ALL_NODES, 255, false);
                let p = parse_frame(&f, 9).unwrap();
                prop_assert_eq!(p.repr, ra);
                prop_assert_eq!(p.src, src);
            }

            #[test]
            fn mutated_frames_never_panic_and_keep_the_rules(
                ra in arb_ra(),
                flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
            ) {
                let mut f = frame(&ra, "fe80::1".parse().unwrap(), ALL_NODES, 255, false);
                let n = f.len();
                for (at, x) in flips {
                    f[at % n] ^= x;
                }
                if let Ok(p) = parse_frame(&f, 1) {
                    prop_assert_eq!(p.hop_limit, 255);
                    if matches!(p.repr, NdpRepr::RouterAdvert(_)) {
                        prop_assert!(is_link_local(&p.src));
                    }
                }
            }
        }
    }
}
