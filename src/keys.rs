//! API key format: `<tier prefix>_<22 base58 chars><6 base58 chars checksum>`.
//!
//! The 22 random characters carry 128.9 bits of randomness. The checksum is
//! the first 32 bits of SHA-256 over everything before it, so a mistyped or
//! invented key is refused before the store is read, and secret scanners can
//! recognise a leaked key by its shape and checksum. At rest only the
//! SHA-256 of the whole key is kept ([`KeyHash`]).

use rand::Rng;
use sha2::{Digest, Sha256};

/// Bitcoin's base58 alphabet: no `0`, `O`, `I`, `l`.
const ALPHABET: &[u8; 58] = b"123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";

/// Whether a byte is one of `ALPHABET`'s, by table (checked on every
/// request's key: a search of the alphabet per byte cost more than the
/// rest of the shape check).
const IN_ALPHABET: [bool; 256] = {
    let mut table = [false; 256];
    let mut i = 0;
    while i < ALPHABET.len() {
        table[ALPHABET[i] as usize] = true;
        i += 1;
    }
    table
};

fn base58(b: u8) -> bool {
    IN_ALPHABET[b as usize]
}
const RANDOM_LEN: usize = 22;
const CHECKSUM_LEN: usize = 6;
/// Characters of the random part shown in a key record's `start`.
const START_LEN: usize = 4;
const ID_LEN: usize = 16;

/// SHA-256 of a key: the only form in which a key is stored.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyHash(pub [u8; 32]);

impl std::fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not secret, but there is no reason to print it whole.
        write!(f, "KeyHash({:02x}{:02x}..)", self.0[0], self.0[1])
    }
}

impl KeyHash {
    pub fn of(key: &str) -> KeyHash {
        KeyHash(Sha256::digest(key.as_bytes()).into())
    }

    /// Lower-case hex, as a key record stores it.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn from_hex(hex: &str) -> Option<KeyHash> {
        if hex.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(KeyHash(out))
    }
}

/// A freshly minted key. The secret leaves the process once, in the answer
/// to the create call, and is never stored.
pub struct NewKey {
    pub secret: String,
    pub hash: KeyHash,
    /// Prefix plus the first random characters: safe to show and log.
    pub start: String,
}

/// Mints a key for a tier's prefix.
pub fn generate(prefix: &str) -> NewKey {
    let mut rng = rand::rng();
    let random: String = (0..RANDOM_LEN)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect();
    let body = format!("{prefix}_{random}");
    let secret = format!("{body}{}", checksum(&body));
    NewKey {
        hash: KeyHash::of(&secret),
        start: format!("{prefix}_{}", &random[..START_LEN]),
        secret,
    }
}

/// A public key id, `key_` plus 16 base58 characters.
pub fn generate_id() -> String {
    random_id("key")
}

/// Whether `id` has the shape of a key id ([`generate_id`]): `key_` and
/// 16 base58 digits.
pub fn is_key_id(id: &str) -> bool {
    id.strip_prefix("key_")
        .is_some_and(|rest| rest.len() == ID_LEN && rest.bytes().all(base58))
}

/// `<prefix>_<random base58>`: ids for keys, events and batches.
pub fn random_id(prefix: &str) -> String {
    let mut rng = rand::rng();
    let id: String = (0..ID_LEN)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect();
    format!("{prefix}_{id}")
}

/// Whether `key` has the shape and checksum of a tollgate key. Run before
/// any store read.
pub fn well_formed(key: &str) -> bool {
    well_shaped(key) && checksum_holds(key)
}

/// Whether `key` has a tollgate key's shape: a prefix, `_`, then the right
/// number of base58 characters. No hashing.
///
/// Read from the end: the tail holds no `_` (base58 has none), so the
/// last `_` is the one just before it (as `rsplit_once('_')` would find,
/// without its search).
pub fn well_shaped(key: &str) -> bool {
    let key = key.as_bytes();
    let Some(cut) = key.len().checked_sub(RANDOM_LEN + CHECKSUM_LEN + 1) else {
        return false;
    };
    cut > 0 && key[cut] == b'_' && key[cut + 1..].iter().all(|&b| base58(b))
}

/// Whether a well-shaped key's last characters are the checksum of the
/// rest. Compared in constant time.
pub fn checksum_holds(key: &str) -> bool {
    let Some(split) = key.len().checked_sub(CHECKSUM_LEN) else {
        return false;
    };
    let (Some(body), Some(sum)) = (key.get(..split), key.get(split..)) else {
        return false;
    };
    subtle::ConstantTimeEq::ct_eq(&checksum_bytes(body)[..], sum.as_bytes()).into()
}

/// The first 32 bits of SHA-256 as 6 base58 digits (58^6 > 2^32).
fn checksum_bytes(body: &str) -> [u8; CHECKSUM_LEN] {
    let digest = Sha256::digest(body.as_bytes());
    let mut n = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
    let mut out = [b'1'; CHECKSUM_LEN];
    for slot in out.iter_mut().rev() {
        *slot = ALPHABET[(n % 58) as usize];
        n /= 58;
    }
    out
}

fn checksum(body: &str) -> String {
    checksum_bytes(body).iter().map(|&b| b as char).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_alphabet_table_holds_exactly_the_alphabet() {
        for b in 0..=u8::MAX {
            assert_eq!(base58(b), ALPHABET.contains(&b), "byte {b}");
        }
        let key = generate("sk_pro").secret;
        for bad in ['0', 'O', 'I', 'l', '+', 'é'] {
            let mut k = key.clone();
            k.replace_range(k.len() - 7..k.len() - 6, &bad.to_string());
            assert!(!well_shaped(&k), "{k}");
        }
    }

    #[test]
    fn generated_keys_are_well_formed_and_distinct() {
        let a = generate("sk_pro");
        let b = generate("sk_pro");
        assert!(a.secret.starts_with("sk_pro_"));
        assert_eq!(a.secret.len(), "sk_pro_".len() + RANDOM_LEN + CHECKSUM_LEN);
        assert!(well_formed(&a.secret));
        assert_ne!(a.secret, b.secret);
        assert_ne!(a.hash, b.hash);
        assert!(a.secret.starts_with(&a.start));
        assert_eq!(a.hash, KeyHash::of(&a.secret));
    }

    #[test]
    fn a_single_changed_character_fails_the_checksum() {
        let key = generate("sk_free").secret;
        let mut failures = 0;
        let positions = "sk_free_".len()..key.len();
        let count = positions.len();
        for i in positions {
            let mut bytes = key.clone().into_bytes();
            bytes[i] = if bytes[i] == b'a' { b'b' } else { b'a' };
            let typo = String::from_utf8(bytes).expect("ascii");
            if !well_formed(&typo) {
                failures += 1;
            }
        }
        assert_eq!(failures, count);
    }

    #[test]
    fn malformed_keys_are_refused() {
        for bad in [
            "",
            "sk_free",
            "_",
            "nounderscore",
            "sk_free_0000000000000000000000000000",
        ] {
            assert!(!well_formed(bad), "{bad}");
        }
    }

    proptest::proptest! {
        /// As the split at the last `_` reads it, for strings near a key's
        /// shape: any prefix (empty, with `_`s, non-ASCII), a base58 tail of
        /// about the right length, sometimes with a character that is not
        /// base58 in it.
        #[test]
        fn the_shape_is_read_as_a_split_at_the_last_underscore(
            prefix in "[a-z_é]{0,4}",
            underscore in proptest::bool::ANY,
            tail in "[1-9A-HJ-NP-Za-km-z]{26,30}",
            bad in proptest::option::of(("[_0OIlé]", 0..26usize)),
        ) {
            let mut tail = tail;
            if let Some((bad, at)) = bad {
                tail.insert_str(at, &bad);
            }
            let key = format!("{prefix}{}{tail}", if underscore { "_" } else { "" });
            let split = key.rsplit_once('_').is_some_and(|(prefix, tail)| {
                !prefix.is_empty()
                    && tail.len() == RANDOM_LEN + CHECKSUM_LEN
                    && tail.bytes().all(base58)
            });
            proptest::prop_assert_eq!(well_shaped(&key), split, "{}", key);
        }
    }

    #[test]
    fn hashes_round_trip_through_hex() {
        let hash = KeyHash::of("sk_x_abc");
        assert_eq!(KeyHash::from_hex(&hash.to_hex()), Some(hash));
        assert_eq!(KeyHash::from_hex("zz"), None);
        assert_eq!(KeyHash::from_hex(&"g".repeat(64)), None);
    }

    #[test]
    fn ids_have_their_prefix() {
        let id = generate_id();
        assert!(id.starts_with("key_") && id.len() == 4 + ID_LEN);
        assert!(is_key_id(&id));
        for bad in [
            "",
            "key_",
            "key_0000000000000000",
            "kex_123456789ABCDEFG",
            &id[..id.len() - 1],
        ] {
            assert!(!is_key_id(bad), "{bad}");
        }
    }
}
