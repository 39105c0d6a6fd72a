//! Any bytes as what an h2 backend sends, split into reads of any size: the frame walk that
//! reads the backend's `SETTINGS_MAX_CONCURRENT_STREAMS` never panics, and reports what a
//! parser of the whole buffer, frame by frame, finds, however the bytes were split.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::proxy::h2_settings::FrameWalk;

/// The values of `SETTINGS_MAX_CONCURRENT_STREAMS` in `bytes`, read frame by frame from the whole
/// buffer (a truncated last SETTINGS frame gives its whole entries).
fn reference(bytes: &[u8]) -> Vec<u32> {
    let mut found = Vec::new();
    let mut at = 0;
    while let Some(head) = bytes.get(at..at + 9) {
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let start = at + 9;
        let end = start + len;
        let payload = &bytes[start..end.min(bytes.len())];
        if head[3] == 0x4 && head[4] & 0x1 == 0 && stream == 0 && len % 6 == 0 {
            for entry in payload.chunks_exact(6) {
                if u16::from_be_bytes([entry[0], entry[1]]) == 0x3 {
                    found.push(u32::from_be_bytes([entry[2], entry[3], entry[4], entry[5]]));
                }
            }
        }
        at = end;
    }
    found
}

fuzz_target!(|data: &[u8]| {
    let Some((&step, bytes)) = data.split_first() else {
        return;
    };
    let step = usize::from(step).max(1);
    let mut walk = FrameWalk::default();
    let mut found = Vec::new();
    for piece in bytes.chunks(step) {
        walk.feed(piece, |v| found.push(v));
    }
    assert_eq!(found, reference(bytes), "read {step} bytes at a time");
});
