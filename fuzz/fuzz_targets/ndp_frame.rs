//! The guest-agent's and host-prep's NDP receive path: Ethernet + IPv6 +
//! extension headers + ICMPv6, as read from an AF_PACKET socket. Any input
//! is either an accepted NDP message or a drop reason, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = mat6_net::icmp6::parse_frame(data, 1);
});
