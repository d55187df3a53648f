//! SYN cookies as the Linux kernel makes them (`net/ipv4/syncookies.c`): the balancer's ISN
//! is a keyed SipHash of the 4-tuple plus the client's ISN, with a time counter in its top
//! 8 bits and the client's MSS, as an index into a small table, in the low bits. Answering a
//! SYN costs no state, a cookie is valid for its period and the next, and the MSS survives
//! even when the SYN's options were forgotten under a flood.

use crate::{FlowKey, SynOptions, NO_WINDOW_SCALE};

/// Low bits of a cookie that carry the hash and the MSS index; the counter takes the rest.
const COOKIE_BITS: u32 = 24;
const COOKIE_MASK: u32 = (1 << COOKIE_BITS) - 1;
/// Counter values a cookie is accepted for: the one it was made in and the next.
const MAX_COOKIE_AGE: u32 = 2;

/// MSS values a cookie can carry (the kernel's IPv4 table): a client gets the largest that
/// does not exceed what it offered.
pub const MSS_TABLE: [u16; 4] = [536, 1300, 1440, 1460];

/// `COOKIE_SECRET` value: the two SipHash keys of one secret (one for the hash added to the
/// ISN, one for the hash under the counter), as the kernel keeps them. The map holds the
/// current secret and the previous one; the agent rotates them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct CookieSecret {
    pub keys: [[u64; 2]; 2],
}
const _: () = assert!(core::mem::size_of::<CookieSecret>() == 32);

/// Entries of `COOKIE_SECRET`: the current secret, then the previous one.
pub const COOKIE_SECRETS: u32 = 2;

/// Low bits of the TSval in the balancer's SYN-ACK that keep the client's window scale (4
/// bits, all ones for none) and SACK permission (1 bit), as the kernel's
/// `cookie_init_timestamp` keeps them: the client echoes the TSval in every TSecr, so its
/// options survive a flood that evicted them from `SYN_OPTIONS`.
const TS_OPTION_BITS: u32 = 5;
const TS_OPTION_MASK: u32 = (1 << TS_OPTION_BITS) - 1;
const TS_NO_WINDOW_SCALE: u32 = 0xf;
const TS_SACK_PERMITTED: u32 = 1 << 4;

/// The TSval of the balancer's SYN-ACK on its millisecond clock at `now_ms`, carrying the
/// SYN's options in its low bits, never ahead of the clock (the client must not see it run
/// backwards once the backend's TSvals follow).
#[inline(always)]
pub fn cookie_tsval(now_ms: u32, options: &SynOptions) -> u32 {
    let shift = if options.window_shift == NO_WINDOW_SCALE {
        TS_NO_WINDOW_SCALE
    } else {
        u32::from(options.window_shift) & TS_NO_WINDOW_SCALE
    };
    let sack = if options.sack_permitted != 0 {
        TS_SACK_PERMITTED
    } else {
        0
    };
    let tsval = (now_ms & !TS_OPTION_MASK) | shift | sack;
    if tsval > now_ms {
        tsval.wrapping_sub(1 << TS_OPTION_BITS)
    } else {
        tsval
    }
}

/// The options of a client whose SYN's were forgotten, from the TSecr of its segment that
/// completes the handshake (which echoes [`cookie_tsval`]) and the MSS its cookie carried.
#[inline(always)]
pub fn options_from_tsecr(tsecr: u32, mss: u16) -> SynOptions {
    let shift = tsecr & TS_NO_WINDOW_SCALE;
    SynOptions {
        mss,
        window_shift: if shift == TS_NO_WINDOW_SCALE {
            NO_WINDOW_SCALE
        } else {
            shift as u8
        },
        sack_permitted: u8::from(tsecr & TS_SACK_PERMITTED != 0),
        timestamps: 1,
        _pad: [0; 3],
    }
}

/// The index into [`MSS_TABLE`] of the largest MSS not above `mss`.
#[inline(always)]
pub fn mss_index(mss: u16) -> u32 {
    if mss >= MSS_TABLE[3] {
        3
    } else if mss >= MSS_TABLE[2] {
        2
    } else if mss >= MSS_TABLE[1] {
        1
    } else {
        0
    }
}

/// The cookie for a client's SYN with ISN `client_isn`, made in counter period `count`,
/// carrying `mss_index`.
#[inline(always)]
pub fn syn_cookie(
    secret: &CookieSecret,
    key: &FlowKey,
    client_isn: u32,
    count: u32,
    mss_index: u32,
) -> u32 {
    cookie_hash(secret, key, 0, 0)
        .wrapping_add(client_isn)
        .wrapping_add(count << COOKIE_BITS)
        .wrapping_add(cookie_hash(secret, key, count, 1).wrapping_add(mss_index) & COOKIE_MASK)
}

/// The MSS index a cookie carries, if it is the cookie of this connection made in period
/// `count` or the one before.
#[inline(always)]
pub fn check_syn_cookie(
    secret: &CookieSecret,
    key: &FlowKey,
    client_isn: u32,
    cookie: u32,
    count: u32,
) -> Option<u32> {
    let cookie = cookie.wrapping_sub(cookie_hash(secret, key, 0, 0).wrapping_add(client_isn));
    let age = count.wrapping_sub(cookie >> COOKIE_BITS) & (u32::MAX >> COOKIE_BITS);
    if age >= MAX_COOKIE_AGE {
        return None;
    }
    let made_in = count.wrapping_sub(age);
    let index = cookie.wrapping_sub(cookie_hash(secret, key, made_in, 1)) & COOKIE_MASK;
    ((index as usize) < MSS_TABLE.len()).then_some(index)
}

/// The kernel's `cookie_hash`: SipHash of the addresses, the ports and `count` under key `c`
/// (for IPv6, as `cookie_v6_hash` lays them out: addresses, count, ports).
#[inline(always)]
fn cookie_hash(secret: &CookieSecret, key: &FlowKey, count: u32, c: usize) -> u32 {
    let ports = (u32::from(key.sport) << 16) | u32::from(key.dport);
    let sip_key = &secret.keys[if c == 0 { 0 } else { 1 }];
    if key.src.is_v4() {
        return siphash_4u32(key.src.v4_word(), key.dst.v4_word(), ports, count, sip_key) as u32;
    }
    let [s0, s1, s2, s3] = key.src.words;
    let [d0, d1, d2, d3] = key.dst.words;
    let pair = |low: u32, high: u32| (u64::from(high) << 32) | u64::from(low);
    siphash(
        &[
            pair(s0, s1),
            pair(s2, s3),
            pair(d0, d1),
            pair(d2, d3),
            pair(count, ports),
        ],
        sip_key,
    ) as u32
}

/// The kernel's `siphash_4u32`: SipHash-2-4 of four 32-bit words, little-endian in pairs.
#[inline(always)]
pub fn siphash_4u32(a: u32, b: u32, c: u32, d: u32, key: &[u64; 2]) -> u64 {
    siphash(
        &[
            (u64::from(b) << 32) | u64::from(a),
            (u64::from(d) << 32) | u64::from(c),
        ],
        key,
    )
}

/// SipHash-2-4 of a message of `N` little-endian 64-bit words.
#[inline(always)]
pub fn siphash<const N: usize>(message: &[u64; N], key: &[u64; 2]) -> u64 {
    let mut v = [
        key[0] ^ 0x736f_6d65_7073_6575,
        key[1] ^ 0x646f_7261_6e64_6f6d,
        key[0] ^ 0x6c79_6765_6e65_7261,
        key[1] ^ 0x7465_6462_7974_6573,
    ];
    for word in message {
        compress(&mut v, *word);
    }
    // The last block holds only the message length in its top byte.
    compress(&mut v, ((8 * N) as u64) << 56);
    v[2] ^= 0xff;
    round(&mut v);
    round(&mut v);
    round(&mut v);
    round(&mut v);
    v[0] ^ v[1] ^ v[2] ^ v[3]
}

#[inline(always)]
fn compress(v: &mut [u64; 4], m: u64) {
    v[3] ^= m;
    round(v);
    round(v);
    v[0] ^= m;
}

#[inline(always)]
fn round(v: &mut [u64; 4]) {
    v[0] = v[0].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(13);
    v[1] ^= v[0];
    v[0] = v[0].rotate_left(32);
    v[2] = v[2].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(16);
    v[3] ^= v[2];
    v[0] = v[0].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(21);
    v[3] ^= v[0];
    v[2] = v[2].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(17);
    v[1] ^= v[2];
    v[2] = v[2].rotate_left(32);
}

#[cfg(test)]
mod tests {
    extern crate std;

    use core::hash::Hasher;

    use super::*;

    /// Key 00 01 .. 0f, as the SipHash paper's test vectors use.
    const VECTOR_KEY: [u64; 2] = [0x0706_0504_0302_0100, 0x0f0e_0d0c_0b0a_0908];

    #[test]
    fn siphash_matches_the_reference_vector_and_the_siphasher_crate() {
        // The reference implementation's 64-bit vector for the 16-byte message 00 01 .. 0f
        // (vectors.h, entry 16).
        let message = [0x0706_0504_0302_0100, 0x0f0e_0d0c_0b0a_0908];
        assert_eq!(
            siphash(&message, &VECTOR_KEY).to_le_bytes(),
            [0xdb, 0x9b, 0xc2, 0x57, 0x7f, 0xcc, 0x2a, 0x3f]
        );
        for (first, second) in [(0u64, 0u64), (u64::MAX, 1), (0x1234_5678_9abc_def0, 42)] {
            let key = [first ^ 0x5555, second.rotate_left(7)];
            let mut reference = siphasher::sip::SipHasher24::new_with_keys(key[0], key[1]);
            reference.write(&first.to_le_bytes());
            reference.write(&second.to_le_bytes());
            assert_eq!(siphash(&[first, second], &key), reference.finish());
            // The 40-byte message of an IPv6 cookie.
            let long = [first, second, first ^ second, 7, second.rotate_left(3)];
            let mut reference = siphasher::sip::SipHasher24::new_with_keys(key[0], key[1]);
            for word in long {
                reference.write(&word.to_le_bytes());
            }
            assert_eq!(siphash(&long, &key), reference.finish());
        }
    }

    fn key() -> FlowKey {
        FlowKey {
            src: crate::Addr::v4(u32::from_ne_bytes([198, 18, 0, 2])),
            dst: crate::Addr::v4(u32::from_ne_bytes([203, 0, 113, 10])),
            sport: 40000u16.to_be(),
            dport: 80u16.to_be(),
            proto: 6,
            _pad: [0; 3],
        }
    }

    fn secret(seed: u64) -> CookieSecret {
        CookieSecret {
            keys: [[seed, seed ^ 1], [seed ^ 2, seed ^ 3]],
        }
    }

    #[test]
    fn a_cookie_carries_its_mss_for_two_periods_and_no_longer() {
        let (secret, key, isn) = (secret(7), key(), 0xdead_beef);
        for index in 0..4 {
            let cookie = syn_cookie(&secret, &key, isn, 1000, index);
            assert_eq!(
                check_syn_cookie(&secret, &key, isn, cookie, 1000),
                Some(index)
            );
            assert_eq!(
                check_syn_cookie(&secret, &key, isn, cookie, 1001),
                Some(index)
            );
            assert_eq!(
                check_syn_cookie(&secret, &key, isn, cookie, 1002),
                None,
                "two periods ago"
            );
        }
        // The counter wraps in its 8 bits.
        let cookie = syn_cookie(&secret, &key, isn, 255, 2);
        assert_eq!(check_syn_cookie(&secret, &key, isn, cookie, 256), Some(2));
    }

    fn key_v6() -> FlowKey {
        FlowKey {
            src: crate::Addr::v6([0x20, 1, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]),
            dst: crate::Addr::v6([0x20, 1, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 10]),
            ..key()
        }
    }

    #[test]
    fn a_cookie_fits_only_its_connection_and_its_secret() {
        for key in [key(), key_v6()] {
            only_its_connection_and_its_secret(key);
        }
        // An IPv6 client differing in any address word gets another cookie.
        let (secret, key, isn) = (secret(7), key_v6(), 0xdead_beef);
        let cookie = syn_cookie(&secret, &key, isn, 1000, 3);
        for word in 0..4 {
            let mut other = key;
            other.src.words[word] ^= 0x100;
            assert_eq!(check_syn_cookie(&secret, &other, isn, cookie, 1000), None);
        }
    }

    fn only_its_connection_and_its_secret(key: FlowKey) {
        let (secret, isn) = (secret(7), 0xdead_beef);
        let cookie = syn_cookie(&secret, &key, isn, 1000, 3);
        let other_port = FlowKey {
            sport: 40001u16.to_be(),
            ..key
        };
        assert_eq!(
            check_syn_cookie(&secret, &other_port, isn, cookie, 1000),
            None
        );
        // The client's ISN is added in: one a few away would only move the MSS index, as in
        // the kernel, but one further off is refused.
        assert_eq!(
            check_syn_cookie(&secret, &key, isn + 0x1000, cookie, 1000),
            None
        );
        assert_eq!(
            check_syn_cookie(&self::secret(8), &key, isn, cookie, 1000),
            None
        );
        // Any flipped bit but the two that carry the MSS index is caught; those two decode to
        // another MSS, as with the kernel's cookies (the MSS is not authenticated).
        for bit in 2..32 {
            assert_eq!(
                check_syn_cookie(&secret, &key, isn, cookie ^ (1 << bit), 1000),
                None,
                "bit {bit}"
            );
        }
    }

    #[test]
    fn the_mss_index_is_the_largest_entry_not_above_the_offer() {
        assert_eq!(mss_index(100), 0);
        assert_eq!(mss_index(536), 0);
        assert_eq!(mss_index(1299), 0);
        assert_eq!(mss_index(1300), 1);
        assert_eq!(mss_index(1459), 2);
        assert_eq!(mss_index(9000), 3);
    }

    #[test]
    fn the_cookie_tsval_keeps_the_syn_options_and_never_runs_ahead_of_the_clock() {
        for now_ms in [0u32, 31, 32, 1_000_003, u32::MAX - 3, u32::MAX] {
            for (window_shift, sack_permitted) in [(NO_WINDOW_SCALE, 0), (0, 1), (7, 0), (14, 1)] {
                let offered = SynOptions {
                    mss: 1440,
                    window_shift,
                    sack_permitted,
                    timestamps: 1,
                    _pad: [0; 3],
                };
                let tsval = cookie_tsval(now_ms, &offered);
                assert!(tsval <= now_ms || now_ms < 32, "{tsval} ahead of {now_ms}");
                assert!(now_ms.wrapping_sub(tsval) < 64);
                assert_eq!(options_from_tsecr(tsval, 1440), offered);
            }
        }
    }
}
