//! The agent's mobility state machine driven by arbitrary event sequences
//! (RAs with arbitrary sources, prefixes and lifetimes, link events, IMS
//! datagrams, peer acks, timer jumps): it must never panic, and its
//! invariants must hold after every step.
#![no_main]

use std::net::Ipv6Addr;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use mat6_proto::mobility::{
    IfaceConfig, LinkEvent, Mobility, MobilityConfig, RaInput, RaPrefix, Role, Timers,
};
use mat6_proto::update::UpdateKey;

fn addr(b: &[u8]) -> Ipv6Addr {
    let mut o = [0u8; 16];
    for (i, x) in b.iter().take(16).enumerate() {
        o[i] = *x;
    }
    Ipv6Addr::from(o)
}

fuzz_target!(|data: &[u8]| {
    let base = Instant::now();
    let mut m = Mobility::new(MobilityConfig {
        hoa: Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 1),
        key: UpdateKey { key_id: 1, secret: [5; 32] },
        ifaces: vec![
            IfaceConfig { ifindex: 2, name: "eth0".into(), mac: [2, 0, 0, 0, 0, 1], role: Role::Primary, allowed_routers: vec![] },
            IfaceConfig { ifindex: 3, name: "eth1".into(), mac: [2, 0, 0, 0, 0, 2], role: Role::Secondary, allowed_routers: vec![Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0xb)] },
        ],
        peer_prefixes: vec![],
        initial_seq: 1,
        nonce_seed: 0,
        timers: Timers::default(),
    });
    let mut now = base;
    for chunk in data.chunks(24) {
        if chunk.len() < 2 {
            break;
        }
        let ifindex = 2 + u32::from(chunk[1] & 1);
        match chunk[0] % 7 {
            0 => m.handle_link(ifindex, LinkEvent::CarrierUp, now),
            1 => m.handle_link(ifindex, LinkEvent::CarrierDown, now),
            2 => m.handle_link(ifindex, LinkEvent::NotifyPeers, now),
            3 => {
                let mut src = addr(&chunk[2..]);
                if chunk[1] & 2 != 0 {
                    let mut o = src.octets();
                    o[0] = 0xfe;
                    o[1] = 0x80;
                    src = Ipv6Addr::from(o);
                }
                let ra = RaInput {
                    src,
                    src_mac: Some([2, 0, 0, 0, 0, chunk[1]]),
                    hop_limit: if chunk[1] & 4 != 0 { 255 } else { chunk[1] },
                    fragmented: chunk[1] & 8 != 0,
                    router_lifetime_s: u16::from(chunk[1] >> 4),
                    prefixes: vec![RaPrefix {
                        prefix: addr(chunk.get(8..).unwrap_or(&[])),
                        prefix_len: if chunk[1] & 16 != 0 { 64 } else { chunk[1] },
                        valid_lifetime_s: u32::from(chunk[1]),
                    }],
                };
                let _ = m.handle_ra(ifindex, &ra, now);
            }
            4 => {
                let _ = m.handle_ims_datagram(&chunk[2..], now);
            }
            5 => m.handle_peer_ack(u64::from(chunk[1]), now),
            _ => {
                now += Duration::from_millis(u64::from(chunk[1]) * 40);
                m.handle_timeout(now);
            }
        }
        while m.poll_action().is_some() {}
        // Invariants: at most one active MoA; it is not also a standby.
        let act = m.active_moa();
        assert!(!m.standby_moas().iter().any(|s| Some(*s) == act));
        if let Some(t) = m.poll_timeout() {
            // Timers are never far in the past relative to now.
            assert!(t + Duration::from_secs(3600) >= now);
        }
    }
});
