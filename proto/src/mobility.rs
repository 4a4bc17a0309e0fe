//! Movement detection and handover for the guest agent, sans-IO.
//!
//! [`Mobility`] owns the per-interface state (`Down | Unconfigured | Standby |
//! Active`), the node's own binding at the IMS (sequence numbers, retransmission
//! with backoff, stale-sequence resync), the direct notification of peers after
//! a move, and the table of the peers' bindings that feeds the translation maps.
//!
//! Inputs carry an explicit `now`: link events ([`Mobility::handle_link`]),
//! address events ([`Mobility::handle_address_removed`]), Router Advertisements
//! ([`Mobility::handle_ra`]), IMS acks ([`Mobility::handle_ims_datagram`]), peer
//! acknowledgements ([`Mobility::handle_peer_ack`]), peer bindings
//! ([`Mobility::handle_peer_binding`]) and timers ([`Mobility::handle_timeout`]).
//! Outputs are [`Action`]s drained with [`Mobility::poll_action`]; the next timer
//! is [`Mobility::poll_timeout`]. Nothing here touches a socket, a clock or
//! netlink, so the whole handover sequence is unit-tested with a fake clock.
//!
//! The switch path is ordered make-before-break: the new active route is
//! installed first (the data path moves), then the unsolicited Neighbor
//! Advertisement and the one-datagram IMS activation go out, and only then is
//! the old attachment torn down. Peers are notified as soon as the IMS ack
//! carries the IMS-signed assertion for the new binding.
//!
//! The IMS exchange itself (signing, retransmission with backoff, ack
//! authentication) is [`crate::update::UpdateClient`]; this machine decides
//! what to register and when, and resyncs its seq on a stale-seq ack.

use std::collections::{BTreeMap, VecDeque};
use std::net::Ipv6Addr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::binding::MAX_STANDBY;
use crate::update::{RetransmitPolicy, UpdateClient, UpdateKey, UpdateOutcome, UpdateRepr};

/// Kernel interface index.
pub type IfIndex = u32;

/// Which NIC of the VM an interface is. The roles only break ties (the primary
/// wins when both links come up at once); after a migration the secondary is
/// the active one and the primary becomes the next standby.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The NIC that is normally active at boot.
    Primary,
    /// The NIC that host-prep prepares with the destination network.
    Secondary,
}

/// One managed interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IfaceConfig {
    /// Kernel interface index.
    pub ifindex: IfIndex,
    /// Interface name (used by the translation map `own_src`).
    pub name: String,
    /// The NIC's MAC address; the MoA's interface identifier is its EUI-64.
    pub mac: [u8; 6],
    /// Primary or secondary.
    pub role: Role,
    /// Link-local addresses of routers whose RAs are accepted on this link.
    /// Empty means any link-local router.
    pub allowed_routers: Vec<Ipv6Addr>,
}

/// Timers and knobs of the state machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Timers {
    /// Interval between Router Solicitation retransmissions.
    pub rs_interval: Duration,
    /// Solicitations sent per link-up (the first one at once).
    pub rs_max: u32,
    /// First IMS update retransmission timeout; doubles per try.
    pub ims_rto_initial: Duration,
    /// Ceiling of the IMS retransmission timeout.
    pub ims_rto_max: Duration,
    /// Transmissions of one update before starting over (after
    /// `ims_rto_max`).
    pub ims_max_attempts: u32,
    /// First peer-notification retransmission timeout; doubles per try.
    pub notify_rto_initial: Duration,
    /// Notifications sent to one peer before giving up (the IMS watch still
    /// tells it).
    pub notify_max_tries: u32,
    /// Binding lifetime requested from the IMS, seconds.
    pub binding_lifetime_s: u32,
    /// Route metric of the active interface's routes.
    pub active_metric: u32,
    /// Route metric of the standby interface's routes.
    pub standby_metric: u32,
    /// Bicast to the standby: while there is both an active and a standby
    /// attachment, the active link's outgoing HoA traffic is also sent,
    /// with the standby MoA as source, through the standby link
    /// ([`Action::SetBicast`]). For a standby that host-prep prepared on a
    /// bridge with no uplink: before the migration the copies end on that
    /// bridge, after it the originals end on the old NIC (carrier off), so
    /// the guest's first packets after resume already leave through the
    /// right link, before the guest-agent runs at all. Off for a standby on
    /// a live link (peers would get every packet twice).
    pub standby_bicast: bool,
    /// How long an *announced* carrier loss of the active link
    /// ([`LinkEvent::CarrierDownAnnounced`]: a live migration moved the VM
    /// and host-prep cut this NIC) waits before the switch, when the bicast
    /// already carries the traffic through the standby. host-prep
    /// activates the prepared standby at the IMS on the VM's behalf at
    /// resume, so nothing on the data path waits for the agent; its own
    /// switch work (IMS activation, NA, peer notifications, then the route
    /// and translation changes) would only compete for the just-resumed
    /// guest's one vCPU with the packets. Zero switches at once.
    pub migration_switch_delay: Duration,
}

impl Default for Timers {
    fn default() -> Self {
        Self {
            rs_interval: Duration::from_millis(250),
            rs_max: 4,
            ims_rto_initial: Duration::from_millis(100),
            ims_rto_max: Duration::from_secs(4),
            ims_max_attempts: 8,
            notify_rto_initial: Duration::from_millis(50),
            notify_max_tries: 6,
            binding_lifetime_s: 600,
            active_metric: 100,
            standby_metric: 200,
            standby_bicast: false,
            migration_switch_delay: Duration::from_millis(300),
        }
    }
}

/// Configuration of the state machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MobilityConfig {
    /// The node's Home Address.
    pub hoa: Ipv6Addr,
    /// The HoA's update key at the IMS.
    pub key: UpdateKey,
    /// Managed interfaces (primary and secondary).
    pub ifaces: Vec<IfaceConfig>,
    /// Peer prefixes routed with source hint HoA (so applications that do
    /// not bind pick the HoA for peers), besides the default route.
    pub peer_prefixes: Vec<(Ipv6Addr, u8)>,
    /// First sequence number to use (the agent derives it from the wall
    /// clock so a restart starts above what the IMS holds; a stale reply
    /// resyncs anyway).
    pub initial_seq: u64,
    /// Seed for notification nonces (random per start).
    pub nonce_seed: u64,
    /// Timers.
    pub timers: Timers,
}

/// A link event from netlink.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkEvent {
    /// Administratively up with carrier.
    CarrierUp,
    /// Carrier lost (or link down).
    CarrierDown,
    /// Carrier lost, reported together with a hypervisor announce
    /// (`IFLA_EVENT_NOTIFY_PEERS`): a live migration moved the VM and the
    /// destination cut this NIC (host-prep's switch). Like
    /// [`LinkEvent::CarrierDown`], except that with the bicast on, the
    /// switch from the active link waits
    /// [`Timers::migration_switch_delay`].
    CarrierDownAnnounced,
    /// `IFLA_EVENT_NOTIFY_PEERS`: a hypervisor announced the VM after a
    /// migration; the link may now be somewhere else.
    NotifyPeers,
}

/// One prefix information option of an RA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RaPrefix {
    /// The prefix.
    pub prefix: Ipv6Addr,
    /// Prefix length.
    pub prefix_len: u8,
    /// Valid lifetime, seconds (`u32::MAX` is infinity).
    pub valid_lifetime_s: u32,
}

/// A received Router Advertisement with what the receiver saw around it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RaInput {
    /// IPv6 source address (must be link-local).
    pub src: Ipv6Addr,
    /// Source link-layer address (from the option or the Ethernet header).
    pub src_mac: Option<[u8; 6]>,
    /// IPv6 hop limit (must be 255).
    pub hop_limit: u8,
    /// Whether the packet carried a Fragment header (then it is dropped).
    pub fragmented: bool,
    /// Router lifetime, seconds (0: not a default router).
    pub router_lifetime_s: u16,
    /// Prefix information options.
    pub prefixes: Vec<RaPrefix>,
}

/// A site of the IMS registry, as the agent uses it to recognise the link
/// it is on without waiting for a Router Advertisement (see
/// [`Mobility::handle_na`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SiteHint {
    /// The site's /64 prefix.
    pub prefix: Ipv6Addr,
    /// The gateway's link-local address.
    pub gateway: Ipv6Addr,
    /// The gateway's MAC.
    pub gateway_mac: [u8; 6],
    /// Router lifetime to assume until the site's own RA arrives, seconds.
    pub router_lifetime_s: u16,
}

/// A received Neighbor Advertisement (an answer to a gateway probe).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NaInput {
    /// IPv6 source address.
    pub src: Ipv6Addr,
    /// The advertised address.
    pub target: Ipv6Addr,
    /// Target link-layer address option.
    pub target_mac: Option<[u8; 6]>,
    /// IPv6 hop limit (must be 255).
    pub hop_limit: u8,
    /// R flag: the sender is a router.
    pub router: bool,
}

/// Why an RA was ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RaVerdict {
    /// Used.
    Accepted,
    /// Not from a managed interface.
    UnknownInterface,
    /// Source not link-local, hop limit not 255 or fragmented.
    Malformed,
    /// Router not in the interface's allow-list.
    NotAllowed,
    /// The interface has no carrier.
    LinkDown,
    /// No usable /64 prefix and no current attachment to refresh.
    NoPrefix,
}

/// An update for the IMS (the client signs and sends it as one datagram).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ImsUpdate {
    /// Sequence number (strictly increasing).
    pub seq: u64,
    /// Active MoA, if any.
    pub active: Option<Ipv6Addr>,
    /// Standby MoAs.
    pub standby: Vec<Ipv6Addr>,
    /// Whether this update activates a new MoA (a move) rather than only
    /// registering standbys or refreshing.
    pub activate: bool,
    /// Requested lifetime, seconds.
    pub lifetime_s: u32,
    /// MoA to send the datagram from.
    pub src: Ipv6Addr,
    /// The signed datagram.
    #[serde(skip)]
    pub datagram: Vec<u8>,
}

/// A peer's binding as learned from the IMS (lookup, watch) or from a
/// verified notification.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PeerBinding {
    /// The peer's active MoA.
    pub active: Option<Ipv6Addr>,
    /// The peer's standby MoAs.
    pub standby: Vec<Ipv6Addr>,
    /// Binding sequence number.
    pub seq: u64,
    /// Absolute expiry, unix seconds.
    pub expires_unix: u64,
}

/// What the I/O layer must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send a Router Solicitation on the interface.
    SendRs {
        /// Interface.
        ifindex: IfIndex,
    },
    /// Put these MoAs into the translation's `own_moas` ahead of time (the
    /// MoAs each NIC would form on each registered site; replaces the
    /// previous list). See [`Mobility::set_sites`].
    PrepareOwnMoas(Vec<Ipv6Addr>),
    /// Send a Neighbor Solicitation for each of the site gateways'
    /// link-local addresses (to its solicited-node group), to learn at
    /// once which registered site the link belongs to (RFC 6059-style
    /// detection of network attachment, with the IMS site registry as the
    /// candidate list). Answers come back through [`Mobility::handle_na`].
    ProbeGateways {
        /// Interface.
        ifindex: IfIndex,
        /// Gateway link-local addresses.
        targets: Vec<Ipv6Addr>,
    },
    /// Add a MoA (no DAD: the IID is the NIC's EUI-64, unique by
    /// construction on the link the RA just came from).
    AddMoa {
        /// Interface.
        ifindex: IfIndex,
        /// Address.
        moa: Ipv6Addr,
        /// Prefix length.
        prefix_len: u8,
    },
    /// Remove a MoA.
    RemoveMoa {
        /// Interface.
        ifindex: IfIndex,
        /// Address.
        moa: Ipv6Addr,
        /// Prefix length.
        prefix_len: u8,
    },
    /// Install a permanent neighbour entry for the router.
    SetNeighbor {
        /// Interface.
        ifindex: IfIndex,
        /// Router link-local address.
        router: Ipv6Addr,
        /// Router MAC.
        mac: [u8; 6],
    },
    /// Remove the router's neighbour entry.
    RemoveNeighbor {
        /// Interface.
        ifindex: IfIndex,
        /// Router link-local address.
        router: Ipv6Addr,
    },
    /// Set (or, with `None`, clear) the bicast of the active link's
    /// outgoing HoA traffic to the standby link ([`Timers::standby_bicast`]).
    /// Derived from the interface states: queued whenever they change what
    /// it should be, after the actions that made the change.
    SetBicast(Option<Bicast>),
    /// Add (or replace) a route.
    AddRoute(Route),
    /// Delete a route.
    RemoveRoute(Route),
    /// Map the interface to its MoA in the translation (`own_src`,
    /// `own_moas`). Done when a MoA is formed, never on a switch.
    SetOwnSource {
        /// Interface.
        ifindex: IfIndex,
        /// Interface name.
        ifname: String,
        /// The MoA on it.
        moa: Ipv6Addr,
    },
    /// Remove the interface's MoA from the translation.
    RemoveOwnSource {
        /// Interface.
        ifindex: IfIndex,
        /// Interface name.
        ifname: String,
        /// The MoA.
        moa: Ipv6Addr,
    },
    /// Send one signed update datagram to the IMS.
    SendImsUpdate(ImsUpdate),
    /// Send an unsolicited Neighbor Advertisement for the MoA.
    SendUnsolicitedNa {
        /// Interface.
        ifindex: IfIndex,
        /// Advertised address.
        moa: Ipv6Addr,
        /// The NIC's MAC.
        mac: [u8; 6],
    },
    /// Send a unicast Neighbor Solicitation from the MoA (with the NIC's
    /// MAC as source link-layer option) to the router, asking for the
    /// router's own address: the router creates a neighbour entry for the
    /// MoA from it (RFC 4861 §7.2.3), so its first packets for the MoA are
    /// forwarded at once instead of waiting for a solicitation the guest
    /// must answer. An unsolicited NA cannot do that: routers only use one
    /// to update an entry they already have.
    AnnounceToRouter {
        /// Interface.
        ifindex: IfIndex,
        /// The MoA (source address).
        moa: Ipv6Addr,
        /// The router's link-local address (target and destination).
        router: Ipv6Addr,
        /// The NIC's MAC.
        mac: [u8; 6],
    },
    /// Send the binding assertion to a peer (UDP, notify port).
    SendPeerNotify {
        /// Source (the new active MoA).
        src: Ipv6Addr,
        /// The peer's HoA (what the notification is about).
        peer_hoa: Ipv6Addr,
        /// Destination: the peer's active MoA.
        dst: Ipv6Addr,
        /// Nonce echoed in the ack.
        nonce: u64,
        /// The IMS-signed assertion.
        assertion: Vec<u8>,
    },
    /// A peer's binding changed: program `peer_out[hoa] = active` and
    /// `peer_in[m] = hoa` for every MoA in `moas` (removing `old_moas`).
    SetPeerMaps {
        /// Peer HoA.
        hoa: Ipv6Addr,
        /// Active MoA (`None`: no `peer_out` entry).
        active: Option<Ipv6Addr>,
        /// Every MoA mapped inbound: the binding's (active and standby)
        /// and those that left it less than [`PEER_MOA_GRACE`] ago.
        moas: Vec<Ipv6Addr>,
        /// MoAs to remove from `peer_in` (out of the binding and past
        /// their grace, or the whole peer deleted).
        old_moas: Vec<Ipv6Addr>,
        /// Previous active MoA (for `peer_out` removal when `active` is
        /// `None`).
        old_active: Option<Ipv6Addr>,
    },
    /// A handover finished its data-path part (for logs and metrics).
    HandoverDone(Handover),
}

/// A route the agent owns.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Route {
    /// Destination prefix (`::/0` for the default route).
    pub dst: Ipv6Addr,
    /// Destination prefix length.
    pub dst_len: u8,
    /// Interface.
    pub ifindex: IfIndex,
    /// Gateway (the router's link-local address).
    pub via: Ipv6Addr,
    /// Metric.
    pub metric: u32,
    /// Preferred source (the HoA for peer prefixes).
    pub src: Option<Ipv6Addr>,
}

/// The active link's outgoing HoA traffic copied to the standby link.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Bicast {
    /// The active interface (packets routed out of it are copied).
    pub from_ifname: String,
    /// The standby interface (the copies leave through it).
    pub to_ifname: String,
    /// The standby router's link-local address (the copies' next hop).
    pub via: Ipv6Addr,
}

/// What kind of move a handover was.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HandoverKind {
    /// Switched to a prepared standby.
    Standby,
    /// Formed a new MoA from a fresh RA (nothing prepared).
    Unplanned,
    /// The active link now carries another prefix.
    Renumbered,
    /// The first MoA after start (not a move).
    Initial,
}

/// Timings of one handover, relative to its trigger.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Handover {
    /// Kind of move.
    pub kind: HandoverKind,
    /// Interface moved to.
    pub ifindex: IfIndex,
    /// New active MoA.
    pub moa: Ipv6Addr,
    /// Trigger → routes switched, microseconds.
    pub switch_us: u64,
    /// Trigger → IMS ack, microseconds (when acked).
    pub ims_ack_us: Option<u64>,
    /// Trigger → every notified peer acked, microseconds.
    pub peers_acked_us: Option<u64>,
    /// Peers notified.
    pub peers_notified: usize,
}

/// An attachment to a router: a MoA formed from its prefix.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Attachment {
    /// The MoA.
    pub moa: Ipv6Addr,
    /// The prefix it came from.
    pub prefix: Ipv6Addr,
    /// Prefix length (64).
    pub prefix_len: u8,
    /// Router link-local address.
    pub router: Ipv6Addr,
    /// Router MAC, if the RA carried it.
    pub router_mac: Option<[u8; 6]>,
    /// When the router's lifetime runs out.
    #[serde(skip)]
    pub router_expires: Instant,
}

/// State of one managed interface.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum IfaceState {
    /// No carrier.
    Down,
    /// Carrier, no usable RA yet; soliciting.
    Unconfigured {
        /// Solicitations sent so far.
        rs_sent: u32,
        /// Next solicitation.
        #[serde(skip)]
        next_rs: Option<Instant>,
    },
    /// A MoA that is registered as standby.
    Standby(Attachment),
    /// The MoA the node uses.
    Active(Attachment),
}

impl IfaceState {
    fn attachment(&self) -> Option<&Attachment> {
        match self {
            IfaceState::Standby(a) | IfaceState::Active(a) => Some(a),
            _ => None,
        }
    }
}

struct Iface {
    cfg: IfaceConfig,
    state: IfaceState,
    /// Gateway probe answers are accepted until then.
    probe_until: Option<Instant>,
    /// When a notify-peers event last solicited this link.
    notified_at: Option<Instant>,
}

/// The registration with the IMS.
#[derive(Clone, Debug)]
enum Registration {
    /// Nothing to register (no MoA) or registered and fresh.
    Idle,
    /// An update is outstanding.
    Pending {
        client: Box<UpdateClient>,
        src: Ipv6Addr,
    },
}

#[derive(Clone, Debug)]
struct PendingNotify {
    src: Ipv6Addr,
    dst: Ipv6Addr,
    assertion: Vec<u8>,
    tries: u32,
    next_try: Instant,
    rto: Duration,
}

#[derive(Clone, Debug)]
struct HandoverProgress {
    started: Instant,
    record: Handover,
    /// Seq of the activation update (the ack for it closes the IMS part).
    seq: Option<u64>,
}

/// Counters for metrics and status.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    /// RAs used.
    pub ra_accepted: u64,
    /// RAs dropped as malformed (source, hop limit, fragment).
    pub ra_malformed: u64,
    /// RAs dropped by the allow-list.
    pub ra_not_allowed: u64,
    /// Router Solicitations sent.
    pub rs_sent: u64,
    /// IMS update datagrams sent (with retransmissions).
    pub ims_updates_sent: u64,
    /// Stale-seq resyncs.
    pub ims_resyncs: u64,
    /// Updates the IMS refused by policy.
    pub ims_refused: u64,
    /// Updates that went unacknowledged through every retransmission.
    pub ims_timeouts: u64,
    /// Handovers done.
    pub handovers: u64,
    /// Peer notifications sent (with retransmissions).
    pub notifies_sent: u64,
    /// Peer notifications that were never acknowledged.
    pub notifies_given_up: u64,
    /// Gateway probes sent (one per interface and link event).
    pub gateway_probes: u64,
    /// Probe answers that identified a registered site.
    pub gateway_probe_hits: u64,
    /// Announced carrier losses whose switch was held back
    /// ([`Timers::migration_switch_delay`]).
    pub switches_held: u64,
}

/// A snapshot for `guest-agent status`.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    /// The HoA.
    pub hoa: Ipv6Addr,
    /// Interfaces: name, role and state.
    pub interfaces: Vec<IfaceStatus>,
    /// Active MoA.
    pub active_moa: Option<Ipv6Addr>,
    /// Standby MoAs.
    pub standby_moas: Vec<Ipv6Addr>,
    /// The bicast to the standby link, when installed.
    pub bicast: Option<Bicast>,
    /// Last seq the IMS accepted.
    pub binding_seq: Option<u64>,
    /// Last accepted binding's expiry, seconds from the snapshot.
    pub binding_expires_in_s: Option<u64>,
    /// Whether an update is outstanding.
    pub registration_pending: bool,
    /// Peers' bindings.
    pub peers: BTreeMap<Ipv6Addr, PeerBinding>,
    /// Recent handovers, newest last.
    pub handovers: Vec<Handover>,
    /// Counters.
    pub counters: Counters,
}

/// One interface in [`Status`].
#[derive(Clone, Debug, Serialize)]
pub struct IfaceStatus {
    /// Name.
    pub name: String,
    /// Index.
    pub ifindex: IfIndex,
    /// Role.
    pub role: Role,
    /// State.
    pub state: IfaceState,
}

const HANDOVER_HISTORY: usize = 16;

/// How long after a move the old attachment's neighbour, translation and
/// MoA stay (see [`Mobility::handle_link`]): past the first, slow moments of
/// a just-migrated guest.
pub const OLD_TEARDOWN_DELAY: Duration = Duration::from_millis(300);

/// How long a peer's MoA that left its binding still translates to the
/// peer's HoA on the way in. The peer's first packets after a move can
/// still carry the old MoA as source: without preparation its guest-agent
/// activates the new MoA before its own source rewrite (an nft
/// transaction, slow right after a migration) has switched, so for that
/// moment our replies already go to the new MoA while its packets come
/// from the old one. The old MoA was the peer's by an IMS-signed binding;
/// it stays mapped to that HoA only this long.
pub const PEER_MOA_GRACE: Duration = Duration::from_secs(2);

/// The mobility state machine.
pub struct Mobility {
    cfg: MobilityConfig,
    /// The IMS site registry ([`Mobility::set_sites`]).
    sites: Vec<SiteHint>,
    /// The MoAs of [`Action::PrepareOwnMoas`].
    prepared_moas: Vec<Ipv6Addr>,
    ifaces: Vec<Iface>,
    next_seq: u64,
    registration: Registration,
    last_accepted: Option<(u64, Instant)>,
    refresh_at: Option<Instant>,
    /// Start-up: when to give up waiting for the primary and promote the
    /// secondary's standby.
    promote_at: Option<Instant>,
    /// After a move: the old attachment's removal (neighbour, translation,
    /// MoA; its routes are gone already), or after a renumbering to a
    /// prepared MoA the source rewrite and the old MoA's removal, held back
    /// until the deadline so
    /// that it does not compete with the data path for the just-migrated
    /// guest's CPU. Interface index and actions.
    deferred_teardown: Option<(Instant, usize, Vec<Action>)>,
    /// An announced carrier loss of the active link, held back
    /// ([`Timers::migration_switch_delay`]).
    pending_down: Option<PendingDown>,
    /// The bicast as last queued ([`Action::SetBicast`]).
    bicast: Option<Bicast>,
    peers: BTreeMap<Ipv6Addr, PeerBinding>,
    /// Peers' MoAs that left their binding, still mapped inbound until the
    /// deadline ([`PEER_MOA_GRACE`]): peer HoA → MoA → deadline.
    retiring: BTreeMap<Ipv6Addr, BTreeMap<Ipv6Addr, Instant>>,
    notifies: BTreeMap<u64, (Ipv6Addr, PendingNotify)>,
    next_nonce: u64,
    handover: Option<HandoverProgress>,
    history: VecDeque<Handover>,
    counters: Counters,
    actions: VecDeque<Action>,
}

/// A held-back carrier loss of the active link.
#[derive(Clone, Copy, Debug)]
struct PendingDown {
    /// When the switch runs.
    due: Instant,
    /// The interface (index into `ifaces`).
    k: usize,
    /// The carrier last reported for it since: a carrier that came back
    /// is handled as a new link-up once the switch has run.
    carrier: bool,
}

impl std::fmt::Debug for Mobility {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mobility")
            .field("hoa", &self.cfg.hoa)
            .field("next_seq", &self.next_seq)
            .field("registration", &self.registration)
            .finish_non_exhaustive()
    }
}

/// The EUI-64 interface identifier of a MAC address.
pub fn eui64(mac: [u8; 6]) -> [u8; 8] {
    [
        mac[0] ^ 0x02,
        mac[1],
        mac[2],
        0xff,
        0xfe,
        mac[3],
        mac[4],
        mac[5],
    ]
}

/// A MoA: the /64 prefix with the MAC's EUI-64 identifier.
pub fn moa_for(prefix: Ipv6Addr, mac: [u8; 6]) -> Ipv6Addr {
    let mut o = prefix.octets();
    o[8..].copy_from_slice(&eui64(mac));
    Ipv6Addr::from(o)
}

/// The MAC a MoA was formed from ([`moa_for`]), when its interface
/// identifier is an EUI-64 one (`ff:fe` in the middle); `None` otherwise.
pub fn mac_of_moa(moa: Ipv6Addr) -> Option<[u8; 6]> {
    let o = moa.octets();
    (o[11] == 0xff && o[12] == 0xfe).then(|| [o[8] ^ 0x02, o[9], o[10], o[13], o[14], o[15]])
}

/// A peer binding's MoAs, active and standby, sorted, without duplicates.
fn binding_moas(b: &PeerBinding) -> Vec<Ipv6Addr> {
    let mut v: Vec<Ipv6Addr> = b
        .active
        .into_iter()
        .chain(b.standby.iter().copied())
        .collect();
    v.sort();
    v.dedup();
    v
}

fn is_link_local(a: &Ipv6Addr) -> bool {
    (a.segments()[0] & 0xffc0) == 0xfe80
}

fn mask64(a: Ipv6Addr) -> Ipv6Addr {
    let mut o = a.octets();
    o[8..].fill(0);
    Ipv6Addr::from(o)
}

fn usable_prefixes(ra: &RaInput) -> impl Iterator<Item = Ipv6Addr> + '_ {
    ra.prefixes
        .iter()
        .filter(|p| p.prefix_len == 64 && p.valid_lifetime_s > 0)
        .filter(|p| {
            let a = p.prefix;
            !is_link_local(&a) && !a.is_multicast() && !a.is_unspecified()
        })
        .map(|p| mask64(p.prefix))
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl Mobility {
    /// A state machine with every interface `Down` (the I/O layer reports the
    /// links' current state at start with [`Mobility::handle_link`]).
    pub fn new(cfg: MobilityConfig) -> Self {
        let ifaces = cfg
            .ifaces
            .iter()
            .map(|c| Iface {
                cfg: c.clone(),
                state: IfaceState::Down,
                probe_until: None,
                notified_at: None,
            })
            .collect();
        Self {
            next_seq: cfg.initial_seq.max(1),
            next_nonce: cfg.nonce_seed,
            cfg,
            ifaces,
            registration: Registration::Idle,
            last_accepted: None,
            refresh_at: None,
            promote_at: None,
            deferred_teardown: None,
            pending_down: None,
            bicast: None,
            peers: BTreeMap::new(),
            retiring: BTreeMap::new(),
            notifies: BTreeMap::new(),
            handover: None,
            history: VecDeque::new(),
            counters: Counters::default(),
            actions: VecDeque::new(),
            sites: Vec::new(),
            prepared_moas: Vec::new(),
        }
    }

    /// The HoA.
    pub fn hoa(&self) -> Ipv6Addr {
        self.cfg.hoa
    }

    /// The next action for the I/O layer.
    pub fn poll_action(&mut self) -> Option<Action> {
        if self.actions.is_empty() {
            let want = self.wanted_bicast();
            if want != self.bicast {
                self.bicast.clone_from(&want);
                self.actions.push_back(Action::SetBicast(want));
            }
        }
        self.actions.pop_front()
    }

    /// What the bicast should be in the current interface states.
    fn wanted_bicast(&self) -> Option<Bicast> {
        if !self.cfg.timers.standby_bicast {
            return None;
        }
        // A move whose route changes are still held back: the copies are
        // what carries the data path until then.
        if self.deferred_teardown.is_some() && self.bicast.is_some() {
            return self.bicast.clone();
        }
        let a = self.active_idx()?;
        let s = self.standby_idx()?;
        let IfaceState::Standby(sa) = &self.ifaces[s].state else {
            return None;
        };
        Some(Bicast {
            from_ifname: self.ifaces[a].cfg.name.clone(),
            to_ifname: self.ifaces[s].cfg.name.clone(),
            via: sa.router,
        })
    }

    /// State of an interface.
    pub fn iface_state(&self, ifindex: IfIndex) -> Option<&IfaceState> {
        self.ifaces
            .iter()
            .find(|i| i.cfg.ifindex == ifindex)
            .map(|i| &i.state)
    }

    /// The active MoA.
    pub fn active_moa(&self) -> Option<Ipv6Addr> {
        self.ifaces.iter().find_map(|i| match &i.state {
            IfaceState::Active(a) => Some(a.moa),
            _ => None,
        })
    }

    /// Standby MoAs.
    pub fn standby_moas(&self) -> Vec<Ipv6Addr> {
        self.ifaces
            .iter()
            .filter_map(|i| match &i.state {
                IfaceState::Standby(a) => Some(a.moa),
                _ => None,
            })
            .collect()
    }

    /// Every MoA the node holds (for the translation's `own_moas`).
    pub fn own_moas(&self) -> Vec<(IfIndex, Ipv6Addr)> {
        self.ifaces
            .iter()
            .filter_map(|i| i.state.attachment().map(|a| (i.cfg.ifindex, a.moa)))
            .collect()
    }

    /// The peers' bindings.
    pub fn peers(&self) -> &BTreeMap<Ipv6Addr, PeerBinding> {
        &self.peers
    }

    /// Counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The last seq the IMS accepted.
    pub fn accepted_seq(&self) -> Option<u64> {
        self.last_accepted.map(|(s, _)| s)
    }

    /// Whether an IMS update is outstanding.
    pub fn registration_pending(&self) -> bool {
        matches!(self.registration, Registration::Pending { .. })
    }

    /// A snapshot for `guest-agent status`.
    pub fn status(&self, now: Instant) -> Status {
        let lifetime = Duration::from_secs(u64::from(self.cfg.timers.binding_lifetime_s));
        Status {
            hoa: self.cfg.hoa,
            interfaces: self
                .ifaces
                .iter()
                .map(|i| IfaceStatus {
                    name: i.cfg.name.clone(),
                    ifindex: i.cfg.ifindex,
                    role: i.cfg.role,
                    state: i.state.clone(),
                })
                .collect(),
            active_moa: self.active_moa(),
            standby_moas: self.standby_moas(),
            bicast: self.bicast.clone(),
            binding_seq: self.accepted_seq(),
            binding_expires_in_s: self
                .last_accepted
                .map(|(_, at)| (at + lifetime).saturating_duration_since(now).as_secs()),
            registration_pending: self.registration_pending(),
            peers: self.peers.clone(),
            handovers: self.history.iter().cloned().collect(),
            counters: self.counters.clone(),
        }
    }

    fn idx(&self, ifindex: IfIndex) -> Option<usize> {
        self.ifaces.iter().position(|i| i.cfg.ifindex == ifindex)
    }

    fn active_idx(&self) -> Option<usize> {
        self.ifaces
            .iter()
            .position(|i| matches!(i.state, IfaceState::Active(_)))
    }

    fn standby_idx(&self) -> Option<usize> {
        // Prefer the primary on a tie (deterministic).
        let mut c: Vec<usize> = (0..self.ifaces.len())
            .filter(|&k| matches!(self.ifaces[k].state, IfaceState::Standby(_)))
            .collect();
        c.sort_by_key(|&k| self.ifaces[k].cfg.role);
        c.first().copied()
    }

    fn routes_for(&self, k: usize, a: &Attachment, metric: u32) -> Vec<Route> {
        let ifindex = self.ifaces[k].cfg.ifindex;
        let mut r = vec![Route {
            dst: Ipv6Addr::UNSPECIFIED,
            dst_len: 0,
            ifindex,
            via: a.router,
            metric,
            src: None,
        }];
        for &(p, l) in &self.cfg.peer_prefixes {
            r.push(Route {
                dst: p,
                dst_len: l,
                ifindex,
                via: a.router,
                metric,
                src: Some(self.cfg.hoa),
            });
        }
        r
    }

    // ---- link events ---------------------------------------------------

    /// A link event on `ifindex`.
    pub fn handle_link(&mut self, ifindex: IfIndex, ev: LinkEvent, now: Instant) {
        let Some(k) = self.idx(ifindex) else { return };
        match ev {
            LinkEvent::CarrierUp => {
                // Link events for a held-back carrier loss (the migration's
                // announce rounds also report stale carrier states) only
                // update what happens after the switch.
                if let Some(p) = self.pending_down.as_mut().filter(|p| p.k == k) {
                    p.carrier = true;
                    return;
                }
                self.carrier_up(k, now);
            }
            LinkEvent::CarrierDown | LinkEvent::CarrierDownAnnounced => {
                if let Some(p) = self.pending_down.as_mut().filter(|p| p.k == k) {
                    p.carrier = false;
                    return;
                }
                let delay = self.cfg.timers.migration_switch_delay;
                if ev == LinkEvent::CarrierDownAnnounced
                    && !delay.is_zero()
                    && self.bicast.is_some()
                    && matches!(self.ifaces[k].state, IfaceState::Active(_))
                    && self.standby_idx().is_some()
                {
                    self.counters.switches_held += 1;
                    self.pending_down = Some(PendingDown {
                        due: now + delay,
                        k,
                        carrier: false,
                    });
                    return;
                }
                self.carrier_down(k, now);
            }
            LinkEvent::NotifyPeers => {
                // The VM may have moved: ask every link with carrier for a
                // fresh RA now instead of waiting for a periodic one. A
                // hypervisor announces several times (QEMU: 5 rounds over
                // 0.6 s) on every NIC; one solicitation per link and
                // hold-off is enough, and a just-resumed guest has better
                // use for its CPU.
                for j in 0..self.ifaces.len() {
                    // A link whose carrier loss is held back has no carrier.
                    if self.ifaces[j]
                        .notified_at
                        .is_some_and(|t| now < t + Self::NOTIFY_HOLDOFF)
                        || self.pending_down.is_some_and(|p| p.k == j)
                    {
                        continue;
                    }
                    if !matches!(self.ifaces[j].state, IfaceState::Down) {
                        self.ifaces[j].notified_at = Some(now);
                    }
                    match &mut self.ifaces[j].state {
                        IfaceState::Down => {}
                        IfaceState::Unconfigured { rs_sent, next_rs } => {
                            *rs_sent = 0;
                            *next_rs = Some(now);
                            self.solicit(j, now);
                        }
                        IfaceState::Standby(_) | IfaceState::Active(_) => {
                            self.counters.rs_sent += 1;
                            self.actions.push_back(Action::SendRs {
                                ifindex: self.ifaces[j].cfg.ifindex,
                            });
                        }
                    }
                    // A standby was prepared for the link it is on (and its
                    // RA refreshes it): probing it would only cost CPU.
                    if matches!(
                        self.ifaces[j].state,
                        IfaceState::Unconfigured { .. } | IfaceState::Active(_)
                    ) {
                        self.probe_gateways(j, now);
                    }
                }
            }
        }
    }

    /// Carrier on interface `k`: a link that was down starts soliciting.
    fn carrier_up(&mut self, k: usize, now: Instant) {
        if matches!(self.ifaces[k].state, IfaceState::Down) {
            self.ifaces[k].state = IfaceState::Unconfigured {
                rs_sent: 0,
                next_rs: Some(now),
            };
            self.solicit(k, now);
            self.probe_gateways(k, now);
        }
    }

    /// Runs a held-back carrier loss: the switch, then a link-up if the
    /// carrier came back meanwhile.
    fn run_pending_down(&mut self, now: Instant) {
        let Some(p) = self.pending_down.take() else {
            return;
        };
        self.carrier_down(p.k, now);
        if p.carrier {
            self.carrier_up(p.k, now);
        }
    }

    /// Notify-peers events within this time of the one that solicited a
    /// link solicit it again only if its carrier came back in between.
    const NOTIFY_HOLDOFF: Duration = Duration::from_secs(1);

    /// How long after a probe its answers are accepted.
    const PROBE_WINDOW: Duration = Duration::from_secs(3);

    /// Replaces the site registry used to recognise links (from the IMS;
    /// sites whose prefix is not a /64 or whose gateway is not link-local
    /// are left out).
    /// The MoAs each NIC would form on each site are prepared in the
    /// translation ([`Action::PrepareOwnMoas`]), so that a renumbering to
    /// a registered site can activate before the translation update.
    pub fn set_sites(&mut self, sites: Vec<SiteHint>) {
        self.sites = sites
            .into_iter()
            .filter(|s| is_link_local(&s.gateway) && mask64(s.prefix) == s.prefix)
            .filter(|s| !is_link_local(&s.prefix) && !s.prefix.is_multicast())
            .collect();
        let mut moas: Vec<Ipv6Addr> = self
            .sites
            .iter()
            .flat_map(|s| self.ifaces.iter().map(|i| moa_for(s.prefix, i.cfg.mac)))
            .collect();
        moas.sort();
        moas.dedup();
        if moas != self.prepared_moas {
            self.prepared_moas = moas.clone();
            self.actions.push_back(Action::PrepareOwnMoas(moas));
        }
    }

    /// Probes the registered gateways on interface `k` (nothing without a
    /// registry).
    fn probe_gateways(&mut self, k: usize, now: Instant) {
        let mut targets: Vec<Ipv6Addr> = self.sites.iter().map(|s| s.gateway).collect();
        targets.sort();
        targets.dedup();
        if targets.is_empty() {
            return;
        }
        self.ifaces[k].probe_until = Some(now + Self::PROBE_WINDOW);
        self.counters.gateway_probes += 1;
        self.actions.push_back(Action::ProbeGateways {
            ifindex: self.ifaces[k].cfg.ifindex,
            targets,
        });
    }

    /// A Neighbor Advertisement received on `ifindex`. When it answers a
    /// recent gateway probe and its (address, MAC) pair is a registered
    /// site's gateway, the link is that site's: it is handled as that
    /// site's Router Advertisement would be (same checks, allow-list
    /// included), so a VM that arrives unprepared forms its MoA one round
    /// trip after the link event instead of waiting for the router, which
    /// delays a solicited RA by up to 0.5 s (RFC 4861 §6.2.6). The site's
    /// own RA, when it comes, refreshes or corrects the attachment.
    /// Returns `None` when the NA is not such an answer.
    pub fn handle_na(&mut self, ifindex: IfIndex, na: &NaInput, now: Instant) -> Option<RaVerdict> {
        let k = self.idx(ifindex)?;
        if self.ifaces[k].probe_until.is_none_or(|t| now > t) {
            return None;
        }
        if na.hop_limit != 255 || !na.router || !is_link_local(&na.target) || na.src != na.target {
            return None;
        }
        let mac = na.target_mac?;
        let site = self
            .sites
            .iter()
            .find(|s| s.gateway == na.target && s.gateway_mac == mac)?
            .clone();
        self.counters.gateway_probe_hits += 1;
        let ra = RaInput {
            src: site.gateway,
            src_mac: Some(mac),
            hop_limit: 255,
            fragmented: false,
            router_lifetime_s: site.router_lifetime_s,
            prefixes: vec![RaPrefix {
                prefix: site.prefix,
                prefix_len: 64,
                valid_lifetime_s: u32::from(site.router_lifetime_s),
            }],
        };
        Some(self.handle_ra(ifindex, &ra, now))
    }

    /// Sends an RS if one is due on an unconfigured interface.
    fn solicit(&mut self, k: usize, now: Instant) {
        let rs_max = self.cfg.timers.rs_max;
        let interval = self.cfg.timers.rs_interval;
        let ifindex = self.ifaces[k].cfg.ifindex;
        if let IfaceState::Unconfigured { rs_sent, next_rs } = &mut self.ifaces[k].state {
            if next_rs.is_some_and(|t| t <= now) {
                *rs_sent += 1;
                *next_rs = (*rs_sent < rs_max).then(|| now + interval);
                self.counters.rs_sent += 1;
                self.actions.push_back(Action::SendRs { ifindex });
            }
        }
    }

    /// Carrier lost on interface `k` (its notify hold-off ends with it).
    fn carrier_down(&mut self, k: usize, now: Instant) {
        self.ifaces[k].notified_at = None;
        let old = std::mem::replace(&mut self.ifaces[k].state, IfaceState::Down);
        match old {
            IfaceState::Down | IfaceState::Unconfigured { .. } => {}
            IfaceState::Standby(a) => {
                self.teardown(k, &a, self.cfg.timers.standby_metric);
                self.register(false, now);
            }
            IfaceState::Active(a) => {
                self.lose_active(k, a, now);
            }
        }
    }

    /// The active attachment on interface `k` is gone (already replaced by
    /// `Down` or `Unconfigured` by the caller): switch to a standby if there
    /// is one, otherwise solicit on every link with carrier.
    ///
    /// The data path moves first: the old active routes go before anything
    /// else, so the standby's (higher-metric) routes carry traffic at once
    /// and there is no moment without a route. The kernel may still consider
    /// the old routes usable: the agent can hear of the carrier loss from a
    /// notify-peers event (virtio announce) before linkwatch has marked them
    /// linkdown, and linkwatch may defer that by up to a second. Then the
    /// standby's routes get the active metric, then the IMS activation and
    /// the NA leave (through the new link), then the rest of the old
    /// attachment is removed.
    ///
    /// With the bicast installed the data path has moved already (the
    /// kernel sends every HoA packet through the standby link too), so the
    /// route changes wait with the rest of the old attachment's removal
    /// ([`OLD_TEARDOWN_DELAY`]) and the bicast stays until then: right after
    /// a migration the guest's one vCPU is better spent on the packets than
    /// on netlink and nft. The IMS activation and the NA leave at once (the
    /// I/O layer sends each from its MoA's own interface).
    fn lose_active(&mut self, k: usize, a: Attachment, now: Instant) {
        if let Some(s) = self.standby_idx() {
            let metric = self.cfg.timers.active_metric;
            self.flush_deferred();
            let mut routes: Vec<Action> = self
                .routes_for(k, &a, metric)
                .into_iter()
                .map(Action::RemoveRoute)
                .collect();
            routes.extend(self.promote_routes(s));
            let defer_routes = self.bicast.is_some();
            if !defer_routes {
                self.actions.extend(routes.drain(..));
            }
            self.promote(s, now, HandoverKind::Standby);
            // The rest of the old attachment (a spawned nft run, address
            // and neighbour removal) later: nothing on the data path needs
            // it, and right after a migration the guest is slow.
            let start = self.actions.len();
            self.teardown_rest(k, &a);
            let rest: Vec<Action> = routes
                .into_iter()
                .chain(self.actions.drain(start..))
                .collect();
            self.deferred_teardown = Some((now + OLD_TEARDOWN_DELAY, k, rest));
        } else {
            self.teardown(k, &a, self.cfg.timers.active_metric);
            self.handover = Some(HandoverProgress {
                started: now,
                record: Handover {
                    kind: HandoverKind::Unplanned,
                    ifindex: 0,
                    moa: Ipv6Addr::UNSPECIFIED,
                    switch_us: 0,
                    ims_ack_us: None,
                    peers_acked_us: None,
                    peers_notified: 0,
                },
                seq: None,
            });
            for j in 0..self.ifaces.len() {
                if let IfaceState::Unconfigured { rs_sent, next_rs } = &mut self.ifaces[j].state {
                    *rs_sent = 0;
                    *next_rs = Some(now);
                    self.solicit(j, now);
                }
            }
            // Nothing left to be active: the IMS keeps the old binding until
            // a new MoA exists (an update with no active MoA would only cut
            // peers off earlier).
        }
    }

    /// Removes an attachment's routes, neighbour, translation and address.
    fn teardown(&mut self, k: usize, a: &Attachment, metric: u32) {
        for r in self.routes_for(k, a, metric) {
            self.actions.push_back(Action::RemoveRoute(r));
        }
        self.teardown_rest(k, a);
    }

    /// Queues a held-back teardown now.
    fn flush_deferred(&mut self) {
        if let Some((_, _, acts)) = self.deferred_teardown.take() {
            self.actions.extend(acts);
        }
    }

    /// Queues a held-back teardown of interface `k` now (before anything
    /// new is set up there).
    fn flush_deferred_for(&mut self, k: usize) {
        if self.deferred_teardown.as_ref().is_some_and(|d| d.1 == k) {
            self.flush_deferred();
        }
    }

    /// [`Self::teardown`] without the routes (already removed).
    fn teardown_rest(&mut self, k: usize, a: &Attachment) {
        let ifindex = self.ifaces[k].cfg.ifindex;
        let ifname = self.ifaces[k].cfg.name.clone();
        self.actions.push_back(Action::RemoveNeighbor {
            ifindex,
            router: a.router,
        });
        self.actions.push_back(Action::RemoveOwnSource {
            ifindex,
            ifname,
            moa: a.moa,
        });
        self.actions.push_back(Action::RemoveMoa {
            ifindex,
            moa: a.moa,
            prefix_len: a.prefix_len,
        });
    }

    /// The route changes that make the standby on `s` the active
    /// attachment: active metric added, standby metric removed.
    fn promote_routes(&self, s: usize) -> Vec<Action> {
        let IfaceState::Standby(a) = &self.ifaces[s].state else {
            return Vec::new();
        };
        let t = &self.cfg.timers;
        let mut v: Vec<Action> = self
            .routes_for(s, a, t.active_metric)
            .into_iter()
            .map(Action::AddRoute)
            .collect();
        v.extend(
            self.routes_for(s, a, t.standby_metric)
                .into_iter()
                .map(Action::RemoveRoute),
        );
        v
    }

    /// Makes the standby on `s` the active attachment (its routes are the
    /// caller's: [`Self::promote_routes`]), then the IMS activation and the
    /// NA.
    fn promote(&mut self, s: usize, now: Instant, kind: HandoverKind) {
        let IfaceState::Standby(a) = self.ifaces[s].state.clone() else {
            return;
        };
        self.ifaces[s].state = IfaceState::Active(a.clone());
        self.activated(s, &a, now, now, kind);
    }

    /// Common tail of every move: IMS activation, NA, the announcement to
    /// the router, handover record.
    fn activated(
        &mut self,
        k: usize,
        a: &Attachment,
        started: Instant,
        now: Instant,
        kind: HandoverKind,
    ) {
        let ifindex = self.ifaces[k].cfg.ifindex;
        let mac = self.ifaces[k].cfg.mac;
        let record = Handover {
            kind,
            ifindex,
            moa: a.moa,
            switch_us: micros(now.saturating_duration_since(started)),
            ims_ack_us: None,
            peers_acked_us: None,
            peers_notified: 0,
        };
        self.counters.handovers += 1;
        // Cancel notifications about an older move.
        self.notifies.clear();
        // The activation first (its ack gates the peers), then the NA.
        let seq = self.register(true, now);
        self.actions.push_back(Action::SendUnsolicitedNa {
            ifindex,
            moa: a.moa,
            mac,
        });
        self.actions.push_back(Action::AnnounceToRouter {
            ifindex,
            moa: a.moa,
            router: a.router,
            mac,
        });
        self.actions.push_back(Action::HandoverDone(record.clone()));
        self.handover = Some(HandoverProgress {
            started,
            record,
            seq,
        });
    }

    /// Clean shutdown: queues the removal of every route, neighbour entry,
    /// translation entry and MoA this machine installed (not the HoA), and
    /// forgets pending IMS updates and notifications. The binding at the IMS
    /// is left to expire (a restart re-registers with a newer seq).
    pub fn shutdown(&mut self) {
        self.pending_down = None;
        self.flush_deferred();
        for k in 0..self.ifaces.len() {
            let old = std::mem::replace(&mut self.ifaces[k].state, IfaceState::Down);
            match old {
                IfaceState::Active(a) => self.teardown(k, &a, self.cfg.timers.active_metric),
                IfaceState::Standby(a) => self.teardown(k, &a, self.cfg.timers.standby_metric),
                IfaceState::Down | IfaceState::Unconfigured { .. } => {}
            }
        }
        self.registration = Registration::Idle;
        self.refresh_at = None;
        self.notifies.clear();
        self.handover = None;
    }

    // ---- address events ------------------------------------------------

    /// An address was removed from `ifindex` by someone else: if it is one of
    /// our MoAs, put it back.
    pub fn handle_address_removed(&mut self, ifindex: IfIndex, addr: Ipv6Addr) {
        let Some(k) = self.idx(ifindex) else { return };
        if let Some(a) = self.ifaces[k].state.attachment() {
            if a.moa == addr {
                self.actions.push_back(Action::AddMoa {
                    ifindex,
                    moa: a.moa,
                    prefix_len: a.prefix_len,
                });
            }
        }
    }

    // ---- router advertisements ------------------------------------------

    /// A Router Advertisement received on `ifindex`.
    pub fn handle_ra(&mut self, ifindex: IfIndex, ra: &RaInput, now: Instant) -> RaVerdict {
        let Some(k) = self.idx(ifindex) else {
            return RaVerdict::UnknownInterface;
        };
        if !is_link_local(&ra.src) || ra.hop_limit != 255 || ra.fragmented {
            self.counters.ra_malformed += 1;
            return RaVerdict::Malformed;
        }
        let allowed = &self.ifaces[k].cfg.allowed_routers;
        if !allowed.is_empty() && !allowed.contains(&ra.src) {
            self.counters.ra_not_allowed += 1;
            return RaVerdict::NotAllowed;
        }
        let lifetime = Duration::from_secs(u64::from(ra.router_lifetime_s));
        let verdict = match self.ifaces[k].state.clone() {
            IfaceState::Down => return RaVerdict::LinkDown,
            IfaceState::Unconfigured { .. } => {
                if ra.router_lifetime_s == 0 {
                    RaVerdict::NoPrefix
                } else if let Some(prefix) = usable_prefixes(ra).next() {
                    self.attach(k, ra, prefix, now);
                    RaVerdict::Accepted
                } else {
                    RaVerdict::NoPrefix
                }
            }
            IfaceState::Standby(mut a) | IfaceState::Active(mut a) => {
                let active = matches!(self.ifaces[k].state, IfaceState::Active(_));
                let same_router = a.router == ra.src;
                let lists_ours = usable_prefixes(ra).any(|p| p == a.prefix);
                if same_router && ra.router_lifetime_s == 0 && lists_ours {
                    // The router retires itself: treat as unreachable.
                    self.router_gone(k, now);
                    RaVerdict::Accepted
                } else if lists_ours && ra.router_lifetime_s > 0 {
                    // Refresh (possibly a new router for the same prefix).
                    let metric = if active {
                        self.cfg.timers.active_metric
                    } else {
                        self.cfg.timers.standby_metric
                    };
                    if !same_router || (ra.src_mac.is_some() && ra.src_mac != a.router_mac) {
                        let ifindex = self.ifaces[k].cfg.ifindex;
                        let old = a.clone();
                        a.router = ra.src;
                        a.router_mac = ra.src_mac.or(a.router_mac);
                        self.install_router(k, &a, metric);
                        if old.router != a.router {
                            for r in self.routes_for(k, &old, metric) {
                                self.actions.push_back(Action::RemoveRoute(r));
                            }
                            self.actions.push_back(Action::RemoveNeighbor {
                                ifindex,
                                router: old.router,
                            });
                        }
                    }
                    a.router_expires = now + lifetime;
                    self.ifaces[k].state = if active {
                        IfaceState::Active(a)
                    } else {
                        IfaceState::Standby(a)
                    };
                    RaVerdict::Accepted
                } else if let Some(prefix) = usable_prefixes(ra)
                    .next()
                    .filter(|_| ra.router_lifetime_s > 0)
                {
                    // The link now carries another prefix: the node moved
                    // (or the site renumbered).
                    if active {
                        self.renumber_active(k, a, ra, prefix, now);
                    } else {
                        let metric = self.cfg.timers.standby_metric;
                        self.teardown(k, &a, metric);
                        self.ifaces[k].state = IfaceState::Unconfigured {
                            rs_sent: 0,
                            next_rs: None,
                        };
                        self.attach(k, ra, prefix, now);
                    }
                    RaVerdict::Accepted
                } else {
                    RaVerdict::NoPrefix
                }
            }
        };
        if verdict == RaVerdict::Accepted {
            self.counters.ra_accepted += 1;
        }
        verdict
    }

    fn install_router(&mut self, k: usize, a: &Attachment, metric: u32) {
        let ifindex = self.ifaces[k].cfg.ifindex;
        if let Some(mac) = a.router_mac {
            self.actions.push_back(Action::SetNeighbor {
                ifindex,
                router: a.router,
                mac,
            });
        }
        for r in self.routes_for(k, a, metric) {
            self.actions.push_back(Action::AddRoute(r));
        }
    }

    /// Forms a MoA on the unconfigured interface `k`: active if nothing is,
    /// standby otherwise.
    fn attach(&mut self, k: usize, ra: &RaInput, prefix: Ipv6Addr, now: Instant) {
        self.flush_deferred_for(k);
        let cfg = self.ifaces[k].cfg.clone();
        let a = Attachment {
            moa: moa_for(prefix, cfg.mac),
            prefix,
            prefix_len: 64,
            router: ra.src,
            router_mac: ra.src_mac,
            router_expires: now + Duration::from_secs(u64::from(ra.router_lifetime_s)),
        };
        self.actions.push_back(Action::AddMoa {
            ifindex: cfg.ifindex,
            moa: a.moa,
            prefix_len: a.prefix_len,
        });
        self.actions.push_back(Action::SetOwnSource {
            ifindex: cfg.ifindex,
            ifname: cfg.name.clone(),
            moa: a.moa,
        });
        // At start-up, when both links come up together, the primary wins:
        // a secondary that hears its router first waits as standby for a
        // moment while the primary is still soliciting.
        let startup = self.history.is_empty() && self.handover.is_none();
        let primary_pending = self.ifaces.iter().any(|i| {
            i.cfg.role == Role::Primary && matches!(i.state, IfaceState::Unconfigured { .. })
        });
        let wait_for_primary = self.active_idx().is_none()
            && startup
            && cfg.role == Role::Secondary
            && primary_pending;
        if wait_for_primary {
            self.install_router(k, &a, self.cfg.timers.standby_metric);
            self.ifaces[k].state = IfaceState::Standby(a);
            self.promote_at = Some(now + self.cfg.timers.rs_interval * 2);
            self.register(false, now);
        } else if self.active_idx().is_none() {
            self.promote_at = None;
            self.install_router(k, &a, self.cfg.timers.active_metric);
            self.ifaces[k].state = IfaceState::Active(a.clone());
            let (started, kind) = match &self.handover {
                Some(h) if h.record.kind == HandoverKind::Unplanned && h.seq.is_none() => {
                    (h.started, HandoverKind::Unplanned)
                }
                _ => (now, HandoverKind::Initial),
            };
            self.activated(k, &a, started, now, kind);
        } else {
            self.install_router(k, &a, self.cfg.timers.standby_metric);
            self.ifaces[k].state = IfaceState::Standby(a);
            self.register(false, now);
        }
    }

    /// The active link now announces another prefix: replace the MoA on the
    /// same interface.
    fn renumber_active(
        &mut self,
        k: usize,
        old: Attachment,
        ra: &RaInput,
        prefix: Ipv6Addr,
        now: Instant,
    ) {
        self.flush_deferred_for(k);
        // If a standby exists, it may be the better choice, but the active
        // link demonstrably works: stay on it with a new MoA.
        let cfg = self.ifaces[k].cfg.clone();
        let a = Attachment {
            moa: moa_for(prefix, cfg.mac),
            prefix,
            prefix_len: 64,
            router: ra.src,
            router_mac: ra.src_mac,
            router_expires: now + Duration::from_secs(u64::from(ra.router_lifetime_s)),
        };
        let metric = self.cfg.timers.active_metric;
        self.actions.push_back(Action::AddMoa {
            ifindex: cfg.ifindex,
            moa: a.moa,
            prefix_len: a.prefix_len,
        });
        if old.router != a.router {
            for r in self.routes_for(k, &old, metric) {
                self.actions.push_back(Action::RemoveRoute(r));
            }
            self.actions.push_back(Action::RemoveNeighbor {
                ifindex: cfg.ifindex,
                router: old.router,
            });
        }
        self.install_router(k, &a, metric);
        // Replacing the own_src element switches the source in one step.
        // It also puts the new MoA into own_moas, which must happen before
        // the activation: a peer that learns the MoA sends to it at once,
        // and until then the kernel would answer with a RST from an
        // address the agent's RST filter does not know yet. A MoA of a
        // registered site is in own_moas already (PrepareOwnMoas): then
        // the activation goes first, since the translation update is an
        // nft transaction, slow in a just-resumed guest.
        let early = self.prepared_moas.binary_search(&a.moa).is_ok();
        self.ifaces[k].state = IfaceState::Active(a.clone());
        let source = [
            Action::SetOwnSource {
                ifindex: cfg.ifindex,
                ifname: cfg.name.clone(),
                moa: a.moa,
            },
            Action::RemoveMoa {
                ifindex: cfg.ifindex,
                moa: old.moa,
                prefix_len: old.prefix_len,
            },
        ];
        if early {
            self.activated(k, &a, now, now, HandoverKind::Renumbered);
            // The source rewrite and the old MoA's removal wait
            // OLD_TEARDOWN_DELAY: peers keep translating the old MoA for
            // PEER_MOA_GRACE, and the nft run would take the just-resumed
            // guest's CPU just when the peers' first packets to the new
            // MoA arrive.
            self.flush_deferred();
            self.deferred_teardown = Some((now + OLD_TEARDOWN_DELAY, k, source.to_vec()));
            return;
        }
        self.actions.extend(source);
        self.activated(k, &a, now, now, HandoverKind::Renumbered);
    }

    /// The router of interface `k` is unreachable (lifetime ran out or it
    /// retired itself).
    fn router_gone(&mut self, k: usize, now: Instant) {
        let old = std::mem::replace(
            &mut self.ifaces[k].state,
            IfaceState::Unconfigured {
                rs_sent: 0,
                next_rs: Some(now),
            },
        );
        match old {
            IfaceState::Active(a) => self.lose_active(k, a, now),
            IfaceState::Standby(a) => {
                self.teardown(k, &a, self.cfg.timers.standby_metric);
                self.register(false, now);
            }
            _ => {}
        }
        self.solicit(k, now);
    }

    // ---- IMS registration ------------------------------------------------

    /// Queues an update carrying the current binding. Returns its seq.
    fn register(&mut self, activate: bool, now: Instant) -> Option<u64> {
        let active = self.active_moa();
        let mut standby = self.standby_moas();
        standby.truncate(MAX_STANDBY);
        let Some(src) = active.or_else(|| standby.first().copied()) else {
            self.registration = Registration::Idle;
            return None;
        };
        // A standby-only change while an activation is still outstanding
        // keeps the activate flag.
        let activate = activate
            || matches!(&self.registration, Registration::Pending { client, .. } if client.repr().activate);
        let seq = self.next_seq;
        self.next_seq += 1;
        if activate {
            // This update supersedes a pending activation: the handover's
            // IMS part now completes with its ack.
            if let Some(h) = &mut self.handover {
                if h.seq.is_some() {
                    h.seq = Some(seq);
                }
            }
        }
        let repr = UpdateRepr {
            key_id: self.cfg.key.key_id,
            seq,
            hoa: self.cfg.hoa,
            lifetime_s: self.cfg.timers.binding_lifetime_s,
            activate,
            active,
            standby,
        };
        self.start_update(repr, src, now, now);
        Some(seq)
    }

    fn start_update(&mut self, repr: UpdateRepr, src: Ipv6Addr, due: Instant, now: Instant) {
        let t = &self.cfg.timers;
        let policy = RetransmitPolicy {
            initial_rto: t.ims_rto_initial,
            max_rto: t.ims_rto_max,
            max_attempts: t.ims_max_attempts.max(1),
        };
        match UpdateClient::new(&self.cfg.key, repr, policy, due) {
            Ok(client) => {
                self.registration = Registration::Pending {
                    client: Box::new(client),
                    src,
                };
                self.transmit(now);
            }
            Err(_) => {
                // Only an unencodable repr fails (too many standbys), which
                // `register` prevents.
                self.counters.ims_refused += 1;
                self.registration = Registration::Idle;
            }
        }
    }

    /// Sends the pending update if a (re)transmission is due; starts over
    /// after the client gave up.
    fn transmit(&mut self, now: Instant) {
        let Registration::Pending { client, src } = &mut self.registration else {
            return;
        };
        if let Some(d) = client.poll_transmit(now) {
            let datagram = d.to_vec();
            let r = client.repr();
            let u = ImsUpdate {
                seq: r.seq,
                active: r.active,
                standby: r.standby.clone(),
                activate: r.activate,
                lifetime_s: r.lifetime_s,
                src: *src,
                datagram,
            };
            self.counters.ims_updates_sent += 1;
            self.actions.push_back(Action::SendImsUpdate(u));
        } else if matches!(client.outcome(), Some(UpdateOutcome::TimedOut { .. })) {
            // The IMS is unreachable: keep trying, at the slowest pace.
            self.counters.ims_timeouts += 1;
            let repr = client.repr().clone();
            let src = *src;
            let due = now + self.cfg.timers.ims_rto_max;
            self.start_update(repr, src, due, now);
        }
    }

    /// A datagram from the IMS. Anything that is not an authenticated ack
    /// for the outstanding update is ignored. Returns whether it was used.
    pub fn handle_ims_datagram(&mut self, bytes: &[u8], now: Instant) -> bool {
        let Registration::Pending { client, src } = &mut self.registration else {
            return false;
        };
        if !client.handle_datagram(bytes, now) {
            return false;
        }
        let repr = client.repr().clone();
        let src = *src;
        let outcome = client.outcome().cloned();
        match outcome {
            Some(UpdateOutcome::Accepted(ack)) => {
                self.registration = Registration::Idle;
                self.last_accepted = Some((repr.seq, now));
                let lifetime = u64::from(self.cfg.timers.binding_lifetime_s);
                self.refresh_at = Some(now + Duration::from_secs((lifetime / 2).max(1)));
                if repr.activate {
                    self.notify_peers(&repr, ack.assertion.unwrap_or_default(), now);
                }
            }
            Some(UpdateOutcome::Stale { last_accepted }) => {
                // Resync above what the IMS holds and resend at once.
                self.counters.ims_resyncs += 1;
                self.next_seq = self.next_seq.max(last_accepted.saturating_add(1));
                let mut repr = repr;
                repr.seq = self.next_seq;
                self.next_seq += 1;
                if let Some(h) = &mut self.handover {
                    if h.seq.is_some() {
                        h.seq = Some(repr.seq);
                    }
                }
                self.start_update(repr, src, now, now);
            }
            Some(UpdateOutcome::Refused(_)) | Some(UpdateOutcome::TimedOut { .. }) | None => {
                // Refused by policy: nothing this node can fix by resending;
                // try again at the next refresh.
                self.counters.ims_refused += 1;
                self.registration = Registration::Idle;
                self.refresh_at = Some(now + self.cfg.timers.ims_rto_max);
            }
        }
        true
    }

    fn notify_peers(&mut self, update: &UpdateRepr, assertion: Vec<u8>, now: Instant) {
        let Some(src) = update.active else { return };
        let mut notified = 0;
        let dsts: Vec<(Ipv6Addr, Ipv6Addr)> = self
            .peers
            .iter()
            .filter_map(|(h, b)| b.active.map(|m| (*h, m)))
            .collect();
        for (peer_hoa, dst) in dsts {
            let nonce = self.next_nonce;
            self.next_nonce = self.next_nonce.wrapping_add(1);
            let p = PendingNotify {
                src,
                dst,
                assertion: assertion.clone(),
                tries: 1,
                next_try: now + self.cfg.timers.notify_rto_initial,
                rto: self.cfg.timers.notify_rto_initial,
            };
            self.counters.notifies_sent += 1;
            self.actions.push_back(Action::SendPeerNotify {
                src,
                peer_hoa,
                dst,
                nonce,
                assertion: assertion.clone(),
            });
            self.notifies.insert(nonce, (peer_hoa, p));
            notified += 1;
        }
        if let Some(h) = &mut self.handover {
            if h.seq == Some(update.seq) {
                h.record.ims_ack_us = Some(micros(now.saturating_duration_since(h.started)));
                h.record.peers_notified = notified;
                if notified == 0 {
                    h.record.peers_acked_us = h.record.ims_ack_us;
                    self.finish_handover();
                }
            }
        }
    }

    fn finish_handover(&mut self) {
        if let Some(h) = self.handover.take() {
            self.history.push_back(h.record);
            while self.history.len() > HANDOVER_HISTORY {
                self.history.pop_front();
            }
        }
    }

    /// A peer acknowledged the notification with this nonce.
    pub fn handle_peer_ack(&mut self, nonce: u64, now: Instant) {
        if self.notifies.remove(&nonce).is_none() {
            return;
        }
        if self.notifies.is_empty() {
            if let Some(h) = &mut self.handover {
                h.record.peers_acked_us = Some(micros(now.saturating_duration_since(h.started)));
            }
            self.finish_handover();
        }
    }

    // ---- peers -----------------------------------------------------------

    /// A peer binding learned from the IMS (lookup or watch) or from a
    /// notification that verified against the IMS key. Applied only if its
    /// seq is newer than what is held. Returns whether it was applied.
    pub fn handle_peer_binding(&mut self, hoa: Ipv6Addr, b: PeerBinding, now: Instant) -> bool {
        if hoa == self.cfg.hoa {
            return false;
        }
        let old = self.peers.get(&hoa);
        if old.is_some_and(|o| o.seq >= b.seq) {
            return false;
        }
        let current = binding_moas(&b);
        let old_active = old.and_then(|o| o.active);
        // MoAs that just left the binding keep translating for a moment.
        let left: Vec<Ipv6Addr> = old
            .map(binding_moas)
            .unwrap_or_default()
            .into_iter()
            .filter(|m| !current.contains(m))
            .collect();
        let retiring = self.retiring.entry(hoa).or_default();
        retiring.retain(|m, _| !current.contains(m));
        for m in left {
            retiring.insert(m, now + PEER_MOA_GRACE);
        }
        if retiring.is_empty() {
            self.retiring.remove(&hoa);
        }
        self.peers.insert(hoa, b);
        self.queue_peer_maps(hoa, old_active, Vec::new());
        true
    }

    /// Queues the translation of peer `hoa`: its binding's MoAs and the
    /// retiring ones inbound, its active MoA outbound; `expired` are the
    /// MoAs whose grace just ended.
    fn queue_peer_maps(
        &mut self,
        hoa: Ipv6Addr,
        old_active: Option<Ipv6Addr>,
        expired: Vec<Ipv6Addr>,
    ) {
        let Some(b) = self.peers.get(&hoa) else {
            return;
        };
        let mut moas = binding_moas(b);
        if let Some(r) = self.retiring.get(&hoa) {
            moas.extend(r.keys().copied());
        }
        moas.sort();
        moas.dedup();
        self.actions.push_back(Action::SetPeerMaps {
            hoa,
            active: b.active,
            moas,
            old_moas: expired,
            old_active,
        });
    }

    /// A peer's binding was deleted at the IMS: forget it and remove its
    /// translation. Returns whether it was held.
    pub fn remove_peer(&mut self, hoa: Ipv6Addr) -> bool {
        let Some(old) = self.peers.remove(&hoa) else {
            return false;
        };
        let mut old_moas = binding_moas(&old);
        old_moas.extend(self.retiring.remove(&hoa).unwrap_or_default().into_keys());
        self.actions.push_back(Action::SetPeerMaps {
            hoa,
            active: None,
            moas: Vec::new(),
            old_moas,
            old_active: old.active,
        });
        true
    }

    /// Whether a binding with this seq would be newer than what is held.
    pub fn peer_seq_is_newer(&self, hoa: Ipv6Addr, seq: u64) -> bool {
        hoa != self.cfg.hoa && self.peers.get(&hoa).is_none_or(|o| seq > o.seq)
    }

    // ---- timers ------------------------------------------------------------

    /// The next instant [`Mobility::handle_timeout`] must be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t: Option<Instant> = None;
        let mut min = |x: Option<Instant>| {
            if let Some(x) = x {
                t = Some(t.map_or(x, |t| t.min(x)));
            }
        };
        for i in &self.ifaces {
            match &i.state {
                IfaceState::Unconfigured { next_rs, .. } => min(*next_rs),
                IfaceState::Standby(a) | IfaceState::Active(a) => min(Some(a.router_expires)),
                IfaceState::Down => {}
            }
        }
        min(self.promote_at);
        min(self.deferred_teardown.as_ref().map(|d| d.0));
        min(self.pending_down.map(|p| p.due));
        if let Registration::Pending { client, .. } = &self.registration {
            min(client.poll_timeout());
        } else {
            min(self.refresh_at);
        }
        for (_, p) in self.notifies.values() {
            min(Some(p.next_try));
        }
        for r in self.retiring.values() {
            min(r.values().min().copied());
        }
        t
    }

    /// Runs every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.pending_down.is_some_and(|p| p.due <= now) {
            self.run_pending_down(now);
        }
        if self.deferred_teardown.as_ref().is_some_and(|d| d.0 <= now) {
            self.flush_deferred();
        }
        let peers: Vec<Ipv6Addr> = self.retiring.keys().copied().collect();
        for hoa in peers {
            let Some(r) = self.retiring.get_mut(&hoa) else {
                continue;
            };
            let expired: Vec<Ipv6Addr> = r
                .iter()
                .filter(|(_, t)| **t <= now)
                .map(|(m, _)| *m)
                .collect();
            if expired.is_empty() {
                continue;
            }
            r.retain(|_, t| *t > now);
            if r.is_empty() {
                self.retiring.remove(&hoa);
            }
            let active = self.peers.get(&hoa).and_then(|b| b.active);
            self.queue_peer_maps(hoa, active, expired);
        }
        if self.promote_at.is_some_and(|t| t <= now) {
            self.promote_at = None;
            if self.active_idx().is_none() {
                if let Some(s) = self.standby_idx() {
                    let routes = self.promote_routes(s);
                    self.actions.extend(routes);
                    self.promote(s, now, HandoverKind::Initial);
                }
            }
        }
        for k in 0..self.ifaces.len() {
            match &self.ifaces[k].state {
                IfaceState::Unconfigured { .. } => self.solicit(k, now),
                IfaceState::Standby(a) | IfaceState::Active(a) => {
                    if a.router_expires <= now {
                        self.router_gone(k, now);
                    }
                }
                IfaceState::Down => {}
            }
        }
        match &self.registration {
            Registration::Pending { .. } => self.transmit(now),
            Registration::Idle if self.refresh_at.is_some_and(|t| t <= now) => {
                self.refresh_at = None;
                self.register(false, now);
            }
            Registration::Idle => {}
        }
        let due: Vec<u64> = self
            .notifies
            .iter()
            .filter(|(_, (_, p))| p.next_try <= now)
            .map(|(n, _)| *n)
            .collect();
        let max = self.cfg.timers.notify_max_tries;
        for nonce in due {
            let Some((peer_hoa, mut p)) = self.notifies.remove(&nonce) else {
                continue;
            };
            if p.tries >= max {
                self.counters.notifies_given_up += 1;
                continue;
            }
            p.tries += 1;
            p.rto *= 2;
            p.next_try = now + p.rto;
            self.counters.notifies_sent += 1;
            self.actions.push_back(Action::SendPeerNotify {
                src: p.src,
                peer_hoa,
                dst: p.dst,
                nonce,
                assertion: p.assertion.clone(),
            });
            self.notifies.insert(nonce, (peer_hoa, p));
        }
        if self.notifies.is_empty()
            && self
                .handover
                .as_ref()
                .is_some_and(|h| h.record.ims_ack_us.is_some())
        {
            self.finish_handover();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::update::{AckRepr, AckStatus};

    const HOA: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 1);
    const PFX_A: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xa, 0, 0, 0, 0, 0);
    const PFX_B: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xb, 0, 0, 0, 0, 0);
    const PFX_C: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 0);
    const RTR_A: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0xa);
    const RTR_B: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0xb);
    const ROGUE: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0x666);
    const MAC1: [u8; 6] = [0x52, 0x54, 0, 0, 0, 1];
    const MAC2: [u8; 6] = [0x52, 0x54, 0, 0, 0, 2];
    const PEER: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 2);
    const PEER_MOA: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 9);

    struct Clock(Instant);
    impl Clock {
        fn at(&self, ms: u64) -> Instant {
            self.0 + Duration::from_millis(ms)
        }
    }

    fn cfg(allow: Vec<Ipv6Addr>) -> MobilityConfig {
        MobilityConfig {
            hoa: HOA,
            key: key(),
            ifaces: vec![
                IfaceConfig {
                    ifindex: 2,
                    name: "eth0".into(),
                    mac: MAC1,
                    role: Role::Primary,
                    allowed_routers: allow.clone(),
                },
                IfaceConfig {
                    ifindex: 3,
                    name: "eth1".into(),
                    mac: MAC2,
                    role: Role::Secondary,
                    allowed_routers: allow,
                },
            ],
            peer_prefixes: vec![],
            initial_seq: 10,
            nonce_seed: 1000,
            timers: Timers::default(),
        }
    }

    fn ra(src: Ipv6Addr, prefix: Ipv6Addr, lifetime: u16) -> RaInput {
        RaInput {
            src,
            src_mac: Some([2, 0, 0, 0, 0, src.segments()[7] as u8]),
            hop_limit: 255,
            fragmented: false,
            router_lifetime_s: lifetime,
            prefixes: vec![RaPrefix {
                prefix,
                prefix_len: 64,
                valid_lifetime_s: 3600,
            }],
        }
    }

    fn drain(m: &mut Mobility) -> Vec<Action> {
        std::iter::from_fn(|| m.poll_action()).collect()
    }

    fn updates(a: &[Action]) -> Vec<ImsUpdate> {
        a.iter()
            .filter_map(|a| match a {
                Action::SendImsUpdate(u) => Some(u.clone()),
                _ => None,
            })
            .collect()
    }

    fn key() -> UpdateKey {
        UpdateKey {
            key_id: 7,
            secret: [3u8; 32],
        }
    }

    fn ack_bytes(status: AckStatus, seq: u64, last: u64, k: &UpdateKey) -> Vec<u8> {
        AckRepr {
            status,
            key_id: k.key_id,
            seq,
            last_accepted_seq: last,
            hoa: HOA,
            assertion: (status == AckStatus::Accepted).then(|| vec![0xaa, seq as u8]),
        }
        .to_vec(&k.hmac_key())
        .unwrap()
    }

    fn ack(m: &mut Mobility, seq: u64, now: Instant) -> bool {
        m.handle_ims_datagram(&ack_bytes(AckStatus::Accepted, seq, seq, &key()), now)
    }

    fn stale(m: &mut Mobility, seq: u64, last: u64, now: Instant) -> bool {
        m.handle_ims_datagram(&ack_bytes(AckStatus::StaleSeq, seq, last, &key()), now)
    }

    /// eth0 active on site A; returns the machine with actions drained.
    fn active_on_a(c: &Clock, allow: Vec<Ipv6Addr>) -> Mobility {
        let mut m = Mobility::new(cfg(allow));
        m.handle_link(2, LinkEvent::CarrierUp, c.at(0));
        assert_eq!(
            m.handle_ra(2, &ra(RTR_A, PFX_A, 1800), c.at(5)),
            RaVerdict::Accepted
        );
        let a = drain(&mut m);
        let u = updates(&a);
        assert_eq!(u.len(), 1);
        ack(&mut m, u[0].seq, c.at(6));
        drain(&mut m);
        m
    }

    #[test]
    fn mac_of_moa_inverts_moa_for() {
        for mac in [MAC1, MAC2, [0xff; 6], [0; 6]] {
            assert_eq!(mac_of_moa(moa_for(PFX_B, mac)), Some(mac));
        }
        assert_eq!(mac_of_moa(HOA), None);
        assert_eq!(mac_of_moa("2001:db8:b::1:2:3:4".parse().unwrap()), None);
    }

    #[test]
    fn eui64_moa() {
        let moa = moa_for(PFX_A, MAC1);
        assert_eq!(
            moa,
            "2001:db8:a:0:5054:ff:fe00:1".parse::<Ipv6Addr>().unwrap()
        );
    }

    #[test]
    fn rs_sent_at_once_on_link_up_and_retransmitted() {
        let c = Clock(Instant::now());
        let mut m = Mobility::new(cfg(vec![]));
        m.handle_link(2, LinkEvent::CarrierUp, c.at(0));
        assert_eq!(drain(&mut m), vec![Action::SendRs { ifindex: 2 }]);
        assert_eq!(m.poll_timeout(), Some(c.at(250)));
        m.handle_timeout(c.at(100));
        assert!(drain(&mut m).is_empty());
        for k in 1..4 {
            m.handle_timeout(c.at(250 * k));
            assert_eq!(drain(&mut m), vec![Action::SendRs { ifindex: 2 }]);
        }
        // rs_max = 4: no more solicitations.
        assert_eq!(m.poll_timeout(), None);
        assert_eq!(m.counters().rs_sent, 4);
    }

    #[test]
    fn first_ra_makes_active_moa_and_registers() {
        let c = Clock(Instant::now());
        let mut m = Mobility::new(cfg(vec![]));
        m.handle_link(2, LinkEvent::CarrierUp, c.at(0));
        drain(&mut m);
        m.handle_ra(2, &ra(RTR_A, PFX_A, 1800), c.at(3));
        let a = drain(&mut m);
        let moa = moa_for(PFX_A, MAC1);
        assert!(a.contains(&Action::AddMoa {
            ifindex: 2,
            moa,
            prefix_len: 64
        }));
        assert!(a.contains(&Action::SetNeighbor {
            ifindex: 2,
            router: RTR_A,
            mac: [2, 0, 0, 0, 0, 0xa]
        }));
        assert!(a.contains(&Action::AddRoute(Route {
            dst: Ipv6Addr::UNSPECIFIED,
            dst_len: 0,
            ifindex: 2,
            via: RTR_A,
            metric: 100,
            src: None
        })));
        let u = updates(&a);
        assert_eq!(u.len(), 1);
        assert_eq!(u[0].active, Some(moa));
        assert!(u[0].activate);
        assert_eq!(u[0].src, moa);
        assert_eq!(u[0].seq, 10);
        assert_eq!(m.active_moa(), Some(moa));
    }

    #[test]
    fn standby_created_from_ra_on_non_active_interface() {
        let c = Clock(Instant::now());
        let mut m = active_on_a(&c, vec![]);
        m.handle_link(3, LinkEvent::CarrierUp, c.at(100));
        assert_eq!(drain(&mut m), vec![Action::SendRs { ifindex: 3 }]);
        m.handle_ra(3, &ra(RTR_B, PFX_B, 1800), c.at(101));
        let a = drain(&mut m);
        let sb = moa_for(PFX_B, MAC2);
        assert!(matches!(m.iface_state(3), Some(IfaceState::Standby(x)) if x.moa == sb));
        assert!(a.contains(&Action::AddRoute(Route {
            dst: Ipv6Addr::UNSPECIFIED,
            dst_len: 0,
            ifindex: 3,
            via: RTR_B,
            metric: 200,
            src: None
        })));
        assert!(a.contains(&Action::SetOwnSource {
            ifindex: 3,
            ifname: "eth1".into(),
            moa: sb
        }));
        let u = updates(&a);
        assert_eq!(u.len(), 1);
        assert_eq!(u[0].standby, vec![sb]);
        assert_eq!(u[0].active, Some(moa_for(PFX_A, MAC1)));
        assert!(!u[0].activate);
        assert_eq!(m.standby_moas(), vec![sb]);
    }

    fn with_standby(c: &Clock) -> Mobility {
        let mut m = active_on_a(c, vec![]);
        m.handle_link(3, LinkEvent::CarrierUp, c.at(100));
        m.handle_ra(3, &ra(RTR_B, PFX_B, 1800), c.at(101));
        let u = updates(&drain(&mut m));
        ack(&mut m, u[0].seq, c.at(102));
        drain(&mut m);
        m
    }

    #[test]
    fn bicast_follows_the_standby() {
        let c = Clock(Instant::now());
        let mut cf = cfg(vec![]);
        cf.timers.standby_bicast = true;
        let mut m = Mobility::new(cf);
        m.handle_link(2, LinkEvent::CarrierUp, c.at(0));
        m.handle_ra(2, &ra(RTR_A, PFX_A, 1800), c.at(5));
        let a = drain(&mut m);
        // Only an active attachment: nothing to copy to.
        assert!(
            !a.iter().any(|x| matches!(x, Action::SetBicast(_))),
            "{a:?}"
        );
        ack(&mut m, updates(&a)[0].seq, c.at(6));
        drain(&mut m);

        // A standby on eth1: the copy rule comes after its neighbour and
        // routes, as the last action.
        m.handle_link(3, LinkEvent::CarrierUp, c.at(100));
        m.handle_ra(3, &ra(RTR_B, PFX_B, 1800), c.at(101));
        let a = drain(&mut m);
        let on = Action::SetBicast(Some(Bicast {
            from_ifname: "eth0".into(),
            to_ifname: "eth1".into(),
            via: RTR_B,
        }));
        assert_eq!(a.last(), Some(&on), "{a:?}");
        assert_eq!(a.iter().filter(|x| **x == on).count(), 1);
        let nb = a
            .iter()
            .position(|x| matches!(x, Action::SetNeighbor { ifindex: 3, .. }))
            .unwrap();
        assert!(nb < a.len() - 1);
        assert_eq!(
            m.status(c.at(101)).bicast,
            Some(Bicast {
                from_ifname: "eth0".into(),
                to_ifname: "eth1".into(),
                via: RTR_B,
            })
        );
        ack(&mut m, updates(&a)[0].seq, c.at(102));
        // Nothing changed: not queued again.
        assert!(!drain(&mut m)
            .iter()
            .any(|x| matches!(x, Action::SetBicast(_))));

        // The switch: the copies carry the data path already, so only the
        // IMS activation and the NA leave now; routes and copy rule stay.
        m.handle_link(2, LinkEvent::CarrierDown, c.at(1000));
        let a = drain(&mut m);
        assert!(
            !a.iter().any(|x| matches!(
                x,
                Action::AddRoute(_) | Action::RemoveRoute(_) | Action::SetBicast(_)
            )),
            "{a:?}"
        );
        let u = updates(&a);
        assert!(u.len() == 1 && u[0].activate && u[0].active == Some(moa_for(PFX_B, MAC2)));
        assert!(a
            .iter()
            .any(|x| matches!(x, Action::SendUnsolicitedNa { ifindex: 3, .. })));
        assert!(m.status(c.at(1000)).bicast.is_some());
        assert_eq!(m.active_moa(), Some(moa_for(PFX_B, MAC2)));
        // Then the route changes (old routes first), the old attachment's
        // removal, and last the copy rule.
        m.handle_timeout(c.at(1000) + OLD_TEARDOWN_DELAY);
        let a = drain(&mut m);
        assert!(
            matches!(a[0], Action::RemoveRoute(Route { ifindex: 2, .. })),
            "{a:?}"
        );
        let add = a
            .iter()
            .position(|x| {
                matches!(
                    x,
                    Action::AddRoute(Route {
                        ifindex: 3,
                        metric: 100,
                        ..
                    })
                )
            })
            .unwrap();
        let rm_moa = a
            .iter()
            .position(|x| matches!(x, Action::RemoveMoa { ifindex: 2, .. }))
            .unwrap();
        assert!(add < rm_moa, "{a:?}");
        assert_eq!(a.last(), Some(&Action::SetBicast(None)), "{a:?}");
        assert_eq!(m.status(c.at(2000)).bicast, None);

        // The next migration prepares eth0 as the standby: copies go the
        // other way.
        m.handle_link(2, LinkEvent::CarrierUp, c.at(2000));
        m.handle_ra(2, &ra(RTR_A, PFX_A, 1800), c.at(2001));
        let a = drain(&mut m);
        assert_eq!(
            a.last(),
            Some(&Action::SetBicast(Some(Bicast {
                from_ifname: "eth1".into(),
                to_ifname: "eth0".into(),
                via: RTR_A,
            }))),
            "{a:?}"
        );
        // Losing the standby clears it too.
        m.handle_link(2, LinkEvent::CarrierDown, c.at(3000));
        assert_eq!(drain(&mut m).last(), Some(&Action::SetBicast(None)));
    }

    /// Active on eth0 (site A), standby on eth1 (site B), bicast on.
    fn with_bicast_standby(c: &Clock, delay: Duration) -> Mobility {
        let mut cf = cfg(vec![]);
        cf.timers.standby_bicast = true;
        cf.timers.migration_switch_delay = delay;
        let mut m = Mobility::new(cf);
        m.handle_link(2, LinkEvent::CarrierUp, c.at(0));
        m.handle_ra(2, &ra(RTR_A, PFX_A, 1800), c.at(5));
        let a = drain(&mut m);
        ack(&mut m, updates(&a)[0].seq, c.at(6));
        drain(&mut m);
        m.handle_link(3, LinkEvent::CarrierUp, c.at(100));
        m.handle_ra(3, &ra(RTR_B, PFX_B, 1800), c.at(101));
        let a = drain(&mut m);
        assert!(a.iter().any(|x| matches!(x, Action::SetBicast(Some(_)))));
        ack(&mut m, updates(&a)[0].seq, c.at(102));
        drain(&mut m);
        m
    }

    #[test]
    fn announced_carrier_loss_switches_after_the_delay() {
        let c = Clock(Instant::now());
        let delay = Duration::from_millis(300);
        let mut m = with_bicast_standby(&c, delay);
        let (ma, mb) = (moa_for(PFX_A, MAC1), moa_for(PFX_B, MAC2));
        // The migration's switch: nothing leaves yet, eth0 stays active.
        m.handle_link(2, LinkEvent::CarrierDownAnnounced, c.at(1000));
        assert_eq!(drain(&mut m), vec![]);
        assert_eq!(m.active_moa(), Some(ma));
        assert_eq!(m.counters().switches_held, 1);
        assert_eq!(m.poll_timeout(), Some(c.at(1300)));
        // The announce rounds' other events: no solicitation on the dead
        // link, and a stale carrier-up then -down changes nothing.
        m.handle_link(2, LinkEvent::NotifyPeers, c.at(1001));
        let a = drain(&mut m);
        assert!(
            !a.iter().any(|x| matches!(
                x,
                Action::SendRs { ifindex: 2 } | Action::ProbeGateways { ifindex: 2, .. }
            )),
            "{a:?}"
        );
        m.handle_link(2, LinkEvent::CarrierUp, c.at(1002));
        m.handle_link(2, LinkEvent::CarrierDown, c.at(1003));
        assert_eq!(drain(&mut m), vec![]);
        m.handle_timeout(c.at(1299));
        assert_eq!(drain(&mut m), vec![]);
        // Then the switch, as for a plain carrier loss.
        m.handle_timeout(c.at(1300));
        let a = drain(&mut m);
        let u = updates(&a);
        assert!(
            u.len() == 1 && u[0].activate && u[0].active == Some(mb),
            "{a:?}"
        );
        assert!(a
            .iter()
            .any(|x| matches!(x, Action::SendUnsolicitedNa { ifindex: 3, .. })));
        assert_eq!(m.active_moa(), Some(mb));
        assert!(matches!(m.iface_state(2), Some(IfaceState::Down)));
        // The held-back teardown follows, OLD_TEARDOWN_DELAY later.
        m.handle_timeout(c.at(1300) + OLD_TEARDOWN_DELAY);
        let a = drain(&mut m);
        assert!(
            a.iter()
                .any(|x| matches!(x, Action::RemoveMoa { ifindex: 2, moa, .. } if *moa == ma)),
            "{a:?}"
        );
        assert_eq!(a.last(), Some(&Action::SetBicast(None)), "{a:?}");
    }

    #[test]
    fn announced_carrier_loss_is_immediate_without_bicast_or_delay() {
        let c = Clock(Instant::now());
        // No bicast: the routes must move now.
        let mut m = with_standby(&c);
        m.handle_link(2, LinkEvent::CarrierDownAnnounced, c.at(1000));
        let u = updates(&drain(&mut m));
        assert!(u.len() == 1 && u[0].activate, "{u:?}");
        assert_eq!(m.counters().switches_held, 0);
        // Bicast, but a zero delay.
        let mut m = with_bicast_standby(&c, Duration::ZERO);
        m.handle_link(2, LinkEvent::CarrierDownAnnounced, c.at(1000));
        let u = updates(&drain(&mut m));
        assert!(u.len() == 1 && u[0].activate, "{u:?}");
        // Bicast and a delay, but a plain carrier loss (no announce).
        let mut m = with_bicast_standby(&c, Duration::from_millis(300));
        m.handle_link(2, LinkEvent::CarrierDown, c.at(1000));
        let u = updates(&drain(&mut m));
        assert!(u.len() == 1 && u[0].activate, "{u:?}");
    }

    #[test]
    fn carrier_back_during_the_delay_solicits_after_the_switch() {
        let c = Clock(Instant::now());
        let mut m = with_bicast_standby(&c, Duration::from_millis(300));
        m.handle_link(2, LinkEvent::CarrierDownAnnounced, c.at(1000));
        m.handle_link(2, LinkEvent::CarrierUp, c.at(1100));
        assert_eq!(drain(&mut m), vec![]);
        m.handle_timeout(c.at(1300));
        let a = drain(&mut m);
        assert_eq!(m.active_moa(), Some(moa_for(PFX_B, MAC2)));
        assert!(a.contains(&Action::SendRs { ifindex: 2 }), "{a:?}");
        assert!(matches!(
            m.iface_state(2),
            Some(IfaceState::Unconfigured { .. })
        ));
        // A shutdown during the delay removes the still-active attachment.
        let mut m = with_bicast_standby(&c, Duration::from_millis(300));
        m.handle_link(2, LinkEvent::CarrierDownAnnounced, c.at(1000));
        m.shutdown();
        let a = drain(&mut m);
        assert!(
            a.iter().any(|x| matches!(x, Action::RemoveMoa { ifindex: 2, moa, .. } if *moa == moa_for(PFX_A, MAC1))),
            "{a:?}"
        );
        assert_eq!(m.poll_timeout(), None);
    }

    #[test]
    fn no_bicast_unless_configured() {
        let c = Clock(Instant::now());
        let mut m = with_standby(&c);
        m.handle_link(2, LinkEvent::CarrierDown, c.at(1000));
        let mut all = drain(&mut m);
        m.handle_timeout(c.at(5000));
        all.extend(drain(&mut m));
        assert!(
            !all.iter().any(|x| matches!(x, Action::SetBicast(_))),
            "{all:?}"
        );
        assert_eq!(m.status(c.at(5000)).bicast, None);
    }

    #[test]
    fn carrier_loss_switches_to_standby() {
        let c = Clock(Instant::now());
        let mut m = with_standby(&c);
        m.handle_peer_binding(
            PEER,
            PeerBinding {
                active: Some(PEER_MOA),
                standby: vec![],
                seq: 5,
                expires_unix: 0,
            },
            c.at(0),
        );
        drain(&mut m);
        let sb = moa_for(PFX_B, MAC2);
        m.handle_link(2, LinkEvent::CarrierDown, c.at(1000));
        let a = drain(&mut m);
        // Carrier loss: the data path first. The old active route goes
        // (the kernel may not have marked it linkdown yet), so the standby
        // route carries traffic at once; then the standby's route gets the
        // active metric, then the IMS activation and the NA leave through
        // the new link, and the rest of the old attachment goes last.
        let pos = |x: &Action| a.iter().position(|y| y == x).unwrap();
        let rm_old = Action::RemoveRoute(Route {
            dst: Ipv6Addr::UNSPECIFIED,
            dst_len: 0,
            ifindex: 2,
            via: RTR_A,
            metric: 100,
            src: None,
        });
        let rm_standby = Action::RemoveRoute(Route {
            dst: Ipv6Addr::UNSPECIFIED,
            dst_len: 0,
            ifindex: 3,
            via: RTR_B,
            metric: 200,
            src: None,
        });
        let add = Action::AddRoute(Route {
            dst: Ipv6Addr::UNSPECIFIED,
            dst_len: 0,
            ifindex: 3,
            via: RTR_B,
            metric: 100,
            src: None,
        });
        let na = Action::SendUnsolicitedNa {
            ifindex: 3,
            moa: sb,
            mac: MAC2,
        };
        let rm = Action::RemoveMoa {
            ifindex: 2,
            moa: moa_for(PFX_A, MAC1),
            prefix_len: 64,
        };
        let ims = a
            .iter()
            .position(|x| matches!(x, Action::SendImsUpdate(_)))
            .unwrap();
        assert_eq!(pos(&rm_old), 0, "{a:?}");
        assert_eq!(pos(&add), 1, "{a:?}");
        assert_eq!(pos(&rm_standby), 2, "{a:?}");
        assert_eq!(ims, 3, "{a:?}");
        assert!(ims < pos(&na));
        // The router of the new link hears of the MoA from the MoA itself.
        let announce = Action::AnnounceToRouter {
            ifindex: 3,
            moa: sb,
            router: RTR_B,
            mac: MAC2,
        };
        assert!(pos(&na) < pos(&announce), "{a:?}");
        // The rest of the old attachment is held back (OLD_TEARDOWN_DELAY).
        assert!(!a.contains(&rm), "{a:?}");
        assert!(m
            .poll_timeout()
            .is_some_and(|t| t <= c.at(1000) + OLD_TEARDOWN_DELAY));
        // The old route is removed once, not again with the rest.
        assert_eq!(a.iter().filter(|x| **x == rm_old).count(), 1, "{a:?}");
        assert!(!a.iter().any(|x| matches!(x, Action::AddMoa { .. })));
        let u = updates(&a);
        assert_eq!(u.len(), 1);
        assert!(u[0].activate);
        assert_eq!(u[0].active, Some(sb));
        assert!(u[0].standby.is_empty());
        assert_eq!(u[0].src, sb);
        assert_eq!(m.active_moa(), Some(sb));
        assert_eq!(m.iface_state(2), Some(&IfaceState::Down));
        // The ack's assertion goes to the peer, from the new MoA.
        ack(&mut m, u[0].seq, c.at(1003));
        let a = drain(&mut m);
        assert_eq!(
            a,
            vec![Action::SendPeerNotify {
                src: sb,
                peer_hoa: PEER,
                dst: PEER_MOA,
                nonce: 1000,
                assertion: vec![0xaa, u[0].seq as u8]
            }]
        );
        // Retransmitted until acked.
        m.handle_timeout(c.at(1053));
        assert_eq!(drain(&mut m).len(), 1);
        m.handle_peer_ack(1000, c.at(1060));
        m.handle_timeout(c.at(1299));
        assert!(drain(&mut m).is_empty());
        // 300 ms after the move: the old neighbour, translation and MoA go.
        m.handle_timeout(c.at(1300));
        let a = drain(&mut m);
        assert_eq!(
            a,
            vec![
                Action::RemoveNeighbor {
                    ifindex: 2,
                    router: RTR_A
                },
                Action::RemoveOwnSource {
                    ifindex: 2,
                    ifname: "eth0".into(),
                    moa: moa_for(PFX_A, MAC1)
                },
                rm
            ]
        );
        m.handle_timeout(c.at(2000));
        assert!(drain(&mut m).is_empty());
        let st = m.status(c.at(2000));
        assert_eq!(st.handovers.len(), 2);
        assert_eq!(st.handovers[0].kind, HandoverKind::Initial);
        let h = &st.handovers[1];
        assert_eq!(h.kind, HandoverKind::Standby);
        assert_eq!(h.switch_us, 0);
        assert_eq!(h.ims_ack_us, Some(3000));
        assert_eq!(h.peers_acked_us, Some(60_000));
    }

    #[test]
    fn peer_notify_is_bounded() {
        let c = Clock(Instant::now());
        let mut m = with_standby(&c);
        m.handle_peer_binding(
            PEER,
            PeerBinding {
                active: Some(PEER_MOA),
                standby: vec![],
                seq: 5,
                expires_unix: 0,
            },
            c.at(0),
        );
        m.handle_link(2, LinkEvent::CarrierDown, c.at(1000));
        let u = updates(&drain(&mut m));
        ack(&mut m, u[0].seq, c.at(1001));
        let mut sent = drain(&mut m).len();
        let mut t = 1001;
        while let Some(next) = m.poll_timeout() {
            if next > c.at(100_000) {
                break;
            }
            t += 1;
            let now = next.max(c.at(t));
            m.handle_timeout(now);
            sent += drain(&mut m)
                .iter()
                .filter(|a| matches!(a, Action::SendPeerNotify { .. }))
                .count();
        }
        assert_eq!(sent, 6);
        assert_eq!(m.counters().notifies_given_up, 1);
    }

    #[test]
    fn carrier_loss_without_standby_solicits_and_forms_new_moa() {
        let c = Clock(Instant::now());
        let mut m = active_on_a(&c, vec![]);
        m.handle_link(3, LinkEvent::CarrierUp, c.at(50));
        drain(&mut m);
        // Retransmissions of the RS on eth1 ran out long ago.
        for k in 1..5 {
            m.handle_timeout(c.at(50 + 250 * k));
        }
        drain(&mut m);
        m.handle_link(2, LinkEvent::CarrierDown, c.at(5000));
        let a = drain(&mut m);
        assert!(a.contains(&Action::SendRs { ifindex: 3 }));
        assert!(updates(&a).is_empty(), "nothing to register yet");
        assert_eq!(m.active_moa(), None);
        m.handle_ra(3, &ra(RTR_B, PFX_B, 1800), c.at(5040));
        let a = drain(&mut m);
        let moa = moa_for(PFX_B, MAC2);
        assert!(a.contains(&Action::AddMoa {
            ifindex: 3,
            moa,
            prefix_len: 64
        }));
        assert!(a.contains(&Action::SendUnsolicitedNa {
            ifindex: 3,
            moa,
            mac: MAC2
        }));
        let u = updates(&a);
        assert!(u[0].activate);
        assert_eq!(u[0].active, Some(moa));
        let h = a
            .iter()
            .find_map(|x| match x {
                Action::HandoverDone(h) => Some(h.clone()),
                _ => None,
            })
            .unwrap();
        assert_eq!(h.kind, HandoverKind::Unplanned);
        assert_eq!(h.switch_us, 40_000);
    }

    #[test]
    fn unplanned_link_up_on_new_link() {
        // Carrier up on a new link, nothing prepared: RS at once, the RA
        // makes the MoA active.
        let c = Clock(Instant::now());
        let mut m = active_on_a(&c, vec![]);
        m.handle_link(2, LinkEvent::CarrierDown, c.at(100));
        drain(&mut m);
        m.handle_link(3, LinkEvent::CarrierUp, c.at(200));
        assert_eq!(drain(&mut m), vec![Action::SendRs { ifindex: 3 }]);
        m.handle_ra(3, &ra(RTR_B, PFX_B, 1800), c.at(202));
        assert_eq!(m.active_moa(), Some(moa_for(PFX_B, MAC2)));
    }

    #[test]
    fn ra_with_another_prefix_on_active_link_renumbers() {
        let c = Clock(Instant::now());
        let mut m = active_on_a(&c, vec![]);
        let old = moa_for(PFX_A, MAC1);
        let new = moa_for(PFX_C, MAC1);
        m.handle_link(2, LinkEvent::NotifyPeers, c.at(500));
        assert_eq!(drain(&mut m), vec![Action::SendRs { ifindex: 2 }]);
        m.handle_ra(2, &ra(RTR_B, PFX_C, 1800), c.at(510));
        let a = drain(&mut m);
        assert!(a.contains(&Action::AddMoa {
            ifindex: 2,
            moa: new,
            prefix_len: 64
        }));
        assert!(a.contains(&Action::RemoveMoa {
            ifindex: 2,
            moa: old,
            prefix_len: 64
        }));
        assert!(a.contains(&Action::SetOwnSource {
            ifindex: 2,
            ifname: "eth0".into(),
            moa: new
        }));
        assert!(a.contains(&Action::RemoveRoute(Route {
            dst: Ipv6Addr::UNSPECIFIED,
            dst_len: 0,
            ifindex: 2,
            via: RTR_A,
            metric: 100,
            src: None
        })));
        let u = updates(&a);
        assert!(u[0].activate);
        assert_eq!(u[0].active, Some(new));
        assert_eq!(m.active_moa(), Some(new));
        // The new MoA is in own_moas (SetOwnSource) before any peer can
        // learn it: else the kernel's RST to a peer's early packet would
        // pass the RST filter and reset the peer's connection.
        let pos = |f: &dyn Fn(&Action) -> bool| a.iter().position(f).unwrap();
        let upd = pos(&|x| matches!(x, Action::SendImsUpdate(_)));
        assert!(pos(&|x| matches!(x, Action::AddMoa { .. })) < upd);
        assert!(pos(&|x| matches!(x, Action::AddRoute(_))) < upd);
        assert!(pos(&|x| matches!(x, Action::SetOwnSource { .. })) < upd);
    }

    /// The registry of the testbed: both gateways on fe80::1, told apart
    /// by their MACs.
    fn sites() -> Vec<SiteHint> {
        let gw = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
        vec![
            SiteHint {
                prefix: PFX_A,
                gateway: gw,
                gateway_mac: [2, 0, 0, 0, 0xa, 1],
                router_lifetime_s: 1800,
            },
            SiteHint {
                prefix: PFX_B,
                gateway: gw,
                gateway_mac: [2, 0, 0, 0, 0xb, 1],
                router_lifetime_s: 1800,
            },
        ]
    }

    fn gw_na(mac: [u8; 6]) -> NaInput {
        let gw = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
        NaInput {
            src: gw,
            target: gw,
            target_mac: Some(mac),
            hop_limit: 255,
            router: true,
        }
    }

    #[test]
    fn gateway_probe_recognises_the_new_site_without_an_ra() {
        let c = Clock(Instant::now());
        let gw = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
        let mut m = Mobility::new(cfg(vec![]));
        m.set_sites(sites());
        m.handle_link(2, LinkEvent::CarrierUp, c.at(0));
        assert_eq!(
            drain(&mut m),
            vec![
                Action::PrepareOwnMoas(vec![
                    moa_for(PFX_A, MAC1),
                    moa_for(PFX_A, MAC2),
                    moa_for(PFX_B, MAC1),
                    moa_for(PFX_B, MAC2),
                ]),
                Action::SendRs { ifindex: 2 },
                Action::ProbeGateways {
                    ifindex: 2,
                    targets: vec![gw]
                }
            ]
        );
        // Site A's gateway answers: the MoA is formed from the registry.
        assert_eq!(
            m.handle_na(2, &gw_na([2, 0, 0, 0, 0xa, 1]), c.at(3)),
            Some(RaVerdict::Accepted)
        );
        let a = drain(&mut m);
        let u = updates(&a);
        ack(&mut m, u[0].seq, c.at(4));
        drain(&mut m);
        assert_eq!(m.active_moa(), Some(moa_for(PFX_A, MAC1)));
        // Migrated, unprepared, to site B: the announce triggers RS and
        // probes; B's gateway answers long before any RA.
        m.handle_link(2, LinkEvent::NotifyPeers, c.at(10_000));
        assert_eq!(
            drain(&mut m),
            vec![
                Action::SendRs { ifindex: 2 },
                Action::ProbeGateways {
                    ifindex: 2,
                    targets: vec![gw]
                }
            ]
        );
        assert_eq!(
            m.handle_na(2, &gw_na([2, 0, 0, 0, 0xb, 1]), c.at(10_002)),
            Some(RaVerdict::Accepted)
        );
        let a = drain(&mut m);
        let new = moa_for(PFX_B, MAC1);
        assert!(a.contains(&Action::AddMoa {
            ifindex: 2,
            moa: new,
            prefix_len: 64
        }));
        assert!(a.contains(&Action::SetNeighbor {
            ifindex: 2,
            router: gw,
            mac: [2, 0, 0, 0, 0xb, 1]
        }));
        let u = updates(&a);
        assert!(u[0].activate);
        assert_eq!(u[0].active, Some(new));
        assert_eq!(m.active_moa(), Some(new));
        assert_eq!(m.counters().gateway_probe_hits, 2);
        // B's MoA was prepared in own_moas: the activation does not wait
        // for the translation update, which comes OLD_TEARDOWN_DELAY later
        // (peers translate the old MoA meanwhile), with the old MoA's
        // removal.
        assert!(
            !a.iter()
                .any(|x| matches!(x, Action::SetOwnSource { .. } | Action::RemoveMoa { .. })),
            "{a:?}"
        );
        ack(&mut m, u[0].seq, c.at(10_003));
        drain(&mut m);
        m.handle_timeout(c.at(10_002) + OLD_TEARDOWN_DELAY);
        assert_eq!(
            drain(&mut m),
            vec![
                Action::SetOwnSource {
                    ifindex: 2,
                    ifname: "eth0".into(),
                    moa: new
                },
                Action::RemoveMoa {
                    ifindex: 2,
                    moa: moa_for(PFX_A, MAC1),
                    prefix_len: 64
                }
            ]
        );
        // The site's own RA then refreshes without any action.
        m.handle_ra(
            2,
            &RaInput {
                src_mac: Some([2, 0, 0, 0, 0xb, 1]),
                ..ra(gw, PFX_B, 1800)
            },
            c.at(10_300),
        );
        assert!(
            !drain(&mut m)
                .iter()
                .any(|a| matches!(a, Action::AddMoa { .. } | Action::RemoveMoa { .. })),
            "the RA confirms the probed site"
        );
    }

    #[test]
    fn gateway_probe_answers_are_checked() {
        let c = Clock(Instant::now());
        let mut m = active_on_a(&c, vec![]);
        let before = m.active_moa();
        // No probe outstanding (no registry yet when the link came up).
        assert_eq!(
            m.handle_na(2, &gw_na([2, 0, 0, 0, 0xb, 1]), c.at(100)),
            None
        );
        m.set_sites(sites());
        m.handle_link(2, LinkEvent::NotifyPeers, c.at(200));
        drain(&mut m);
        // An unknown MAC, no R flag, a wrong hop limit, a global target, a
        // missing target MAC: not a registered gateway.
        let bad = [
            gw_na([2, 0, 0, 0, 0xc, 1]),
            NaInput {
                router: false,
                ..gw_na([2, 0, 0, 0, 0xb, 1])
            },
            NaInput {
                hop_limit: 64,
                ..gw_na([2, 0, 0, 0, 0xb, 1])
            },
            NaInput {
                target: PFX_B,
                src: PFX_B,
                ..gw_na([2, 0, 0, 0, 0xb, 1])
            },
            NaInput {
                target_mac: None,
                ..gw_na([2, 0, 0, 0, 0xb, 1])
            },
        ];
        for na in &bad {
            assert_eq!(m.handle_na(2, na, c.at(201)), None, "{na:?}");
        }
        // Too late: the probe window is over.
        assert_eq!(
            m.handle_na(2, &gw_na([2, 0, 0, 0, 0xb, 1]), c.at(200 + 3_001)),
            None
        );
        assert!(drain(&mut m).is_empty());
        assert_eq!(m.active_moa(), before);
        // The allow-list applies to a probed gateway as to an RA.
        let mut m = active_on_a(&c, vec![RTR_A]);
        m.set_sites(sites());
        m.handle_link(2, LinkEvent::NotifyPeers, c.at(200));
        drain(&mut m);
        assert_eq!(
            m.handle_na(2, &gw_na([2, 0, 0, 0, 0xb, 1]), c.at(201)),
            Some(RaVerdict::NotAllowed)
        );
        // The current site's gateway answering changes nothing.
        let mut m = Mobility::new(cfg(vec![]));
        m.set_sites(sites());
        m.handle_link(2, LinkEvent::CarrierUp, c.at(0));
        m.handle_na(2, &gw_na([2, 0, 0, 0, 0xa, 1]), c.at(1));
        let u = updates(&drain(&mut m));
        ack(&mut m, u[0].seq, c.at(2));
        drain(&mut m);
        m.handle_link(2, LinkEvent::NotifyPeers, c.at(500));
        drain(&mut m);
        assert_eq!(
            m.handle_na(2, &gw_na([2, 0, 0, 0, 0xa, 1]), c.at(501)),
            Some(RaVerdict::Accepted)
        );
        assert!(drain(&mut m).is_empty());
    }

    #[test]
    fn a_prepared_standby_is_not_probed() {
        let c = Clock(Instant::now());
        let gw = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
        let mut m = active_on_a(&c, vec![]);
        m.handle_link(3, LinkEvent::CarrierUp, c.at(100));
        m.handle_ra(3, &ra(RTR_B, PFX_B, 1800), c.at(110));
        drain(&mut m);
        m.set_sites(sites());
        m.handle_link(3, LinkEvent::NotifyPeers, c.at(1_000));
        let probes: Vec<Action> = drain(&mut m)
            .into_iter()
            .filter(|a| matches!(a, Action::ProbeGateways { .. }))
            .collect();
        assert_eq!(
            probes,
            vec![Action::ProbeGateways {
                ifindex: 2,
                targets: vec![gw]
            }]
        );
        // Further announces within the hold-off solicit nothing.
        m.handle_link(2, LinkEvent::NotifyPeers, c.at(1_100));
        m.handle_link(3, LinkEvent::NotifyPeers, c.at(1_200));
        assert!(drain(&mut m).is_empty());
        m.handle_link(2, LinkEvent::NotifyPeers, c.at(2_100));
        assert!(drain(&mut m).contains(&Action::SendRs { ifindex: 2 }));
    }

    #[test]
    fn no_registry_no_probe() {
        let c = Clock(Instant::now());
        let mut m = Mobility::new(cfg(vec![]));
        // A site that is not a /64 or whose gateway is global is dropped.
        m.set_sites(vec![
            SiteHint {
                prefix: Ipv6Addr::new(0x2001, 0xdb8, 0xa, 0, 0, 0, 0, 1),
                ..sites()[0].clone()
            },
            SiteHint {
                gateway: PFX_B,
                ..sites()[1].clone()
            },
        ]);
        m.handle_link(2, LinkEvent::CarrierUp, c.at(0));
        assert_eq!(drain(&mut m), vec![Action::SendRs { ifindex: 2 }]);
    }

    #[test]
    fn same_prefix_refreshes_without_actions() {
        let c = Clock(Instant::now());
        let mut m = active_on_a(&c, vec![]);
        m.handle_ra(2, &ra(RTR_A, PFX_A, 1800), c.at(1000));
        assert!(drain(&mut m).is_empty());
    }

    #[test]
    fn router_lifetime_expiry_switches_to_standby() {
        let c = Clock(Instant::now());
        let mut m = Mobility::new(cfg(vec![]));
        m.handle_link(2, LinkEvent::CarrierUp, c.at(0));
        m.handle_ra(2, &ra(RTR_A, PFX_A, 3), c.at(1));
        let u = updates(&drain(&mut m));
        ack(&mut m, u[0].seq, c.at(2));
        m.handle_link(3, LinkEvent::CarrierUp, c.at(10));
        m.handle_ra(3, &ra(RTR_B, PFX_B, 1800), c.at(11));
        let u = updates(&drain(&mut m));
        ack(&mut m, u[0].seq, c.at(12));
        drain(&mut m);
        assert_eq!(m.poll_timeout(), Some(c.at(3001)));
        m.handle_timeout(c.at(3001));
        let a = drain(&mut m);
        // The old router is gone but its route is not linkdown: the routes
        // move before the activation is sent.
        let add = a
            .iter()
            .position(|x| matches!(x, Action::AddRoute(r) if r.ifindex == 3 && r.metric == 100))
            .unwrap();
        let ims = a
            .iter()
            .position(|x| matches!(x, Action::SendImsUpdate(_)))
            .unwrap();
        assert!(add < ims, "{a:?}");
        assert_eq!(m.active_moa(), Some(moa_for(PFX_B, MAC2)));
        // eth0 still has carrier: it solicits for a new router.
        assert!(a.contains(&Action::SendRs { ifindex: 2 }));
        assert!(matches!(
            m.iface_state(2),
            Some(IfaceState::Unconfigured { .. })
        ));
        assert!(updates(&a)[0].activate);
    }

    #[test]
    fn router_lifetime_zero_retires_router() {
        let c = Clock(Instant::now());
        let mut m = with_standby(&c);
        m.handle_ra(2, &ra(RTR_A, PFX_A, 0), c.at(500));
        assert_eq!(m.active_moa(), Some(moa_for(PFX_B, MAC2)));
    }

    #[test]
    fn rogue_ra_is_ignored() {
        let c = Clock(Instant::now());
        let mut m = active_on_a(&c, vec![RTR_A, RTR_B]);
        m.handle_link(3, LinkEvent::CarrierUp, c.at(100));
        drain(&mut m);
        assert_eq!(
            m.handle_ra(3, &ra(ROGUE, PFX_C, 1800), c.at(101)),
            RaVerdict::NotAllowed
        );
        assert_eq!(
            m.handle_ra(2, &ra(ROGUE, PFX_C, 1800), c.at(102)),
            RaVerdict::NotAllowed
        );
        assert!(drain(&mut m).is_empty());
        assert!(m.standby_moas().is_empty());
        assert_eq!(m.active_moa(), Some(moa_for(PFX_A, MAC1)));
        assert_eq!(m.counters().ra_not_allowed, 2);
    }

    #[test]
    fn malformed_ras_are_dropped() {
        let c = Clock(Instant::now());
        let mut m = Mobility::new(cfg(vec![]));
        m.handle_link(2, LinkEvent::CarrierUp, c.at(0));
        drain(&mut m);
        let global = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
        assert_eq!(
            m.handle_ra(2, &ra(global, PFX_A, 1800), c.at(1)),
            RaVerdict::Malformed
        );
        let mut r = ra(RTR_A, PFX_A, 1800);
        r.hop_limit = 64;
        assert_eq!(m.handle_ra(2, &r, c.at(1)), RaVerdict::Malformed);
        let mut r = ra(RTR_A, PFX_A, 1800);
        r.fragmented = true;
        assert_eq!(m.handle_ra(2, &r, c.at(1)), RaVerdict::Malformed);
        let mut r = ra(RTR_A, PFX_A, 1800);
        r.prefixes[0].prefix_len = 48;
        assert_eq!(m.handle_ra(2, &r, c.at(1)), RaVerdict::NoPrefix);
        assert_eq!(
            m.handle_ra(9, &ra(RTR_A, PFX_A, 1800), c.at(1)),
            RaVerdict::UnknownInterface
        );
        assert!(drain(&mut m).is_empty());
        assert_eq!(m.active_moa(), None);
    }

    #[test]
    fn ims_update_retransmits_with_backoff() {
        let c = Clock(Instant::now());
        let mut m = Mobility::new(cfg(vec![]));
        m.handle_link(2, LinkEvent::CarrierUp, c.at(0));
        m.handle_ra(2, &ra(RTR_A, PFX_A, 1800), c.at(0));
        let first = updates(&drain(&mut m));
        assert_eq!(first.len(), 1);
        let mut times = vec![];
        let mut now = c.at(0);
        for _ in 0..7 {
            now = m.poll_timeout().unwrap();
            m.handle_timeout(now);
            let u = updates(&drain(&mut m));
            assert_eq!(u, first, "same datagram, same seq");
            times.push(now.duration_since(c.at(0)).as_millis());
        }
        assert_eq!(times, vec![100, 300, 700, 1500, 3100, 6300, 10300]);
        ack(&mut m, first[0].seq, now);
        assert!(!m.registration_pending());
        assert_eq!(m.accepted_seq(), Some(first[0].seq));
        // Refresh at half the lifetime, with a new seq.
        let t = m.poll_timeout().unwrap();
        assert_eq!(t, now + Duration::from_secs(300));
        m.handle_timeout(t);
        let u = updates(&drain(&mut m));
        assert_eq!(u[0].seq, first[0].seq + 1);
        assert!(!u[0].activate);
    }

    #[test]
    fn ims_update_is_signed_and_restarts_after_timeout() {
        let c = Clock(Instant::now());
        let mut m = Mobility::new(cfg(vec![]));
        m.handle_link(2, LinkEvent::CarrierUp, c.at(0));
        m.handle_ra(2, &ra(RTR_A, PFX_A, 1800), c.at(0));
        let u = updates(&drain(&mut m));
        let r = UpdateRepr::parse_verified(&u[0].datagram, &key().hmac_key()).unwrap();
        assert_eq!(r.hoa, HOA);
        assert_eq!(r.seq, 10);
        assert_eq!(r.active, Some(moa_for(PFX_A, MAC1)));
        assert!(r.activate);
        // Unanswered: 8 transmissions, then it starts over after the cap.
        let mut sent = 1;
        let mut now = c.at(0);
        while now < c.at(30_000) {
            now = m.poll_timeout().unwrap();
            m.handle_timeout(now);
            sent += updates(&drain(&mut m)).len();
        }
        assert!(sent > 8);
        assert!(m.counters().ims_timeouts >= 1);
        assert!(m.registration_pending());
        assert!(ack(&mut m, 10, now));
        assert!(!m.registration_pending());
    }

    #[test]
    fn stale_seq_resyncs() {
        let c = Clock(Instant::now());
        let mut m = Mobility::new(cfg(vec![]));
        m.handle_link(2, LinkEvent::CarrierUp, c.at(0));
        m.handle_ra(2, &ra(RTR_A, PFX_A, 1800), c.at(0));
        let u = updates(&drain(&mut m));
        assert_eq!(u[0].seq, 10);
        // A reply for another seq is ignored.
        assert!(!stale(&mut m, 3, 500, c.at(1)));
        assert!(drain(&mut m).is_empty());
        // An ack under another key is ignored too.
        let other = UpdateKey {
            key_id: 7,
            secret: [4u8; 32],
        };
        let forged = ack_bytes(AckStatus::StaleSeq, 10, 500, &other);
        assert!(!m.handle_ims_datagram(&forged, c.at(1)));
        assert!(drain(&mut m).is_empty());
        assert!(stale(&mut m, 10, 500, c.at(2)));
        let u2 = updates(&drain(&mut m));
        assert_eq!(u2.len(), 1);
        assert_eq!(u2[0].seq, 501);
        assert_eq!(u2[0].active, u[0].active);
        assert!(u2[0].activate);
        // A late ack for the stale seq does not complete the registration.
        ack(&mut m, 10, c.at(3));
        assert!(m.registration_pending());
        ack(&mut m, 501, c.at(4));
        assert!(!m.registration_pending());
        assert_eq!(m.counters().ims_resyncs, 1);
        // Later updates continue above.
        m.handle_link(3, LinkEvent::CarrierUp, c.at(10));
        m.handle_ra(3, &ra(RTR_B, PFX_B, 1800), c.at(11));
        assert_eq!(updates(&drain(&mut m))[0].seq, 502);
    }

    #[test]
    fn newer_update_supersedes_pending_one() {
        let c = Clock(Instant::now());
        let mut m = Mobility::new(cfg(vec![]));
        m.handle_link(2, LinkEvent::CarrierUp, c.at(0));
        m.handle_link(3, LinkEvent::CarrierUp, c.at(0));
        m.handle_ra(2, &ra(RTR_A, PFX_A, 1800), c.at(1));
        m.handle_ra(3, &ra(RTR_B, PFX_B, 1800), c.at(2));
        let u = updates(&drain(&mut m));
        assert_eq!(u.len(), 2);
        assert!(u[1].activate, "activation still outstanding");
        assert_eq!(u[1].standby, vec![moa_for(PFX_B, MAC2)]);
        ack(&mut m, u[0].seq, c.at(3));
        assert!(m.registration_pending());
        ack(&mut m, u[1].seq, c.at(4));
        assert!(!m.registration_pending());
    }

    #[test]
    fn superseded_activation_still_completes_the_handover() {
        let c = Clock(Instant::now());
        let mut m = Mobility::new(cfg(vec![]));
        m.handle_link(2, LinkEvent::CarrierUp, c.at(0));
        m.handle_link(3, LinkEvent::CarrierUp, c.at(0));
        m.handle_ra(2, &ra(RTR_A, PFX_A, 1800), c.at(1));
        // A standby appears before the activation is acked.
        m.handle_ra(3, &ra(RTR_B, PFX_B, 1800), c.at(2));
        let u = updates(&drain(&mut m));
        assert_eq!(u.len(), 2);
        assert!(u[1].activate);
        ack(&mut m, u[1].seq, c.at(3));
        let st = m.status(c.at(4));
        assert_eq!(st.handovers.len(), 1, "{:?}", st.handovers);
        assert_eq!(st.handovers[0].kind, HandoverKind::Initial);
        assert_eq!(st.handovers[0].ims_ack_us, Some(2000));
    }

    #[test]
    fn standby_loss_updates_ims() {
        let c = Clock(Instant::now());
        let mut m = with_standby(&c);
        m.handle_link(3, LinkEvent::CarrierDown, c.at(200));
        let a = drain(&mut m);
        assert!(a.contains(&Action::RemoveMoa {
            ifindex: 3,
            moa: moa_for(PFX_B, MAC2),
            prefix_len: 64
        }));
        let u = updates(&a);
        assert!(u[0].standby.is_empty());
        assert!(!u[0].activate);
        assert_eq!(m.active_moa(), Some(moa_for(PFX_A, MAC1)));
    }

    #[test]
    fn peer_bindings_only_move_forward() {
        let c = Clock(Instant::now());
        let mut m = active_on_a(&c, vec![]);
        let sb = Ipv6Addr::new(0x2001, 0xdb8, 0xd, 0, 0, 0, 0, 9);
        assert!(m.handle_peer_binding(
            PEER,
            PeerBinding {
                active: Some(PEER_MOA),
                standby: vec![sb],
                seq: 5,
                expires_unix: 0
            },
            c.at(0)
        ));
        assert_eq!(
            drain(&mut m),
            vec![Action::SetPeerMaps {
                hoa: PEER,
                active: Some(PEER_MOA),
                moas: vec![PEER_MOA, sb],
                old_moas: vec![],
                old_active: None
            }]
        );
        assert!(!m.handle_peer_binding(
            PEER,
            PeerBinding {
                active: Some(sb),
                standby: vec![],
                seq: 5,
                expires_unix: 0
            },
            c.at(0)
        ));
        assert!(drain(&mut m).is_empty());
        assert!(m.handle_peer_binding(
            PEER,
            PeerBinding {
                active: Some(sb),
                standby: vec![],
                seq: 6,
                expires_unix: 0
            },
            c.at(0)
        ));
        // The MoA that left the binding still translates inbound for a
        // moment (the peer's own source may still be switching), then goes.
        assert_eq!(
            drain(&mut m),
            vec![Action::SetPeerMaps {
                hoa: PEER,
                active: Some(sb),
                moas: vec![PEER_MOA, sb],
                old_moas: vec![],
                old_active: Some(PEER_MOA)
            }]
        );
        let grace_end = c.at(0) + PEER_MOA_GRACE;
        assert!(m.poll_timeout().is_some_and(|t| t <= grace_end));
        m.handle_timeout(grace_end - Duration::from_millis(1));
        assert!(!drain(&mut m)
            .iter()
            .any(|a| matches!(a, Action::SetPeerMaps { .. })));
        m.handle_timeout(grace_end);
        assert_eq!(
            drain(&mut m)
                .into_iter()
                .filter(|a| matches!(a, Action::SetPeerMaps { .. }))
                .collect::<Vec<_>>(),
            vec![Action::SetPeerMaps {
                hoa: PEER,
                active: Some(sb),
                moas: vec![sb],
                old_moas: vec![PEER_MOA],
                old_active: Some(sb)
            }]
        );
        // A MoA that comes back within its grace is simply current again.
        assert!(m.handle_peer_binding(
            PEER,
            PeerBinding {
                active: Some(PEER_MOA),
                standby: vec![],
                seq: 7,
                expires_unix: 0
            },
            c.at(5000)
        ));
        drain(&mut m);
        assert!(m.handle_peer_binding(
            PEER,
            PeerBinding {
                active: Some(sb),
                standby: vec![],
                seq: 8,
                expires_unix: 0
            },
            c.at(5100)
        ));
        drain(&mut m);
        assert!(m.handle_peer_binding(
            PEER,
            PeerBinding {
                active: Some(PEER_MOA),
                standby: vec![],
                seq: 9,
                expires_unix: 0
            },
            c.at(5200)
        ));
        drain(&mut m);
        m.handle_timeout(c.at(5100) + PEER_MOA_GRACE);
        let a = drain(&mut m);
        assert!(
            !a.iter().any(|x| matches!(x, Action::SetPeerMaps { old_moas, .. } if old_moas.contains(&PEER_MOA))),
            "{a:?}"
        );
        // Deleting the peer removes the retiring MoAs at once.
        assert!(m.remove_peer(PEER));
        let a = drain(&mut m);
        assert!(
            a.iter().any(|x| matches!(x, Action::SetPeerMaps { old_moas, .. } if old_moas.contains(&sb) && old_moas.contains(&PEER_MOA))),
            "{a:?}"
        );
        // Our own HoA is never a peer.
        assert!(!m.handle_peer_binding(
            HOA,
            PeerBinding {
                active: Some(sb),
                standby: vec![],
                seq: 99,
                expires_unix: 0
            },
            c.at(0)
        ));
    }

    #[test]
    fn shutdown_removes_everything_it_added() {
        let c = Clock(Instant::now());
        let mut m = with_standby(&c);
        m.shutdown();
        let a = drain(&mut m);
        for (ifindex, moa) in [(2, moa_for(PFX_A, MAC1)), (3, moa_for(PFX_B, MAC2))] {
            assert!(a.contains(&Action::RemoveMoa {
                ifindex,
                moa,
                prefix_len: 64
            }));
            assert!(a
                .iter()
                .any(|x| matches!(x, Action::RemoveRoute(r) if r.ifindex == ifindex)));
            assert!(a
                .iter()
                .any(|x| matches!(x, Action::RemoveOwnSource { moa: m, .. } if *m == moa)));
        }
        assert!(updates(&a).is_empty());
        assert_eq!(m.poll_timeout(), None);
        assert_eq!(m.active_moa(), None);
    }

    #[test]
    fn primary_wins_at_startup() {
        let c = Clock(Instant::now());
        let mut m = Mobility::new(cfg(vec![]));
        m.handle_link(2, LinkEvent::CarrierUp, c.at(0));
        m.handle_link(3, LinkEvent::CarrierUp, c.at(0));
        drain(&mut m);
        // The secondary's router answers first: it waits as standby.
        m.handle_ra(3, &ra(RTR_B, PFX_B, 1800), c.at(1));
        assert_eq!(m.active_moa(), None);
        assert_eq!(m.standby_moas(), vec![moa_for(PFX_B, MAC2)]);
        m.handle_ra(2, &ra(RTR_A, PFX_A, 1800), c.at(5));
        assert_eq!(m.active_moa(), Some(moa_for(PFX_A, MAC1)));
        assert_eq!(m.standby_moas(), vec![moa_for(PFX_B, MAC2)]);
        m.handle_timeout(c.at(600));
        assert_eq!(m.active_moa(), Some(moa_for(PFX_A, MAC1)));
    }

    #[test]
    fn secondary_promoted_when_primary_stays_silent() {
        let c = Clock(Instant::now());
        let mut m = Mobility::new(cfg(vec![]));
        m.handle_link(2, LinkEvent::CarrierUp, c.at(0));
        m.handle_link(3, LinkEvent::CarrierUp, c.at(0));
        m.handle_ra(3, &ra(RTR_B, PFX_B, 1800), c.at(1));
        assert_eq!(m.active_moa(), None);
        m.handle_timeout(c.at(250)); // an RS retransmission on eth0
        assert_eq!(m.active_moa(), None);
        m.handle_timeout(c.at(501));
        assert_eq!(m.active_moa(), Some(moa_for(PFX_B, MAC2)));
        let a = drain(&mut m);
        assert!(a
            .iter()
            .any(|x| matches!(x, Action::AddRoute(r) if r.ifindex == 3 && r.metric == 100)));
    }

    #[test]
    fn deleted_peer_is_unmapped() {
        let c = Clock(Instant::now());
        let mut m = active_on_a(&c, vec![]);
        assert!(!m.remove_peer(PEER));
        m.handle_peer_binding(
            PEER,
            PeerBinding {
                active: Some(PEER_MOA),
                standby: vec![],
                seq: 5,
                expires_unix: 0,
            },
            c.at(0),
        );
        drain(&mut m);
        assert!(m.remove_peer(PEER));
        assert_eq!(
            drain(&mut m),
            vec![Action::SetPeerMaps {
                hoa: PEER,
                active: None,
                moas: vec![],
                old_moas: vec![PEER_MOA],
                old_active: Some(PEER_MOA)
            }]
        );
        assert!(m.peers().is_empty());
        // A later binding (any seq) is accepted again.
        assert!(m.handle_peer_binding(
            PEER,
            PeerBinding {
                active: Some(PEER_MOA),
                standby: vec![],
                seq: 1,
                expires_unix: 0
            },
            c.at(0)
        ));
    }

    #[test]
    fn removed_moa_is_restored() {
        let c = Clock(Instant::now());
        let mut m = active_on_a(&c, vec![]);
        let moa = moa_for(PFX_A, MAC1);
        m.handle_address_removed(2, moa);
        assert_eq!(
            drain(&mut m),
            vec![Action::AddMoa {
                ifindex: 2,
                moa,
                prefix_len: 64
            }]
        );
        m.handle_address_removed(2, PEER);
        assert!(drain(&mut m).is_empty());
    }

    #[test]
    fn peer_prefix_routes_carry_hoa_source() {
        let c = Clock(Instant::now());
        let mut conf = cfg(vec![]);
        conf.peer_prefixes = vec![(Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 0), 64)];
        let mut m = Mobility::new(conf);
        m.handle_link(2, LinkEvent::CarrierUp, c.at(0));
        m.handle_ra(2, &ra(RTR_A, PFX_A, 1800), c.at(0));
        let a = drain(&mut m);
        assert!(a.contains(&Action::AddRoute(Route {
            dst: Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 0),
            dst_len: 64,
            ifindex: 2,
            via: RTR_A,
            metric: 100,
            src: Some(HOA)
        })));
    }
}

#[cfg(test)]
mod proptests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[derive(Debug, Clone)]
    enum Ev {
        Up(u32),
        Down(u32),
        Notify(u32),
        Ra(u32, u8, u8, u16),
        Na(u32, u8),
        Ack,
        Stale(u64),
        Wait(u16),
    }

    fn ev() -> impl Strategy<Value = Ev> {
        prop_oneof![
            (2u32..4).prop_map(Ev::Up),
            (2u32..4).prop_map(Ev::Down),
            (2u32..4).prop_map(Ev::Notify),
            (2u32..4, 0u8..4).prop_map(|(i, g)| Ev::Na(i, g)),
            (
                2u32..4,
                0u8..4,
                0u8..3,
                prop_oneof![Just(0u16), Just(3), Just(1800)]
            )
                .prop_map(|(i, r, p, l)| Ev::Ra(i, r, p, l)),
            Just(Ev::Ack),
            (0u64..5).prop_map(Ev::Stale),
            (0u16..5000).prop_map(Ev::Wait),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
        /// Whatever happens: at most one active MoA, never also a standby;
        /// addresses added and removed balance out after shutdown; the MoA
        /// of an interface is always its own EUI-64 in an RA prefix.
        #[test]
        fn invariants_hold(evs in proptest::collection::vec(ev(), 1..60)) {
            let key = UpdateKey { key_id: 1, secret: [9; 32] };
            let routers = [
                Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0xa),
                Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0xb),
                Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0x666),
                Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1),
            ];
            let prefixes = [
                Ipv6Addr::new(0x2001, 0xdb8, 0xa, 0, 0, 0, 0, 0),
                Ipv6Addr::new(0x2001, 0xdb8, 0xb, 0, 0, 0, 0, 0),
                Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 0),
            ];
            let macs = [[2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]];
            let mut m = Mobility::new(MobilityConfig {
                hoa: Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 1),
                key: key.clone(),
                ifaces: vec![
                    IfaceConfig { ifindex: 2, name: "eth0".into(), mac: macs[0], role: Role::Primary, allowed_routers: vec![] },
                    IfaceConfig { ifindex: 3, name: "eth1".into(), mac: macs[1], role: Role::Secondary, allowed_routers: routers[..2].to_vec() },
                ],
                peer_prefixes: vec![],
                initial_seq: 100,
                nonce_seed: 0,
                timers: Timers::default(),
            });
            // Sites A and B share a gateway address, told apart by MAC.
            let gw_macs = [[2, 0, 0, 0, 9, 0xa], [2, 0, 0, 0, 9, 0xb], [2, 0, 0, 0, 9, 0xc], [2, 0, 0, 0, 9, 0xd]];
            m.set_sites(vec![
                SiteHint { prefix: prefixes[0], gateway: routers[0], gateway_mac: gw_macs[0], router_lifetime_s: 1800 },
                SiteHint { prefix: prefixes[1], gateway: routers[0], gateway_mac: gw_macs[1], router_lifetime_s: 1800 },
                SiteHint { prefix: prefixes[2], gateway: routers[1], gateway_mac: gw_macs[2], router_lifetime_s: 3 },
            ]);
            let t0 = Instant::now();
            let mut now = t0;
            let mut addrs: BTreeSet<(u32, Ipv6Addr)> = BTreeSet::new();
            let mut last_update: Option<ImsUpdate> = None;
            let mut seqs: Vec<u64> = Vec::new();
            for e in evs {
                match e {
                    Ev::Up(i) => m.handle_link(i, LinkEvent::CarrierUp, now),
                    Ev::Down(i) => m.handle_link(i, LinkEvent::CarrierDown, now),
                    Ev::Notify(i) => m.handle_link(i, LinkEvent::NotifyPeers, now),
                    Ev::Ra(i, r, p, l) => {
                        let ra = RaInput {
                            src: routers[usize::from(r)],
                            src_mac: Some([2, 0, 0, 0, 9, r]),
                            hop_limit: 255,
                            fragmented: false,
                            router_lifetime_s: l,
                            prefixes: vec![RaPrefix { prefix: prefixes[usize::from(p)], prefix_len: 64, valid_lifetime_s: 3600 }],
                        };
                        let v = m.handle_ra(i, &ra, now);
                        if r >= 2 && i == 3 { prop_assert_ne!(v, RaVerdict::Accepted); }
                        if r == 3 { prop_assert_eq!(v, RaVerdict::Malformed); }
                    }
                    Ev::Na(i, g) => {
                        let gw = if g == 2 { routers[1] } else { routers[0] };
                        let na = NaInput { src: gw, target: gw, target_mac: Some(gw_macs[usize::from(g)]), hop_limit: 255, router: true };
                        let v = m.handle_na(i, &na, now);
                        // An unregistered MAC is never taken for a site.
                        if g == 3 { prop_assert_eq!(v, None); }
                    }
                    Ev::Ack => {
                        if let Some(u) = &last_update {
                            let ack = crate::update::AckRepr {
                                status: crate::update::AckStatus::Accepted,
                                key_id: 1, seq: u.seq, last_accepted_seq: u.seq,
                                hoa: m.hoa(), assertion: Some(vec![1]),
                            };
                            m.handle_ims_datagram(&ack.to_vec(&key.hmac_key()).unwrap(), now);
                        }
                    }
                    Ev::Stale(d) => {
                        if let Some(u) = &last_update {
                            let ack = crate::update::AckRepr {
                                status: crate::update::AckStatus::StaleSeq,
                                key_id: 1, seq: u.seq, last_accepted_seq: u.seq + d,
                                hoa: m.hoa(), assertion: None,
                            };
                            m.handle_ims_datagram(&ack.to_vec(&key.hmac_key()).unwrap(), now);
                        }
                    }
                    Ev::Wait(ms) => {
                        now += Duration::from_millis(u64::from(ms));
                        m.handle_timeout(now);
                    }
                }
                while let Some(a) = m.poll_action() {
                    match a {
                        Action::AddMoa { ifindex, moa, .. } => {
                            let mac = macs[(ifindex - 2) as usize];
                            prop_assert_eq!(&moa.octets()[8..], &eui64(mac)[..]);
                            prop_assert!(prefixes.contains(&mask64(moa)));
                            addrs.insert((ifindex, moa));
                        }
                        Action::RemoveMoa { ifindex, moa, .. } => { addrs.remove(&(ifindex, moa)); }
                        Action::SendImsUpdate(u) => {
                            if seqs.last() != Some(&u.seq) { seqs.push(u.seq); }
                            prop_assert!(u.active.is_some() || !u.standby.is_empty());
                            last_update = Some(u);
                        }
                        _ => {}
                    }
                }
                let act = m.active_moa();
                prop_assert!(!m.standby_moas().iter().any(|s| Some(*s) == act));
                // Every MoA the machine holds is on the interface.
                for (i, moa) in m.own_moas() {
                    prop_assert!(addrs.contains(&(i, moa)));
                }
            }
            // New updates always carry a larger seq than the previous one.
            prop_assert!(seqs.windows(2).all(|w| w[1] > w[0]), "{:?}", seqs);
            m.shutdown();
            while let Some(a) = m.poll_action() {
                if let Action::RemoveMoa { ifindex, moa, .. } = a { addrs.remove(&(ifindex, moa)); }
            }
            prop_assert!(addrs.is_empty(), "left behind: {:?}", addrs);
        }
    }
}
