//! Stripe's webhook signature scheme, as documented: `Stripe-Signature: t=<unix>,v1=<hex>[,v1=…]`
//! where each `v1` is HMAC-SHA256, keyed with the endpoint's signing secret, over
//! `"<t>.<raw body>"`. Any `v1` may match any of the secrets (so a secret can be rotated with
//! both active), compared in constant time; `t` must be within the tolerance of now, either way
//! (a replayed old delivery and a forged future one are both refused).

use hmac::{Hmac, Mac};
use sha2::Sha256;

pub const HEADER: &str = "stripe-signature";

/// Why a signature was refused (logged and audited; callers all get the same 401).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureError {
    Missing,
    Malformed,
    Stale,
    FromTheFuture,
    Mismatch,
}

impl SignatureError {
    pub fn code(self) -> &'static str {
        match self {
            SignatureError::Missing => "missing_signature",
            SignatureError::Malformed => "malformed_signature",
            SignatureError::Stale => "stale_signature",
            SignatureError::FromTheFuture => "future_signature",
            SignatureError::Mismatch => "bad_signature",
        }
    }
}

/// The parts of a signature header we use: its timestamp and every `v1` signature.
#[derive(Debug, PartialEq, Eq)]
struct Parsed {
    timestamp: i64,
    v1: Vec<[u8; 32]>,
}

fn parse(header: &str) -> Result<Parsed, SignatureError> {
    if header.len() > 4096 {
        return Err(SignatureError::Malformed);
    }
    let mut timestamp = None;
    let mut v1 = Vec::new();
    for item in header.split(',') {
        let (key, value) = item
            .trim()
            .split_once('=')
            .ok_or(SignatureError::Malformed)?;
        match key {
            "t" => {
                if timestamp.is_some() {
                    return Err(SignatureError::Malformed);
                }
                let t = value
                    .parse::<i64>()
                    .ok()
                    .filter(|t| *t > 0)
                    .ok_or(SignatureError::Malformed)?;
                timestamp = Some(t);
            }
            "v1" => {
                let mut signature = [0u8; 32];
                hex::decode_to_slice(value, &mut signature)
                    .map_err(|_| SignatureError::Malformed)?;
                v1.push(signature);
            }
            // Other schemes (v0 is Stripe's test scheme) are ignored, as Stripe's libraries do.
            _ => {}
        }
    }
    match (timestamp, v1.is_empty()) {
        (Some(timestamp), false) if v1.len() <= 16 => Ok(Parsed { timestamp, v1 }),
        _ => Err(SignatureError::Malformed),
    }
}

/// Checks a delivery: `header` as received, `body` byte for byte, the tenant's active secrets.
pub fn verify(
    header: Option<&str>,
    body: &[u8],
    secrets: &[String],
    now_unix: i64,
    tolerance_secs: i64,
) -> Result<(), SignatureError> {
    let header = header
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .ok_or(SignatureError::Missing)?;
    let parsed = parse(header)?;
    let mut signed_any = false;
    for secret in secrets {
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
            continue;
        };
        mac.update(parsed.timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        for candidate in &parsed.v1 {
            // verify_slice compares in constant time.
            if mac.clone().verify_slice(candidate).is_ok() {
                signed_any = true;
            }
        }
    }
    if !signed_any {
        return Err(SignatureError::Mismatch);
    }
    // The timestamp is signed, so it is checked once the signature holds.
    if parsed.timestamp < now_unix - tolerance_secs {
        return Err(SignatureError::Stale);
    }
    if parsed.timestamp > now_unix + tolerance_secs {
        return Err(SignatureError::FromTheFuture);
    }
    Ok(())
}

/// The header Stripe would send for `body` at `timestamp` (tests, the demo, the benchmark).
pub fn sign(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!(
        "t={timestamp},v1={}",
        hex::encode(mac.finalize().into_bytes())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_795_608_000;
    const SECRET: &str = "whsec_test_secret";

    fn secrets(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_valid_signature_passes() {
        let body = br#"{"id":"evt_1"}"#;
        let header = sign(SECRET, NOW, body);
        assert_eq!(
            verify(Some(&header), body, &secrets(&[SECRET]), NOW, 300),
            Ok(())
        );
        // Within the tolerance, either way.
        assert!(verify(Some(&header), body, &secrets(&[SECRET]), NOW + 300, 300).is_ok());
        assert!(verify(Some(&header), body, &secrets(&[SECRET]), NOW - 300, 300).is_ok());
    }

    #[test]
    fn a_known_vector_matches_stripe() {
        // HMAC-SHA256("whsec_test_secret", "1795608000.{}") computed independently.
        let header = sign(SECRET, NOW, b"{}");
        let expected = {
            let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
            mac.update(b"1795608000.{}");
            hex::encode(mac.finalize().into_bytes())
        };
        assert_eq!(header, format!("t=1795608000,v1={expected}"));
    }

    #[test]
    fn every_kind_of_bad_signature_is_refused() {
        let body = br#"{"id":"evt_1"}"#;
        let good = sign(SECRET, NOW, body);
        let check = |header: Option<&str>, body: &[u8], keys: &[&str], now: i64| {
            verify(header, body, &secrets(keys), now, 300)
        };
        assert_eq!(
            check(None, body, &[SECRET], NOW),
            Err(SignatureError::Missing)
        );
        assert_eq!(
            check(Some(" "), body, &[SECRET], NOW),
            Err(SignatureError::Missing)
        );
        for garbled in [
            "garbage",
            "t=abc,v1=00",
            "v1=zz",
            "t=1795608000",
            "t=1795608000,v1=abcd",
            "t=-5,v1=00",
            "t=1,t=2,v1=00",
        ] {
            assert_eq!(
                check(Some(garbled), body, &[SECRET], NOW),
                Err(SignatureError::Malformed),
                "{garbled}"
            );
        }
        assert_eq!(
            check(Some(&good), body, &["whsec_other"], NOW),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            check(Some(&good), br#"{"id":"evt_2"}"#, &[SECRET], NOW),
            Err(SignatureError::Mismatch),
            "a tampered body"
        );
        assert_eq!(
            check(Some(&good), body, &[SECRET], NOW + 301),
            Err(SignatureError::Stale)
        );
        assert_eq!(
            check(Some(&good), body, &[SECRET], NOW - 301),
            Err(SignatureError::FromTheFuture)
        );
        // Moving the timestamp breaks the signature.
        let moved = good.replace("t=1795608000", "t=1795608100");
        assert_eq!(
            check(Some(&moved), body, &[SECRET], NOW + 100),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            check(Some(&good), body, &[], NOW),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn rotation_any_secret_and_any_v1_may_match() {
        let body = b"{}";
        let old = sign("whsec_old", NOW, body);
        let new = sign("whsec_new", NOW, body);
        let both = format!("{},v1={}", new, &old[old.find("v1=").unwrap() + 3..]);
        assert!(verify(
            Some(&old),
            body,
            &secrets(&["whsec_new", "whsec_old"]),
            NOW,
            300
        )
        .is_ok());
        assert!(verify(Some(&both), body, &secrets(&["whsec_old"]), NOW, 300).is_ok());
        let with_v0 = format!("{old},v0=deadbeef");
        assert!(verify(Some(&with_v0), body, &secrets(&["whsec_old"]), NOW, 300).is_ok());
    }
}
