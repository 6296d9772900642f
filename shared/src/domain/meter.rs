//! Meters: how a tenant's CloudEvents map to usage events, after OpenMeter's meter model — the
//! CloudEvents `type` a meter counts, the metric of the catalog it counts towards, where in the
//! event's `data` its quantity is (`valueProperty`, a JSONPath; absent: each event counts 1),
//! and the `groupBy` properties kept in the usage event's metadata.

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use super::InvalidValue;

/// The longest JSONPath accepted.
pub const MAX_PATH_CHARS: usize = 256;
/// `groupBy` keys per meter, at most.
pub const MAX_GROUP_BY: usize = 16;

/// A JSONPath into an event's `data`, of the subset meters need: `$`, then member names
/// (`.name`, or `['any name']`) and array indices (`[0]`). No wildcards, filters or recursion:
/// a path names at most one value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonPath {
    text: String,
    steps: Vec<Step>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Member(String),
    Index(usize),
}

impl JsonPath {
    pub fn parse(text: &str) -> Result<JsonPath, InvalidValue> {
        let bad = |why: &str| InvalidValue::new("path", format!("{text:?}: {why}"));
        if text.chars().count() > MAX_PATH_CHARS {
            return Err(bad("longer than 256 characters"));
        }
        let mut rest = text
            .strip_prefix('$')
            .ok_or_else(|| bad("must start with $"))?;
        let mut steps = Vec::new();
        while !rest.is_empty() {
            if let Some(after) = rest.strip_prefix('.') {
                let end = after.find(['.', '[']).unwrap_or(after.len());
                let name = &after[..end];
                if name.is_empty()
                    || !name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                {
                    return Err(bad(
                        "a .member is letters, digits, _ or -; use ['…'] for others",
                    ));
                }
                steps.push(Step::Member(name.to_owned()));
                rest = &after[end..];
            } else if let Some(after) = rest.strip_prefix("['") {
                let end = after.find("']").ok_or_else(|| bad("an unclosed ['…']"))?;
                let name = &after[..end];
                if name.is_empty() || name.contains('\'') || name.chars().any(char::is_control) {
                    return Err(bad("an empty or unreadable ['…'] member"));
                }
                steps.push(Step::Member(name.to_owned()));
                rest = &after[end + 2..];
            } else if let Some(after) = rest.strip_prefix('[') {
                let end = after.find(']').ok_or_else(|| bad("an unclosed [index]"))?;
                let index: usize = after[..end]
                    .parse()
                    .map_err(|_| bad("an index is a whole number; use ['…'] for a member"))?;
                steps.push(Step::Index(index));
                rest = &after[end + 1..];
            } else {
                return Err(bad("expected .member, ['member'] or [index]"));
            }
        }
        if steps.is_empty() {
            return Err(bad("names no property of data"));
        }
        Ok(JsonPath {
            text: text.to_owned(),
            steps,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The value the path names in `data`, if there is one.
    pub fn get<'v>(&self, data: &'v Value) -> Option<&'v Value> {
        self.steps.iter().try_fold(data, |value, step| match step {
            Step::Member(name) => value.as_object()?.get(name),
            Step::Index(i) => value.as_array()?.get(*i),
        })
    }
}

/// A tenant's meter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meter {
    /// OpenMeter's meter slug: what the meter query names.
    pub slug: String,
    /// The CloudEvents `type` it counts (one meter per type and tenant).
    pub event_type: String,
    /// The metric of the catalog its events count towards.
    pub metric: String,
    /// Where the quantity is in `data`; `None`: each event counts 1.
    pub value_property: Option<JsonPath>,
    /// Properties kept in the usage event's metadata, by key.
    pub group_by: BTreeMap<String, JsonPath>,
}

/// A meter as the admin function and the table hold it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeterDefinition {
    pub slug: String,
    pub event_type: String,
    pub metric: String,
    #[serde(default)]
    pub value_property: Option<String>,
    #[serde(default)]
    pub group_by: BTreeMap<String, String>,
}

impl MeterDefinition {
    /// The meter it defines, every part checked (the metric against the catalog is the
    /// caller's).
    pub fn parse(&self) -> Result<Meter, InvalidValue> {
        let slug_ok = {
            let b = self.slug.as_bytes();
            !b.is_empty()
                && b.len() <= 63
                && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
                && b.iter().all(|c| {
                    c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_' || *c == b'-'
                })
        };
        if !slug_ok {
            return Err(InvalidValue::new(
                "slug",
                "1-63 characters of a-z, 0-9, _ and -, starting with a letter or digit",
            ));
        }
        if self.event_type.is_empty()
            || self.event_type.chars().count() > 256
            || self.event_type.chars().any(char::is_control)
        {
            return Err(InvalidValue::new(
                "eventType",
                "1-256 characters without control characters",
            ));
        }
        let path = |field: &'static str, text: &str| {
            JsonPath::parse(text).map_err(|e| InvalidValue::new(field, e.message))
        };
        let value_property = self
            .value_property
            .as_deref()
            .map(|p| path("valueProperty", p))
            .transpose()?;
        if self.group_by.len() > MAX_GROUP_BY {
            return Err(InvalidValue::new(
                "groupBy",
                format!("at most {MAX_GROUP_BY} keys"),
            ));
        }
        let mut group_by = BTreeMap::new();
        for (key, p) in &self.group_by {
            let key_ok = !key.is_empty()
                && key.len() <= 64
                && key
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            if !key_ok {
                return Err(InvalidValue::new(
                    "groupBy",
                    format!("{key:?}: a key is 1-64 characters of letters, digits, _ and -"),
                ));
            }
            group_by.insert(key.clone(), path("groupBy", p)?);
        }
        Ok(Meter {
            slug: self.slug.clone(),
            event_type: self.event_type.clone(),
            metric: self.metric.clone(),
            value_property,
            group_by,
        })
    }
}

/// A CloudEvent in structured JSON mode (specification 1.0), as OpenMeter's SDKs and
/// collectors send it: the attributes a meter reads, and `data`.
#[derive(Debug, Clone, PartialEq)]
pub struct CloudEvent {
    pub id: String,
    pub source: String,
    pub event_type: String,
    pub subject: Option<String>,
    pub time: Option<String>,
    pub data: Value,
}

/// The longest `id`, `source`, `type` or `subject` accepted.
pub const MAX_ATTRIBUTE_CHARS: usize = 1024;

impl CloudEvent {
    /// Reads one event; `Err` names the attribute at fault.
    pub fn parse(raw: &Value) -> Result<CloudEvent, InvalidValue> {
        let Value::Object(obj) = raw else {
            return Err(InvalidValue::new("event", "a CloudEvent is a JSON object"));
        };
        let text = |attribute: &'static str,
                    required: bool|
         -> Result<Option<String>, InvalidValue> {
            match obj.get(attribute) {
                None | Some(Value::Null) if !required => Ok(None),
                None | Some(Value::Null) => {
                    Err(InvalidValue::new(attribute, format!("{attribute} is required")))
                }
                Some(Value::String(s))
                    if !s.is_empty()
                        && s.chars().count() <= MAX_ATTRIBUTE_CHARS
                        && !s.chars().any(char::is_control) =>
                {
                    Ok(Some(s.clone()))
                }
                Some(_) => Err(InvalidValue::new(
                    attribute,
                    format!(
                        "{attribute} must be a string of 1-{MAX_ATTRIBUTE_CHARS} characters without control characters"
                    ),
                )),
            }
        };
        match obj.get("specversion") {
            Some(Value::String(v)) if v == "1.0" => {}
            _ => {
                return Err(InvalidValue::new(
                    "specversion",
                    "specversion must be \"1.0\"",
                ))
            }
        }
        if let Some(kind) = obj.get("datacontenttype") {
            let json_content = kind
                .as_str()
                .is_some_and(|k| k == "application/json" || k.starts_with("application/json;"));
            if !json_content {
                return Err(InvalidValue::new(
                    "datacontenttype",
                    "only application/json data is read",
                ));
            }
        }
        let data = match obj.get("data") {
            None | Some(Value::Null) => Value::Object(Map::new()),
            Some(data @ Value::Object(_)) => data.clone(),
            Some(_) => {
                return Err(InvalidValue::new("data", "data must be a JSON object"));
            }
        };
        Ok(CloudEvent {
            id: text("id", true)?.unwrap_or_default(),
            source: text("source", true)?.unwrap_or_default(),
            event_type: text("type", true)?.unwrap_or_default(),
            subject: text("subject", false)?,
            time: text("time", false)?,
            data,
        })
    }

    /// The usage event's `eventId`: unique per CloudEvents `source` and `id` (the same `id`
    /// from two sources is two events), at most 128 characters — `ce:<len(source)>:<source><id>`,
    /// or `ce:sha256:<hex>` of both when that is longer.
    pub fn usage_event_id(&self) -> String {
        let readable = format!("ce:{}:{}{}", self.source.len(), self.source, self.id);
        if readable.chars().count() <= 128 {
            return readable;
        }
        let mut hash = Sha256::new();
        hash.update(self.source.as_bytes());
        hash.update([0]);
        hash.update(self.id.as_bytes());
        format!("ce:sha256:{}", hex::encode(hash.finalize()))
    }
}

impl Meter {
    /// The usage event (the native API's JSON) that `event` stands for; it is then validated
    /// like any other (the window, the catalog, billable-from-external). The quantity is the
    /// integer at `valueProperty` (a number, or a string of digits, as OpenMeter accepts), or
    /// 1; `time` is `occurredAt`, `received_at` when absent; `subject` is the actor; each
    /// `groupBy` value found (a string, number or boolean) goes into the metadata, with the
    /// event's source and type.
    pub fn usage_event(
        &self,
        event: &CloudEvent,
        received_at: DateTime<Utc>,
    ) -> Result<Value, InvalidValue> {
        let quantity: i64 = match &self.value_property {
            None => 1,
            Some(path) => match path.get(&event.data) {
                Some(Value::Number(n)) => n
                    .as_i64()
                    .or_else(|| {
                        n.as_f64()
                            .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
                            .map(|f| f as i64)
                    })
                    .ok_or_else(|| {
                        InvalidValue::new(
                            "data",
                            format!("{} is not a whole number", path.as_str()),
                        )
                    })?,
                Some(Value::String(s)) => s.trim().parse().map_err(|_| {
                    InvalidValue::new("data", format!("{} is not a whole number", path.as_str()))
                })?,
                Some(_) => {
                    return Err(InvalidValue::new(
                        "data",
                        format!("{} is not a number", path.as_str()),
                    ))
                }
                None => {
                    return Err(InvalidValue::new(
                        "data",
                        format!(
                            "{} (the meter's valueProperty) is not in data",
                            path.as_str()
                        ),
                    ))
                }
            },
        };
        let mut metadata = Map::new();
        for (key, path) in &self.group_by {
            let value = match path.get(&event.data) {
                Some(Value::String(s)) => s.clone(),
                Some(v @ (Value::Number(_) | Value::Bool(_))) => v.to_string(),
                _ => continue,
            };
            metadata.insert(key.clone(), Value::String(value));
        }
        metadata.insert(
            "cloudevents".into(),
            json!({"source": event.source, "type": event.event_type}),
        );
        let occurred_at = event
            .time
            .clone()
            .unwrap_or_else(|| received_at.to_rfc3339_opts(SecondsFormat::Millis, true));
        let mut usage = json!({
            "eventId": event.usage_event_id(),
            "metric": self.metric,
            "quantity": quantity,
            "occurredAt": occurred_at,
            "correlationId": event.usage_event_id(),
            "metadata": metadata,
        });
        if let Some(subject) = &event.subject {
            usage["actorId"] = Value::String(subject.clone());
        }
        Ok(usage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn paths_name_one_value_of_data() {
        let data =
            json!({"tokens": {"input": 12, "out put": 3}, "items": [{"n": 5}], "model": "gpt"});
        let get = |p: &str| JsonPath::parse(p).unwrap().get(&data).cloned();
        assert_eq!(get("$.tokens.input"), Some(json!(12)));
        assert_eq!(get("$.tokens['out put']"), Some(json!(3)));
        assert_eq!(get("$.items[0].n"), Some(json!(5)));
        assert_eq!(get("$['model']"), Some(json!("gpt")));
        assert_eq!(get("$.items[3].n"), None);
        assert_eq!(get("$.model.x"), None);
        for bad in [
            "",
            "$",
            "tokens",
            "$.",
            "$..a",
            "$.a b",
            "$['a",
            "$[x]",
            "$[-1]",
            "$.*",
            "$['']",
            "$[?(@.a)]",
        ] {
            assert!(JsonPath::parse(bad).is_err(), "{bad}");
        }
        assert!(JsonPath::parse(&format!("$.{}", "a".repeat(300))).is_err());
    }

    #[test]
    fn definitions_are_checked_whole() {
        let ok = MeterDefinition {
            slug: "tokens_total".into(),
            event_type: "prompt".into(),
            metric: "api.requests".into(),
            value_property: Some("$.tokens".into()),
            group_by: BTreeMap::from([("model".into(), "$.model".into())]),
        };
        let meter = ok.parse().unwrap();
        assert_eq!(meter.value_property.unwrap().as_str(), "$.tokens");
        let bad = |f: &dyn Fn(&mut MeterDefinition)| {
            let mut d = ok.clone();
            f(&mut d);
            d.parse().unwrap_err().field
        };
        assert_eq!(bad(&|d| d.slug = "Tokens".into()), "slug");
        assert_eq!(bad(&|d| d.slug = "x".repeat(64)), "slug");
        assert_eq!(bad(&|d| d.event_type = String::new()), "eventType");
        assert_eq!(
            bad(&|d| d.value_property = Some("tokens".into())),
            "valueProperty"
        );
        assert_eq!(
            bad(&|d| {
                d.group_by.insert("a b".into(), "$.x".into());
            }),
            "groupBy"
        );
        assert_eq!(
            bad(&|d| {
                d.group_by = (0..17).map(|i| (format!("k{i}"), "$.x".into())).collect();
            }),
            "groupBy"
        );
    }

    fn meter() -> Meter {
        MeterDefinition {
            slug: "tokens".into(),
            event_type: "prompt".into(),
            metric: "api.requests".into(),
            value_property: Some("$.tokens".into()),
            group_by: BTreeMap::from([
                ("model".into(), "$.model".into()),
                ("stream".into(), "$.stream".into()),
                ("absent".into(), "$.nothing".into()),
            ]),
        }
        .parse()
        .unwrap()
    }

    #[test]
    fn a_cloudevent_becomes_a_usage_event() {
        let raw = json!({"specversion": "1.0", "id": "evt-1", "source": "gateway", "type": "prompt",
                         "subject": "customer-7", "time": "2026-12-07T10:00:00Z",
                         "data": {"tokens": "42", "model": "gpt", "stream": true}});
        let event = CloudEvent::parse(&raw).unwrap();
        let at = DateTime::parse_from_rfc3339("2026-12-07T11:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let usage = meter().usage_event(&event, at).unwrap();
        assert_eq!(
            usage,
            json!({"eventId": "ce:7:gatewayevt-1", "metric": "api.requests", "quantity": 42,
                   "occurredAt": "2026-12-07T10:00:00Z", "correlationId": "ce:7:gatewayevt-1",
                   "actorId": "customer-7",
                   "metadata": {"model": "gpt", "stream": "true",
                                "cloudevents": {"source": "gateway", "type": "prompt"}}})
        );
        // No time: the time of receipt. No valueProperty: 1.
        let mut counting = meter();
        counting.value_property = None;
        let bare = CloudEvent::parse(&json!({"specversion": "1.0", "id": "e", "source": "s",
                                             "type": "prompt"}))
        .unwrap();
        let usage = counting.usage_event(&bare, at).unwrap();
        assert_eq!(
            (usage["quantity"].clone(), usage["occurredAt"].clone()),
            (json!(1), json!("2026-12-07T11:00:00.000Z"))
        );
        assert!(usage.get("actorId").is_none());
        // A missing or non-integer quantity is refused.
        for data in [
            json!({}),
            json!({"tokens": 1.5}),
            json!({"tokens": "x"}),
            json!({"tokens": [1]}),
        ] {
            let e = CloudEvent {
                data,
                ..event.clone()
            };
            assert_eq!(meter().usage_event(&e, at).unwrap_err().field, "data");
        }
    }

    #[test]
    fn the_same_id_from_two_sources_is_two_events() {
        let event = |source: &str, id: &str| CloudEvent {
            id: id.into(),
            source: source.into(),
            event_type: "t".into(),
            subject: None,
            time: None,
            data: json!({}),
        };
        assert_ne!(
            event("a", "1").usage_event_id(),
            event("b", "1").usage_event_id()
        );
        // No ambiguity where source and id meet.
        assert_ne!(
            event("ab", "c").usage_event_id(),
            event("a", "bc").usage_event_id()
        );
        let long = event(&"s".repeat(200), "1").usage_event_id();
        assert!(
            long.starts_with("ce:sha256:") && long.len() <= 128,
            "{long}"
        );
        assert_ne!(long, event(&"s".repeat(200), "2").usage_event_id());
    }

    #[test]
    fn malformed_cloudevents_name_their_attribute() {
        let base = json!({"specversion": "1.0", "id": "e", "source": "s", "type": "t"});
        let with = |k: &str, v: Value| {
            let mut e = base.clone();
            e[k] = v;
            CloudEvent::parse(&e).unwrap_err().field
        };
        assert_eq!(with("specversion", json!("0.3")), "specversion");
        assert_eq!(with("id", json!("")), "id");
        assert_eq!(with("id", json!(7)), "id");
        assert_eq!(with("source", Value::Null), "source");
        assert_eq!(with("type", json!("a\u{0}b")), "type");
        assert_eq!(with("subject", json!("x".repeat(2000))), "subject");
        assert_eq!(with("data", json!([1])), "data");
        assert_eq!(
            with("datacontenttype", json!("text/plain")),
            "datacontenttype"
        );
        assert_eq!(
            CloudEvent::parse(&json!([base])).unwrap_err().field,
            "event"
        );
        assert!(CloudEvent::parse(&base).is_ok());
    }
}
