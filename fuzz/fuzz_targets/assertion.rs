//! IMS-signed binding assertion decoder (peers receive these from moving VMs).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mat6_proto::assertion::BindingAssertion;

fuzz_target!(|data: &[u8]| {
    if let Ok(a) = BindingAssertion::decode(data) {
        assert_eq!(a.encode(), data);
        assert_eq!(a.buffer_len(), data.len());
        let _ = a.verify(&[7u8; 32]);
    }
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = BindingAssertion::from_b64(s);
    }
});
