use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::{is_slug_like, InvalidValue};

/// How far a key's caller is trusted. `external` keys (partners, browsers) may not report
/// BILLABLE usage; only `internal` services may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Trust {
    Internal,
    External,
}

impl Trust {
    pub fn as_str(self) -> &'static str {
        match self {
            Trust::Internal => "internal",
            Trust::External => "external",
        }
    }
}

impl FromStr for Trust {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "internal" => Ok(Trust::Internal),
            "external" => Ok(Trust::External),
            other => Err(InvalidValue::new(
                "trust",
                format!("{other:?} is not a trust level: use internal or external"),
            )),
        }
    }
}

impl fmt::Display for Trust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The service a key belongs to (`crm`, `voice-gateway`, …): `[a-z0-9._-]`, 1–64 chars.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct SourceService(String);

impl SourceService {
    pub fn parse(raw: &str) -> Result<Self, InvalidValue> {
        if is_slug_like(raw, 64, b"-._") {
            Ok(SourceService(raw.to_owned()))
        } else {
            Err(InvalidValue::new(
                "source",
                format!(
                    "{raw:?} is not a service name: use 1-64 of a-z, 0-9 and inner '.', '_', '-'"
                ),
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SourceService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trust_and_source() {
        assert_eq!("internal".parse::<Trust>().unwrap(), Trust::Internal);
        assert!("root".parse::<Trust>().is_err());
        assert!(SourceService::parse("voice-gateway.v2").is_ok());
        assert!(SourceService::parse("Voice").is_err());
        assert!(SourceService::parse("").is_err());
    }
}
