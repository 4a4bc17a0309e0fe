//! rtnetlink wrapper: links, IPv6 addresses, routes and neighbours, and a
//! typed stream of link / address / route events.
//!
//! ```no_run
//! # async fn demo() -> Result<(), mat6_net::netlink::NetlinkError> {
//! use mat6_net::netlink::{AddrSpec, Netlink, NetEvents, EventGroups, Route6};
//! let (nl, _conn) = Netlink::connect()?;
//! // Subscribe first, then read the current state, so nothing is missed.
//! let (mut events, _econn) = NetEvents::subscribe(EventGroups::all())?;
//! let eth1 = nl.link_by_name("eth1").await?;
//! nl.addr_add(eth1.ifindex, &AddrSpec::new("2001:db8:2::5".parse().unwrap(), 64).nodad()).await?;
//! nl.route_replace(&Route6::default_via("fe80::1".parse().unwrap(), eth1.ifindex)).await?;
//! while let Some(ev) = events.next().await {
//!     println!("{ev:?}");
//! }
//! # Ok(()) }
//! ```
//!
//! All methods need a tokio runtime (the connection task is spawned with
//! `tokio::spawn`); the namespace is the one of the thread that called
//! `connect`/`subscribe`.

use std::io;
use std::net::{IpAddr, Ipv6Addr};

use futures::channel::mpsc::UnboundedReceiver;
use futures::{StreamExt, TryStreamExt};
use ipnetwork::Ipv6Network;
use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, AddressScope, CacheInfo,
};
use netlink_packet_route::link::{
    LinkAttribute, LinkEvent as RawLinkEvent, LinkFlags, LinkMessage,
};
/// Neighbour cache states as the kernel reports them (re-exported).
pub use netlink_packet_route::neighbour::NeighbourState;
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage,
};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteType};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::{Handle, LinkUnspec, MulticastGroup, RouteMessageBuilder};
use tokio::task::JoinHandle;

/// Errors of this module. Each names the operation and the interface or
/// address concerned, and keeps the kernel's errno when there is one.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The netlink socket could not be opened or bound.
    #[error("cannot open rtnetlink socket: {0}")]
    Socket(#[source] io::Error),
    /// No interface with this name or index.
    #[error("no such interface: {0}")]
    NoSuchLink(String),
    /// The kernel refused a request (or the reply did not parse).
    #[error("{op} {target}: {source}")]
    Request {
        /// What was attempted, e.g. `"add address"`.
        op: &'static str,
        /// What it was attempted on, e.g. `"2001:db8::1/64 on ifindex 3"`.
        target: String,
        /// The rtnetlink error (errno inside for kernel refusals).
        #[source]
        source: rtnetlink::Error,
    },
    /// An argument that cannot be expressed (e.g. a prefix length > 128).
    #[error("invalid argument: {0}")]
    Invalid(String),
}

impl NetlinkError {
    /// The positive errno the kernel answered (e.g. `libc::EEXIST` = 17,
    /// `ENOENT` = 2, `ESRCH` = 3), if this is a kernel refusal.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Request {
                source: rtnetlink::Error::NetlinkError(m),
                ..
            } => m.code.map(|c| c.get().abs()),
            _ => None,
        }
    }

    /// True if the kernel said "no such object" (ENOENT or ESRCH), e.g. when
    /// deleting something that is already gone.
    pub fn is_not_found(&self) -> bool {
        matches!(self.errno(), Some(2) | Some(3)) || matches!(self, NetlinkError::NoSuchLink(_))
    }

    /// True if the kernel said "exists" (EEXIST).
    pub fn is_exists(&self) -> bool {
        self.errno() == Some(17)
    }
}

fn req(
    op: &'static str,
    target: impl Into<String>,
) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    let target = target.into();
    move |source| NetlinkError::Request { op, target, source }
}

/// A snapshot of one link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    /// Interface index.
    pub ifindex: u32,
    /// Interface name (empty if the kernel did not say).
    pub name: String,
    /// Ethernet MAC, if the link has a 6-byte hardware address.
    pub mac: Option<[u8; 6]>,
    /// IFF_UP: administratively up.
    pub admin_up: bool,
    /// Carrier (IFLA_CARRIER, else IFF_LOWER_UP).
    pub carrier: bool,
    /// MTU, if reported.
    pub mtu: Option<u32>,
    /// Index of the bridge/bond this link is a port of.
    pub controller: Option<u32>,
}

impl LinkInfo {
    /// Reads a link message (dump answer or event).
    pub fn from_message(msg: &LinkMessage) -> LinkInfo {
        let mut info = LinkInfo {
            ifindex: msg.header.index,
            name: String::new(),
            mac: None,
            admin_up: msg.header.flags.contains(LinkFlags::Up),
            carrier: msg.header.flags.contains(LinkFlags::LowerUp),
            mtu: None,
            controller: None,
        };
        for a in &msg.attributes {
            match a {
                LinkAttribute::IfName(n) => info.name = n.clone(),
                LinkAttribute::Address(m) => info.mac = <[u8; 6]>::try_from(m.as_slice()).ok(),
                LinkAttribute::Carrier(c) => info.carrier = *c != 0,
                LinkAttribute::Mtu(m) => info.mtu = Some(*m),
                LinkAttribute::Controller(c) => info.controller = Some(*c),
                _ => {}
            }
        }
        info
    }
}

/// A link changed (RTM_NEWLINK). Sent by the kernel on carrier, admin state,
/// address or name changes, and on `IFLA_EVENT` notifications.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkEvent {
    /// Interface index.
    pub ifindex: u32,
    /// Interface name.
    pub name: String,
    /// Carrier now.
    pub carrier: bool,
    /// Administratively up now.
    pub admin_up: bool,
    /// MAC now.
    pub mac: Option<[u8; 6]>,
    /// `IFLA_EVENT == IFLA_EVENT_NOTIFY_PEERS`: the driver asked the stack to
    /// announce itself (virtio-net does this when QEMU's post-migration
    /// announce arrives; `ip link set ... ` does not, `bonding` failover does).
    pub notify_peers: bool,
}

impl LinkEvent {
    /// Reads an RTM_NEWLINK message.
    pub fn from_message(msg: &LinkMessage) -> LinkEvent {
        let i = LinkInfo::from_message(msg);
        let notify_peers = msg
            .attributes
            .iter()
            .any(|a| matches!(a, LinkAttribute::Event(RawLinkEvent::NotifyPeers)));
        LinkEvent {
            ifindex: i.ifindex,
            name: i.name,
            carrier: i.carrier,
            admin_up: i.admin_up,
            mac: i.mac,
            notify_peers,
        }
    }
}

/// Flags of an IPv6 address (IFA_F_*), as reported or requested.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AddrFlags {
    /// IFA_F_NODAD: skip duplicate address detection.
    pub nodad: bool,
    /// IFA_F_OPTIMISTIC: usable during DAD (RFC 4429).
    pub optimistic: bool,
    /// IFA_F_TENTATIVE: DAD in progress (report only).
    pub tentative: bool,
    /// IFA_F_DADFAILED: DAD found a duplicate (report only).
    pub dadfailed: bool,
    /// IFA_F_DEPRECATED: preferred lifetime over (report only).
    pub deprecated: bool,
    /// IFA_F_PERMANENT: no lifetime (report only).
    pub permanent: bool,
    /// IFA_F_NOPREFIXROUTE: do not install the prefix route.
    pub noprefixroute: bool,
}

impl AddrFlags {
    fn from_bits(b: u32) -> AddrFlags {
        let f = AddressFlags::from_bits_retain(b);
        AddrFlags {
            nodad: f.contains(AddressFlags::Nodad),
            optimistic: f.contains(AddressFlags::Optimistic),
            tentative: f.contains(AddressFlags::Tentative),
            dadfailed: f.contains(AddressFlags::Dadfailed),
            deprecated: f.contains(AddressFlags::Deprecated),
            permanent: f.contains(AddressFlags::Permanent),
            noprefixroute: f.contains(AddressFlags::Noprefixroute),
        }
    }

    fn request_bits(&self) -> AddressFlags {
        let mut f = AddressFlags::empty();
        if self.nodad {
            f |= AddressFlags::Nodad;
        }
        if self.optimistic {
            f |= AddressFlags::Optimistic;
        }
        if self.noprefixroute {
            f |= AddressFlags::Noprefixroute;
        }
        f
    }
}

/// An IPv6 address on a link (dump answer or event).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddrInfo {
    /// Interface index.
    pub ifindex: u32,
    /// The address.
    pub addr: Ipv6Addr,
    /// Prefix length.
    pub prefix_len: u8,
    /// Flags (tentative, dadfailed, optimistic, ...).
    pub flags: AddrFlags,
    /// Valid lifetime in seconds (`u32::MAX` = forever), if reported.
    pub valid_lft: Option<u32>,
    /// Preferred lifetime in seconds (`u32::MAX` = forever), if reported.
    pub preferred_lft: Option<u32>,
}

impl AddrInfo {
    /// Is the address usable as a source now (not tentative unless
    /// optimistic, DAD not failed)?
    pub fn usable(&self) -> bool {
        !self.flags.dadfailed && (!self.flags.tentative || self.flags.optimistic)
    }

    /// Is it link-local (fe80::/10)?
    pub fn is_link_local(&self) -> bool {
        (self.addr.segments()[0] & 0xffc0) == 0xfe80
    }

    /// Reads an address message; `None` for non-IPv6 addresses.
    pub fn from_message(msg: &AddressMessage) -> Option<AddrInfo> {
        if msg.header.family != AddressFamily::Inet6 {
            return None;
        }
        let mut addr = None;
        let mut bits = u32::from(msg.header.flags.bits());
        let mut valid_lft = None;
        let mut preferred_lft = None;
        for a in &msg.attributes {
            match a {
                AddressAttribute::Address(IpAddr::V6(a)) => addr = Some(*a),
                AddressAttribute::Local(IpAddr::V6(a)) if addr.is_none() => addr = Some(*a),
                AddressAttribute::Flags(f) => bits = f.bits(),
                AddressAttribute::CacheInfo(c) => {
                    valid_lft = Some(c.ifa_valid);
                    preferred_lft = Some(c.ifa_preferred);
                }
                _ => {}
            }
        }
        Some(AddrInfo {
            ifindex: msg.header.index,
            addr: addr?,
            prefix_len: msg.header.prefix_len,
            flags: AddrFlags::from_bits(bits),
            valid_lft,
            preferred_lft,
        })
    }
}

/// What to add: address, prefix length, flags and lifetimes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddrSpec {
    /// The address.
    pub addr: Ipv6Addr,
    /// Prefix length (<= 128).
    pub prefix_len: u8,
    /// Request flags (only `nodad`, `optimistic`, `noprefixroute` are sent).
    pub flags: AddrFlags,
    /// Valid lifetime in seconds; `None` = forever.
    pub valid_lft: Option<u32>,
    /// Preferred lifetime in seconds; `None` = same as valid.
    pub preferred_lft: Option<u32>,
}

impl AddrSpec {
    /// A permanent address with no flags.
    pub fn new(addr: Ipv6Addr, prefix_len: u8) -> AddrSpec {
        AddrSpec {
            addr,
            prefix_len,
            flags: AddrFlags::default(),
            valid_lft: None,
            preferred_lft: None,
        }
    }

    /// Skip DAD: usable at once (IFA_F_NODAD).
    pub fn nodad(mut self) -> AddrSpec {
        self.flags.nodad = true;
        self
    }

    /// Optimistic DAD (IFA_F_OPTIMISTIC): usable at once while DAD runs. The
    /// kernel honours it only with `optimistic_dad=1` on the interface (see
    /// [`crate::sysctl`]); otherwise the address is tentative for ~1 s.
    pub fn optimistic(mut self) -> AddrSpec {
        self.flags.optimistic = true;
        self
    }

    /// Do not install the on-link prefix route (IFA_F_NOPREFIXROUTE).
    pub fn noprefixroute(mut self) -> AddrSpec {
        self.flags.noprefixroute = true;
        self
    }

    /// Finite lifetimes in seconds (preferred <= valid).
    pub fn lifetimes(mut self, valid_s: u32, preferred_s: u32) -> AddrSpec {
        self.valid_lft = Some(valid_s);
        self.preferred_lft = Some(preferred_s.min(valid_s));
        self
    }

    fn describe(&self, ifindex: u32) -> String {
        format!("{}/{} on ifindex {ifindex}", self.addr, self.prefix_len)
    }
}

/// An IPv6 route: destination prefix, optional gateway, interface, metric
/// and table. `Route6::default()` is `::/0` in the main table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route6 {
    /// Destination prefix.
    pub dst: Ipv6Network,
    /// Next hop (link-local gateways need `oif`).
    pub gateway: Option<Ipv6Addr>,
    /// Output interface index.
    pub oif: Option<u32>,
    /// Metric / priority (`None` = kernel default 1024).
    pub metric: Option<u32>,
    /// Routing table (`None` = main, 254).
    pub table: Option<u32>,
    /// Preferred source address.
    pub pref_src: Option<Ipv6Addr>,
}

impl Default for Route6 {
    fn default() -> Route6 {
        Route6 {
            dst: Ipv6Network::new(Ipv6Addr::UNSPECIFIED, 0).unwrap_or_else(|_| unreachable_net()),
            gateway: None,
            oif: None,
            metric: None,
            table: None,
            pref_src: None,
        }
    }
}

// `Ipv6Network::new(::, 0)` cannot fail (prefix 0 <= 128); this keeps clippy's
// unwrap lint quiet without a panic path.
fn unreachable_net() -> Ipv6Network {
    Ipv6Network::from(Ipv6Addr::UNSPECIFIED)
}

impl Route6 {
    /// A route to `dst/prefix_len` out of `oif` (on-link).
    pub fn to(dst: Ipv6Addr, prefix_len: u8, oif: u32) -> Result<Route6, NetlinkError> {
        let dst = Ipv6Network::new(dst, prefix_len)
            .map_err(|e| NetlinkError::Invalid(format!("{dst}/{prefix_len}: {e}")))?;
        Ok(Route6 {
            dst,
            oif: Some(oif),
            ..Route6::default()
        })
    }

    /// The default route via `gateway` out of `oif`.
    pub fn default_via(gateway: Ipv6Addr, oif: u32) -> Route6 {
        Route6 {
            gateway: Some(gateway),
            oif: Some(oif),
            ..Route6::default()
        }
    }

    /// Sets the gateway.
    pub fn via(mut self, gateway: Ipv6Addr) -> Route6 {
        self.gateway = Some(gateway);
        self
    }

    /// Sets the metric.
    pub fn metric(mut self, metric: u32) -> Route6 {
        self.metric = Some(metric);
        self
    }

    /// Sets the table.
    pub fn table(mut self, table: u32) -> Route6 {
        self.table = Some(table);
        self
    }

    /// Sets the preferred source.
    pub fn src(mut self, src: Ipv6Addr) -> Route6 {
        self.pref_src = Some(src);
        self
    }

    fn describe(&self) -> String {
        let mut s = format!("{}", self.dst);
        if let Some(g) = self.gateway {
            s.push_str(&format!(" via {g}"));
        }
        if let Some(o) = self.oif {
            s.push_str(&format!(" oif {o}"));
        }
        if let Some(m) = self.metric {
            s.push_str(&format!(" metric {m}"));
        }
        if let Some(t) = self.table {
            s.push_str(&format!(" table {t}"));
        }
        s
    }

    fn to_message(&self) -> RouteMessage {
        let mut b = RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(self.dst.network(), self.dst.prefix());
        if let Some(g) = self.gateway {
            b = b.gateway(g);
        }
        if let Some(o) = self.oif {
            b = b.output_interface(o);
        }
        if let Some(m) = self.metric {
            b = b.priority(m);
        }
        if let Some(t) = self.table {
            b = b.table_id(t);
        }
        if let Some(s) = self.pref_src {
            b = b.pref_source(s);
        }
        b.build()
    }

    /// Reads a route message; `None` for non-IPv6 or non-unicast routes.
    pub fn from_message(msg: &RouteMessage) -> Option<Route6> {
        if msg.header.address_family != AddressFamily::Inet6
            || msg.header.kind != RouteType::Unicast
        {
            return None;
        }
        let mut dst = Ipv6Addr::UNSPECIFIED;
        let mut r = Route6 {
            table: Some(u32::from(msg.header.table)),
            ..Route6::default()
        };
        for a in &msg.attributes {
            match a {
                RouteAttribute::Destination(RouteAddress::Inet6(d)) => dst = *d,
                RouteAttribute::Gateway(RouteAddress::Inet6(g)) => r.gateway = Some(*g),
                RouteAttribute::Oif(o) => r.oif = Some(*o),
                RouteAttribute::Priority(p) => r.metric = Some(*p),
                RouteAttribute::Table(t) => r.table = Some(*t),
                RouteAttribute::PrefSource(RouteAddress::Inet6(s)) => r.pref_src = Some(*s),
                _ => {}
            }
        }
        r.dst = Ipv6Network::new(dst, msg.header.destination_prefix_length).ok()?;
        Some(r)
    }
}

/// A neighbour cache state to install.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NeighState {
    /// Never expires, never probed.
    Permanent,
    /// Reachable now; ages into stale.
    Reachable,
    /// Usable; verified on first use.
    Stale,
}

impl From<NeighState> for NeighbourState {
    fn from(s: NeighState) -> NeighbourState {
        match s {
            NeighState::Permanent => NeighbourState::Permanent,
            NeighState::Reachable => NeighbourState::Reachable,
            NeighState::Stale => NeighbourState::Stale,
        }
    }
}

/// An IPv6 neighbour cache entry (dump answer or event).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeighInfo {
    /// Interface index.
    pub ifindex: u32,
    /// The neighbour's address.
    pub ip: Ipv6Addr,
    /// Its link-layer address, if known.
    pub mac: Option<[u8; 6]>,
    /// NUD state (`Reachable`, `Stale`, `Failed`, ...).
    pub state: NeighbourState,
    /// NTF_ROUTER: the neighbour said it is a router.
    pub router: bool,
}

impl NeighInfo {
    /// Reads a neighbour message; `None` for non-IPv6 entries.
    pub fn from_message(msg: &NeighbourMessage) -> Option<NeighInfo> {
        if msg.header.family != AddressFamily::Inet6 {
            return None;
        }
        let mut ip = None;
        let mut mac = None;
        for a in &msg.attributes {
            match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet6(d)) => ip = Some(*d),
                NeighbourAttribute::LinkLayerAddress(m) => {
                    mac = <[u8; 6]>::try_from(m.as_slice()).ok()
                }
                _ => {}
            }
        }
        Some(NeighInfo {
            ifindex: msg.header.ifindex,
            ip: ip?,
            mac,
            state: msg.header.state,
            router: msg.header.flags.contains(NeighbourFlags::Router),
        })
    }

    /// Has neighbour unreachability detection given up on it?
    pub fn failed(&self) -> bool {
        self.state == NeighbourState::Failed
    }
}

/// The carrier of `ifname` from sysfs (`/sys/class/net/<ifname>/carrier`):
/// two small file reads instead of an `RTM_GETLINK` round trip and its
/// decoding, which matters in a just-resumed TCG guest, where every code
/// path is slow the first time it runs. `None` when sysfs cannot answer
/// for interface `ifindex` (no such interface, or a /sys mounted for
/// another network namespace, seen by its different ifindex): ask netlink
/// then. An administratively down link has no carrier.
pub fn sysfs_carrier(ifname: &str, ifindex: u32) -> Option<bool> {
    if ifname.is_empty() || ifname.len() > 15 || ifname.contains('/') || ifname.starts_with('.') {
        return None;
    }
    let dir = std::path::Path::new("/sys/class/net").join(ifname);
    let idx: u32 = std::fs::read_to_string(dir.join("ifindex"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    if idx != ifindex {
        return None;
    }
    match std::fs::read_to_string(dir.join("carrier")) {
        Ok(v) => parse_carrier(&v),
        // The kernel refuses to read the carrier of a link that is down.
        Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => Some(false),
        Err(_) => None,
    }
}

fn parse_carrier(v: &str) -> Option<bool> {
    match v.trim() {
        "1" => Some(true),
        "0" => Some(false),
        _ => None,
    }
}

/// Formats a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn fmt_mac(mac: &[u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]
    )
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in out.iter_mut() {
        let p = parts.next()?;
        if p.is_empty() || p.len() > 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// Aborts a spawned connection task when the last owner drops.
#[derive(Debug)]
struct TaskGuard(tokio::task::AbortHandle);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A handle on rtnetlink (cheap to clone). The connection task ends when the
/// last clone is dropped.
#[derive(Debug, Clone)]
pub struct Netlink {
    handle: Handle,
    _task: std::sync::Arc<TaskGuard>,
}

impl Netlink {
    /// Opens an rtnetlink socket in the calling thread's namespace and spawns
    /// its connection task (ended when all `Netlink` clones are dropped).
    /// Must be called inside a tokio runtime.
    pub fn connect() -> Result<(Netlink, JoinHandle<()>), NetlinkError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Socket)?;
        let task = tokio::spawn(conn);
        let guard = std::sync::Arc::new(TaskGuard(task.abort_handle()));
        Ok((
            Netlink {
                handle,
                _task: guard,
            },
            task,
        ))
    }

    /// The underlying rtnetlink handle, for requests this wrapper lacks
    /// (keep the `Netlink` alive while using it).
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// All links.
    pub async fn links(&self) -> Result<Vec<LinkInfo>, NetlinkError> {
        self.handle
            .link()
            .get()
            .execute()
            .map_ok(|m| LinkInfo::from_message(&m))
            .try_collect()
            .await
            .map_err(req("list", "links"))
    }

    /// The link named `name`.
    pub async fn link_by_name(&self, name: &str) -> Result<LinkInfo, NetlinkError> {
        let mut s = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        match s.try_next().await {
            Ok(Some(m)) => Ok(LinkInfo::from_message(&m)),
            Ok(None) => Err(NetlinkError::NoSuchLink(name.to_owned())),
            Err(e) => {
                let e = req("get link", name)(e);
                if e.is_not_found() || e.errno() == Some(19) {
                    Err(NetlinkError::NoSuchLink(name.to_owned()))
                } else {
                    Err(e)
                }
            }
        }
    }

    /// The link with index `ifindex`.
    pub async fn link_by_index(&self, ifindex: u32) -> Result<LinkInfo, NetlinkError> {
        let mut s = self.handle.link().get().match_index(ifindex).execute();
        let target = format!("ifindex {ifindex}");
        match s.try_next().await {
            Ok(Some(m)) => Ok(LinkInfo::from_message(&m)),
            Ok(None) => Err(NetlinkError::NoSuchLink(target)),
            Err(e) => {
                let e = req("get link", target.clone())(e);
                if e.is_not_found() || e.errno() == Some(19) {
                    Err(NetlinkError::NoSuchLink(target))
                } else {
                    Err(e)
                }
            }
        }
    }

    /// The index of the link named `name`.
    pub async fn ifindex(&self, name: &str) -> Result<u32, NetlinkError> {
        Ok(self.link_by_name(name).await?.ifindex)
    }

    async fn link_set(
        &self,
        msg: LinkMessage,
        op: &'static str,
        ifindex: u32,
    ) -> Result<(), NetlinkError> {
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(req(op, format!("ifindex {ifindex}")))
    }

    /// Sets a link administratively up.
    pub async fn set_up(&self, ifindex: u32) -> Result<(), NetlinkError> {
        self.link_set(
            LinkUnspec::new_with_index(ifindex).up().build(),
            "set up",
            ifindex,
        )
        .await
    }

    /// Sets a link administratively down.
    pub async fn set_down(&self, ifindex: u32) -> Result<(), NetlinkError> {
        self.link_set(
            LinkUnspec::new_with_index(ifindex).down().build(),
            "set down",
            ifindex,
        )
        .await
    }

    /// Sets the MAC address of a link.
    pub async fn set_mac(&self, ifindex: u32, mac: [u8; 6]) -> Result<(), NetlinkError> {
        self.link_set(
            LinkUnspec::new_with_index(ifindex)
                .address(mac.to_vec())
                .build(),
            "set mac",
            ifindex,
        )
        .await
    }

    /// Sets the carrier of a link (drivers that support it: not veth).
    pub async fn set_carrier(&self, ifindex: u32, on: bool) -> Result<(), NetlinkError> {
        self.link_set(
            LinkUnspec::new_with_index(ifindex).carrier(on).build(),
            "set carrier",
            ifindex,
        )
        .await
    }

    fn addr_message(ifindex: u32, spec: &AddrSpec) -> Result<AddressMessage, NetlinkError> {
        if spec.prefix_len > 128 {
            return Err(NetlinkError::Invalid(format!(
                "prefix length {} > 128 for {}",
                spec.prefix_len, spec.addr
            )));
        }
        let mut m = AddressMessage::default();
        m.header.family = AddressFamily::Inet6;
        m.header.prefix_len = spec.prefix_len;
        m.header.index = ifindex;
        m.header.scope = if (spec.addr.segments()[0] & 0xffc0) == 0xfe80 {
            AddressScope::Link
        } else {
            AddressScope::Universe
        };
        let bits = spec.flags.request_bits();
        // The header carries the low 8 bits, IFA_FLAGS all 32 (iproute2 does both).
        m.header.flags = AddressHeaderFlags::from_bits_retain((bits.bits() & 0xff) as u8);
        m.attributes
            .push(AddressAttribute::Local(IpAddr::V6(spec.addr)));
        m.attributes
            .push(AddressAttribute::Address(IpAddr::V6(spec.addr)));
        m.attributes.push(AddressAttribute::Flags(bits));
        if let Some(valid) = spec.valid_lft {
            let mut ci = CacheInfo::default();
            ci.ifa_valid = valid;
            ci.ifa_preferred = spec.preferred_lft.unwrap_or(valid).min(valid);
            m.attributes.push(AddressAttribute::CacheInfo(ci));
        }
        Ok(m)
    }

    async fn addr_request(
        &self,
        ifindex: u32,
        spec: &AddrSpec,
        replace: bool,
    ) -> Result<(), NetlinkError> {
        let msg = Self::addr_message(ifindex, spec)?;
        let mut r = self
            .handle
            .address()
            .add(ifindex, IpAddr::V6(spec.addr), spec.prefix_len);
        *r.message_mut() = msg;
        let (r, op) = if replace {
            (r.replace(), "replace address")
        } else {
            (r, "add address")
        };
        r.execute().await.map_err(req(op, spec.describe(ifindex)))
    }

    /// Adds an IPv6 address (EEXIST if it is there: see [`Netlink::addr_replace`]).
    pub async fn addr_add(&self, ifindex: u32, spec: &AddrSpec) -> Result<(), NetlinkError> {
        self.addr_request(ifindex, spec, false).await
    }

    /// Adds an IPv6 address or updates its flags and lifetimes.
    pub async fn addr_replace(&self, ifindex: u32, spec: &AddrSpec) -> Result<(), NetlinkError> {
        self.addr_request(ifindex, spec, true).await
    }

    /// Deletes an IPv6 address.
    pub async fn addr_del(
        &self,
        ifindex: u32,
        addr: Ipv6Addr,
        prefix_len: u8,
    ) -> Result<(), NetlinkError> {
        let spec = AddrSpec::new(addr, prefix_len);
        let mut msg = Self::addr_message(ifindex, &spec)?;
        msg.attributes
            .retain(|a| !matches!(a, AddressAttribute::Flags(_)));
        self.handle
            .address()
            .del(msg)
            .execute()
            .await
            .map_err(req("delete address", spec.describe(ifindex)))
    }

    /// IPv6 addresses, of one link or of all.
    pub async fn addrs(&self, ifindex: Option<u32>) -> Result<Vec<AddrInfo>, NetlinkError> {
        let mut r = self.handle.address().get();
        if let Some(i) = ifindex {
            r = r.set_link_index_filter(i);
        }
        let all: Vec<AddressMessage> = r
            .execute()
            .try_collect()
            .await
            .map_err(req("list", "addresses"))?;
        Ok(all
            .iter()
            .filter_map(AddrInfo::from_message)
            .filter(|a| ifindex.is_none_or(|i| a.ifindex == i))
            .collect())
    }

    /// Adds a route or replaces the one with the same destination, table and
    /// metric (`ip -6 route replace`).
    pub async fn route_replace(&self, route: &Route6) -> Result<(), NetlinkError> {
        self.handle
            .route()
            .add(route.to_message())
            .replace()
            .execute()
            .await
            .map_err(req("replace route", route.describe()))
    }

    /// Adds a route (EEXIST if the same one exists).
    pub async fn route_add(&self, route: &Route6) -> Result<(), NetlinkError> {
        self.handle
            .route()
            .add(route.to_message())
            .execute()
            .await
            .map_err(req("add route", route.describe()))
    }

    /// Deletes a route (matching destination, and gateway/oif/metric/table
    /// when given).
    pub async fn route_del(&self, route: &Route6) -> Result<(), NetlinkError> {
        self.handle
            .route()
            .del(route.to_message())
            .execute()
            .await
            .map_err(req("delete route", route.describe()))
    }

    /// IPv6 unicast routes of a table (`None` = all tables).
    pub async fn routes(&self, table: Option<u32>) -> Result<Vec<Route6>, NetlinkError> {
        let msg = RouteMessageBuilder::<Ipv6Addr>::new().build();
        let all: Vec<RouteMessage> = self
            .handle
            .route()
            .get(msg)
            .execute()
            .try_collect()
            .await
            .map_err(req("list", "routes"))?;
        Ok(all
            .iter()
            .filter_map(Route6::from_message)
            .filter(|r| table.is_none_or(|t| r.table == Some(t)))
            .collect())
    }

    /// Adds or replaces a neighbour entry `ip -> mac` on `ifindex`.
    pub async fn neigh_replace(
        &self,
        ifindex: u32,
        ip: Ipv6Addr,
        mac: [u8; 6],
        state: NeighState,
    ) -> Result<(), NetlinkError> {
        self.handle
            .neighbours()
            .add(ifindex, IpAddr::V6(ip))
            .link_layer_address(&mac)
            .state(state.into())
            .replace()
            .execute()
            .await
            .map_err(req(
                "replace neighbour",
                format!("{ip} lladdr {} on ifindex {ifindex}", fmt_mac(&mac)),
            ))
    }

    /// IPv6 neighbour entries, of one link or of all.
    pub async fn neighbours(&self, ifindex: Option<u32>) -> Result<Vec<NeighInfo>, NetlinkError> {
        let all: Vec<NeighbourMessage> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Inet6)
            .execute()
            .try_collect()
            .await
            .map_err(req("list", "neighbours"))?;
        Ok(all
            .iter()
            .filter_map(NeighInfo::from_message)
            .filter(|n| ifindex.is_none_or(|i| n.ifindex == i))
            .collect())
    }

    /// Deletes a neighbour entry.
    pub async fn neigh_del(&self, ifindex: u32, ip: Ipv6Addr) -> Result<(), NetlinkError> {
        let mut m = NeighbourMessage::default();
        m.header.family = AddressFamily::Inet6;
        m.header.ifindex = ifindex;
        m.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet6(ip)));
        self.handle.neighbours().del(m).execute().await.map_err(req(
            "delete neighbour",
            format!("{ip} on ifindex {ifindex}"),
        ))
    }
}

/// Which kernel notifications to subscribe to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventGroups {
    /// RTNLGRP_LINK: carrier, admin state, MAC, IFLA_EVENT.
    pub link: bool,
    /// RTNLGRP_IPV6_IFADDR: IPv6 addresses added/removed/changed.
    pub ipv6_addr: bool,
    /// RTNLGRP_IPV6_ROUTE: IPv6 routes added/removed.
    pub ipv6_route: bool,
    /// RTNLGRP_NEIGH: neighbour cache changes (e.g. the router became
    /// `Failed`: unreachable).
    pub neigh: bool,
}

impl EventGroups {
    /// Links, IPv6 addresses, IPv6 routes and neighbours.
    pub fn all() -> EventGroups {
        EventGroups {
            link: true,
            ipv6_addr: true,
            ipv6_route: true,
            neigh: true,
        }
    }

    /// Links and IPv6 addresses (what movement detection needs).
    pub fn links_and_addrs() -> EventGroups {
        EventGroups {
            link: true,
            ipv6_addr: true,
            ipv6_route: false,
            neigh: false,
        }
    }
}

/// A typed kernel notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetEvent {
    /// RTM_NEWLINK.
    Link(LinkEvent),
    /// RTM_DELLINK: the link is gone.
    LinkRemoved {
        /// Its index.
        ifindex: u32,
        /// Its name.
        name: String,
    },
    /// RTM_NEWADDR: added, or its flags changed (e.g. tentative -> ready,
    /// dadfailed).
    AddrAdded(AddrInfo),
    /// RTM_DELADDR.
    AddrRemoved(AddrInfo),
    /// RTM_NEWROUTE (IPv6 unicast).
    RouteAdded(Route6),
    /// RTM_DELROUTE (IPv6 unicast).
    RouteRemoved(Route6),
    /// RTM_NEWNEIGH (IPv6): a neighbour entry was added or changed state.
    NeighChanged(NeighInfo),
    /// RTM_DELNEIGH (IPv6).
    NeighRemoved(NeighInfo),
}

impl NetEvent {
    /// Translates one rtnetlink message; `None` for messages of no interest.
    pub fn from_message(msg: &RouteNetlinkMessage) -> Option<NetEvent> {
        match msg {
            RouteNetlinkMessage::NewLink(m) => Some(NetEvent::Link(LinkEvent::from_message(m))),
            RouteNetlinkMessage::DelLink(m) => {
                let i = LinkInfo::from_message(m);
                Some(NetEvent::LinkRemoved {
                    ifindex: i.ifindex,
                    name: i.name,
                })
            }
            RouteNetlinkMessage::NewAddress(m) => {
                AddrInfo::from_message(m).map(NetEvent::AddrAdded)
            }
            RouteNetlinkMessage::DelAddress(m) => {
                AddrInfo::from_message(m).map(NetEvent::AddrRemoved)
            }
            RouteNetlinkMessage::NewRoute(m) => Route6::from_message(m).map(NetEvent::RouteAdded),
            RouteNetlinkMessage::DelRoute(m) => Route6::from_message(m).map(NetEvent::RouteRemoved),
            RouteNetlinkMessage::NewNeighbour(m) => {
                NeighInfo::from_message(m).map(NetEvent::NeighChanged)
            }
            RouteNetlinkMessage::DelNeighbour(m) => {
                NeighInfo::from_message(m).map(NetEvent::NeighRemoved)
            }
            _ => None,
        }
    }
}

/// A stream of [`NetEvent`]s from the kernel (like `ip monitor`).
#[derive(Debug)]
pub struct NetEvents {
    rx: UnboundedReceiver<(
        NetlinkMessage<RouteNetlinkMessage>,
        rtnetlink::sys::SocketAddr,
    )>,
    // Keeps the connection's request side alive.
    _handle: Handle,
    // Ends the connection task when the stream is dropped.
    _task: TaskGuard,
}

impl NetEvents {
    /// Subscribes in the calling thread's namespace and spawns the connection
    /// task (ended when the `NetEvents` is dropped). Must be called inside a
    /// tokio runtime.
    pub fn subscribe(groups: EventGroups) -> Result<(NetEvents, JoinHandle<()>), NetlinkError> {
        let mut g = Vec::new();
        if groups.link {
            g.push(MulticastGroup::Link);
        }
        if groups.ipv6_addr {
            g.push(MulticastGroup::Ipv6Ifaddr);
        }
        if groups.ipv6_route {
            g.push(MulticastGroup::Ipv6Route);
        }
        if groups.neigh {
            g.push(MulticastGroup::Neigh);
        }
        let (conn, handle, rx) =
            rtnetlink::new_multicast_connection(&g).map_err(NetlinkError::Socket)?;
        let task = tokio::spawn(conn);
        let guard = TaskGuard(task.abort_handle());
        Ok((
            NetEvents {
                rx,
                _handle: handle,
                _task: guard,
            },
            task,
        ))
    }

    /// The next event; `None` when the connection has ended.
    pub async fn next(&mut self) -> Option<NetEvent> {
        loop {
            let (msg, _) = self.rx.next().await?;
            if let NetlinkPayload::InnerMessage(inner) = msg.payload {
                if let Some(ev) = NetEvent::from_message(&inner) {
                    return Some(ev);
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
    fn sysfs_carrier_answers_only_for_the_right_interface() {
        assert_eq!(parse_carrier("1\n"), Some(true));
        assert_eq!(parse_carrier("0\n"), Some(false));
        assert_eq!(parse_carrier("x"), None);
        // Loopback is up with carrier in every namespace; its index is 1.
        assert_eq!(sysfs_carrier("lo", 1), Some(true));
        // Another interface's index, no such interface, not a name.
        assert_eq!(sysfs_carrier("lo", 999_999), None);
        assert_eq!(sysfs_carrier("m6nosuch0", 1), None);
        assert_eq!(sysfs_carrier("../lo", 1), None);
        assert_eq!(sysfs_carrier("", 1), None);
    }

    #[test]
    fn link_event_reads_notify_peers_carrier_and_mac() {
        let mut m = LinkMessage::default();
        m.header.index = 7;
        m.header.flags = LinkFlags::Up | LinkFlags::LowerUp;
        m.attributes.push(LinkAttribute::IfName("eth1".into()));
        m.attributes
            .push(LinkAttribute::Address(vec![2, 0, 0, 0, 0, 9]));
        m.attributes.push(LinkAttribute::Carrier(0));
        m.attributes
            .push(LinkAttribute::Event(RawLinkEvent::NotifyPeers));
        let ev = LinkEvent::from_message(&m);
        assert_eq!(
            ev,
            LinkEvent {
                ifindex: 7,
                name: "eth1".into(),
                carrier: false, // IFLA_CARRIER wins over the flag
                admin_up: true,
                mac: Some([2, 0, 0, 0, 0, 9]),
                notify_peers: true,
            }
        );
        m.attributes.pop();
        m.attributes
            .retain(|a| !matches!(a, LinkAttribute::Carrier(_)));
        let ev = LinkEvent::from_message(&m);
        assert!(!ev.notify_peers);
        assert!(ev.carrier, "falls back to IFF_LOWER_UP");
    }

    #[test]
    fn addr_message_round_trip_keeps_flags_and_lifetimes() {
        let spec = AddrSpec::new("2001:db8:1::5".parse().unwrap(), 64)
            .nodad()
            .optimistic()
            .lifetimes(300, 600);
        let m = Netlink::addr_message(4, &spec).unwrap();
        let back = AddrInfo::from_message(&m).unwrap();
        assert_eq!(back.addr, spec.addr);
        assert_eq!(back.prefix_len, 64);
        assert_eq!(back.ifindex, 4);
        assert!(back.flags.nodad && back.flags.optimistic && !back.flags.tentative);
        assert_eq!(back.valid_lft, Some(300));
        assert_eq!(back.preferred_lft, Some(300), "preferred clamped to valid");
        assert!(Netlink::addr_message(4, &AddrSpec::new(spec.addr, 129)).is_err());
    }

    #[test]
    fn addr_usable_rules() {
        let mut a = AddrInfo {
            ifindex: 1,
            addr: "fe80::1".parse().unwrap(),
            prefix_len: 64,
            flags: AddrFlags::default(),
            valid_lft: None,
            preferred_lft: None,
        };
        assert!(a.usable() && a.is_link_local());
        a.flags.tentative = true;
        assert!(!a.usable());
        a.flags.optimistic = true;
        assert!(a.usable());
        a.flags.dadfailed = true;
        assert!(!a.usable());
    }

    #[test]
    fn route_message_round_trip() {
        let r = Route6::to("2001:db8:5::".parse().unwrap(), 48, 3)
            .unwrap()
            .via("fe80::1".parse().unwrap())
            .metric(50)
            .table(1000)
            .src("2001:db8:1::2".parse().unwrap());
        let back = Route6::from_message(&r.to_message()).unwrap();
        assert_eq!(back, r);
        let d = Route6::default_via("fe80::1".parse().unwrap(), 2);
        let back = Route6::from_message(&d.to_message()).unwrap();
        assert_eq!(back.dst.prefix(), 0);
        assert_eq!(back.gateway, d.gateway);
        assert_eq!(back.table, Some(254));
        assert!(Route6::to("2001:db8::".parse().unwrap(), 129, 1).is_err());
    }

    #[test]
    fn mac_format_and_parse() {
        let m = [0x02, 0xab, 0, 1, 0xff, 0x10];
        assert_eq!(fmt_mac(&m), "02:ab:00:01:ff:10");
        assert_eq!(parse_mac("02:ab:00:01:ff:10"), Some(m));
        assert_eq!(parse_mac("02:ab:00:01:ff"), None);
        assert_eq!(parse_mac("02:ab:00:01:ff:10:11"), None);
        assert_eq!(parse_mac("02:ab:00:01:ff:1g"), None);
        assert_eq!(parse_mac("002:ab:00:01:ff:10"), None);
    }

    /// A link notification carrying IFLA_EVENT_NOTIFY_PEERS, through the
    /// netlink wire format and back, as the event stream receives it.
    #[test]
    fn notify_peers_survives_the_wire_format() {
        let mut m = LinkMessage::default();
        m.header.index = 3;
        m.header.flags = LinkFlags::Up | LinkFlags::LowerUp | LinkFlags::Running;
        m.attributes.push(LinkAttribute::IfName("eth0".into()));
        m.attributes.push(LinkAttribute::Carrier(1));
        m.attributes
            .push(LinkAttribute::Event(RawLinkEvent::NotifyPeers));
        let mut msg = NetlinkMessage::from(RouteNetlinkMessage::NewLink(m));
        msg.finalize();
        let mut buf = vec![0u8; msg.buffer_len()];
        msg.serialize(&mut buf);
        // IFLA_EVENT (44) with value 4 must be in the bytes.
        assert!(
            buf.windows(8).any(|w| w == [8, 0, 44, 0, 4, 0, 0, 0]),
            "{buf:?}"
        );
        let back = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf).unwrap();
        let NetlinkPayload::InnerMessage(inner) = back.payload else {
            panic!("not an inner message")
        };
        let Some(NetEvent::Link(l)) = NetEvent::from_message(&inner) else {
            panic!("not a link event")
        };
        assert!(l.notify_peers && l.carrier && l.admin_up);
        assert_eq!((l.ifindex, l.name.as_str()), (3, "eth0"));
    }

    #[test]
    fn neighbour_info_reads_state_mac_and_router_flag() {
        let mut m = NeighbourMessage::default();
        m.header.family = AddressFamily::Inet6;
        m.header.ifindex = 2;
        m.header.state = NeighbourState::Failed;
        m.header.flags = NeighbourFlags::Router;
        m.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet6(
                "fe80::1".parse().unwrap(),
            )));
        m.attributes
            .push(NeighbourAttribute::LinkLayerAddress(vec![2, 0, 0, 0, 0, 1]));
        let n = NeighInfo::from_message(&m).unwrap();
        assert!(n.failed() && n.router);
        assert_eq!(n.mac, Some([2, 0, 0, 0, 0, 1]));
        assert_eq!(n.ip, "fe80::1".parse::<Ipv6Addr>().unwrap());
        assert_eq!(
            NetEvent::from_message(&RouteNetlinkMessage::DelNeighbour(m)),
            Some(NetEvent::NeighRemoved(n))
        );
    }

    #[test]
    fn net_event_ignores_ipv4_addresses() {
        let mut m = AddressMessage::default();
        m.header.family = AddressFamily::Inet;
        m.attributes
            .push(AddressAttribute::Address("192.0.2.1".parse().unwrap()));
        assert_eq!(
            NetEvent::from_message(&RouteNetlinkMessage::NewAddress(m)),
            None
        );
    }
}
