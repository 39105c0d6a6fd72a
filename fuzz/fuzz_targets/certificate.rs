//! Any bytes as a verified leaf certificate: identity extraction and both XFCC encodings never
//! panic; an identity always has a non-empty app; the raw XFCC value decodes to the same bytes.
#![no_main]

use base64::Engine;
use libfuzzer_sys::fuzz_target;
use portcullis::config::XfccFormat;
use portcullis::identity::PeerCert;
use portcullis::proxy::xfcc_value;

fuzz_target!(|data: &[u8]| {
    let peer = PeerCert::from_der(data);
    if let Ok(id) = &peer.identity {
        assert!(!id.app.is_empty());
        assert!(id.space.as_ref().is_none_or(|s| !s.is_empty()));
        assert!(id.org.as_ref().is_none_or(|o| !o.is_empty()));
    }
    let raw = xfcc_value(&peer, XfccFormat::Raw);
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(raw)
        .expect("raw XFCC is base64");
    assert_eq!(decoded, data);
    let envoy = xfcc_value(&peer, XfccFormat::Envoy);
    assert!(envoy.starts_with("Hash="));
});
