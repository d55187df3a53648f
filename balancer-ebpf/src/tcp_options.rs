//! TCP options, worked on in a copy (in a map: the stack has no room left): parsing them in
//! place needs bounds checks at variable offsets, which the compiler reshapes beyond what the
//! verifier can follow. Indexes into the copy are masked, so every access is in bounds
//! whatever the loop's checks become.

use aya_ebpf::{
    helpers::{bpf_xdp_load_bytes, bpf_xdp_store_bytes},
    programs::XdpContext,
};
use balancer_common::proto::{tcp_option, TCP_HEADER_LEN};

use crate::{
    maps::OPTION_BYTES,
    packet::{ptr_at, Packet},
};

/// Bytes of the timestamp option with the two NOPs before it.
pub const ALIGNED_TIMESTAMPS_LEN: usize = 12;
/// Bytes of a SYN-ACK's options up to its timestamps' end, in the layouts `synack_tsval` knows.
const SYNACK_OPTIONS_READ: usize = 20;
/// TCP options occupy at most 40 bytes.
const MAX_OPTION_BYTES: usize = 40;
/// Options walked. Real stacks send at most 8 (macOS's SYN: MSS, NOP, WS, NOP, NOP, TS,
/// SACK-permitted, EOL); every further iteration multiplies the verifier's work, and a segment
/// that pads beyond this only has its later options ignored.
const MAX_OPTIONS_READ: usize = 12;
/// A power of two above 40 + 3, so masked indexes stay inside it.
pub const BUFFER: usize = 64;

/// Where in the frame a segment's TSval lies (its TSecr follows), if its options start with
/// two NOPs and the timestamps, as Linux, Windows, macOS and the BSDs send them once a
/// connection is open. Reading them at a fixed place keeps the per-packet path from walking
/// the options.
#[inline(always)]
pub fn timestamps_at(ctx: &XdpContext, packet: &Packet) -> Option<usize> {
    if packet.tcp_header_len < TCP_HEADER_LEN + ALIGNED_TIMESTAMPS_LEN {
        return None;
    }
    let at = packet.l4_offset + TCP_HEADER_LEN;
    let first: *const [u8; 4] = ptr_at(ctx, at)?;
    // SAFETY: `ptr_at` checked that the bytes lie inside the frame.
    let aligned =
        unsafe { *first } == [tcp_option::NOP, tcp_option::NOP, tcp_option::TIMESTAMP, 10];
    aligned.then_some(at + 4)
}

/// The TSval of a SYN-ACK, where Linux puts it (behind the MSS and SACK-permitted or two
/// NOPs) or the BSDs do (behind the MSS, a NOP, the window scale and SACK-permitted).
#[inline(always)]
pub fn synack_tsval(ctx: &XdpContext, packet: &Packet) -> Option<u32> {
    if packet.tcp_header_len < TCP_HEADER_LEN + SYNACK_OPTIONS_READ {
        return None;
    }
    let options = packet.l4_offset + TCP_HEADER_LEN;
    let is_timestamp = |at: usize| {
        ptr_at::<[u8; 2]>(ctx, options + at).is_some_and(|kind| {
            // SAFETY: `ptr_at` checked that the bytes lie inside the frame.
            let kind = unsafe { *kind };
            kind == [tcp_option::TIMESTAMP, 10]
        })
    };
    let tsval = if is_timestamp(6) {
        options + 8
    } else if is_timestamp(10) {
        options + 12
    } else {
        return None;
    };
    let word: *const [u8; 4] = ptr_at(ctx, tsval)?;
    // SAFETY: as above.
    Some(u32::from_be_bytes(unsafe { *word }))
}

pub struct Options {
    /// This CPU's entry of `OPTION_BYTES`.
    bytes: *mut [u8; BUFFER],
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
        let options = Options {
            bytes: OPTION_BYTES.get_ptr_mut(0)?,
            len,
            offset: packet.l4_offset + TCP_HEADER_LEN,
        };
        // SAFETY: `bytes` points at a map value, valid for the duration of the program, with
        // room for `len` (1..=40) bytes. It is cleared first: readers look past `len` without
        // checking, and must find zeros there, not an earlier packet's options.
        let copied = unsafe {
            *options.bytes = [0; BUFFER];
            bpf_xdp_load_bytes(
                ctx.ctx,
                options.offset as u32,
                options.bytes.cast(),
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
                self.bytes.cast(),
                self.len.clamp(1, MAX_OPTION_BYTES) as u32,
            )
        };
        (stored == 0).then_some(())
    }

    #[inline(always)]
    pub fn byte(&self, at: usize) -> u8 {
        // SAFETY: `bytes` points at a map value, valid for the duration of the program.
        unsafe { (*self.bytes)[at & (BUFFER - 1)] }
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
            // SAFETY: as in `byte`.
            unsafe { (*self.bytes)[(at + i) & (BUFFER - 1)] = b };
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
