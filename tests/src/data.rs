//! Deterministic test data: the bytes `/bytes/<n>` serves, reproducible anywhere so that a
//! client can check what it received without a copy (`lab-backend --generate <n>` prints the
//! same bytes).

use std::{io::Write, path::Path};

use sha2::{Digest, Sha256};

/// The size of the chunks the stream is generated (and served) in.
pub const CHUNK: usize = 64 * 1024;

/// An endless stream of pseudo-random bytes from a fixed seed (xorshift64*).
pub struct TestData {
    state: u64,
}

impl Default for TestData {
    fn default() -> Self {
        Self {
            state: 0x9e37_79b9_7f4a_7c15,
        }
    }
}

impl TestData {
    /// Fills `buf` with the next bytes of the stream; `buf.len()` must be a multiple of 8
    /// (a shorter last word is cut, so the stream would no longer match).
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.state ^= self.state >> 12;
            self.state ^= self.state << 25;
            self.state ^= self.state >> 27;
            let word = self.state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }
}

/// The first `size` bytes of the test data, in chunks of at most [`CHUNK`] bytes.
pub struct Chunks {
    data: TestData,
    left: u64,
}

impl Chunks {
    pub fn new(size: u64) -> Self {
        Self {
            data: TestData::default(),
            left: size,
        }
    }

    /// Bytes not yet returned.
    pub fn remaining(&self) -> u64 {
        self.left
    }
}

impl Iterator for Chunks {
    type Item = Vec<u8>;

    fn next(&mut self) -> Option<Vec<u8>> {
        if self.left == 0 {
            return None;
        }
        // Always generate a whole chunk so the stream does not depend on where it is cut.
        let mut buf = vec![0u8; CHUNK];
        self.data.fill(&mut buf);
        let n = self.left.min(CHUNK as u64) as usize;
        buf.truncate(n);
        self.left -= n as u64;
        Some(buf)
    }
}

/// Writes the first `size` bytes of the test data to `out`.
pub fn copy_test_data(out: &mut impl Write, size: u64) -> std::io::Result<()> {
    for chunk in Chunks::new(size) {
        out.write_all(&chunk)?;
    }
    out.flush()
}

/// Writes the first `size` bytes of the test data to `path`.
pub fn write_test_data(path: &Path, size: u64) -> std::io::Result<()> {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    copy_test_data(&mut file, size)
}

/// The sha256 (lowercase hex, as `sha256sum` prints it) of the first `size` bytes.
pub fn test_data_sha256(size: u64) -> String {
    let mut hasher = Sha256::new();
    for chunk in Chunks::new(size) {
        hasher.update(&chunk);
    }
    hex(&hasher.finalize())
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_one_stream_whatever_the_size() {
        let long: Vec<u8> = Chunks::new(3 * CHUNK as u64).flatten().collect();
        let short: Vec<u8> = Chunks::new(CHUNK as u64 + 5).flatten().collect();
        assert_eq!(short.len(), CHUNK + 5);
        assert_eq!(&long[..short.len()], &short[..]);
    }

    #[test]
    fn sha256_of_nothing_is_the_empty_digest() {
        assert_eq!(
            test_data_sha256(0),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
