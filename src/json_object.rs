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
}
