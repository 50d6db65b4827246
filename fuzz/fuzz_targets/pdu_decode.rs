//! Any byte string fed to the PDU decoder either decodes or errors; a decoded PDU encodes
//! back to a header that decodes to the same PDU.
#![no_main]
use iscsi_proto::pdu::{decode_wire, Pdu};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for (hd, dd) in [(false, false), (true, true), (true, false)] {
        if let Ok((pdu, used)) = decode_wire(data, hd, dd) {
            assert!(used <= data.len());
            let bhs = pdu.encode_header();
            let again = Pdu::decode(&bhs, pdu.data()).expect("re-decode");
            assert_eq!(again.encode_header(), bhs);
        }
    }
});
