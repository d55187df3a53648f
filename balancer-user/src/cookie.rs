//! The balancer's own affinity cookie (`lb-cookie`): which backend a browser's session is on
//! and until when, signed so that every balancer host holding the key routes it alike and
//! nobody else can forge it.
//!
//! The value is base64url (no padding) of 22 bytes: version (1), key id (1), backend token (4,
//! big-endian), expiry in Unix seconds (4, big-endian), then HMAC-SHA256 truncated to 12
//! bytes. The MAC covers the bytes before it and the service's name, so a cookie of one
//! service does not route another. A backend token is a hash of the backend's name, the same
//! on every host with the same configuration, and says nothing about its address. A session
//! in a group of backends (version 2, 30 bytes) also carries the group's token and until when
//! it stays in that group, before the MAC.

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use hmac::{Hmac, Mac};
use sha2::Sha256;

const VERSION: u8 = 1;
const GROUP_VERSION: u8 = 2;
const SIGNED_LEN: usize = 10;
const GROUP_SIGNED_LEN: usize = SIGNED_LEN + 8;
const MAC_LEN: usize = 12;
const MAX_VALUE_LEN: usize = GROUP_SIGNED_LEN + MAC_LEN;

/// base64url of `len` bytes without padding.
const fn encoded_len(len: usize) -> usize {
    (len * 4).div_ceil(3)
}

/// What a genuine cookie says: the backend's token, when the cookie expires (Unix seconds)
/// and its session's group, if it has one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    pub token: u32,
    pub expires: u32,
    pub group: Option<GroupPin>,
}

/// A session's group (a token of its name, as backends have) and the Unix second until
/// which the session stays in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupPin {
    pub token: u32,
    pub until: u32,
}

/// A signing key; its id travels in the cookie so the right key verifies it.
#[derive(Clone, PartialEq, Eq)]
pub struct CookieKey {
    pub id: u8,
    pub secret: Vec<u8>,
}

impl std::fmt::Debug for CookieKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CookieKey {{ id: {}, secret: <{} bytes> }}",
            self.id,
            self.secret.len()
        )
    }
}

/// Why a cookie was treated as absent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// Not base64url, not the right length, or another version.
    Malformed,
    /// Signed with a key id this balancer does not hold.
    UnknownKey,
    /// The MAC does not match: the value was changed or forged.
    BadSignature,
    Expired,
}

impl Rejection {
    pub const ALL: [Rejection; 4] = [
        Rejection::Malformed,
        Rejection::UnknownKey,
        Rejection::BadSignature,
        Rejection::Expired,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Rejection::Malformed => "malformed",
            Rejection::UnknownKey => "unknown_key",
            Rejection::BadSignature => "bad_signature",
            Rejection::Expired => "expired",
        }
    }
}

/// The keys of an instance: the first signs, all verify, so keys can rotate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CookieKeys(pub Vec<CookieKey>);

impl CookieKeys {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// A cookie value naming `backend` (a [`backend_token`]) until `expires` (Unix seconds)
    /// in `group`, or None without keys.
    pub fn seal(
        &self,
        service: &str,
        backend: u32,
        expires: u32,
        group: Option<GroupPin>,
    ) -> Option<String> {
        let key = self.0.first()?;
        let mut value = [0u8; MAX_VALUE_LEN];
        value[0] = VERSION;
        value[1] = key.id;
        value[2..6].copy_from_slice(&backend.to_be_bytes());
        value[6..10].copy_from_slice(&expires.to_be_bytes());
        let mut signed = SIGNED_LEN;
        if let Some(group) = group {
            value[0] = GROUP_VERSION;
            value[10..14].copy_from_slice(&group.token.to_be_bytes());
            value[14..18].copy_from_slice(&group.until.to_be_bytes());
            signed = GROUP_SIGNED_LEN;
        }
        let mac = mac(key, service, &value[..signed]).finalize().into_bytes();
        value[signed..signed + MAC_LEN].copy_from_slice(&mac[..MAC_LEN]);
        Some(URL_SAFE_NO_PAD.encode(&value[..signed + MAC_LEN]))
    }

    /// The session a cookie value holds, if it is genuine and not expired at `now`.
    pub fn open(&self, service: &str, cookie: &str, now: u32) -> Result<Session, Rejection> {
        let signed = if cookie.len() == encoded_len(SIGNED_LEN + MAC_LEN) {
            SIGNED_LEN
        } else if cookie.len() == encoded_len(GROUP_SIGNED_LEN + MAC_LEN) {
            GROUP_SIGNED_LEN
        } else {
            return Err(Rejection::Malformed);
        };
        let version = if signed == SIGNED_LEN {
            VERSION
        } else {
            GROUP_VERSION
        };
        let mut value = [0u8; MAX_VALUE_LEN];
        match URL_SAFE_NO_PAD.decode_slice(cookie, &mut value) {
            Ok(len) if len == signed + MAC_LEN && value[0] == version => {}
            _ => return Err(Rejection::Malformed),
        }
        let key = self
            .0
            .iter()
            .find(|k| k.id == value[1])
            .ok_or(Rejection::UnknownKey)?;
        mac(key, service, &value[..signed])
            .verify_truncated_left(&value[signed..signed + MAC_LEN])
            .map_err(|_| Rejection::BadSignature)?;
        let field = |at: usize| {
            u32::from_be_bytes([value[at], value[at + 1], value[at + 2], value[at + 3]])
        };
        if field(6) <= now {
            return Err(Rejection::Expired);
        }
        Ok(Session {
            token: field(2),
            expires: field(6),
            group: (signed == GROUP_SIGNED_LEN).then(|| GroupPin {
                token: field(10),
                until: field(14),
            }),
        })
    }
}

fn mac(key: &CookieKey, service: &str, signed: &[u8]) -> Hmac<Sha256> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&key.secret)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(service.as_bytes());
    mac.update(&[0]);
    mac.update(signed);
    mac
}

/// The token that names a backend in cookies: FNV-1a of its name.
pub fn backend_token(name: &str) -> u32 {
    name.bytes().fold(0x811c_9dc5, |h: u32, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(ids: &[u8]) -> CookieKeys {
        CookieKeys(
            ids.iter()
                .map(|&id| CookieKey {
                    id,
                    secret: format!("secret number {id} of the test").into_bytes(),
                })
                .collect(),
        )
    }

    const NOW: u32 = 1_800_000_000;

    #[test]
    fn a_sealed_cookie_opens_to_its_backend_until_it_expires() {
        let keys = keys(&[1]);
        let cookie = keys
            .seal("web", 0xdead_beef, NOW + 60, None)
            .expect("a key");
        assert_eq!(cookie.len(), encoded_len(SIGNED_LEN + MAC_LEN));
        assert_eq!(
            keys.open("web", &cookie, NOW).map(|s| s.token),
            Ok(0xdead_beef)
        );
        assert_eq!(keys.open("web", &cookie, NOW + 60), Err(Rejection::Expired));
        assert_eq!(
            keys.open("api", &cookie, NOW),
            Err(Rejection::BadSignature),
            "another service's cookie"
        );
    }

    #[test]
    fn rotated_keys_verify_old_cookies_and_sign_with_the_first() {
        let old = keys(&[1]).seal("web", 7, NOW + 60, None).expect("a key");
        let rotated = keys(&[2, 1]);
        assert_eq!(rotated.open("web", &old, NOW).map(|s| s.token), Ok(7));
        let new = rotated.seal("web", 7, NOW + 60, None).expect("a key");
        assert_eq!(keys(&[2]).open("web", &new, NOW).map(|s| s.token), Ok(7));
        assert_eq!(
            keys(&[1]).open("web", &new, NOW),
            Err(Rejection::UnknownKey)
        );
        let forged_key = CookieKeys(vec![CookieKey {
            id: 2,
            secret: b"someone else's secret".to_vec(),
        }]);
        assert_eq!(
            forged_key.open("web", &new, NOW),
            Err(Rejection::BadSignature)
        );
    }

    #[test]
    fn a_sessions_group_travels_in_the_cookie() {
        let keys = keys(&[1]);
        let pin = GroupPin {
            token: backend_token("green"),
            until: NOW + 30,
        };
        let cookie = keys.seal("web", 9, NOW + 60, Some(pin)).expect("a key");
        assert_eq!(cookie.len(), encoded_len(GROUP_SIGNED_LEN + MAC_LEN));
        let session = keys.open("web", &cookie, NOW).expect("genuine");
        assert_eq!((session.token, session.group), (9, Some(pin)));
        // The group's time may pass before the cookie's: the cookie still opens.
        assert_eq!(
            keys.open("web", &cookie, NOW + 31).map(|s| s.group),
            Ok(Some(pin))
        );
    }

    #[test]
    fn every_flipped_bit_and_every_truncation_is_rejected() {
        let keys = keys(&[3]);
        let pin = GroupPin {
            token: 5,
            until: NOW + 60,
        };
        for group in [None, Some(pin)] {
            let cookie = keys.seal("web", 42, NOW + 3600, group).expect("a key");
            let raw = URL_SAFE_NO_PAD.decode(&cookie).expect("base64");
            for bit in 0..raw.len() * 8 {
                let mut tampered = raw.clone();
                tampered[bit / 8] ^= 1 << (bit % 8);
                let opened = keys.open("web", &URL_SAFE_NO_PAD.encode(&tampered), NOW);
                assert!(
                    opened.is_err(),
                    "bit {bit} flipped still opened: {opened:?}"
                );
            }
            for len in 0..cookie.len() {
                assert_eq!(
                    keys.open("web", &cookie[..len], NOW),
                    Err(Rejection::Malformed)
                );
            }
            assert_eq!(
                keys.open("web", &format!("{cookie}A"), NOW),
                Err(Rejection::Malformed)
            );
        }
    }

    /// Arbitrary text never panics and never opens (a cheap property test over many inputs).
    #[test]
    fn arbitrary_values_never_open() {
        let keys = keys(&[1]);
        let alphabet =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=+/%. \xff";
        let mut state = 0x1234_5678_9abc_def0u64;
        for _ in 0..200_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = (state % 40) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|i| alphabet[((state >> (i % 8 * 8)) as usize + i) % alphabet.len()])
                .collect();
            let text = String::from_utf8_lossy(&bytes);
            assert!(keys.open("web", &text, NOW).is_err(), "{text:?} opened");
        }
    }

    #[test]
    fn backend_tokens_are_stable() {
        assert_eq!(backend_token(""), 0x811c_9dc5);
        assert_eq!(backend_token("a"), 0xe40c_292c);
        assert_ne!(backend_token("backend-1"), backend_token("backend-2"));
    }
}
