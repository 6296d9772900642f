//! Exact decimal strings (`"812345"`) as `u128`: the API sends totals that may exceed 2⁶³ as
//! strings.

use serde::de::{self, Deserializer};
use serde::Deserialize;

pub(crate) fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u128, D::Error> {
    let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
    text.parse()
        .map_err(|_| de::Error::custom(format!("{text:?} is not a whole number")))
}

#[cfg(test)]
mod tests {
    #[derive(serde::Deserialize)]
    struct Total {
        #[serde(with = "super")]
        total: u128,
    }

    #[test]
    fn decimal_strings_beyond_64_bits_read_exactly() {
        let total: Total = serde_json::from_str(r#"{"total": "36893488147419103232"}"#).unwrap();
        assert_eq!(total.total, 1u128 << 65);
        assert!(serde_json::from_str::<Total>(r#"{"total": "-1"}"#).is_err());
        assert!(serde_json::from_str::<Total>(r#"{"total": 5}"#).is_err());
    }
}
