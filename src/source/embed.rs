//! What a Celery task message carries of the canvas (its body's third element, the "embed"):
//! signatures of callbacks and errbacks, the rest of a chain, a chord's body; read strictly,
//! the chain's later steps kept as text. What follows a task's end is [`super::canvas`].

use super::decode_error::DecodeError;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use std::sync::Arc;

/// A serialized signature (`celery.canvas.Signature` as JSON).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Signature {
    pub task: String,
    pub args: Vec<Value>,
    pub kwargs: Map<String, Value>,
    pub options: Map<String, Value>,
    /// `group`, `chain`, `chord`, ... for composites; `None` for a plain task.
    pub subtask_type: Option<String>,
    /// `.si()`: never given the parent's result.
    pub immutable: bool,
}

/// The workflow steps a protocol 2 message carries (its body's third element).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Embed {
    pub callbacks: Vec<Signature>,
    pub errbacks: Vec<Signature>,
    /// The rest of the chain.
    pub chain: Chain,
    /// Set on the members of a chord's header: the chord's body.
    pub chord: Option<Value>,
}

/// Chain steps as text; shared, so handing them to the next message copies nothing.
pub type Steps = Arc<[Box<RawValue>]>;

/// No chain steps.
pub(super) fn no_steps() -> Steps {
    Arc::from(Vec::new())
}

/// The rest of a chain, reversed as on the wire (the last step runs next). Only the next step
/// is read; the others stay the text they came as and go on to the next message unparsed,
/// so a step of a long chain costs its bytes, never a tree of every later step.
#[derive(Debug, Clone)]
pub struct Chain {
    /// The steps after the next one, as text, shared with the message that carries them on.
    pub(super) rest: Steps,
    pub(super) next: Option<Signature>,
}

impl Default for Chain {
    fn default() -> Chain {
        Chain {
            rest: no_steps(),
            next: None,
        }
    }
}

impl PartialEq for Chain {
    fn eq(&self, other: &Chain) -> bool {
        self.next == other.next
            && self.rest.len() == other.rest.len()
            && self
                .rest
                .iter()
                .zip(other.rest.iter())
                .all(|(a, b)| a.get() == b.get())
    }
}

impl Chain {
    /// Reads a chain from its steps' text: the next (last) one strictly, the others must be
    /// objects.
    fn from_raw(steps: Vec<&RawValue>) -> Result<Chain, DecodeError> {
        let Some((next, rest)) = steps.split_last() else {
            return Ok(Chain::default());
        };
        let at = format!("embed.chain[{}]", rest.len());
        let next: Value =
            serde_json::from_str(next.get()).map_err(|e| DecodeError::NotJson(e.to_string()))?;
        let next = Signature::from_json(&next, &at)?;
        for (i, step) in rest.iter().enumerate() {
            if !step.get().starts_with('{') {
                return Err(shape(format!(
                    "embed.chain[{i}] must be a signature object"
                )));
            }
        }
        let rest = rest
            .iter()
            .map(|s| (*s).to_owned())
            .collect::<Vec<_>>()
            .into();
        Ok(Chain {
            rest,
            next: Some(next),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.next.is_none()
    }

    /// Every step in wire order (the next one last), read as signatures where they can be
    /// (after a failure, to fail each); a step that cannot be read is left out.
    pub(super) fn steps(&self) -> impl Iterator<Item = Signature> + '_ {
        let rest = self.rest.iter().filter_map(|raw| {
            let v: Value = serde_json::from_str(raw.get()).ok()?;
            Signature::from_json(&v, "embed.chain").ok()
        });
        rest.chain(self.next.clone())
    }
}

fn shape(msg: String) -> DecodeError {
    DecodeError::Shape(msg)
}

impl Signature {
    pub fn from_json(v: &Value, at: &str) -> Result<Signature, DecodeError> {
        let Value::Object(o) = v else {
            return Err(shape(format!("{at} must be a signature object")));
        };
        let task = o
            .get("task")
            .and_then(Value::as_str)
            .ok_or_else(|| shape(format!("{at}: `task` must be a string")))?;
        let field = |k: &str| o.get(k).filter(|v| !v.is_null());
        Ok(Signature {
            task: task.to_string(),
            args: match field("args") {
                None => Vec::new(),
                Some(Value::Array(a)) => a.clone(),
                Some(_) => return Err(shape(format!("{at}: `args` must be an array"))),
            },
            kwargs: match field("kwargs") {
                None => Map::new(),
                Some(Value::Object(k)) => k.clone(),
                Some(_) => return Err(shape(format!("{at}: `kwargs` must be an object"))),
            },
            options: match field("options") {
                None => Map::new(),
                Some(Value::Object(k)) => k.clone(),
                Some(_) => return Err(shape(format!("{at}: `options` must be an object"))),
            },
            subtask_type: field("subtask_type")
                .and_then(Value::as_str)
                .map(str::to_string),
            immutable: field("immutable").and_then(Value::as_bool).unwrap_or(false),
        })
    }

    pub(super) fn option_str(&self, key: &str) -> Option<&str> {
        self.options
            .get(key)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    }

    /// The signatures an option holds (`link`, `link_error`): one, a list, or none.
    pub(super) fn option_signatures(&self, key: &str) -> Vec<Value> {
        match self.options.get(key) {
            Some(Value::Array(a)) => a.clone(),
            Some(v @ Value::Object(_)) => vec![v.clone()],
            _ => Vec::new(),
        }
    }
}

pub(super) fn signatures(v: Option<&Value>, at: &str) -> Result<Vec<Signature>, DecodeError> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, s)| Signature::from_json(s, &format!("{at}[{i}]")))
            .collect(),
        Some(_) => Err(shape(format!("{at} must be a list of signatures"))),
    }
}

/// An embed as its text is read: the chain's steps stay text.
#[derive(serde::Deserialize)]
struct EmbedText<'a> {
    #[serde(default)]
    callbacks: Value,
    #[serde(default)]
    errbacks: Value,
    #[serde(borrow, default)]
    chain: Option<&'a RawValue>,
    #[serde(default)]
    chord: Value,
}

impl Embed {
    /// Reads a v2 body's third element from its text; `null` or absent is an empty embed.
    pub fn from_raw(raw: Option<&RawValue>) -> Result<Embed, DecodeError> {
        let Some(raw) = raw.filter(|r| r.get() != "null") else {
            return Ok(Embed::default());
        };
        if !raw.get().starts_with('{') {
            return Err(shape("body[2] (embed) must be an object".into()));
        }
        let text: EmbedText =
            serde_json::from_str(raw.get()).map_err(|e| shape(format!("body[2] (embed): {e}")))?;
        let chain = match text.chain.filter(|c| c.get() != "null") {
            None => Chain::default(),
            Some(c) => {
                let steps: Vec<&RawValue> = serde_json::from_str(c.get())
                    .map_err(|_| shape("embed.chain must be a list of signatures".into()))?;
                Chain::from_raw(steps)?
            }
        };
        Ok(Embed {
            callbacks: signatures(Some(&text.callbacks), "embed.callbacks")?,
            errbacks: signatures(Some(&text.errbacks), "embed.errbacks")?,
            chain,
            chord: Some(text.chord).filter(|c| !c.is_null()),
        })
    }

    /// The same from a JSON value (tests, and embeds built in memory).
    pub fn from_json(v: Option<&Value>) -> Result<Embed, DecodeError> {
        let raw = v
            .map(|v| serde_json::value::to_raw_value(v).expect("JSON serializes"))
            .filter(|r| r.get() != "null");
        Embed::from_raw(raw.as_deref())
    }
}
