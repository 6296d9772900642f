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

/// What a key may do. Routes name the scope they need; the request edge checks it once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// `POST /v1/usage/events`
    UsageWrite,
    /// `GET /v1/usage/events`, `GET /v1/usage/realtime`: the whole tenant's usage.
    UsageRead,
    /// Voiding usage events another source service sent (a service voids its own with
    /// `usage:write`). Never held by default: granted to the service that corrects others'.
    UsageVoid,
    /// Creating payment records.
    PaymentsWrite,
    /// Reading payment records.
    PaymentsRead,
    /// Verifying a payment (moves money state; internal services only).
    PaymentsVerify,
}

impl Scope {
    pub const ALL: [Scope; 6] = [
        Scope::UsageWrite,
        Scope::UsageRead,
        Scope::UsageVoid,
        Scope::PaymentsWrite,
        Scope::PaymentsRead,
        Scope::PaymentsVerify,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::UsageWrite => "usage:write",
            Scope::UsageRead => "usage:read",
            Scope::UsageVoid => "usage:void",
            Scope::PaymentsWrite => "payments:write",
            Scope::PaymentsRead => "payments:read",
            Scope::PaymentsVerify => "payments:verify",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl FromStr for Scope {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Scope::ALL
            .into_iter()
            .find(|scope| scope.as_str() == s)
            .ok_or_else(|| {
                InvalidValue::new(
                    "scopes",
                    format!(
                        "{:?} is not a scope: use {}",
                        s.chars().take(64).collect::<String>(),
                        Scope::ALL.map(Scope::as_str).join(", ")
                    ),
                )
            })
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The scopes a key holds. External keys may hold only `usage:write` (the database enforces the
/// same rule); a key holds at least one scope.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Scopes(u8);

impl Scopes {
    /// What a key of this trust gets when its creator names no scopes: an internal key every
    /// scope but `usage:void`, an external one `usage:write`.
    pub fn default_for(trust: Trust) -> Self {
        match trust {
            Trust::Internal => Scopes::of(&[
                Scope::UsageWrite,
                Scope::UsageRead,
                Scope::PaymentsWrite,
                Scope::PaymentsRead,
                Scope::PaymentsVerify,
            ]),
            Trust::External => Scopes::of(&[Scope::UsageWrite]),
        }
    }

    pub fn of(scopes: &[Scope]) -> Self {
        Scopes(scopes.iter().fold(0, |bits, s| bits | s.bit()))
    }

    /// Parses scope names, and checks that a key of `trust` may hold them.
    pub fn parse_for<S: AsRef<str>>(names: &[S], trust: Trust) -> Result<Self, InvalidValue> {
        let scopes = names
            .iter()
            .map(|n| n.as_ref().parse())
            .collect::<Result<Vec<Scope>, _>>()?;
        let scopes = Scopes::of(&scopes);
        if scopes.0 == 0 {
            return Err(InvalidValue::new(
                "scopes",
                "a key needs at least one scope",
            ));
        }
        if trust == Trust::External && !Scopes::default_for(Trust::External).covers(scopes) {
            return Err(InvalidValue::new(
                "scopes",
                "an external key may only hold usage:write",
            ));
        }
        Ok(scopes)
    }

    /// Scopes as stored; unknown names are a schema/code mismatch.
    pub fn from_stored<S: AsRef<str>>(names: &[S]) -> Result<Self, InvalidValue> {
        let scopes = names
            .iter()
            .map(|n| n.as_ref().parse())
            .collect::<Result<Vec<Scope>, _>>()?;
        Ok(Scopes::of(&scopes))
    }

    pub fn contains(self, scope: Scope) -> bool {
        self.0 & scope.bit() != 0
    }

    fn covers(self, other: Scopes) -> bool {
        other.0 & !self.0 == 0
    }

    pub fn iter(self) -> impl Iterator<Item = Scope> {
        Scope::ALL.into_iter().filter(move |s| self.contains(*s))
    }

    pub fn names(self) -> Vec<&'static str> {
        self.iter().map(Scope::as_str).collect()
    }
}

impl fmt::Debug for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.names()).finish()
    }
}

impl Serialize for Scopes {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.names())
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

    #[test]
    fn scopes_by_trust() {
        let internal = Scopes::default_for(Trust::Internal);
        assert!(Scope::ALL
            .iter()
            .all(|s| internal.contains(*s) == (*s != Scope::UsageVoid)));
        assert!(Scopes::parse_for(&["usage:void"], Trust::Internal).is_ok());
        assert!(Scopes::parse_for(&["usage:void"], Trust::External).is_err());
        let external = Scopes::default_for(Trust::External);
        assert_eq!(external.names(), ["usage:write"]);
        assert!(!external.contains(Scope::UsageRead));

        let read_only = Scopes::parse_for(&["usage:read"], Trust::Internal).unwrap();
        assert!(read_only.contains(Scope::UsageRead) && !read_only.contains(Scope::UsageWrite));
        assert!(Scopes::parse_for(&["usage:read"], Trust::External).is_err());
        assert!(Scopes::parse_for(&["payments:verify"], Trust::External).is_err());
        assert!(Scopes::parse_for::<&str>(&[], Trust::Internal).is_err());
        assert!(Scopes::parse_for(&["usage:admin"], Trust::Internal).is_err());
        assert_eq!(
            serde_json::to_value(
                Scopes::parse_for(&["usage:read", "usage:write"], Trust::Internal).unwrap()
            )
            .unwrap(),
            serde_json::json!(["usage:write", "usage:read"])
        );
        for s in Scope::ALL {
            assert_eq!(s.as_str().parse::<Scope>().unwrap(), s);
        }
    }
}
