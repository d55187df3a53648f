//! Deterministic test data: the bytes `/bytes/<n>` serves, reproducible anywhere so that a
//! client can check what it received without a copy.

use std::{io::Write, path::Path};

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
    /// Fills `buf` with the next bytes of the stream; `buf.len()` must be a multiple of 8.
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

/// Writes the first `size` bytes of the test data to `path`.
pub fn write_test_data(path: &Path, size: u64) -> std::io::Result<()> {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut data = TestData::default();
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = size;
    while left > 0 {
        data.fill(&mut buf);
        let n = left.min(buf.len() as u64) as usize;
        file.write_all(&buf[..n])?;
        left -= n as u64;
    }
    file.flush()
}
