//! Client-defined custom data: a small JSON object stored with the user.

use serde_json::{Map, Value};

/// Keeps rows small; custom data is metadata, not a document store.
const MAX_BYTES: usize = 16 * 1024;
/// Bounds recursion in everything that later walks the value.
const MAX_DEPTH: usize = 8;

/// A JSON object of at most 16 KiB (16384 bytes of compact JSON) nested at
/// most 8 levels deep. The object itself is level 1 and every nested object
/// or array adds one: `{"a":{"b":1}}` and `{"a":[1]}` are 2 levels deep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomData(Value);

impl CustomData {
    pub fn parse(value: Value) -> Result<Self, String> {
        if !value.is_object() {
            return Err("must be a JSON object".to_owned());
        }
        if depth(&value) > MAX_DEPTH {
            return Err(format!("must be nested at most {MAX_DEPTH} levels deep"));
        }
        if holds_nul(&value) {
            // Postgres' jsonb cannot store it.
            return Err("must not contain NUL characters in keys or strings".to_owned());
        }
        // Display writes compact JSON, the same bytes the store keeps.
        if value.to_string().len() > MAX_BYTES {
            return Err(format!("must be at most {MAX_BYTES} bytes as JSON"));
        }
        Ok(Self(value))
    }

    pub fn as_value(&self) -> &Value {
        &self.0
    }

    pub fn into_value(self) -> Value {
        self.0
    }

    pub fn as_map(&self) -> &Map<String, Value> {
        match &self.0 {
            Value::Object(map) => map,
            _ => unreachable!("CustomData always holds an object"),
        }
    }

    pub fn into_inner(self) -> Map<String, Value> {
        match self.0 {
            Value::Object(map) => map,
            _ => unreachable!("CustomData always holds an object"),
        }
    }
}

/// An empty object.
impl Default for CustomData {
    fn default() -> Self {
        Self(Value::Object(Map::new()))
    }
}

/// Levels of object/array nesting; scalars add none.
fn depth(value: &Value) -> usize {
    match value {
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// Whether a key or string anywhere in `value` holds U+0000.
fn holds_nul(value: &Value) -> bool {
    match value {
        Value::String(text) => text.contains('\0'),
        Value::Array(items) => items.iter().any(holds_nul),
        Value::Object(map) => map
            .iter()
            .any(|(key, value)| key.contains('\0') || holds_nul(value)),
        Value::Null | Value::Bool(_) | Value::Number(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// An object `levels` deep: `{"k":{"k":...{"k":1}}}`.
    fn nested(levels: usize) -> Value {
        (1..levels).fold(json!({ "k": 1 }), |inner, _| json!({ "k": inner }))
    }

    #[test]
    fn accepts_objects() {
        let value = json!({ "plan": "pro", "seats": 3, "tags": ["a", null, true] });
        assert_eq!(CustomData::parse(value.clone()).unwrap().as_value(), &value);
        assert!(CustomData::parse(json!({})).is_ok());
    }

    #[test]
    fn rejects_non_objects() {
        for value in [
            json!(null),
            json!(1),
            json!("x"),
            json!([]),
            json!([{}]),
            json!(true),
        ] {
            assert_eq!(
                CustomData::parse(value).unwrap_err(),
                "must be a JSON object"
            );
        }
    }

    #[test]
    fn depth_counts_the_object_itself_as_level_one() {
        assert_eq!(depth(&json!({})), 1);
        assert_eq!(depth(&json!({ "a": { "b": 1 } })), 2);
        assert_eq!(depth(&json!({ "a": [1] })), 2);
        assert_eq!(depth(&json!({ "a": [{ "b": [] }] })), 4);
        assert_eq!(depth(&nested(8)), 8);
    }

    #[test]
    fn depth_boundary_is_8_levels() {
        assert!(CustomData::parse(nested(8)).is_ok());
        assert_eq!(
            CustomData::parse(nested(9)).unwrap_err(),
            "must be nested at most 8 levels deep"
        );
        // Arrays are levels too.
        assert!(CustomData::parse(json!({ "k": nested(8) })).is_err());
        assert!(CustomData::parse(json!({ "k": [nested(7)] })).is_err());
    }

    #[test]
    fn size_boundary_is_16_kib_of_json() {
        // `{"k":""}` is 8 bytes of JSON around the string.
        let at_limit = json!({ "k": "a".repeat(MAX_BYTES - 8) });
        assert_eq!(at_limit.to_string().len(), 16384);
        assert!(CustomData::parse(at_limit).is_ok());
        assert_eq!(
            CustomData::parse(json!({ "k": "a".repeat(MAX_BYTES - 7) })).unwrap_err(),
            "must be at most 16384 bytes as JSON"
        );
    }

    #[test]
    fn size_counts_encoded_bytes_not_characters() {
        // Each "é" is one character but two bytes of JSON.
        assert!(CustomData::parse(json!({ "k": "é".repeat(8188) })).is_ok());
        assert!(CustomData::parse(json!({ "k": "é".repeat(8189) })).is_err());
    }

    #[test]
    fn rejects_nul_in_keys_and_strings_at_any_depth() {
        for value in [
            json!({ "k": "a\0b" }),
            json!({ "a\0": 1 }),
            json!({ "k": [{ "deep": ["\0"] }] }),
        ] {
            assert_eq!(
                CustomData::parse(value).unwrap_err(),
                "must not contain NUL characters in keys or strings"
            );
        }
        assert!(CustomData::parse(json!({ "k": "a\\u0000b" })).is_ok());
    }

    #[test]
    fn default_is_an_empty_object() {
        let data = CustomData::default();
        assert_eq!(data.as_value(), &json!({}));
        assert!(data.clone().into_inner().is_empty());
        assert_eq!(data.into_value(), json!({}));
    }
}
