//! TCP options, worked on in a copy: parsing them in place needs bounds checks at variable
//! offsets, which the compiler reshapes beyond what the verifier can follow. Indexes into the
//! copy are masked, so every access is in bounds whatever the loop's checks become.

use aya_ebpf::{
    helpers::{bpf_xdp_load_bytes, bpf_xdp_store_bytes},
    programs::XdpContext,
};
use balancer_common::proto::{tcp_option, TCP_HEADER_LEN};

use crate::packet::Packet;

/// TCP options occupy at most 40 bytes.
const MAX_OPTION_BYTES: usize = 40;
/// Options walked. Real stacks send at most 8 (macOS's SYN: MSS, NOP, WS, NOP, NOP, TS,
/// SACK-permitted, EOL); every further iteration multiplies the verifier's work, and a segment
/// that pads beyond this only has its later options ignored.
const MAX_OPTIONS_READ: usize = 12;
/// A power of two above 40 + 3, so masked indexes stay inside it.
const BUFFER: usize = 64;

pub struct Options {
    bytes: [u8; BUFFER],
    len: usize,
    /// Where the options lie in the frame.
    offset: usize,
}

impl Options {
    /// The options of the packet's TCP header, if it has any and they could be copied.
    #[inline(always)]
    pub fn load(ctx: &XdpContext, packet: &Packet) -> Option<Options> {
        let len = packet
            .tcp_header_len
            .saturating_sub(TCP_HEADER_LEN)
            .min(MAX_OPTION_BYTES);
        if len == 0 {
            return None;
        }
        let mut options = Options {
            bytes: [0; BUFFER],
            len,
            offset: packet.l4_offset + TCP_HEADER_LEN,
        };
        // SAFETY: `bytes` has room for `len` (1..=40) bytes.
        let copied = unsafe {
            bpf_xdp_load_bytes(
                ctx.ctx,
                options.offset as u32,
                options.bytes.as_mut_ptr().cast(),
                len.clamp(1, MAX_OPTION_BYTES) as u32,
            )
        };
        (copied == 0).then_some(options)
    }

    /// Writes the copy back over the frame's options.
    #[inline(always)]
    pub fn store(&self, ctx: &XdpContext) -> Option<()> {
        // SAFETY: `bytes` holds at least `len` (1..=40) bytes.
        let stored = unsafe {
            bpf_xdp_store_bytes(
                ctx.ctx,
                self.offset as u32,
                self.bytes.as_ptr() as *mut _,
                self.len.clamp(1, MAX_OPTION_BYTES) as u32,
            )
        };
        (stored == 0).then_some(())
    }

    #[inline(always)]
    pub fn byte(&self, at: usize) -> u8 {
        self.bytes[at & (BUFFER - 1)]
    }

    /// The big-endian 32-bit field at `at`, as its bytes.
    #[inline(always)]
    pub fn word(&self, at: usize) -> [u8; 4] {
        [
            self.byte(at),
            self.byte(at + 1),
            self.byte(at + 2),
            self.byte(at + 3),
        ]
    }

    #[inline(always)]
    pub fn set_word(&mut self, at: usize, word: [u8; 4]) {
        for (i, b) in word.into_iter().enumerate() {
            self.bytes[(at + i) & (BUFFER - 1)] = b;
        }
    }

    /// Calls `visit(kind, offset, length)` for each option with a length byte, in order,
    /// until the options end or `visit` returns false.
    #[inline(always)]
    pub fn each(&self, mut visit: impl FnMut(u8, usize, usize) -> bool) {
        let mut at = 0;
        for _ in 0..MAX_OPTIONS_READ {
            if at >= self.len {
                break;
            }
            let kind = self.byte(at);
            if kind == tcp_option::END {
                break;
            }
            if kind == tcp_option::NOP {
                at += 1;
                continue;
            }
            let len = usize::from(self.byte(at + 1));
            if len < 2 || at + len > self.len || !visit(kind, at, len) {
                break;
            }
            at += len;
        }
    }
}
