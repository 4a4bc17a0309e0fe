//! UDP ack decoder (what clients parse from the network).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mat6_proto::update::{AckPacket, AckRepr, UpdateKey};

fuzz_target!(|data: &[u8]| {
    let key = UpdateKey {
        key_id: 1,
        secret: [0x42; 32],
    }
    .hmac_key();
    if let Ok(p) = AckPacket::new_checked(data) {
        let verified = p.verify(&key).is_ok();
        let repr = AckRepr::parse(&p);
        assert_eq!(repr.buffer_len(), data.len());
        if verified {
            assert_eq!(repr.to_vec(&key).expect("re-emit"), data);
        }
    }
    let _ = AckRepr::parse_verified(data, &key);
});
