//! Bytes already read from a stream, served to its reader before the stream itself.

use tokio::io::ReadBuf;

/// Bytes to hand out before reading on; freed once all are handed out.
#[derive(Debug, Default)]
pub struct Prefix {
    bytes: Vec<u8>,
    at: usize,
}

impl Prefix {
    pub fn new(bytes: Vec<u8>) -> Self {
        Prefix { bytes, at: 0 }
    }

    /// Copies what fits into `buf`; false when nothing was left to copy.
    pub fn serve(&mut self, buf: &mut ReadBuf<'_>) -> bool {
        let rest = &self.bytes[self.at..];
        if rest.is_empty() {
            return false;
        }
        let n = rest.len().min(buf.remaining());
        buf.put_slice(&rest[..n]);
        self.at += n;
        if self.at == self.bytes.len() {
            *self = Prefix::default();
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serves_in_pieces_then_nothing() {
        let mut p = Prefix::new(b"hello".to_vec());
        let mut out = [0u8; 3];
        let mut buf = ReadBuf::new(&mut out);
        assert!(p.serve(&mut buf));
        assert_eq!(buf.filled(), b"hel");
        let mut out = [0u8; 8];
        let mut buf = ReadBuf::new(&mut out);
        assert!(p.serve(&mut buf));
        assert_eq!(buf.filled(), b"lo");
        assert!(!p.serve(&mut buf));
        assert_eq!(p.bytes.capacity(), 0, "freed once served");
    }
}
