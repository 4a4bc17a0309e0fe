//! Sans-IO core of host-prep's Router Advertisement sender.
//!
//! The sender runs on the source host's no-uplink bridge while a VM's standby
//! NIC is being prepared: it sends an initial burst of RAs, then periodic RAs,
//! answers every Router Solicitation at once (rate limited), and, when
//! stopped, sends one final RA with router lifetime 0 (RFC 4861 §6.2.5).
//!
//! No socket and no clock here: time comes in as `now`, packets go out as
//! [`Transmit`]s that the I/O loop ([`crate::ra_io`]) turns into bytes.

use std::collections::VecDeque;
use std::net::Ipv6Addr;
use std::time::{Duration, Instant};

use mat6_proto::binding::{RaParams, SiteInfo};
use mat6_proto::ndp::{NdpError, NdpRepr, PrefixInfo, RouterAdvert};

/// `ff02::1`, all-nodes multicast.
pub const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);

/// Timing of the sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RaTiming {
    /// Interval of unsolicited RAs after the initial burst.
    pub interval: Duration,
    /// Number of RAs in the initial burst (at least 1).
    pub initial_count: u32,
    /// Gap between RAs of the initial burst.
    pub initial_interval: Duration,
    /// Minimum gap between two solicited RAs; solicitations inside the gap
    /// are answered by one multicast RA at its end.
    pub min_solicited_gap: Duration,
}

impl From<&crate::config::RaSettings> for RaTiming {
    fn from(s: &crate::config::RaSettings) -> Self {
        Self {
            interval: Duration::from_millis(s.interval_ms.max(1)),
            initial_count: s.initial_count.max(1),
            initial_interval: Duration::from_millis(s.initial_interval_ms.max(1)),
            min_solicited_gap: Duration::from_millis(s.min_solicited_gap_ms),
        }
    }
}

/// Why an RA is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Part of the initial burst.
    Initial,
    /// Periodic unsolicited RA.
    Periodic,
    /// Answer to a Router Solicitation.
    Solicited,
    /// Last RA, router lifetime 0: this router is going away.
    Final,
}

/// One RA to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transmit {
    /// IPv6 destination (all-nodes or the soliciting node).
    pub dst: Ipv6Addr,
    /// Why it is sent; `Final` means router lifetime 0.
    pub reason: Reason,
}

/// Sender phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Sending the initial burst; `sent` RAs of it are out.
    Initial {
        /// RAs of the burst sent so far.
        sent: u32,
    },
    /// Sending periodic RAs.
    Periodic,
    /// Stopped; the final RA has been queued.
    Stopped,
}

/// Counters, for logs and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RaStats {
    /// Unsolicited RAs (initial + periodic).
    pub unsolicited: u64,
    /// Solicited RAs.
    pub solicited: u64,
    /// Router Solicitations seen.
    pub solicitations: u64,
}

/// The RA sender state machine.
#[derive(Debug)]
pub struct RaSender {
    timing: RaTiming,
    phase: Phase,
    next_unsolicited: Option<Instant>,
    last_solicited: Option<Instant>,
    deferred_solicited: Option<Instant>,
    queue: VecDeque<Transmit>,
    stats: RaStats,
}

impl RaSender {
    /// A sender whose first RA is due at `now`.
    pub fn new(timing: RaTiming, now: Instant) -> Self {
        Self {
            timing,
            phase: Phase::Initial { sent: 0 },
            next_unsolicited: Some(now),
            last_solicited: None,
            deferred_solicited: None,
            queue: VecDeque::new(),
            stats: RaStats::default(),
        }
    }

    /// Current phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Counters.
    pub fn stats(&self) -> RaStats {
        self.stats
    }

    /// When [`handle_timeout`](Self::handle_timeout) must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match (self.next_unsolicited, self.deferred_solicited) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Advance time: queue the RAs that are due.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(at) = self.deferred_solicited {
            if at <= now {
                self.deferred_solicited = None;
                self.send_solicited(ALL_NODES, now);
            }
        }
        let Some(due) = self.next_unsolicited else {
            return;
        };
        if due > now {
            return;
        }
        match self.phase {
            Phase::Initial { sent } => {
                self.push(ALL_NODES, Reason::Initial);
                self.stats.unsolicited += 1;
                let sent = sent + 1;
                if sent >= self.timing.initial_count {
                    self.phase = Phase::Periodic;
                    self.next_unsolicited = Some(now + self.timing.interval);
                } else {
                    self.phase = Phase::Initial { sent };
                    self.next_unsolicited = Some(now + self.timing.initial_interval);
                }
            }
            Phase::Periodic => {
                self.push(ALL_NODES, Reason::Periodic);
                self.stats.unsolicited += 1;
                self.next_unsolicited = Some(now + self.timing.interval);
            }
            Phase::Stopped => self.next_unsolicited = None,
        }
    }

    /// A Router Solicitation from `src` arrived at `now`.
    ///
    /// Answered at once, unicast to the solicitor (multicast when the source
    /// is unspecified), unless another solicited RA went out less than
    /// `min_solicited_gap` ago: then one multicast RA goes out at the end of
    /// the gap for all solicitations inside it.
    pub fn handle_rs(&mut self, src: Ipv6Addr, now: Instant) {
        if self.phase == Phase::Stopped {
            return;
        }
        self.stats.solicitations += 1;
        let dst = if src.is_unspecified() { ALL_NODES } else { src };
        match self.last_solicited {
            Some(last) if now < last + self.timing.min_solicited_gap => {
                if self.deferred_solicited.is_none() {
                    self.deferred_solicited = Some(last + self.timing.min_solicited_gap);
                }
            }
            _ => self.send_solicited(dst, now),
        }
    }

    /// Stop: queue the final RA (router lifetime 0) and never send again.
    pub fn stop(&mut self) {
        if self.phase == Phase::Stopped {
            return;
        }
        self.phase = Phase::Stopped;
        self.next_unsolicited = None;
        self.deferred_solicited = None;
        self.queue.clear();
        self.push(ALL_NODES, Reason::Final);
    }

    /// Next RA to put on the wire.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.queue.pop_front()
    }

    fn send_solicited(&mut self, dst: Ipv6Addr, now: Instant) {
        self.last_solicited = Some(now);
        self.stats.solicited += 1;
        self.push(dst, Reason::Solicited);
    }

    fn push(&mut self, dst: Ipv6Addr, reason: Reason) {
        self.queue.push_back(Transmit { dst, reason });
    }
}

/// The Router Advertisement that makes a link look like `site`'s link: the
/// site prefix with the on-link and autonomous flags, the gateway's MAC as
/// source link-layer option, lifetimes from the site's RA parameters. A
/// `Final` RA carries router lifetime 0 (the prefix stays: its lifetime
/// cannot be shortened by an RA anyway, RFC 4862 §5.5.3 e).
pub fn router_advert(site: &SiteInfo, reason: Reason) -> RouterAdvert {
    let params = site.ra.clone().unwrap_or_default();
    RouterAdvert {
        cur_hop_limit: 64,
        managed: false,
        other: false,
        router_lifetime_s: if reason == Reason::Final {
            0
        } else {
            params.router_lifetime_s
        },
        reachable_time_ms: 0,
        retrans_timer_ms: 0,
        source_ll: Some(site.gateway_mac.0),
        mtu: params.mtu,
        prefixes: vec![PrefixInfo {
            prefix: site.prefix.network(),
            prefix_len: site.prefix.prefix(),
            on_link: true,
            autonomous: true,
            valid_lifetime_s: params.prefix_valid_lifetime_s,
            preferred_lifetime_s: params
                .prefix_preferred_lifetime_s
                .min(params.prefix_valid_lifetime_s),
        }],
        other_options: Vec::new(),
    }
}

/// ICMPv6 bytes (header + body, checksum filled in) of the RA for `tx`, sent
/// from the site gateway's link-local address.
pub fn encode(site: &SiteInfo, tx: &Transmit) -> Result<Vec<u8>, NdpError> {
    NdpRepr::RouterAdvert(router_advert(site, tx.reason)).to_bytes(site.gateway_ll, tx.dst)
}

/// The sender timing for a site: host defaults, with the site's own RA
/// interval when the registry gives one.
pub fn timing_for(site_ra: Option<&RaParams>, host: RaTiming) -> RaTiming {
    match site_ra {
        Some(p) if p.interval_ms > 0 => RaTiming {
            interval: Duration::from_millis(u64::from(p.interval_ms)),
            ..host
        },
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn timing() -> RaTiming {
        RaTiming {
            interval: Duration::from_secs(1),
            initial_count: 3,
            initial_interval: Duration::from_millis(100),
            min_solicited_gap: Duration::from_millis(20),
        }
    }

    fn drain(s: &mut RaSender) -> Vec<Transmit> {
        std::iter::from_fn(|| s.poll_transmit()).collect()
    }

    /// Run the sender from `start` to `end`, following its timeouts, and
    /// return the times and kinds of the RAs it sent.
    fn run_until(s: &mut RaSender, start: Instant, end: Instant) -> Vec<(Duration, Reason)> {
        let mut out = Vec::new();
        while let Some(t) = s.poll_timeout() {
            if t > end {
                break;
            }
            s.handle_timeout(t);
            for tx in drain(s) {
                out.push((t - start, tx.reason));
            }
        }
        out
    }

    #[test]
    fn initial_burst_then_periodic() {
        let t0 = Instant::now();
        let mut s = RaSender::new(timing(), t0);
        assert_eq!(s.poll_timeout(), Some(t0));
        let sent = run_until(&mut s, t0, t0 + Duration::from_millis(3_250));
        let ms: Vec<(u128, Reason)> = sent.iter().map(|(d, r)| (d.as_millis(), *r)).collect();
        assert_eq!(
            ms,
            vec![
                (0, Reason::Initial),
                (100, Reason::Initial),
                (200, Reason::Initial),
                (1_200, Reason::Periodic),
                (2_200, Reason::Periodic),
                (3_200, Reason::Periodic),
            ]
        );
        assert_eq!(s.phase(), Phase::Periodic);
        assert_eq!(s.stats().unsolicited, 6);
    }

    #[test]
    fn nothing_before_due() {
        let t0 = Instant::now();
        let mut s = RaSender::new(timing(), t0 + Duration::from_millis(5));
        s.handle_timeout(t0);
        assert!(s.poll_transmit().is_none());
        s.handle_timeout(t0 + Duration::from_millis(5));
        assert_eq!(s.poll_transmit().map(|t| t.reason), Some(Reason::Initial));
    }

    #[test]
    fn rs_answered_at_once_unicast() {
        let t0 = Instant::now();
        let mut s = RaSender::new(timing(), t0);
        s.handle_timeout(t0);
        drain(&mut s);
        let node: Ipv6Addr = "fe80::5054:ff:fe00:2".parse().unwrap();
        let t1 = t0 + Duration::from_millis(50);
        s.handle_rs(node, t1);
        assert_eq!(
            drain(&mut s),
            vec![Transmit {
                dst: node,
                reason: Reason::Solicited
            }]
        );
        // Unspecified source (a node without an address yet): multicast.
        s.handle_rs(Ipv6Addr::UNSPECIFIED, t1 + Duration::from_millis(30));
        assert_eq!(drain(&mut s)[0].dst, ALL_NODES);
        assert_eq!(s.stats().solicited, 2);
    }

    #[test]
    fn rs_flood_is_rate_limited_and_coalesced() {
        let t0 = Instant::now();
        let mut s = RaSender::new(timing(), t0 + Duration::from_secs(100));
        let node: Ipv6Addr = "fe80::1:2".parse().unwrap();
        s.handle_rs(node, t0);
        assert_eq!(drain(&mut s).len(), 1);
        for i in 1..10 {
            s.handle_rs(node, t0 + Duration::from_millis(i));
        }
        assert!(drain(&mut s).is_empty(), "no answer inside the gap");
        let due = t0 + Duration::from_millis(20);
        assert_eq!(s.poll_timeout(), Some(due));
        s.handle_timeout(due);
        assert_eq!(
            drain(&mut s),
            vec![Transmit {
                dst: ALL_NODES,
                reason: Reason::Solicited
            }]
        );
        assert_eq!(s.stats().solicitations, 10);
        assert_eq!(s.stats().solicited, 2);
        // The periodic schedule is untouched by the flood.
        assert_eq!(s.poll_timeout(), Some(t0 + Duration::from_secs(100)));
    }

    #[test]
    fn stop_sends_one_final_ra_then_silence() {
        let t0 = Instant::now();
        let mut s = RaSender::new(timing(), t0);
        s.handle_timeout(t0);
        s.handle_rs("fe80::9".parse().unwrap(), t0);
        s.stop();
        assert_eq!(
            drain(&mut s),
            vec![Transmit {
                dst: ALL_NODES,
                reason: Reason::Final
            }]
        );
        assert_eq!(s.poll_timeout(), None);
        s.handle_rs("fe80::9".parse().unwrap(), t0 + Duration::from_secs(1));
        s.handle_timeout(t0 + Duration::from_secs(10));
        assert!(s.poll_transmit().is_none());
        s.stop();
        assert!(s.poll_transmit().is_none(), "stop is idempotent");
    }

    fn site() -> SiteInfo {
        SiteInfo {
            name: "B".into(),
            prefix: "2001:db8:b::/64".parse().unwrap(),
            gateway_ll: "fe80::b:1".parse().unwrap(),
            gateway_mac: "02:00:00:00:0b:01".parse().unwrap(),
            ra: Some(RaParams {
                router_lifetime_s: 600,
                prefix_valid_lifetime_s: 3600,
                prefix_preferred_lifetime_s: 7200,
                interval_ms: 250,
                mtu: Some(1500),
            }),
        }
    }

    #[test]
    fn ra_announces_the_site() {
        let tx = Transmit {
            dst: ALL_NODES,
            reason: Reason::Periodic,
        };
        let bytes = encode(&site(), &tx).unwrap();
        // What a guest's raw socket would read parses back to the site's link.
        let parsed = NdpRepr::parse(&bytes, site().gateway_ll, ALL_NODES).unwrap();
        let NdpRepr::RouterAdvert(ra) = parsed else {
            panic!("not an RA: {parsed:?}")
        };
        assert_eq!(ra.source_ll, Some([2, 0, 0, 0, 0x0b, 1]));
        assert_eq!(ra.router_lifetime_s, 600);
        assert_eq!(ra.mtu, Some(1500));
        assert_eq!(ra.prefixes.len(), 1);
        let p = &ra.prefixes[0];
        assert_eq!(p.prefix, "2001:db8:b::".parse::<Ipv6Addr>().unwrap());
        assert_eq!(p.prefix_len, 64);
        assert!(p.on_link && p.autonomous);
        assert_eq!(p.valid_lifetime_s, 3600);
        assert_eq!(p.preferred_lifetime_s, 3600, "preferred clamped to valid");
        // Checksum covers the pseudo-header: another source does not verify.
        assert!(NdpRepr::parse(&bytes, "fe80::2".parse().unwrap(), ALL_NODES).is_err());
    }

    #[test]
    fn final_ra_has_zero_router_lifetime() {
        let ra = router_advert(&site(), Reason::Final);
        assert_eq!(ra.router_lifetime_s, 0);
        assert_eq!(ra.prefixes.len(), 1);
        let mut s = site();
        s.ra = None;
        let ra = router_advert(&s, Reason::Solicited);
        assert_eq!(ra.router_lifetime_s, RaParams::default().router_lifetime_s);
    }

    #[test]
    fn site_interval_overrides_host_default() {
        let t = timing_for(site().ra.as_ref(), timing());
        assert_eq!(t.interval, Duration::from_millis(250));
        assert_eq!(t.initial_count, 3);
        assert_eq!(timing_for(None, timing()), timing());
    }

    #[derive(Debug, Clone)]
    enum Ev {
        Rs { after_ms: u64, unspecified: bool },
        Timeout,
        Stop,
    }

    fn ev() -> impl proptest::strategy::Strategy<Value = Ev> {
        use proptest::prelude::*;
        prop_oneof![
            8 => (0u64..400, any::<bool>()).prop_map(|(after_ms, unspecified)| Ev::Rs { after_ms, unspecified }),
            8 => Just(Ev::Timeout),
            1 => Just(Ev::Stop),
        ]
    }

    proptest::proptest! {
        /// Whatever the mix of solicitations, timeouts and a stop: solicited
        /// RAs are at least `min_solicited_gap` apart, every RS before the
        /// stop is answered (at once or by the deferred multicast RA) within
        /// the gap, unsolicited RAs follow the schedule, and after the final
        /// RA nothing is sent.
        #[test]
        fn ra_sender_invariants(events in proptest::collection::vec(ev(), 1..200)) {
            let t = timing();
            let t0 = Instant::now();
            let mut s = RaSender::new(t, t0);
            let mut now = t0;
            let mut solicited_at: Vec<Instant> = Vec::new();
            let mut unsolicited_at: Vec<Instant> = Vec::new();
            let mut rs_at: Vec<Instant> = Vec::new();
            let mut finals = 0;
            let mut stopped = false;
            let mut after_final = 0;
            for e in events {
                match e {
                    Ev::Rs { after_ms, unspecified } => {
                        now += Duration::from_millis(after_ms);
                        // Time passes: fire what was due first.
                        while let Some(d) = s.poll_timeout() {
                            if d > now { break; }
                            s.handle_timeout(d);
                            for tx in drain(&mut s) {
                                record(&tx, d, &mut solicited_at, &mut unsolicited_at, &mut finals);
                            }
                        }
                        let src = if unspecified { Ipv6Addr::UNSPECIFIED } else { "fe80::7".parse().unwrap() };
                        s.handle_rs(src, now);
                        if !stopped { rs_at.push(now); }
                    }
                    Ev::Timeout => {
                        if let Some(d) = s.poll_timeout() {
                            now = now.max(d);
                            s.handle_timeout(now);
                        }
                    }
                    Ev::Stop => { s.stop(); stopped = true; }
                }
                for tx in drain(&mut s) {
                    if finals > 0 { after_final += 1; }
                    record(&tx, now, &mut solicited_at, &mut unsolicited_at, &mut finals);
                }
            }
            proptest::prop_assert!(finals <= 1);
            proptest::prop_assert_eq!(after_final, 0);
            for w in solicited_at.windows(2) {
                proptest::prop_assert!(w[1] - w[0] >= t.min_solicited_gap, "solicited RAs too close");
            }
            for w in unsolicited_at.windows(2) {
                proptest::prop_assert!(w[1] - w[0] >= t.initial_interval);
            }
            if !stopped {
                // Every RS got an RA no later than one gap after it.
                for r in &rs_at {
                    let answered = solicited_at.iter().any(|a| *a >= *r && *a - *r <= t.min_solicited_gap);
                    let pending = s.poll_timeout().is_some_and(|d| d <= *r + t.min_solicited_gap) && solicited_at.iter().all(|a| *a < *r);
                    proptest::prop_assert!(answered || pending, "RS at {:?} unanswered", *r - t0);
                }
            }
        }
    }

    fn record(
        tx: &Transmit,
        at: Instant,
        sol: &mut Vec<Instant>,
        unsol: &mut Vec<Instant>,
        finals: &mut u32,
    ) {
        match tx.reason {
            Reason::Solicited => sol.push(at),
            Reason::Initial | Reason::Periodic => unsol.push(at),
            Reason::Final => *finals += 1,
        }
    }

    #[test]
    fn timing_from_settings_clamps_zero() {
        let cfg = crate::config::RaSettings {
            interval_ms: 0,
            initial_count: 0,
            initial_interval_ms: 0,
            min_solicited_gap_ms: 0,
        };
        let t = RaTiming::from(&cfg);
        assert_eq!(t.initial_count, 1);
        assert_eq!(t.interval, Duration::from_millis(1));
    }
}
