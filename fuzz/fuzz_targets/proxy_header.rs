//! Any bytes as the start of a connection from a PROXY protocol balancer: decoding never panics,
//! a header never claims more bytes than it was given and decodes the same from exactly its own
//! bytes, and a client it names is never an IPv4-mapped IPv6 address.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::proxy_protocol::{decode, Header};

fuzz_target!(|data: &[u8]| {
    match decode(data) {
        Ok(Some((header, len))) => {
            assert!(len <= data.len());
            assert_eq!(decode(&data[..len]).unwrap(), Some((header, len)));
            if let Header::Proxied(client) = header {
                assert_eq!(client.ip(), client.ip().to_canonical());
            }
        }
        Ok(None) => {}
        Err(e) => assert!(["invalid", "closed", "timeout"].contains(&e.label())),
    }
});
