//! Request JSON, parsed strictly: a document whose object repeats a key
//! (`{"quantity": 1, "quantity": 5}`) is refused instead of silently keeping the last value,
//! at any depth. Everything else is `serde_json`'s parser, with its nesting limit.

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// Parses `bytes` as one JSON document, refusing duplicate object keys.
pub fn from_slice_strict(bytes: &[u8]) -> Result<Value, serde_json::Error> {
    serde_json::from_slice::<Strict>(bytes).map(|strict| strict.0)
}

struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("a number that is not finite"))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(Strict(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                let shown: String = key.chars().take(64).collect();
                return Err(de::Error::custom(format_args!("duplicate key {shown:?}")));
            }
            let Strict(value) = map.next_value()?;
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicate_keys_are_refused_at_any_depth() {
        for doc in [
            r#"{"quantity": 1, "quantity": 5}"#,
            r#"{"events": [{"a": 1, "b": {"x": 1, "x": 1}}]}"#,
            r#"{"events": [], "events": [{"eventId": "e"}]}"#,
            r#"[{"k": null, "k": null}]"#,
        ] {
            let err = from_slice_strict(doc.as_bytes()).unwrap_err();
            assert!(err.to_string().contains("duplicate key"), "{doc}: {err}");
        }
    }

    #[test]
    fn everything_else_parses_as_serde_json_does() {
        for doc in [
            r#"{"events": [{"eventId": "e", "quantity": 3, "f": 1.5, "n": null, "b": true, "u": 18446744073709551615, "i": -9223372036854775808}]}"#,
            r#"[]"#,
            r#""text""#,
            r#"{"a": {"a": {"a": 1}}, "b": [{"a": 1}, {"a": 2}]}"#,
            r#"{"é": "\u00e9", "big": 1e300}"#,
        ] {
            let strict = from_slice_strict(doc.as_bytes()).unwrap();
            let plain: Value = serde_json::from_str(doc).unwrap();
            assert_eq!(strict, plain, "{doc}");
        }
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(
            from_slice_strict(deep.as_bytes()).is_err(),
            "nesting stays limited"
        );
        assert!(from_slice_strict(b"{\"a\":1,}").is_err());
    }
}
