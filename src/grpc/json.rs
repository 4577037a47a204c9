//! `google.protobuf.Struct`, the wire form of `customData`, to and from
//! JSON: the domain knows custom data as JSON only.

use prost_types::value::Kind;
use serde_json::{Map, Number, Value};

use crate::domain::CustomData;

/// Converts a `google.protobuf.Struct` and validates the result as custom
/// data.
///
/// JSON cannot carry NaN or infinities and a value without a `kind` has
/// no meaning, so both are rejected. Numbers stay JSON floats (`1` from
/// the wire becomes `1.0`), which is exact for integers up to 2^53.
pub fn custom_data(proto: &prost_types::Struct) -> Result<CustomData, String> {
    CustomData::parse(Value::Object(struct_to_json(proto)?))
}

/// Converts a stored JSON object to a `google.protobuf.Struct`.
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
        Value::Object(map) => Kind::StructValue(json_to_struct(map)),
    };
    prost_types::Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
        let data = custom_data(&proto).unwrap();
        assert_eq!(
            data.as_value(),
            &json!({ "name": "Ada", "n": 1.5, "on": true, "none": null, "list": [2.0], "obj": { "x": "y" } })
        );
        assert_eq!(json_to_struct(data.as_map()), proto);
    }

    #[test]
    fn from_struct_rejects_non_finite_numbers() {
        for number in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let proto = proto_struct([("n", proto(Kind::NumberValue(number)))]);
            assert_eq!(
                custom_data(&proto).unwrap_err(),
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
                custom_data(&proto).unwrap_err(),
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
        assert!(custom_data(&deep).is_err());
    }

    #[test]
    fn json_to_struct_converts_stored_rows() {
        let map = json!({ "seats": 3, "big": u64::MAX, "tags": ["a"] })
            .as_object()
            .cloned()
            .unwrap();
        let converted = json_to_struct(&map);
        assert_eq!(converted.fields["seats"], proto(Kind::NumberValue(3.0)));
        assert_eq!(
            converted.fields["big"],
            proto(Kind::NumberValue(u64::MAX as f64))
        );
        // And back: integers come back as floats, equal in value.
        let back = custom_data(&converted).unwrap();
        assert_eq!(back.as_map()["seats"].as_f64(), Some(3.0));
    }
}
