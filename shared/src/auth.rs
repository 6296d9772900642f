//! API keys: generation, the shape check every presented key passes before any lookup, and
//! hashing. A key is `mbk_<prefix>_<secret>`: the 12-hex-char prefix is a public lookup id
//! (it is shown in listings), the 64-hex-char secret carries 256 random bits. Only the SHA-256 of
//! the whole key is stored; with that much entropy a slow hash adds nothing.

use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

const SCHEME: &str = "mbk";
const PREFIX_BYTES: usize = 6;
const SECRET_BYTES: usize = 32;

/// A freshly generated key. `key` is shown once, to whoever created it, and never stored.
pub struct NewApiKey {
    pub key: String,
    pub prefix: String,
    pub hash: [u8; 32],
}

impl std::fmt::Debug for NewApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewApiKey")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

pub fn generate_api_key() -> NewApiKey {
    let mut prefix = [0u8; PREFIX_BYTES];
    let mut secret = [0u8; SECRET_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut prefix);
    rand::rngs::OsRng.fill_bytes(&mut secret);
    let prefix = hex::encode(prefix);
    let key = format!("{SCHEME}_{prefix}_{}", hex::encode(secret));
    let hash = hash_api_key(&key);
    NewApiKey { key, prefix, hash }
}

pub fn hash_api_key(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// A presented key that has the right shape; only these reach the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresentedKey {
    pub prefix: String,
    pub hash: [u8; 32],
}

/// Checks the shape of a presented key. Anything else is rejected without a lookup.
pub fn parse_presented_key(raw: &str) -> Option<PresentedKey> {
    let rest = raw.strip_prefix(SCHEME)?.strip_prefix('_')?;
    let (prefix, secret) = rest.split_once('_')?;
    let lower_hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    if !lower_hex(prefix, PREFIX_BYTES * 2) || !lower_hex(secret, SECRET_BYTES * 2) {
        return None;
    }
    Some(PresentedKey {
        prefix: prefix.to_owned(),
        hash: hash_api_key(raw),
    })
}

/// Constant-time comparison of a presented key's hash with a stored one.
pub fn hashes_match(presented: &[u8; 32], stored: &[u8]) -> bool {
    stored.len() == presented.len() && bool::from(presented.ct_eq(stored))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_parse_and_match() {
        let new = generate_api_key();
        let parsed = parse_presented_key(&new.key).expect("well-formed");
        assert_eq!(parsed.prefix, new.prefix);
        assert!(hashes_match(&parsed.hash, &new.hash));
        assert!(!format!("{new:?}").contains(&new.key));
        assert_ne!(generate_api_key().key, new.key);
    }

    #[test]
    fn malformed_keys_are_refused_before_lookup() {
        let good = generate_api_key().key;
        let upper = good.to_uppercase();
        let truncated = &good[..good.len() - 1];
        let long = format!("{good}0");
        for bad in [
            "",
            "mbk_",
            "Bearer x",
            upper.as_str(),
            truncated,
            long.as_str(),
            "mbk_0123456789ab_zz",
        ] {
            assert!(parse_presented_key(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn a_different_key_does_not_match() {
        let a = generate_api_key();
        let b = generate_api_key();
        assert!(!hashes_match(&a.hash, &b.hash));
        assert!(!hashes_match(&a.hash, &b.hash[..31]));
    }
}
