//! Client-defined custom data: a small JSON object stored with the user.

use prost_types::value::Kind;
use serde_json::{Map, Number, Value};

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

    /// Converts a `google.protobuf.Struct` and validates the result.
    ///
    /// JSON cannot carry NaN or infinities and a value without a `kind` has
    /// no meaning, so both are rejected. Numbers stay JSON floats (`1` from
    /// the wire becomes `1.0`), which is exact for integers up to 2^53.
    pub fn from_struct(proto: &prost_types::Struct) -> Result<Self, String> {
        Self::parse(Value::Object(struct_to_json(proto)?))
    }

    /// Converts to a `google.protobuf.Struct` for responses.
    pub fn to_struct(&self) -> prost_types::Struct {
        Self::json_to_struct(self.as_map())
    }

    /// Converts an already-stored JSON object to a `google.protobuf.Struct`.
    ///
    /// Rows are trusted, so this does not validate; numbers become `f64`
    /// because that is the only number type `Struct` has.
    pub fn json_to_struct(map: &Map<String, Value>) -> prost_types::Struct {
        prost_types::Struct {
            fields: map
                .iter()
                .map(|(key, value)| (key.clone(), json_to_proto(value)))
                .collect(),
        }
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

fn struct_to_json(proto: &prost_types::Struct) -> Result<Map<String, Value>, String> {
    proto
        .fields
        .iter()
        .map(|(key, value)| Ok((key.clone(), proto_to_json(value)?)))
        .collect()
}

fn proto_to_json(value: &prost_types::Value) -> Result<Value, String> {
    let kind = value
        .kind
        .as_ref()
        .ok_or("must not contain a value with no kind set")?;
    Ok(match kind {
        Kind::NullValue(_) => Value::Null,
        Kind::BoolValue(flag) => Value::Bool(*flag),
        Kind::NumberValue(number) => Number::from_f64(*number)
            .map(Value::Number)
            .ok_or("must not contain NaN or infinite numbers")?,
        Kind::StringValue(text) => Value::String(text.clone()),
        Kind::ListValue(list) => Value::Array(
            list.values
                .iter()
                .map(proto_to_json)
                .collect::<Result<_, _>>()?,
        ),
        Kind::StructValue(nested) => Value::Object(struct_to_json(nested)?),
    })
}

fn json_to_proto(value: &Value) -> prost_types::Value {
    let kind = match value {
        Value::Null => Kind::NullValue(prost_types::NullValue::NullValue.into()),
        Value::Bool(flag) => Kind::BoolValue(*flag),
        // as_f64 only fails under serde_json's arbitrary_precision feature;
        // null is more honest than a made-up number if that ever changes.
        Value::Number(number) => number
            .as_f64()
            .map_or(Kind::NullValue(0), Kind::NumberValue),
        Value::String(text) => Kind::StringValue(text.clone()),
        Value::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.iter().map(json_to_proto).collect(),
        }),
        Value::Object(map) => Kind::StructValue(CustomData::json_to_struct(map)),
    };
    prost_types::Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// An object `levels` deep: `{"k":{"k":...{"k":1}}}`.
    fn nested(levels: usize) -> Value {
        (1..levels).fold(json!({ "k": 1 }), |inner, _| json!({ "k": inner }))
    }

    fn proto(kind: Kind) -> prost_types::Value {
        prost_types::Value { kind: Some(kind) }
    }

    fn proto_struct(
        fields: impl IntoIterator<Item = (&'static str, prost_types::Value)>,
    ) -> prost_types::Struct {
        prost_types::Struct {
            fields: fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        }
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
    fn converts_from_struct() {
        let proto = proto_struct([
            ("name", proto(Kind::StringValue("Ada".into()))),
            ("n", proto(Kind::NumberValue(1.5))),
            ("on", proto(Kind::BoolValue(true))),
            ("none", proto(Kind::NullValue(0))),
            (
                "list",
                proto(Kind::ListValue(prost_types::ListValue {
                    values: vec![proto(Kind::NumberValue(2.0))],
                })),
            ),
            (
                "obj",
                proto(Kind::StructValue(proto_struct([(
                    "x",
                    proto(Kind::StringValue("y".into())),
                )]))),
            ),
        ]);
        let data = CustomData::from_struct(&proto).unwrap();
        assert_eq!(
            data.as_value(),
            &json!({ "name": "Ada", "n": 1.5, "on": true, "none": null, "list": [2.0], "obj": { "x": "y" } })
        );
        assert_eq!(data.to_struct(), proto);
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
    fn from_struct_rejects_non_finite_numbers() {
        for number in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let proto = proto_struct([("n", proto(Kind::NumberValue(number)))]);
            assert_eq!(
                CustomData::from_struct(&proto).unwrap_err(),
                "must not contain NaN or infinite numbers"
            );
        }
    }

    #[test]
    fn from_struct_rejects_missing_kind_even_when_nested() {
        let missing = prost_types::Value { kind: None };
        let list = proto(Kind::ListValue(prost_types::ListValue {
            values: vec![missing.clone()],
        }));
        for proto in [proto_struct([("k", missing)]), proto_struct([("k", list)])] {
            assert_eq!(
                CustomData::from_struct(&proto).unwrap_err(),
                "must not contain a value with no kind set"
            );
        }
    }

    #[test]
    fn from_struct_applies_the_same_limits() {
        let mut deep = proto_struct([("k", proto(Kind::NumberValue(1.0)))]);
        for _ in 1..9 {
            deep = proto_struct([("k", proto(Kind::StructValue(deep)))]);
        }
        assert!(CustomData::from_struct(&deep).is_err());
    }

    #[test]
    fn json_to_struct_converts_stored_rows() {
        let map = json!({ "seats": 3, "big": u64::MAX, "tags": ["a"] })
            .as_object()
            .cloned()
            .unwrap();
        let converted = CustomData::json_to_struct(&map);
        assert_eq!(converted.fields["seats"], proto(Kind::NumberValue(3.0)));
        assert_eq!(
            converted.fields["big"],
            proto(Kind::NumberValue(u64::MAX as f64))
        );
        // And back: integers come back as floats, equal in value.
        let back = CustomData::from_struct(&converted).unwrap();
        assert_eq!(back.as_map()["seats"].as_f64(), Some(3.0));
    }

    #[test]
    fn default_is_an_empty_object() {
        let data = CustomData::default();
        assert_eq!(data.as_value(), &json!({}));
        assert!(data.clone().into_inner().is_empty());
        assert_eq!(data.into_value(), json!({}));
        assert!(CustomData::default().to_struct().fields.is_empty());
    }
}
