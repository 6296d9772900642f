//! Reading a JSON request body field by field, collecting every problem as an RFC 9457
//! per-field error instead of stopping at the first.

use meterbridge::domain::usage::{is_valid_id, write_canonical};
use meterbridge::http::{ApiError, FieldError};
use serde_json::{Map, Value};

pub struct Fields {
    object: Map<String, Value>,
    errors: Vec<FieldError>,
}

impl Fields {
    /// The body must be an object of `known` fields only: an unknown one is refused rather
    /// than silently ignored (a typo must not drop a value).
    pub fn of(body: Value, known: &[&str]) -> Result<Fields, ApiError> {
        let Value::Object(object) = body else {
            return Err(ApiError::Malformed("the body must be a JSON object".into()));
        };
        let errors = object
            .keys()
            .filter(|k| !known.contains(&k.as_str()))
            .map(|k| {
                let shown: String = k.chars().take(64).collect();
                FieldError::new(
                    "unknown_field",
                    format!("/{shown}"),
                    format!("unknown field {shown:?}"),
                )
            })
            .collect();
        Ok(Fields { object, errors })
    }

    fn error(&mut self, code: &str, field: &str, message: impl Into<String>) {
        self.errors
            .push(FieldError::new(code, format!("/{field}"), message.into()));
    }

    fn take(&mut self, field: &str, required: bool) -> Option<Value> {
        match self.object.remove(field) {
            None | Some(Value::Null) => {
                if required {
                    self.error("missing_field", field, format!("{field} is required"));
                }
                None
            }
            Some(value) => Some(value),
        }
    }

    /// A string of 1..=`max` characters without control characters.
    pub fn text(&mut self, field: &str, required: bool, max: usize) -> Option<String> {
        match self.take(field, required)? {
            Value::String(s) if is_valid_id(&s, max) => Some(s),
            Value::String(_) => {
                self.error(
                    "invalid_value",
                    field,
                    format!("{field} must be 1-{max} characters without control characters"),
                );
                None
            }
            _ => {
                self.error("invalid_type", field, format!("{field} must be a string"));
                None
            }
        }
    }

    /// A whole number within `range`.
    pub fn integer(
        &mut self,
        field: &str,
        required: bool,
        range: std::ops::RangeInclusive<i64>,
    ) -> Option<i64> {
        match self.take(field, required)? {
            Value::Number(n) => match n.as_i64().filter(|v| range.contains(v)) {
                Some(v) => Some(v),
                None => {
                    self.error(
                        "invalid_value",
                        field,
                        format!(
                            "{field} must be a whole number from {} to {}",
                            range.start(),
                            range.end()
                        ),
                    );
                    None
                }
            },
            _ => {
                self.error("invalid_type", field, format!("{field} must be a number"));
                None
            }
        }
    }

    /// A JSON object of at most `max_bytes` (canonical form), without NUL characters.
    pub fn object(&mut self, field: &str, max_bytes: usize) -> Option<Value> {
        match self.take(field, false)? {
            value @ Value::Object(_) => {
                let mut canonical = String::new();
                write_canonical(&value, &mut canonical);
                if canonical.contains("\\u0000") {
                    self.error(
                        "invalid_value",
                        field,
                        format!("{field} must not contain NUL"),
                    );
                    None
                } else if canonical.len() > max_bytes {
                    self.error(
                        "invalid_value",
                        field,
                        format!("{field} may be at most {max_bytes} bytes"),
                    );
                    None
                } else {
                    Some(value)
                }
            }
            _ => {
                self.error("invalid_type", field, format!("{field} must be an object"));
                None
            }
        }
    }

    /// Adds a problem found by the caller's own check of a value.
    pub fn invalid(&mut self, field: &str, message: impl Into<String>) {
        self.error("invalid_value", field, message);
    }

    /// 422 with every problem found, or nothing.
    pub fn finish(self) -> Result<(), ApiError> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(ApiError::Unprocessable {
                detail: format!(
                    "{} field(s) are invalid; nothing was changed",
                    self.errors.len()
                ),
                errors: self.errors,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_problem_is_reported_at_once() {
        let mut f = Fields::of(
            json!({"a": 5, "b": "x\u{0}", "c": "1", "d": [1], "typo": 1}),
            &["a", "b", "c", "d", "e"],
        )
        .unwrap();
        assert_eq!(f.integer("a", true, 1..=4), None);
        assert_eq!(f.text("b", true, 10), None);
        assert_eq!(f.integer("c", true, 1..=4), None);
        assert_eq!(f.object("d", 100), None);
        assert_eq!(f.text("e", true, 10), None);
        let ApiError::Unprocessable { errors, .. } = f.finish().unwrap_err() else {
            panic!("422 expected");
        };
        let codes: Vec<(&str, &str)> = errors
            .iter()
            .map(|e| (e.code.as_str(), e.pointer.as_str()))
            .collect();
        assert_eq!(
            codes,
            [
                ("unknown_field", "/typo"),
                ("invalid_value", "/a"),
                ("invalid_value", "/b"),
                ("invalid_type", "/c"),
                ("invalid_type", "/d"),
                ("missing_field", "/e"),
            ]
        );
        assert!(Fields::of(json!([1]), &[]).is_err());
    }
}
