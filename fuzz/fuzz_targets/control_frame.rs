//! TLS control-channel frame decoder, both directions.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mat6_proto::control::{decode_frame, encode_frame, RequestFrame, ResponseFrame};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((req, used))) = decode_frame::<RequestFrame>(data) {
        assert!(used <= data.len());
        let bytes = encode_frame(&req).expect("re-encode");
        let (back, _): (RequestFrame, usize) =
            decode_frame(&bytes).expect("decode").expect("complete");
        assert_eq!(back, req);
    }
    if let Ok(Some((resp, _))) = decode_frame::<ResponseFrame>(data) {
        let bytes = encode_frame(&resp).expect("re-encode");
        assert!(decode_frame::<ResponseFrame>(&bytes).is_ok());
    }
});
