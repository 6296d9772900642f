use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{is_slug_like, InvalidValue};

/// A tenant's id: the key every tenant-owned row and every RLS policy is scoped by.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, sqlx::Type,
)]
#[sqlx(transparent)]
pub struct TenantId(pub Uuid);

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The tenant's short, stable, URL-safe name: `[a-z0-9-]`, 1–63 chars, no leading/trailing dash.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct TenantSlug(String);

impl TenantSlug {
    pub fn parse(raw: &str) -> Result<Self, InvalidValue> {
        if is_slug_like(raw, 63, b"-") {
            Ok(TenantSlug(raw.to_owned()))
        } else {
            Err(InvalidValue::new(
                "slug",
                format!("{raw:?} is not a slug: use 1-63 of a-z, 0-9 and inner '-'"),
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TenantSlug {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TenantStatus {
    Active,
    Disabled,
    /// Offboarded with its billing records kept: nothing else of it is left.
    Erased,
}

impl TenantStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            TenantStatus::Active => "active",
            TenantStatus::Disabled => "disabled",
            TenantStatus::Erased => "erased",
        }
    }
}

impl FromStr for TenantStatus {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "active" => Ok(TenantStatus::Active),
            "disabled" => Ok(TenantStatus::Disabled),
            "erased" => Ok(TenantStatus::Erased),
            other => Err(InvalidValue::new(
                "status",
                format!("unknown status {other:?}"),
            )),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Tenant {
    pub id: TenantId,
    pub slug: String,
    pub name: String,
    pub status: TenantStatus,
    pub created_at: DateTime<Utc>,
    pub disabled_at: Option<DateTime<Utc>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs() {
        for ok in ["acme", "a", "acme-2", "0x"] {
            assert!(TenantSlug::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-acme",
            "acme-",
            "Acme",
            "ac me",
            "acmé",
            &"a".repeat(64),
            "a_b",
        ] {
            assert!(TenantSlug::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn status_round_trips() {
        for s in [TenantStatus::Active, TenantStatus::Disabled] {
            assert_eq!(s.as_str().parse::<TenantStatus>().unwrap(), s);
        }
        assert!("gone".parse::<TenantStatus>().is_err());
    }
}
