//! Peer-notification decoder (any host can send to the agent's UDP 7343),
//! and the acceptance check that runs on every decoded notification.
#![no_main]

use std::net::Ipv6Addr;

use libfuzzer_sys::fuzz_target;
use mat6_proto::notify::{accept, NotifyRepr};

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = NotifyRepr::parse_bytes(data) {
        // Checked parse then emit reproduces the datagram byte for byte.
        assert_eq!(r.to_vec().ok().as_deref(), Some(data));
        assert_eq!(r.buffer_len(), data.len());
        if let NotifyRepr::Notify { assertion, .. } = &r {
            let own = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 1);
            // Random bytes never verify against a fixed key.
            assert!(accept(assertion, &[7u8; 32], own, |_| None, 0).is_err());
        }
    }
});
