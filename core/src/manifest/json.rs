//! Reading JSON text into a value while reporting what `serde_json::Value` would hide: keys
//! that appear twice in one object (the last one would silently win).

use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use super::{Issue, pointer};

/// Deepest nesting accepted; deeper input is refused before it can exhaust the stack.
const MAX_DEPTH: usize = 64;

/// Parses `bytes` as one JSON value. Duplicate keys are returned as issues (the value keeps the
/// first occurrence); text that is not JSON is an error naming the line and column.
pub fn parse_checked(bytes: &[u8]) -> Result<(Value, Vec<Issue>), Issue> {
    let mut duplicates = Vec::new();
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let seed = Checked {
        path: String::new(),
        depth: 0,
        duplicates: &mut duplicates,
    };
    let value = seed.deserialize(&mut de).map_err(syntax_issue)?;
    de.end().map_err(syntax_issue)?;
    Ok((value, duplicates))
}

fn syntax_issue(e: serde_json::Error) -> Issue {
    if e.line() == 0 {
        Issue::new("", e.to_string())
    } else {
        let text = e.to_string();
        // serde_json appends " at line L column C"; the path already says where.
        let message = text
            .rsplit_once(" at line ")
            .map_or(text.as_str(), |(m, _)| m)
            .to_string();
        Issue::new(format!("line {}, column {}", e.line(), e.column()), message)
    }
}

struct Checked<'a> {
    path: String,
    depth: usize,
    duplicates: &'a mut Vec<Issue>,
}

impl<'de> DeserializeSeed<'de> for Checked<'_> {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Checked<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
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
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        if self.depth >= MAX_DEPTH {
            return Err(serde::de::Error::custom(format!(
                "nesting deeper than {MAX_DEPTH} levels at {}",
                self.path
            )));
        }
        let mut items = Vec::new();
        loop {
            let seed = Checked {
                path: format!("{}/{}", self.path, items.len()),
                depth: self.depth + 1,
                duplicates: self.duplicates,
            };
            match seq.next_element_seed(seed)? {
                Some(v) => items.push(v),
                None => break,
            }
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        if self.depth >= MAX_DEPTH {
            return Err(serde::de::Error::custom(format!(
                "nesting deeper than {MAX_DEPTH} levels at {}",
                self.path
            )));
        }
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let path = pointer(&self.path, &key);
            let seed = Checked {
                path: path.clone(),
                depth: self.depth + 1,
                duplicates: self.duplicates,
            };
            let value = map.next_value_seed(seed)?;
            if object.contains_key(&key) {
                self.duplicates.push(Issue::new(
                    path,
                    format!("key `{key}` appears more than once in this object; keep one"),
                ));
            } else {
                object.insert(key, value);
            }
        }
        Ok(Value::Object(object))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicate_keys_are_reported_with_their_path() {
        let (_, issues) =
            parse_checked(br#"{"modules": {"a": {"image": "x"}, "a": {"image": "y"}}}"#).unwrap();
        assert_eq!(issues.len(), 1);
        assert_eq!(issues[0].path, "/modules/a");
    }

    #[test]
    fn syntax_errors_name_line_and_column() {
        let err = parse_checked(b"{\n  \"id\": ,\n}").unwrap_err();
        assert_eq!(err.path, "line 2, column 9");
    }

    #[test]
    fn deep_nesting_is_refused_without_overflowing() {
        let text = "[".repeat(10_000);
        assert!(parse_checked(text.as_bytes()).is_err());
    }

    #[test]
    fn trailing_garbage_is_refused() {
        assert!(parse_checked(br#"{"a":1} x"#).is_err());
    }
}
