//! A JSON object written field by field into bytes, for events: the worker makes several per
//! task, and building each as a `serde_json::Map` only to serialize it cost more than the rest
//! of the event. (`task.run` lines have their own writer, with keys escaped at compile time:
//! `supervisor/instance/wire.rs`.)

use serde::Serialize;

/// An object being written; [`ObjectWriter::finish`] closes it.
pub(crate) struct ObjectWriter {
    out: Vec<u8>,
}

impl ObjectWriter {
    /// An open object, with room for about `capacity` bytes.
    pub(crate) fn with_capacity(capacity: usize) -> ObjectWriter {
        let mut out = Vec::with_capacity(capacity);
        out.push(b'{');
        ObjectWriter { out }
    }

    /// Appends `"key":value`. The caller keeps keys unique.
    pub(crate) fn field(&mut self, key: &str, value: &(impl Serialize + ?Sized)) {
        if self.out.len() > 1 {
            self.out.push(b',');
        }
        serde_json::to_writer(&mut self.out, key).expect("a str serializes");
        self.out.push(b':');
        serde_json::to_writer(&mut self.out, value).expect("an event field serializes");
    }

    /// The object's text.
    pub(crate) fn finish(mut self) -> Vec<u8> {
        self.out.push(b'}');
        self.out
    }
}

/// An event's own fields, written straight into its JSON object as they are given (no map
/// is built: the worker makes several events per task while anyone listens). Keys its writer
/// keeps for itself (`reserved`: a worker event's `event` and `time`, a Celery event's common
/// fields) are left out, so no field can spoof them.
pub struct EventFields {
    object: ObjectWriter,
    reserved: &'static [&'static str],
}

impl EventFields {
    /// Fields written after what `object` already holds, leaving out `reserved` keys.
    pub(crate) fn new(object: ObjectWriter, reserved: &'static [&'static str]) -> EventFields {
        EventFields { object, reserved }
    }

    /// Appends `"key":value`, unless `key` is reserved. The caller keeps keys unique.
    pub fn field(&mut self, key: &str, value: &(impl Serialize + ?Sized)) -> &mut EventFields {
        if !self.reserved.contains(&key) {
            self.object.field(key, value);
        }
        self
    }

    /// The object, still open, for its writer's own fields.
    pub(crate) fn into_object(self) -> ObjectWriter {
        self.object
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    #[test]
    fn fields_make_one_object_in_the_order_written() {
        assert_eq!(ObjectWriter::with_capacity(0).finish(), b"{}");
        let mut o = ObjectWriter::with_capacity(8);
        o.field("a\"b", "x\ny");
        o.field("n", &1.5);
        o.field("v", &json!([1, null]));
        let text = String::from_utf8(o.finish()).unwrap();
        assert_eq!(text, r#"{"a\"b":"x\ny","n":1.5,"v":[1,null]}"#);
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["a\"b"], "x\ny");
    }

    #[test]
    fn event_fields_leave_out_the_reserved_keys() {
        let mut f = EventFields::new(ObjectWriter::with_capacity(8), &["time"]);
        f.field("a", &1).field("time", &"spoofed").field("b", &2);
        let mut o = f.into_object();
        o.field("time", &3);
        assert_eq!(o.finish(), br#"{"a":1,"b":2,"time":3}"#);
    }
}
