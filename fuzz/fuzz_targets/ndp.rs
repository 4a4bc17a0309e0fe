//! NDP decoder (RS/RA/NS/NA): never panics; whatever parses re-emits to a
//! message that parses to the same Repr.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mat6_proto::ndp::{NdpPacket, NdpRepr};
use std::net::Ipv6Addr;

fuzz_target!(|data: &[u8]| {
    let src = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
    let dst = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    let _ = NdpPacket::new_checked(data).map(|p| p.verify_checksum(&src, &dst));
    if let Ok(repr) = NdpRepr::parse(data, src, dst) {
        let bytes = repr.to_bytes(src, dst).expect("re-emit");
        assert_eq!(NdpRepr::parse(&bytes, src, dst).expect("re-parse"), repr);
    }
});
