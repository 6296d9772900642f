use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::InvalidValue;

/// Whether a metric is billed. Comes from the catalog, never from the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Classification {
    Billable,
    NonBillable,
    Info,
}

impl Classification {
    pub fn as_str(self) -> &'static str {
        match self {
            Classification::Billable => "BILLABLE",
            Classification::NonBillable => "NON_BILLABLE",
            Classification::Info => "INFO",
        }
    }
}

impl FromStr for Classification {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "BILLABLE" => Ok(Classification::Billable),
            "NON_BILLABLE" => Ok(Classification::NonBillable),
            "INFO" => Ok(Classification::Info),
            other => Err(InvalidValue::new(
                "classification",
                format!("{other:?} is not one of BILLABLE, NON_BILLABLE, INFO"),
            )),
        }
    }
}

impl fmt::Display for Classification {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One entry of the metric catalog.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MetricDefinition {
    pub name: String,
    pub classification: Classification,
    pub unit: String,
}

/// The metric catalog, by name.
#[derive(Debug, Clone, Default)]
pub struct MetricCatalog {
    by_name: std::collections::HashMap<String, MetricDefinition>,
}

impl MetricCatalog {
    pub fn new(metrics: impl IntoIterator<Item = MetricDefinition>) -> Self {
        MetricCatalog {
            by_name: metrics.into_iter().map(|m| (m.name.clone(), m)).collect(),
        }
    }

    pub fn get(&self, name: &str) -> Option<&MetricDefinition> {
        self.by_name.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_round_trips() {
        for c in [
            Classification::Billable,
            Classification::NonBillable,
            Classification::Info,
        ] {
            assert_eq!(c.as_str().parse::<Classification>().unwrap(), c);
            assert_eq!(
                serde_json::to_string(&c).unwrap(),
                format!("\"{}\"", c.as_str())
            );
        }
    }
}
