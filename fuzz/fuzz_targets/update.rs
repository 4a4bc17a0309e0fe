//! UDP update decoder: checked view, parse, verify; re-emitting a parsed
//! update with the same key must give back the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mat6_proto::update::{UpdateKey, UpdatePacket, UpdateRepr};

fuzz_target!(|data: &[u8]| {
    let key = UpdateKey {
        key_id: 1,
        secret: [0x42; 32],
    }
    .hmac_key();
    if let Ok(p) = UpdatePacket::new_checked(data) {
        let _ = (p.key_id(), p.hoa(), p.seq());
        let verified = p.verify(&key).is_ok();
        let repr = UpdateRepr::parse(&p);
        assert_eq!(repr.buffer_len(), data.len());
        if verified {
            let again = repr.to_vec(&key).expect("re-emit");
            assert_eq!(again, data);
        }
    }
    let _ = UpdateRepr::parse_verified(data, &key);
});
