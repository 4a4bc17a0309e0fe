//! The stateless HoA/MoA translation in nftables: the ruleset and the map
//! updates, as `nft` script text.
//!
//! ```text
//! table ip6 mat6
//!   map peer_out  peer HoA  -> peer active MoA
//!   map peer_in   peer MoA (active, standby, retiring) -> peer HoA
//!   map own_src   oifname   -> own MoA on that interface
//!   set own_moas  every own MoA
//!   output      (filter, raw):      drop TCP RST / ICMPv6 unreachable sourced
//!                                   from an own MoA;
//!                                   saddr == HoA: daddr := peer_out[daddr], notrack
//!   bicast      (filter, srcnat-1): only while a standby is ready and bicast
//!                                   is on: saddr == HoA, oifname == active:
//!                                   dup to standby router via standby link
//!   postrouting (filter, srcnat):   saddr == HoA: saddr := own_src[oifname]
//!   prerouting  (filter, raw):      daddr in own_moas: saddr := peer_in[saddr],
//!                                   daddr := HoA, notrack
//! ```
//!
//! The output chain is a plain `filter` chain: rewriting the destination
//! does not re-route the packet. That is right because the agent routes a
//! peer's HoA and its MoA alike: its routes (default and peer prefixes) all
//! go via the active router, and MoAs carry no prefix route
//! (`noprefixroute`), so the route the socket chose for the peer HoA is the
//! one the MoA would get. A `type route` chain would re-run the route
//! lookup for every packet; measured with `./bench.sh dataplane` that
//! costs about 3 % of the throughput. The source is chosen by outgoing
//! interface in postrouting, so switching interfaces is one route change
//! and never an nft call. The bicast chain exists only while copies are
//! made (an empty base chain or a `jump` still costs every packet); its
//! copy (nftables `dup`, taken before the source is rewritten) goes through
//! postrouting again on the standby link and gets the standby MoA there.
//! Translated packets are `notrack`: conntrack would otherwise see the two
//! directions of a flow under different addresses. A map miss ends the
//! rule, so traffic that is not between HoAs passes untouched.
//!
//! [`Translation`] keeps the agent's view of the maps and turns a desired
//! change into the minimal `nft` commands (delete before add when a key's
//! value changes; nftables 1.0.6 has no `destroy`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::Ipv6Addr;

/// The full ruleset for `table` and `hoa`, replacing any previous table of
/// that name (so a crash leaves nothing that blocks the next start).
pub fn ruleset(table: &str, hoa: Ipv6Addr) -> String {
    format!(
        "add table ip6 {table}\n\
         delete table ip6 {table}\n\
         table ip6 {table} {{\n\
         \tmap peer_out {{ type ipv6_addr : ipv6_addr; }}\n\
         \tmap peer_in {{ type ipv6_addr : ipv6_addr; }}\n\
         \tmap own_src {{ type ifname : ipv6_addr; }}\n\
         \tset own_moas {{ type ipv6_addr; }}\n\
         \tchain output {{\n\
         \t\ttype filter hook output priority raw; policy accept;\n\
         \t\tip6 saddr @own_moas tcp flags & rst == rst drop\n\
         \t\tip6 saddr @own_moas icmpv6 type destination-unreachable drop\n\
         \t\tip6 saddr {hoa} ip6 daddr set ip6 daddr map @peer_out notrack\n\
         \t}}\n\
         \tchain postrouting {{\n\
         \t\ttype filter hook postrouting priority srcnat; policy accept;\n\
         \t\tip6 saddr {hoa} ip6 saddr set oifname map @own_src\n\
         \t}}\n\
         \tchain prerouting {{\n\
         \t\ttype filter hook prerouting priority raw; policy accept;\n\
         \t\tip6 daddr @own_moas ip6 saddr set ip6 saddr map @peer_in ip6 daddr set {hoa} notrack\n\
         \t}}\n\
         }}\n"
    )
}

/// Commands removing the table.
pub fn delete(table: &str) -> String {
    format!("delete table ip6 {table}\n")
}

/// The agent's view of the translation maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Translation {
    table: String,
    hoa: Ipv6Addr,
    peer_out: BTreeMap<Ipv6Addr, Ipv6Addr>,
    peer_in: BTreeMap<Ipv6Addr, Ipv6Addr>,
    own_src: BTreeMap<String, Ipv6Addr>,
    own_moas: BTreeSet<Ipv6Addr>,
    /// MoAs put into `own_moas` before they exist ([`Translation::set_prepared`]).
    prepared: BTreeSet<Ipv6Addr>,
}

fn quote_ifname(name: &str) -> String {
    // Interface names are validated (1..=15 chars); keep them inside quotes
    // without any quote or backslash of their own.
    let clean: String = name
        .chars()
        .filter(|c| *c != '"' && *c != '\\' && !c.is_control())
        .collect();
    format!("\"{clean}\"")
}

impl Translation {
    /// An empty view of `table` (just created by [`ruleset`] for `hoa`).
    pub fn new(table: &str, hoa: Ipv6Addr) -> Self {
        Self {
            table: table.to_owned(),
            hoa,
            peer_out: BTreeMap::new(),
            peer_in: BTreeMap::new(),
            own_src: BTreeMap::new(),
            own_moas: BTreeSet::new(),
            prepared: BTreeSet::new(),
        }
    }

    /// Peer HoA → active MoA.
    pub fn peer_out(&self) -> &BTreeMap<Ipv6Addr, Ipv6Addr> {
        &self.peer_out
    }

    /// Peer MoA → HoA.
    pub fn peer_in(&self) -> &BTreeMap<Ipv6Addr, Ipv6Addr> {
        &self.peer_in
    }

    /// Own interface → MoA.
    pub fn own_src(&self) -> &BTreeMap<String, Ipv6Addr> {
        &self.own_src
    }

    /// Sets a peer's binding: `active` (or none) and all its MoAs. Returns
    /// the nft commands (empty when nothing changes).
    pub fn set_peer(
        &mut self,
        hoa: Ipv6Addr,
        active: Option<Ipv6Addr>,
        moas: &[Ipv6Addr],
    ) -> String {
        let t = &self.table;
        let mut s = String::new();
        match (self.peer_out.get(&hoa).copied(), active) {
            (Some(old), Some(new)) if old == new => {}
            (old, new) => {
                if old.is_some() {
                    let _ = writeln!(s, "delete element ip6 {t} peer_out {{ {hoa} }}");
                    self.peer_out.remove(&hoa);
                }
                if let Some(new) = new {
                    let _ = writeln!(s, "add element ip6 {t} peer_out {{ {hoa} : {new} }}");
                    self.peer_out.insert(hoa, new);
                }
            }
        }
        let want: BTreeSet<Ipv6Addr> = moas.iter().copied().collect();
        let stale: Vec<Ipv6Addr> = self
            .peer_in
            .iter()
            .filter(|(m, h)| **h == hoa && !want.contains(m))
            .map(|(m, _)| *m)
            .collect();
        for m in stale {
            let _ = writeln!(s, "delete element ip6 {t} peer_in {{ {m} }}");
            self.peer_in.remove(&m);
        }
        for m in want {
            match self.peer_in.get(&m) {
                Some(h) if *h == hoa => {}
                Some(_) => {
                    let _ = writeln!(s, "delete element ip6 {t} peer_in {{ {m} }}");
                    let _ = writeln!(s, "add element ip6 {t} peer_in {{ {m} : {hoa} }}");
                    self.peer_in.insert(m, hoa);
                }
                None => {
                    let _ = writeln!(s, "add element ip6 {t} peer_in {{ {m} : {hoa} }}");
                    self.peer_in.insert(m, hoa);
                }
            }
        }
        s
    }

    /// Removes a peer entirely.
    pub fn remove_peer(&mut self, hoa: Ipv6Addr) -> String {
        self.set_peer(hoa, None, &[])
    }

    /// Maps `ifname` to `moa` (and adds `moa` to `own_moas`).
    pub fn set_own(&mut self, ifname: &str, moa: Ipv6Addr) -> String {
        let t = &self.table;
        let q = quote_ifname(ifname);
        let mut s = String::new();
        match self.own_src.get(ifname).copied() {
            Some(old) if old == moa => {}
            Some(old) => {
                // Replace the element in one transaction (the caller sends
                // the whole string as one batch).
                let _ = writeln!(s, "delete element ip6 {t} own_src {{ {q} }}");
                let _ = writeln!(s, "add element ip6 {t} own_src {{ {q} : {moa} }}");
                self.own_src.insert(ifname.to_owned(), moa);
                if self.unused(old) && self.own_moas.remove(&old) {
                    let _ = writeln!(s, "delete element ip6 {t} own_moas {{ {old} }}");
                }
            }
            None => {
                let _ = writeln!(s, "add element ip6 {t} own_src {{ {q} : {moa} }}");
                self.own_src.insert(ifname.to_owned(), moa);
            }
        }
        if self.own_moas.insert(moa) {
            let _ = writeln!(s, "add element ip6 {t} own_moas {{ {moa} }}");
        }
        s
    }

    /// The bicast chain's new content: with `Some((from, to, via))`, HoA
    /// packets routed out of `from` are also sent through `to` to the
    /// router `via` (link-local); with `None`, nothing is copied and the
    /// chain is gone (no per-packet cost). One transaction either way, so
    /// there is never a moment with two copy rules; `add chain` first makes
    /// both work whether or not the chain exists.
    pub fn bicast(&self, b: Option<(&str, &str, Ipv6Addr)>) -> String {
        let t = &self.table;
        let mut s = format!(
            "add chain ip6 {t} bicast {{ type filter hook postrouting priority srcnat - 1; policy accept; }}\n\
             flush chain ip6 {t} bicast\n"
        );
        match b {
            Some((from, to, via)) => {
                let _ = writeln!(
                    s,
                    "add rule ip6 {t} bicast ip6 saddr {} oifname {} dup to {via} device {}",
                    self.hoa,
                    quote_ifname(from),
                    quote_ifname(to)
                );
            }
            None => {
                let _ = writeln!(s, "delete chain ip6 {t} bicast");
            }
        }
        s
    }

    /// Unmaps `ifname` if it maps to `moa`.
    pub fn remove_own(&mut self, ifname: &str, moa: Ipv6Addr) -> String {
        let t = &self.table;
        let mut s = String::new();
        if self.own_src.get(ifname) == Some(&moa) {
            let _ = writeln!(
                s,
                "delete element ip6 {t} own_src {{ {} }}",
                quote_ifname(ifname)
            );
            self.own_src.remove(ifname);
        }
        if self.unused(moa) && self.own_moas.remove(&moa) {
            let _ = writeln!(s, "delete element ip6 {t} own_moas {{ {moa} }}");
        }
        s
    }

    /// Whether `moa` may leave `own_moas`: no interface uses it and it is
    /// not prepared.
    fn unused(&self, moa: Ipv6Addr) -> bool {
        !self.own_src.values().any(|m| *m == moa) && !self.prepared.contains(&moa)
    }

    /// Puts the MoAs this node would form on the registered sites into
    /// `own_moas` ahead of time (and takes out those no longer prepared
    /// nor in use). A move to such a site can then announce its new MoA
    /// before the `own_src` update: packets that reach the MoA early are
    /// already translated, and the kernel's RSTs from it already dropped.
    pub fn set_prepared(&mut self, moas: &BTreeSet<Ipv6Addr>) -> String {
        let t = &self.table;
        let mut s = String::new();
        let old = std::mem::replace(&mut self.prepared, moas.clone());
        for &m in old.difference(moas) {
            if self.unused(m) && self.own_moas.remove(&m) {
                let _ = writeln!(s, "delete element ip6 {t} own_moas {{ {m} }}");
            }
        }
        for &m in moas {
            if self.own_moas.insert(m) {
                let _ = writeln!(s, "add element ip6 {t} own_moas {{ {m} }}");
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn a(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    #[test]
    fn ruleset_has_the_verified_shape() {
        let r = ruleset("mat6", a("2001:db8:ff::1"));
        assert!(r.starts_with("add table ip6 mat6\ndelete table ip6 mat6\n"));
        assert!(r.contains("type filter hook output priority raw"));
        assert!(!r.contains("type route"), "no per-packet re-route");
        assert!(
            r.contains("ip6 saddr 2001:db8:ff::1 ip6 daddr set ip6 daddr map @peer_out notrack")
        );
        assert!(r.contains("ip6 saddr 2001:db8:ff::1 ip6 saddr set oifname map @own_src"));
        // No copy chain (and no jump to one) until bicast is switched on.
        assert!(!r.contains("bicast"));
        assert!(r.contains(
            "ip6 daddr @own_moas ip6 saddr set ip6 saddr map @peer_in ip6 daddr set 2001:db8:ff::1 notrack"
        ));
        assert!(r.contains("tcp flags & rst == rst drop"));
        assert!(r.contains("icmpv6 type destination-unreachable drop"));
    }

    #[test]
    fn peer_updates_are_minimal_diffs() {
        let mut t = Translation::new("m", a("2001:db8:ff::1"));
        let h = a("2001:db8:ff::2");
        let m1 = a("2001:db8:a::2");
        let m2 = a("2001:db8:b::2");
        assert_eq!(
            t.set_peer(h, Some(m1), &[m1, m2]),
            "add element ip6 m peer_out { 2001:db8:ff::2 : 2001:db8:a::2 }\n\
             add element ip6 m peer_in { 2001:db8:a::2 : 2001:db8:ff::2 }\n\
             add element ip6 m peer_in { 2001:db8:b::2 : 2001:db8:ff::2 }\n"
        );
        assert_eq!(t.set_peer(h, Some(m1), &[m1, m2]), "");
        // The peer moved to its standby: only peer_out changes, then the old
        // MoA leaves peer_in.
        assert_eq!(
            t.set_peer(h, Some(m2), &[m2]),
            "delete element ip6 m peer_out { 2001:db8:ff::2 }\n\
             add element ip6 m peer_out { 2001:db8:ff::2 : 2001:db8:b::2 }\n\
             delete element ip6 m peer_in { 2001:db8:a::2 }\n"
        );
        assert_eq!(t.peer_out().get(&h), Some(&m2));
        assert_eq!(t.peer_in().len(), 1);
        assert_eq!(
            t.remove_peer(h),
            "delete element ip6 m peer_out { 2001:db8:ff::2 }\n\
             delete element ip6 m peer_in { 2001:db8:b::2 }\n"
        );
        assert!(t.peer_in().is_empty() && t.peer_out().is_empty());
    }

    #[test]
    fn moa_reused_by_another_peer_is_replaced() {
        let mut t = Translation::new("m", a("2001:db8:ff::1"));
        let m = a("2001:db8:a::9");
        t.set_peer(a("2001:db8:ff::2"), Some(m), &[m]);
        let s = t.set_peer(a("2001:db8:ff::3"), Some(m), &[m]);
        assert!(s.contains("delete element ip6 m peer_in { 2001:db8:a::9 }"));
        assert!(s.contains("add element ip6 m peer_in { 2001:db8:a::9 : 2001:db8:ff::3 }"));
    }

    #[test]
    fn bicast_chain_is_replaced_whole() {
        let t = Translation::new("m", a("2001:db8:ff::1"));
        let chain = "add chain ip6 m bicast { type filter hook postrouting priority srcnat - 1; policy accept; }\n\
                     flush chain ip6 m bicast\n";
        assert_eq!(
            t.bicast(Some(("eth0", "eth1", a("fe80::1")))),
            format!(
                "{chain}add rule ip6 m bicast ip6 saddr 2001:db8:ff::1 oifname \"eth0\" dup to fe80::1 device \"eth1\"\n"
            )
        );
        // The copy runs before postrouting's source rewrite (srcnat).
        assert!(chain.contains("priority srcnat - 1"));
        assert_eq!(
            t.bicast(None),
            format!("{chain}delete chain ip6 m bicast\n")
        );
    }

    #[test]
    fn prepared_moas_stay_in_own_moas() {
        let mut t = Translation::new("m", a("2001:db8:ff::1"));
        let pa = a("2001:db8:a::1");
        let pb = a("2001:db8:b::1");
        let set: BTreeSet<Ipv6Addr> = [pa, pb].into();
        assert_eq!(
            t.set_prepared(&set),
            "add element ip6 m own_moas { 2001:db8:a::1 }\n\
             add element ip6 m own_moas { 2001:db8:b::1 }\n"
        );
        assert_eq!(t.set_prepared(&set), "");
        // Using a prepared MoA only maps the interface.
        assert_eq!(
            t.set_own("eth0", pa),
            "add element ip6 m own_src { \"eth0\" : 2001:db8:a::1 }\n"
        );
        // Moving on: the old MoA stays (prepared), nothing to add.
        assert_eq!(
            t.set_own("eth0", pb),
            "delete element ip6 m own_src { \"eth0\" }\n\
             add element ip6 m own_src { \"eth0\" : 2001:db8:b::1 }\n"
        );
        // Unprepared: pa (unused) goes, pb (in use) stays.
        assert_eq!(
            t.set_prepared(&BTreeSet::new()),
            "delete element ip6 m own_moas { 2001:db8:a::1 }\n"
        );
        assert_eq!(
            t.remove_own("eth0", pb),
            "delete element ip6 m own_src { \"eth0\" }\n\
             delete element ip6 m own_moas { 2001:db8:b::1 }\n"
        );
    }

    #[test]
    fn own_source_per_interface() {
        let mut t = Translation::new("m", a("2001:db8:ff::1"));
        let m1 = a("2001:db8:a::1");
        let m2 = a("2001:db8:c::1");
        assert_eq!(
            t.set_own("eth0", m1),
            "add element ip6 m own_src { \"eth0\" : 2001:db8:a::1 }\n\
             add element ip6 m own_moas { 2001:db8:a::1 }\n"
        );
        assert_eq!(t.set_own("eth0", m1), "");
        let s = t.set_own("eth0", m2);
        assert_eq!(
            s,
            "delete element ip6 m own_src { \"eth0\" }\n\
             add element ip6 m own_src { \"eth0\" : 2001:db8:c::1 }\n\
             delete element ip6 m own_moas { 2001:db8:a::1 }\n\
             add element ip6 m own_moas { 2001:db8:c::1 }\n"
        );
        // Removing a MoA the interface no longer maps to leaves it alone.
        assert_eq!(t.remove_own("eth0", m1), "");
        assert_eq!(
            t.remove_own("eth0", m2),
            "delete element ip6 m own_src { \"eth0\" }\n\
             delete element ip6 m own_moas { 2001:db8:c::1 }\n"
        );
        assert_eq!(quote_ifname("e\"th\\0"), "\"eth0\"");
    }
}
