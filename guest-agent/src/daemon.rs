//! The daemon: the I/O around [`Mobility`].
//!
//! Event sources (each a task feeding one channel): netlink link/address
//! events, one NDP receiver per managed interface (RAs, already checked for
//! fragment headers, hop limit and link-local source by `mat6_net::icmp6`),
//! the IMS update socket, the peer-notification socket, the IMS watch stream
//! (peers' bindings) and the status socket. The main loop feeds each event to
//! the state machine, runs its timers and executes its actions: netlink
//! requests, NDP sends, UDP sends and map updates through one long-lived
//! `nft -i` session. Nothing on the switch path spawns a process or waits on
//! TLS: the switch is route changes (netlink), one NA, one UDP datagram.

use std::collections::BTreeMap;
use std::future::Future;
use std::io::IoSlice;
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use mat6_net::icmp6::{Icmp6Error, NdpReceiver, NdpSender, ALL_NODES, ALL_ROUTERS};
use mat6_net::netlink::{
    AddrSpec, EventGroups, NeighState, NetEvent, NetEvents, Netlink, NetlinkError, Route6,
};
use mat6_net::nft::{self as nftx, NftError, NftSession};
use mat6_net::prio;
use mat6_net::sysctl::{self, Ipv6Key, SysctlError};
use mat6_proto::mobility::{
    self, Action, IfaceConfig, IfaceState, LinkEvent, Mobility, MobilityConfig, NaInput,
    PeerBinding, RaInput, RaPrefix, SiteHint, Timers,
};
use mat6_proto::ndp::NdpRepr;
use mat6_proto::notify::{self, AckStatus, NotifyError, NotifyRepr};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, SockaddrIn6};
use tokio::io::{AsyncWriteExt as _, Interest};
use tokio::net::{UdpSocket, UnixListener};
use tokio::sync::{mpsc, oneshot};

use crate::config::{AgentConfig, ConfigError};
use crate::translate::{self, Translation};

/// Errors that stop the daemon (each names what to fix).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Configuration or key file.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A netlink request failed.
    #[error("netlink: {0}")]
    Netlink(#[from] NetlinkError),
    /// A configured interface is unusable.
    #[error("interface {name}: {reason}")]
    Interface {
        /// Interface name.
        name: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// nftables refused the ruleset or could not run.
    #[error("nftables: {0}")]
    Nft(#[from] NftError),
    /// A sysctl could not be set.
    #[error("sysctl: {0}")]
    Sysctl(#[from] SysctlError),
    /// A socket could not be opened.
    #[error("{what}: {source}")]
    Socket {
        /// Which socket.
        what: String,
        /// Cause.
        source: std::io::Error,
    },
    /// An NDP socket could not be opened.
    #[error("NDP socket: {0}")]
    Icmp6(#[from] Icmp6Error),
    /// The IMS TLS settings (CA file) are unusable.
    #[error("IMS TLS settings: {0}")]
    Tls(ims_client::ClientError),
}

/// What feeds the main loop.
#[derive(Debug)]
enum Event {
    Net(NetEvent),
    Ra { ifindex: u32, ra: RaInput },
    Na { ifindex: u32, na: NaInput },
    Sites(Vec<SiteHint>),
    ImsDatagram(Vec<u8>),
    Notify { bytes: Vec<u8>, from: SocketAddr },
    PeerRecord(ims_client::BindingRecord),
    PeerDeleted(Ipv6Addr),
    Status(oneshot::Sender<String>),
    Metrics(oneshot::Sender<String>),
}

struct Iface {
    cfg: IfaceConfig,
    sender: NdpSender,
}

/// The running agent.
struct Agent {
    cfg: AgentConfig,
    ims_pk: [u8; 32],
    m: Mobility,
    nl: Netlink,
    nft: NftSession,
    tr: Translation,
    ifaces: BTreeMap<u32, Iface>,
    ims_sock: Arc<UdpSocket>,
    notify_sock: Arc<UdpSocket>,
    started: Instant,
    /// The nice value the agent started with, while `agent.bicast_nice`
    /// holds it lowered (see [`Agent::set_bicast_priority`]).
    lowered_from: Option<i32>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn sock_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> AgentError {
    let what = what.into();
    move |source| AgentError::Socket { what, source }
}

/// Sends `data` to `dst` from the local address `src` out of interface
/// `ifindex` (0: wherever the routes say) (IPV6_PKTINFO). Pinning a MoA's
/// signalling to the MoA's own link keeps it right while the routes still
/// point at the old one (a bicast switch changes them later).
async fn send_from(
    sock: &UdpSocket,
    src: Ipv6Addr,
    ifindex: u32,
    dst: SocketAddrV6,
    data: &[u8],
) -> std::io::Result<usize> {
    let to = SockaddrIn6::from(dst);
    let info = nix::libc::in6_pktinfo {
        ipi6_addr: nix::libc::in6_addr {
            s6_addr: src.octets(),
        },
        ipi6_ifindex: ifindex,
    };
    let iov = [IoSlice::new(data)];
    sock.async_io(Interest::WRITABLE, || {
        let cmsg = [ControlMessage::Ipv6PacketInfo(&info)];
        sendmsg(sock.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), Some(&to))
            .map_err(std::io::Error::from)
    })
    .await
}

fn to_sockaddr_v6(a: SocketAddr) -> SocketAddrV6 {
    match a {
        SocketAddr::V6(v) => v,
        SocketAddr::V4(v) => SocketAddrV6::new(v.ip().to_ipv6_mapped(), v.port(), 0, 0),
    }
}

fn ra_input(p: &mat6_net::icmp6::NdpPacketIn) -> Option<RaInput> {
    let NdpRepr::RouterAdvert(ra) = &p.repr else {
        return None;
    };
    Some(RaInput {
        src: p.src,
        src_mac: ra.source_ll.or(Some(p.src_mac)),
        hop_limit: p.hop_limit,
        fragmented: false,
        router_lifetime_s: ra.router_lifetime_s,
        prefixes: ra
            .prefixes
            .iter()
            .map(|x| RaPrefix {
                prefix: x.prefix,
                prefix_len: x.prefix_len,
                valid_lifetime_s: x.valid_lifetime_s,
            })
            .collect(),
    })
}

fn na_input(p: &mat6_net::icmp6::NdpPacketIn) -> Option<NaInput> {
    let NdpRepr::NeighborAdvert {
        router,
        target,
        target_ll,
        ..
    } = &p.repr
    else {
        return None;
    };
    Some(NaInput {
        src: p.src,
        target: *target,
        target_mac: *target_ll,
        hop_limit: p.hop_limit,
        router: *router,
    })
}

/// The registry's sites as the state machine uses them (sites that are
/// not a /64 are left out: a MoA is always formed in a /64).
fn site_hints(sites: &[mat6_proto::binding::SiteInfo]) -> Vec<SiteHint> {
    sites
        .iter()
        .filter(|s| s.prefix.prefix() == 64)
        .map(|s| SiteHint {
            prefix: s.prefix.network(),
            gateway: s.gateway_ll,
            gateway_mac: s.gateway_mac.0,
            router_lifetime_s: s
                .ra
                .as_ref()
                .map_or(SITE_ROUTER_LIFETIME_S, |r| r.router_lifetime_s),
        })
        .collect()
}

/// Router lifetime assumed for a site recognised by its gateway when the
/// registry gives no RA parameters (RFC 4861's default, 3 × 600 s).
const SITE_ROUTER_LIFETIME_S: u16 = 1800;

fn peer_binding(b: &ims_client::Binding) -> PeerBinding {
    PeerBinding {
        active: b.active,
        standby: b.standby.clone(),
        seq: b.seq,
        expires_unix: b.expires_unix,
    }
}

/// Runs the agent until `shutdown` resolves, then removes what it added
/// (nft table, routes, neighbour entries, MoAs; not the HoA).
pub async fn run(cfg: AgentConfig, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    let key = cfg.load_key()?;
    let ims_pk = cfg.ims_public_key()?;
    let (nl, _nl_task) = Netlink::connect()?;
    let (tx, mut rx) = mpsc::channel::<Event>(1024);

    // Interfaces: index, MAC, sysctls (the agent does RA processing itself).
    let mut ifaces = BTreeMap::new();
    let mut iface_cfgs = Vec::new();
    for ic in &cfg.interfaces {
        let link = nl.link_by_name(&ic.name).await?;
        let mac = link.mac.ok_or(AgentError::Interface {
            name: ic.name.clone(),
            reason: "has no Ethernet MAC address",
        })?;
        for (k, v) in [
            (Ipv6Key::AcceptRa, 0),
            (Ipv6Key::Autoconf, 0),
            (Ipv6Key::IgnoreRoutesWithLinkdown, 1),
            // Link-local addresses are EUI-64 too: no DAD wait after a
            // carrier change, so an RS can leave at once from fe80::.
            (Ipv6Key::AcceptDad, 0),
            (Ipv6Key::KeepAddrOnDown, 1),
        ] {
            sysctl::set(Some(&ic.name), k, v)?;
        }
        sysctl::set(None, Ipv6Key::IgnoreRoutesWithLinkdown, 1)?;
        if !link.admin_up {
            nl.set_up(link.ifindex).await?;
        }
        let c = IfaceConfig {
            ifindex: link.ifindex,
            name: ic.name.clone(),
            mac,
            role: ic.role,
            allowed_routers: ic.allowed_routers.clone(),
        };
        let sender = NdpSender::bind(link.ifindex)?;
        let mut receiver = NdpReceiver::bind(link.ifindex)?;
        let txr = tx.clone();
        let ifindex = link.ifindex;
        tokio::spawn(async move {
            while let Ok(p) = receiver.recv().await {
                let ev = if let Some(ra) = ra_input(&p) {
                    Event::Ra { ifindex, ra }
                } else if let Some(na) = na_input(&p) {
                    Event::Na { ifindex, na }
                } else {
                    continue;
                };
                if txr.send(ev).await.is_err() {
                    break;
                }
            }
        });
        // A previous run's leftovers on this link: its MoAs (EUI-64 of this
        // MAC) and its default routes. They are re-formed from the next RA.
        for a in nl.addrs(Some(link.ifindex)).await? {
            if !a.is_link_local() && a.addr.octets()[8..] == mobility::eui64(mac) {
                let _ = nl.addr_del(link.ifindex, a.addr, a.prefix_len).await;
            }
        }
        for r in nl.routes(None).await? {
            if r.oif == Some(link.ifindex)
                && r.gateway.is_some()
                && (r.metric == Some(cfg.agent.active_metric)
                    || r.metric == Some(cfg.agent.standby_metric))
            {
                let _ = nl.route_del(&r).await;
            }
        }
        iface_cfgs.push(c.clone());
        ifaces.insert(link.ifindex, Iface { cfg: c, sender });
    }

    // The HoA: a /128 on lo, so applications bind to it.
    let lo = nl.link_by_name("lo").await?;
    if !lo.admin_up {
        nl.set_up(lo.ifindex).await?;
    }
    nl.addr_replace(lo.ifindex, &AddrSpec::new(cfg.hoa, 128).nodad())
        .await?;

    // Translation: replace any previous table in one transaction.
    nftx::apply(&translate::ruleset(&cfg.agent.nft_table, cfg.hoa)).await?;
    let nft = NftSession::start().await?;
    let tr = Translation::new(&cfg.agent.nft_table, cfg.hoa);

    // Sockets.
    let ims_sock = Arc::new(
        UdpSocket::bind("[::]:0")
            .await
            .map_err(sock_err("IMS update socket"))?,
    );
    let notify_sock = Arc::new(
        UdpSocket::bind(SocketAddr::from((
            Ipv6Addr::UNSPECIFIED,
            cfg.agent.notify_port,
        )))
        .await
        .map_err(sock_err(format!(
            "peer notification socket (UDP port {})",
            cfg.agent.notify_port
        )))?,
    );
    {
        let s = ims_sock.clone();
        let ims_addr = cfg.ims.update_addr;
        let t = tx.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            while let Ok((n, from)) = s.recv_from(&mut buf).await {
                if from != ims_addr {
                    continue;
                }
                let d = buf.get(..n).unwrap_or(&[]).to_vec();
                if t.send(Event::ImsDatagram(d)).await.is_err() {
                    break;
                }
            }
        });
    }
    {
        let s = notify_sock.clone();
        let t = tx.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            while let Ok((n, from)) = s.recv_from(&mut buf).await {
                let bytes = buf.get(..n).unwrap_or(&[]).to_vec();
                if t.send(Event::Notify { bytes, from }).await.is_err() {
                    break;
                }
            }
        });
    }

    // Netlink events.
    let (mut events, _ev_task) = NetEvents::subscribe(EventGroups::links_and_addrs())?;
    {
        let t = tx.clone();
        tokio::spawn(async move {
            while let Some(ev) = events.next().await {
                if t.send(Event::Net(ev)).await.is_err() {
                    break;
                }
            }
        });
    }

    // The IMS control channel (TLS): its address and trust, read once for
    // the watch and the site registry.
    let control = match (cfg.ims.control_addr, cfg.ims.ca_file.as_ref()) {
        (Some(addr), Some(ca)) => Some((
            addr,
            ims_client::TlsSettings::from_ca_pem_file(ca, &cfg.ims.server_name)
                .map_err(AgentError::Tls)?,
        )),
        _ => None,
    };

    // Peers' bindings from the IMS watch (TLS, in the background).
    let _watch = if let Some((addr, tls)) = control.clone() {
        let filter = ims_client::WatchFilter {
            hoas: cfg.peers.hoas.clone(),
            prefixes: cfg.peers.prefixes.clone(),
        };
        let mut w = ims_client::Watch::start(addr, tls, filter, None);
        let t = tx.clone();
        Some(tokio::spawn(async move {
            while let Ok(item) = w.next().await {
                if let ims_client::WatchItem::Event(ev) = item {
                    let e = match ev.change {
                        ims_client::WatchChange::Changed { record } => Event::PeerRecord(record),
                        ims_client::WatchChange::Deleted { hoa } => Event::PeerDeleted(hoa),
                    };
                    if t.send(e).await.is_err() {
                        break;
                    }
                }
            }
        }))
    } else {
        None
    };

    // The IMS site registry, to recognise a site by its gateway right
    // after a link event (Mobility::handle_na). Fetched until it answers,
    // then every 5 minutes.
    let _sites = if let (Some((addr, tls)), true) = (control, cfg.agent.site_probe) {
        let t = tx.clone();
        Some(tokio::spawn(async move {
            loop {
                let got = match ims_client::ControlClient::connect(addr, &tls).await {
                    Ok(c) => c.site_list().await,
                    Err(e) => Err(e),
                };
                let wait = match got {
                    Ok(sites) => {
                        if t.send(Event::Sites(site_hints(&sites))).await.is_err() {
                            break;
                        }
                        std::time::Duration::from_secs(300)
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "site registry not fetched; retrying");
                        std::time::Duration::from_secs(2)
                    }
                };
                tokio::time::sleep(wait).await;
            }
        }))
    } else {
        None
    };

    // Status socket.
    let status_path = cfg.agent.status_socket.clone();
    if let Some(dir) = status_path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let _ = std::fs::remove_file(&status_path);
    let listener = UnixListener::bind(&status_path)
        .map_err(sock_err(format!("status socket {}", status_path.display())))?;
    {
        let t = tx.clone();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let t = t.clone();
                tokio::spawn(async move {
                    let (otx, orx) = oneshot::channel();
                    if t.send(Event::Status(otx)).await.is_err() {
                        return;
                    }
                    if let Ok(s) = orx.await {
                        let _ = conn.write_all(s.as_bytes()).await;
                    }
                    let _ = conn.shutdown().await;
                });
            }
        });
    }

    // Prometheus text metrics (optional).
    if let Some(addr) = cfg.agent.metrics_addr {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(sock_err(format!("metrics listener {addr}")))?;
        let t = tx.clone();
        tokio::spawn(async move {
            while let Ok((conn, _)) = l.accept().await {
                let t = t.clone();
                tokio::spawn(serve_metrics(conn, t));
            }
        });
    }

    let timers = Timers {
        binding_lifetime_s: cfg.ims.binding_lifetime_s,
        active_metric: cfg.agent.active_metric,
        standby_metric: cfg.agent.standby_metric,
        standby_bicast: cfg.agent.standby_bicast,
        migration_switch_delay: std::time::Duration::from_millis(
            cfg.agent.migration_switch_delay_ms,
        ),
        rs_interval: std::time::Duration::from_millis(cfg.agent.rs_interval_ms),
        ..Timers::default()
    };
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(1);
    let m = Mobility::new(MobilityConfig {
        hoa: cfg.hoa,
        key,
        ifaces: iface_cfgs,
        peer_prefixes: cfg.peer_prefixes(),
        // Above anything a previous run used (a stale ack resyncs anyway).
        initial_seq: micros,
        nonce_seed: nonce_seed(),
        timers,
    });
    let mut agent = Agent {
        cfg,
        ims_pk,
        m,
        nl,
        nft,
        tr,
        ifaces,
        ims_sock,
        notify_sock,
        started: Instant::now(),
        lowered_from: None,
    };

    // Current link state.
    let managed: Vec<u32> = agent.ifaces.keys().copied().collect();
    for ifindex in managed {
        let l = agent.nl.link_by_index(ifindex).await?;
        if l.carrier && l.admin_up {
            agent
                .m
                .handle_link(ifindex, LinkEvent::CarrierUp, Instant::now());
        }
    }
    agent.drain().await;
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    tracing::info!(hoa = %agent.cfg.hoa, "guest-agent running");

    tokio::pin!(shutdown);
    loop {
        let deadline = agent.m.poll_timeout();
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = &mut shutdown => break,
            ev = rx.recv() => match ev {
                Some(ev) => agent.handle(ev).await,
                None => break,
            },
            _ = sleep => agent.m.handle_timeout(Instant::now()),
        }
        agent.drain().await;
    }

    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    tracing::info!("shutting down: removing routes, MoAs and the nft table");
    agent.m.shutdown();
    agent.drain().await;
    let _ = nftx::delete_table(nftx::Family::Ip6, &agent.cfg.agent.nft_table).await;
    let _ = std::fs::remove_file(&agent.cfg.agent.status_socket);
    Ok(())
}

/// Answers one HTTP request on the metrics port with the text exposition.
async fn serve_metrics(mut conn: tokio::net::TcpStream, tx: mpsc::Sender<Event>) {
    use tokio::io::AsyncReadExt as _;
    let mut buf = [0u8; 2048];
    // The request line is all we need; anything is answered with metrics.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), conn.read(&mut buf)).await;
    let (otx, orx) = oneshot::channel();
    if tx.send(Event::Metrics(otx)).await.is_err() {
        return;
    }
    let Ok(body) = orx.await else { return };
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = conn.write_all(head.as_bytes()).await;
    let _ = conn.write_all(body.as_bytes()).await;
    let _ = conn.shutdown().await;
}

fn nonce_seed() -> u64 {
    use ring::rand::SecureRandom as _;
    let mut b = [0u8; 8];
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    u64::from_be_bytes(b)
}

/// An action's variant name, for timing traces.
fn action_name(a: &Action) -> &'static str {
    match a {
        Action::SendRs { .. } => "SendRs",
        Action::ProbeGateways { .. } => "ProbeGateways",
        Action::PrepareOwnMoas(_) => "PrepareOwnMoas",
        Action::AddMoa { .. } => "AddMoa",
        Action::RemoveMoa { .. } => "RemoveMoa",
        Action::SetNeighbor { .. } => "SetNeighbor",
        Action::RemoveNeighbor { .. } => "RemoveNeighbor",
        Action::SetBicast(_) => "SetBicast",
        Action::AddRoute(_) => "AddRoute",
        Action::RemoveRoute(_) => "RemoveRoute",
        Action::SetOwnSource { .. } => "SetOwnSource",
        Action::RemoveOwnSource { .. } => "RemoveOwnSource",
        Action::SendImsUpdate(_) => "SendImsUpdate",
        Action::SendUnsolicitedNa { .. } => "SendUnsolicitedNa",
        Action::AnnounceToRouter { .. } => "AnnounceToRouter",
        Action::SendPeerNotify { .. } => "SendPeerNotify",
        Action::SetPeerMaps { .. } => "SetPeerMaps",
        Action::HandoverDone(_) => "HandoverDone",
    }
}

impl Agent {
    /// While the bicast is on, the agent (every thread and its `nft -i`
    /// child) runs at `agent.bicast_nice`: the copies carry the data path
    /// and host-prep activates the standby at the IMS, so right after a
    /// migration nothing waits for the agent, and a just-resumed TCG guest
    /// (empty translation cache: every code path is slow the first time)
    /// gives its vCPU to the packets first. Restored when the bicast ends.
    fn set_bicast_priority(&mut self, on: bool) {
        let want = self.cfg.agent.bicast_nice;
        if on && want != 0 && self.lowered_from.is_none() {
            let base = match prio::own_nice() {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the agent's nice value; priority unchanged");
                    return;
                }
            };
            if want <= base {
                return;
            }
            if let Err(e) = self.renice(want) {
                tracing::warn!(error = %e, nice = want, "cannot lower the agent's CPU priority");
                return;
            }
            self.lowered_from = Some(base);
            tracing::info!(nice = want, "CPU priority lowered while the bicast is on");
        } else if !on {
            if let Some(base) = self.lowered_from.take() {
                match self.renice(base) {
                    Ok(()) => tracing::info!(nice = base, "CPU priority restored"),
                    Err(e) => {
                        tracing::warn!(error = %e, nice = base, "cannot restore the agent's CPU priority (needs CAP_SYS_NICE)")
                    }
                }
            }
        }
    }

    fn renice(&self, nice: i32) -> std::io::Result<()> {
        prio::set_own_nice(nice)?;
        if let Some(pid) = self.nft.pid() {
            prio::set_nice(pid, nice)?;
        }
        Ok(())
    }

    async fn handle(&mut self, ev: Event) {
        let now = Instant::now();
        match ev {
            Event::Net(NetEvent::Link(l)) => {
                if !self.ifaces.contains_key(&l.ifindex) {
                    return;
                }
                let mut up = l.carrier && l.admin_up;
                // A notify-peers event (virtio announce, e.g. host-prep's
                // announce-self after `set_link off`) can be sent in the
                // same config-change run just before the driver turns the
                // carrier off, so it says "up". For the active link, ask
                // the kernel for the carrier now (sysfs: far less code to
                // run in a just-resumed guest than a netlink request;
                // netlink if sysfs cannot answer): the switch then waits
                // neither for the next announce nor for linkwatch (which
                // defers a carrier-off by up to 1 s).
                if up
                    && l.notify_peers
                    && matches!(self.m.iface_state(l.ifindex), Some(IfaceState::Active(_)))
                {
                    let name = self.ifaces.get(&l.ifindex).map(|i| i.cfg.name.as_str());
                    match name.and_then(|n| mat6_net::netlink::sysfs_carrier(n, l.ifindex)) {
                        Some(c) => up = c,
                        None => {
                            if let Ok(cur) = self.nl.link_by_index(l.ifindex).await {
                                up = cur.carrier && cur.admin_up;
                            }
                        }
                    }
                }
                // Carrier off in an announce: a migration and the
                // destination's switch (the bicast may let it wait).
                let e = if up {
                    LinkEvent::CarrierUp
                } else if l.notify_peers {
                    LinkEvent::CarrierDownAnnounced
                } else {
                    LinkEvent::CarrierDown
                };
                tracing::debug!(ifindex = l.ifindex, ?e, notify = l.notify_peers, "link");
                self.m.handle_link(l.ifindex, e, now);
                if l.notify_peers {
                    self.m.handle_link(l.ifindex, LinkEvent::NotifyPeers, now);
                }
            }
            Event::Net(NetEvent::AddrRemoved(a)) => {
                self.m.handle_address_removed(a.ifindex, a.addr)
            }
            Event::Net(_) => {}
            Event::Ra { ifindex, ra } => {
                let v = self.m.handle_ra(ifindex, &ra, now);
                tracing::debug!(ifindex, src = %ra.src, ?v, "router advertisement");
            }
            Event::Na { ifindex, na } => {
                if let Some(v) = self.m.handle_na(ifindex, &na, now) {
                    tracing::debug!(ifindex, gateway = %na.target, ?v, "link recognised by its gateway (site registry)");
                }
            }
            Event::Sites(sites) => {
                tracing::debug!(sites = sites.len(), "site registry");
                self.m.set_sites(sites);
            }
            Event::ImsDatagram(d) => {
                if !self.m.handle_ims_datagram(&d, now) {
                    tracing::debug!(len = d.len(), "IMS datagram ignored");
                }
            }
            Event::Notify { bytes, from } => self.on_notify(&bytes, from).await,
            Event::PeerRecord(r) => {
                let b = peer_binding(&r.binding);
                if self.m.handle_peer_binding(r.binding.hoa, b, now) {
                    tracing::info!(peer = %r.binding.hoa, active = ?r.binding.active, seq = r.binding.seq, "peer binding from IMS");
                }
            }
            Event::PeerDeleted(hoa) => {
                if self.m.remove_peer(hoa) {
                    tracing::info!(peer = %hoa, "peer binding deleted at the IMS");
                }
            }
            Event::Status(tx) => {
                let s = self.status_json();
                let _ = tx.send(s);
            }
            Event::Metrics(tx) => {
                let _ = tx.send(self.metrics_text());
            }
        }
    }

    fn metrics_text(&self) -> String {
        let c = self.m.counters();
        let mut s = String::new();
        let mut counter = |name: &str, help: &str, v: u64| {
            s.push_str(&format!(
                "# HELP mat6_agent_{name} {help}\n# TYPE mat6_agent_{name} counter\nmat6_agent_{name}_total {v}\n"
            ));
        };
        counter("ra_accepted", "Router Advertisements used.", c.ra_accepted);
        counter(
            "ra_malformed",
            "RAs dropped: source, hop limit or fragment.",
            c.ra_malformed,
        );
        counter(
            "ra_not_allowed",
            "RAs dropped by the router allow-list.",
            c.ra_not_allowed,
        );
        counter("rs_sent", "Router Solicitations sent.", c.rs_sent);
        counter(
            "ims_updates_sent",
            "IMS update datagrams sent.",
            c.ims_updates_sent,
        );
        counter("ims_resyncs", "Stale-seq resyncs.", c.ims_resyncs);
        counter("ims_refused", "Updates refused by the IMS.", c.ims_refused);
        counter(
            "ims_timeouts",
            "Updates unanswered through every retransmission.",
            c.ims_timeouts,
        );
        counter(
            "handovers",
            "Handovers (including the first MoA).",
            c.handovers,
        );
        counter("notifies_sent", "Peer notifications sent.", c.notifies_sent);
        counter(
            "gateway_probes",
            "Site-registry gateway probes sent.",
            c.gateway_probes,
        );
        counter(
            "gateway_probe_hits",
            "Probe answers that identified a registered site.",
            c.gateway_probe_hits,
        );
        counter(
            "switches_held",
            "Announced carrier losses whose switch waited migration_switch_delay_ms.",
            c.switches_held,
        );
        counter(
            "notifies_given_up",
            "Peer notifications never acknowledged.",
            c.notifies_given_up,
        );
        let st = self.m.status(Instant::now());
        s.push_str(&format!(
            "# HELP mat6_agent_peers Peer bindings held.\n# TYPE mat6_agent_peers gauge\nmat6_agent_peers {}\n",
            st.peers.len()
        ));
        s.push_str(&format!(
            "# HELP mat6_agent_active Whether a MoA is active.\n# TYPE mat6_agent_active gauge\nmat6_agent_active {}\n",
            u8::from(st.active_moa.is_some())
        ));
        if let Some(h) = st.handovers.last() {
            s.push_str(&format!(
                "# HELP mat6_agent_last_switch_seconds Trigger to data path switched, last handover.\n# TYPE mat6_agent_last_switch_seconds gauge\nmat6_agent_last_switch_seconds {}\n",
                h.switch_us as f64 / 1e6
            ));
            if let Some(a) = h.ims_ack_us {
                s.push_str(&format!(
                    "# HELP mat6_agent_last_ims_ack_seconds Trigger to IMS ack, last handover.\n# TYPE mat6_agent_last_ims_ack_seconds gauge\nmat6_agent_last_ims_ack_seconds {}\n",
                    a as f64 / 1e6
                ));
            }
        }
        s
    }

    fn status_json(&self) -> String {
        let st = self.m.status(Instant::now());
        let v = serde_json::json!({
            "status": st,
            "uptime_s": self.started.elapsed().as_secs(),
            "counters": self.m.counters(),
            "translation": {
                "peer_out": self.tr.peer_out(),
                "peer_in": self.tr.peer_in(),
                "own_src": self.tr.own_src(),
            },
        });
        serde_json::to_string_pretty(&v).unwrap_or_else(|_| "{}".to_owned())
    }

    async fn on_notify(&mut self, bytes: &[u8], from: SocketAddr) {
        let Ok(repr) = NotifyRepr::parse_bytes(bytes) else {
            tracing::debug!(%from, "malformed notification dropped");
            return;
        };
        match repr {
            NotifyRepr::Ack { nonce, .. } => self.m.handle_peer_ack(nonce, Instant::now()),
            NotifyRepr::Notify { nonce, assertion } => {
                let peers = self.m.peers();
                let r = notify::accept(
                    &assertion,
                    &self.ims_pk,
                    self.cfg.hoa,
                    |h| peers.get(&h).map(|b| b.seq),
                    unix_now(),
                );
                let (status, hoa, seq) = match r {
                    Ok(a) => {
                        let b = ims_client::Binding {
                            hoa: a.hoa,
                            active: a.active,
                            standby: a.standby.clone(),
                            seq: a.seq,
                            expires_unix: a.expires_unix,
                            key_id: 0,
                        };
                        self.m
                            .handle_peer_binding(a.hoa, peer_binding(&b), Instant::now());
                        // Apply the maps before acking, so the ack (and
                        // everything after it) already uses the new MoA.
                        self.drain().await;
                        tracing::info!(peer = %a.hoa, active = ?a.active, seq = a.seq, %from, "peer moved (notification)");
                        (AckStatus::Applied, a.hoa, a.seq)
                    }
                    Err(NotifyError::NotNewer { held, .. }) => {
                        let hoa = mat6_proto::assertion::BindingAssertion::decode(&assertion)
                            .map(|a| a.hoa)
                            .unwrap_or(Ipv6Addr::UNSPECIFIED);
                        (AckStatus::NotNewer, hoa, held)
                    }
                    Err(e) => {
                        // Forged, expired or about us: change nothing, say
                        // nothing.
                        tracing::warn!(%from, error = %e, "peer notification rejected");
                        return;
                    }
                };
                let ack = NotifyRepr::Ack {
                    nonce,
                    status,
                    hoa,
                    seq,
                };
                if let Ok(b) = ack.to_vec() {
                    let _ = self.notify_sock.send_to(&b, from).await;
                }
            }
        }
    }

    /// Executes every queued action.
    async fn drain(&mut self) {
        while let Some(a) = self.m.poll_action() {
            let t = Instant::now();
            if let Err(e) = self.exec(a.clone()).await {
                tracing::warn!(action = ?a, error = %e, "action failed");
            }
            tracing::debug!(
                action = action_name(&a),
                us = t.elapsed().as_micros() as u64,
                "action done"
            );
        }
    }

    async fn exec(&mut self, a: Action) -> Result<(), AgentError> {
        match a {
            Action::SendRs { ifindex } => {
                if let Some(i) = self.ifaces.get(&ifindex) {
                    let rs = NdpRepr::RouterSolicit {
                        source_ll: Some(i.cfg.mac),
                    };
                    i.sender.send(&rs, None, ALL_ROUTERS).await?;
                }
            }
            Action::ProbeGateways { ifindex, targets } => {
                if let Some(i) = self.ifaces.get(&ifindex) {
                    for target in targets {
                        let ns = NdpRepr::NeighborSolicit {
                            target,
                            source_ll: Some(i.cfg.mac),
                        };
                        i.sender
                            .send(&ns, None, mat6_net::icmp6::solicited_node(&target))
                            .await?;
                    }
                }
            }
            Action::AddMoa {
                ifindex,
                moa,
                prefix_len,
            } => {
                // No DAD: the interface identifier is the NIC's EUI-64, unique
                // by construction on the link the RA just came from. Without
                // a prefix route: everything goes through the router, so a
                // standby link never attracts traffic for its prefix.
                let spec = AddrSpec::new(moa, prefix_len).nodad().noprefixroute();
                self.nl.addr_replace(ifindex, &spec).await?;
                tracing::info!(ifindex, %moa, "MoA added");
            }
            Action::RemoveMoa {
                ifindex,
                moa,
                prefix_len,
            } => match self.nl.addr_del(ifindex, moa, prefix_len).await {
                Ok(()) => tracing::info!(ifindex, %moa, "MoA removed"),
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e.into()),
            },
            Action::SetNeighbor {
                ifindex,
                router,
                mac,
            } => {
                self.nl
                    .neigh_replace(ifindex, router, mac, NeighState::Permanent)
                    .await?
            }
            Action::RemoveNeighbor { ifindex, router } => {
                let _ = self.nl.neigh_del(ifindex, router).await;
            }
            Action::SetBicast(b) => {
                let s = self.tr.bicast(
                    b.as_ref()
                        .map(|b| (b.from_ifname.as_str(), b.to_ifname.as_str(), b.via)),
                );
                self.nft_run(&s).await?;
                self.set_bicast_priority(b.is_some());
                match b {
                    Some(b) => {
                        tracing::info!(from = %b.from_ifname, to = %b.to_ifname, via = %b.via, "bicast to the standby link on")
                    }
                    None => tracing::info!("bicast off"),
                }
            }
            Action::AddRoute(r) => {
                let mut rt = Route6::to(r.dst, r.dst_len, r.ifindex)?
                    .via(r.via)
                    .metric(r.metric);
                if let Some(s) = r.src {
                    rt = rt.src(s);
                }
                self.nl.route_replace(&rt).await?;
            }
            Action::RemoveRoute(r) => {
                let rt = Route6::to(r.dst, r.dst_len, r.ifindex)?
                    .via(r.via)
                    .metric(r.metric);
                match self.nl.route_del(&rt).await {
                    Ok(()) => {}
                    Err(e) if e.is_not_found() => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Action::PrepareOwnMoas(moas) => {
                let s = self.tr.set_prepared(&moas.into_iter().collect());
                self.nft_run(&s).await?;
            }
            Action::SetOwnSource { ifname, moa, .. } => {
                let s = self.tr.set_own(&ifname, moa);
                self.nft_run(&s).await?;
            }
            Action::RemoveOwnSource { ifname, moa, .. } => {
                let s = self.tr.remove_own(&ifname, moa);
                self.nft_run(&s).await?;
            }
            Action::SendImsUpdate(u) => {
                let dst = to_sockaddr_v6(self.cfg.ims.update_addr);
                let oif = self.oif_of(u.src);
                send_from(&self.ims_sock, u.src, oif, dst, &u.datagram)
                    .await
                    .map_err(sock_err("send IMS update"))?;
                tracing::debug!(seq = u.seq, activate = u.activate, active = ?u.active, standby = ?u.standby, "IMS update sent");
            }
            Action::SendUnsolicitedNa { ifindex, moa, mac } => {
                if let Some(i) = self.ifaces.get(&ifindex) {
                    let na = NdpRepr::NeighborAdvert {
                        router: false,
                        solicited: false,
                        override_: true,
                        target: moa,
                        target_ll: Some(mac),
                    };
                    i.sender.send(&na, Some(moa), ALL_NODES).await?;
                }
            }
            Action::AnnounceToRouter {
                ifindex,
                moa,
                router,
                mac,
            } => {
                if let Some(i) = self.ifaces.get(&ifindex) {
                    let ns = NdpRepr::NeighborSolicit {
                        target: router,
                        source_ll: Some(mac),
                    };
                    i.sender.send(&ns, Some(moa), router).await?;
                }
            }
            Action::SendPeerNotify {
                src,
                dst,
                nonce,
                assertion,
                peer_hoa,
            } => {
                let n = NotifyRepr::Notify { nonce, assertion };
                if let Ok(b) = n.to_vec() {
                    let to = SocketAddrV6::new(dst, self.cfg.agent.notify_port, 0, 0);
                    let oif = self.oif_of(src);
                    send_from(&self.notify_sock, src, oif, to, &b)
                        .await
                        .map_err(sock_err("send peer notification"))?;
                    tracing::debug!(peer = %peer_hoa, %dst, "peer notified");
                }
            }
            Action::SetPeerMaps {
                hoa, active, moas, ..
            } => {
                let s = self.tr.set_peer(hoa, active, &moas);
                self.nft_run(&s).await?;
            }
            Action::HandoverDone(h) => {
                tracing::info!(kind = ?h.kind, ifindex = h.ifindex, moa = %h.moa, switch_us = h.switch_us, "handover: data path switched");
            }
        }
        Ok(())
    }

    /// The interface holding our MoA `src` (0 when it is none of ours).
    fn oif_of(&self, src: Ipv6Addr) -> u32 {
        self.m
            .own_moas()
            .into_iter()
            .find(|(_, m)| *m == src)
            .map_or(0, |(i, _)| i)
    }

    /// Runs a multi-line script as one nft transaction.
    async fn nft_run(&mut self, script: &str) -> Result<(), AgentError> {
        let line: Vec<&str> = script.lines().filter(|l| !l.trim().is_empty()).collect();
        if line.is_empty() {
            return Ok(());
        }
        self.nft.run(&line.join("; ")).await?;
        Ok(())
    }
}
