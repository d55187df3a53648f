//! Incremental Internet checksum updates (RFC 1624).
//!
//! Values are taken as they lie in memory (network order read natively): one's-complement sums
//! are byte-order independent as long as every word is read the same way.

/// Folds a 32-bit one's-complement sum of 16-bit words into 16 bits (the sum of up to 65535
/// words fits).
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The one's-complement sum of `bytes` as 16-bit words read natively (an odd last byte
/// padded with zero), folded.
pub fn sum_words(bytes: &[u8]) -> u16 {
    let sum = bytes.chunks(2).fold(0u64, |sum, word| {
        sum + u64::from(u16::from_ne_bytes([word[0], *word.get(1).unwrap_or(&0)]))
    });
    let mut folded = sum;
    while folded > 0xffff {
        folded = (folded & 0xffff) + (folded >> 16);
    }
    folded as u16
}

/// The checksum after a 16-bit word of the covered data changed from `old` to `new`.
#[inline(always)]
pub fn replace16(check: u16, old: u16, new: u16) -> u16 {
    !fold(u32::from(!check) + u32::from(!old) + u32::from(new))
}

/// The checksum after a 32-bit field of the covered data changed from `old` to `new`.
#[inline(always)]
pub fn replace32(check: u16, old: u32, new: u32) -> u16 {
    let sum = u32::from(!check) + (!old >> 16) + (!old & 0xffff) + (new >> 16) + (new & 0xffff);
    !fold(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Full checksum over 16-bit words as they lie in memory.
    fn checksum(bytes: &[u8]) -> u16 {
        let sum: u32 = bytes
            .chunks(2)
            .map(|w| u32::from(u16::from_ne_bytes([w[0], *w.get(1).unwrap_or(&0)])))
            .sum();
        !fold(fold(sum) as u32)
    }

    fn ipv4_header(dst: [u8; 4], ttl: u8) -> [u8; 20] {
        let mut h = [
            0x45, 0, 0, 60, 0x1c, 0x46, 0x40, 0, ttl, 6, 0, 0, 198, 18, 0, 2, dst[0], dst[1],
            dst[2], dst[3],
        ];
        let c = checksum(&h).to_ne_bytes();
        h[10] = c[0];
        h[11] = c[1];
        h
    }

    #[test]
    fn address_rewrite_matches_a_full_recomputation() {
        let before = ipv4_header([203, 0, 113, 10], 64);
        let after = ipv4_header([198, 19, 0, 12], 64);
        let check = u16::from_ne_bytes([before[10], before[11]]);
        let updated = replace32(
            check,
            u32::from_ne_bytes([203, 0, 113, 10]),
            u32::from_ne_bytes([198, 19, 0, 12]),
        );
        assert_eq!(updated.to_ne_bytes(), [after[10], after[11]]);
    }

    #[test]
    fn ttl_decrement_matches_a_full_recomputation() {
        for ttl in [1u8, 2, 64, 255] {
            let before = ipv4_header([203, 0, 113, 10], ttl);
            let after = ipv4_header([203, 0, 113, 10], ttl - 1);
            let check = u16::from_ne_bytes([before[10], before[11]]);
            let updated = replace16(
                check,
                u16::from_ne_bytes([ttl, 6]),
                u16::from_ne_bytes([ttl - 1, 6]),
            );
            assert_eq!(updated.to_ne_bytes(), [after[10], after[11]], "ttl {ttl}");
        }
    }

    #[test]
    fn a_valid_packet_sums_to_zero_after_any_rewrite() {
        let mut seed = 0x2545_f491_u32;
        for _ in 0..10_000 {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            let new_dst = seed.to_ne_bytes();
            let mut h = ipv4_header([203, 0, 113, 10], 64);
            let check = u16::from_ne_bytes([h[10], h[11]]);
            let updated = replace32(
                check,
                u32::from_ne_bytes([h[16], h[17], h[18], h[19]]),
                seed,
            );
            h[16..20].copy_from_slice(&new_dst);
            h[10..12].copy_from_slice(&updated.to_ne_bytes());
            assert_eq!(checksum(&h), 0, "dst {new_dst:?}");
        }
    }
}
