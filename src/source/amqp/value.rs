//! AMQP field values and JSON: every numeric type AMQP can carry becomes a JSON number, and
//! JSON goes back as the field types kombu reads.

use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use serde_json::{json, Value};

/// A header value nested deeper than the limit: the message is refused, never converted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooDeep;

/// AMQP field values as JSON (every numeric type accepted), at most `depth` tables or arrays
/// deep: the recursion is bounded, whatever a producer nested.
pub fn amqp_to_json(v: &AMQPValue, depth: usize) -> Result<Value, TooDeep> {
    Ok(match v {
        AMQPValue::Boolean(b) => json!(b),
        AMQPValue::ShortShortInt(n) => json!(n),
        AMQPValue::ShortShortUInt(n) => json!(n),
        AMQPValue::ShortInt(n) => json!(n),
        AMQPValue::ShortUInt(n) => json!(n),
        AMQPValue::LongInt(n) => json!(n),
        AMQPValue::LongUInt(n) => json!(n),
        AMQPValue::LongLongInt(n) => json!(n),
        AMQPValue::Float(f) => json!(f),
        AMQPValue::Double(f) => json!(f),
        AMQPValue::DecimalValue(d) => json!(d.value as f64 / 10f64.powi(d.scale as i32)),
        AMQPValue::ShortString(s) => Value::String(s.as_str().to_owned()),
        AMQPValue::LongString(s) => Value::String(String::from_utf8_lossy(s.as_bytes()).into()),
        AMQPValue::FieldArray(a) => {
            let inner = depth.checked_sub(1).ok_or(TooDeep)?;
            let mut items = Vec::with_capacity(a.as_slice().len());
            for x in a.as_slice() {
                items.push(amqp_to_json(x, inner)?);
            }
            Value::Array(items)
        }
        AMQPValue::Timestamp(t) => json!(t),
        AMQPValue::FieldTable(t) => table_to_json(t, depth)?,
        AMQPValue::ByteArray(b) => Value::String(String::from_utf8_lossy(b.as_slice()).into()),
        AMQPValue::Void => Value::Null,
    })
}

/// A field table as a JSON object, nested at most `depth` deep (the table itself counts).
pub fn table_to_json(t: &FieldTable, depth: usize) -> Result<Value, TooDeep> {
    let inner = depth.checked_sub(1).ok_or(TooDeep)?;
    // Inserted one by one: collecting would first gather the fields in a vector grown by
    // doubling (four reallocations for a Celery message's headers) and sort it again.
    let mut object = serde_json::Map::new();
    for (k, v) in t.inner() {
        object.insert(k.as_str().to_string(), amqp_to_json(v, inner)?);
    }
    Ok(Value::Object(object))
}

/// Queue arguments as a field table, integers as py-amqp sends them (a signed 32-bit `I` where
/// they fit), so a queue a Celery client declared compares equal to the worker's declaration.
pub fn json_to_table(args: &serde_json::Map<String, Value>) -> FieldTable {
    let mut table = FieldTable::default();
    for (k, v) in args {
        let value = match v.as_i64().and_then(|i| i32::try_from(i).ok()) {
            Some(i) => AMQPValue::LongInt(i),
            None => json_to_amqp(v),
        };
        table.insert(k.as_str().into(), value);
    }
    table
}

/// JSON as AMQP field values. An object key longer than a short string (255 bytes) cannot be
/// a field name: that entry is left out (such keys can only come from a JSON body).
pub fn json_to_amqp(v: &Value) -> AMQPValue {
    match v {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => AMQPValue::LongLongInt(i),
            None => AMQPValue::Double(n.as_f64().unwrap_or(0.0)),
        },
        Value::String(s) => AMQPValue::LongString(LongString::from(s.as_bytes().to_vec())),
        Value::Array(a) => {
            let mut arr = FieldArray::default();
            for x in a {
                arr.push(json_to_amqp(x));
            }
            AMQPValue::FieldArray(arr)
        }
        Value::Object(o) => {
            let mut t = FieldTable::default();
            for (k, x) in o {
                if let Ok(key) = ShortString::try_new(k.as_str()) {
                    t.insert(key, json_to_amqp(x));
                }
            }
            AMQPValue::FieldTable(t)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::DecimalValue;

    #[test]
    fn every_amqp_numeric_type_becomes_a_json_number() {
        let cases = [
            (AMQPValue::ShortShortInt(-1), json!(-1)),
            (AMQPValue::ShortShortUInt(2), json!(2)),
            (AMQPValue::ShortInt(-3), json!(-3)),
            (AMQPValue::ShortUInt(4), json!(4)),
            (AMQPValue::LongInt(-5), json!(-5)),
            (AMQPValue::LongUInt(6), json!(6)),
            (AMQPValue::LongLongInt(-7), json!(-7)),
            (AMQPValue::Float(1.5), json!(1.5)),
            (AMQPValue::Double(2.5), json!(2.5)),
            (
                AMQPValue::DecimalValue(DecimalValue {
                    scale: 2,
                    value: 125,
                }),
                json!(1.25),
            ),
            (AMQPValue::Timestamp(9), json!(9)),
            (AMQPValue::Void, Value::Null),
            (AMQPValue::ShortString("s".into()), json!("s")),
            (
                AMQPValue::LongString(b"a\xffb".to_vec().into()),
                json!("a\u{fffd}b"),
            ),
        ];
        for (v, want) in cases {
            assert_eq!(amqp_to_json(&v, 0), Ok(want), "{v:?}");
        }
        let back = amqp_to_json(
            &json_to_amqp(&json!({"a": [1, "x", null, 2.5, {"b": true}]})),
            3,
        );
        assert_eq!(back, Ok(json!({"a": [1, "x", null, 2.5, {"b": true}]})));
    }

    #[test]
    fn nesting_past_the_depth_is_refused_and_long_keys_are_left_out() {
        let v = json_to_amqp(&json!({"a": [[{"b": 1}]]}));
        assert!(amqp_to_json(&v, 4).is_ok());
        assert_eq!(amqp_to_json(&v, 3), Err(TooDeep));
        let long = "k".repeat(256);
        let v = json_to_amqp(&json!({ long: 1, "ok": 2 }));
        assert_eq!(amqp_to_json(&v, 1), Ok(json!({"ok": 2})));
    }
}
