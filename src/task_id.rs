//! [`TaskId`]: a task's id, shared rather than copied. Every task's id is a key in several
//! maps at once (the dispatcher's in-flight table, its pool's placements, its instance's
//! tasks) and travels in the reports between them; as a `String` each of those was an
//! allocation and a free per task on the worker's busiest thread.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

/// A task id: cheap to clone, and read as a `&str` (`Deref`, `Borrow<str>` for map lookups).
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskId(Arc<str>);

impl TaskId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Deref for TaskId {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

/// Hashes and compares as the `str` it holds, so a map keyed by `TaskId` is looked up by `&str`.
impl Borrow<str> for TaskId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl From<String> for TaskId {
    fn from(id: String) -> Self {
        TaskId(id.into())
    }
}

impl From<&str> for TaskId {
    fn from(id: &str) -> Self {
        TaskId(id.into())
    }
}

impl From<&TaskId> for TaskId {
    fn from(id: &TaskId) -> Self {
        id.clone()
    }
}

impl From<TaskId> for String {
    fn from(id: TaskId) -> Self {
        id.0.to_string()
    }
}

impl PartialEq<&str> for TaskId {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl Serialize for TaskId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for TaskId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Arc::<str>::deserialize(d).map(TaskId)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_map_keyed_by_task_id_is_looked_up_by_str() {
        let mut map = crate::idmap::TaskMap::default();
        map.insert(TaskId::from("a-1"), 1);
        assert_eq!(map.get("a-1"), Some(&1));
        assert_eq!(map.remove("a-1"), Some(1));
        assert!(map.is_empty());
    }

    #[test]
    fn clones_share_one_allocation_and_serialize_as_a_string() {
        let id = TaskId::from("7f2c".to_string());
        let copy = id.clone();
        assert!(std::ptr::eq(id.as_str(), copy.as_str()));
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"7f2c\"");
        let back: TaskId = serde_json::from_str("\"7f2c\"").unwrap();
        assert_eq!(back, "7f2c");
        assert_eq!(format!("{id} {id:?}"), "7f2c \"7f2c\"");
    }
}
