//! `[limits]` of a plugin manifest: what one plugin process may use, applied with setrlimit in
//! the child before exec. Core dumps are off unless a plugin asks for them.

use serde::{Deserialize, Serialize};

/// Resource limits of one plugin process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct Limits {
    /// Address space in bytes (RLIMIT_AS).
    pub memory: Option<u64>,
    /// Open file descriptors (RLIMIT_NOFILE).
    pub open_files: Option<u64>,
    /// Processes of the plugin's user (RLIMIT_NPROC).
    pub processes: Option<u64>,
    /// CPU seconds (RLIMIT_CPU); past it the process gets SIGXCPU.
    pub cpu_time: Option<u64>,
    /// Core file size in bytes (RLIMIT_CORE); 0, no core dumps, by default.
    pub core: u64,
    /// CPU priority (setpriority), 0-19: higher yields the CPU to others. Unset in the
    /// manifest, it is resolved when the manifest is parsed: `WATCHER_NICE` for a plugin that
    /// only watches events, else 0 (see [`RawLimits::check`]).
    pub nice: u8,
    /// Runs under `SCHED_IDLE`: on a CPU only when nothing else wants it, and off it the
    /// moment something does. Unset, it is on for a plugin that only watches events and sets
    /// no `nice`: its work then never delays a task's.
    pub idle_cpu: bool,
}

/// `[limits]` as written: sizes may carry a unit (`"512MiB"`, `"2GiB"`) or be plain bytes.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    memory: Option<Size>,
    open_files: Option<u64>,
    processes: Option<u64>,
    cpu_time: Option<u64>,
    core: Option<Size>,
    nice: Option<i64>,
    idle_cpu: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Size {
    Bytes(u64),
    Text(String),
}

impl Size {
    fn bytes(&self, key: &str) -> Result<u64, String> {
        let text = match self {
            Size::Bytes(n) => return Ok(*n),
            Size::Text(t) => t.trim(),
        };
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (digits, unit) = text.split_at(split);
        let scale: u64 = match unit.trim() {
            "" | "B" => 1,
            "K" | "KiB" => 1 << 10,
            "M" | "MiB" => 1 << 20,
            "G" | "GiB" => 1 << 30,
            _ => {
                return Err(format!(
                    "key `limits.{key}`: {text:?} is not a size like \"512MiB\" or \"2GiB\""
                ))
            }
        };
        digits
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(scale))
            .ok_or_else(|| {
                format!("key `limits.{key}`: {text:?} is not a size like \"512MiB\" or \"2GiB\"")
            })
    }
}

impl RawLimits {
    /// The limits as applied. A `watcher` (a plugin that only watches events) defaults to
    /// `WATCHER_NICE` and, unless its `nice` is written, to the idle CPU.
    pub(super) fn check(&self, watcher: bool) -> Result<Limits, String> {
        let positive = |key: &str, v: Option<u64>| match v {
            Some(0) => Err(format!("key `limits.{key}`: must be at least 1")),
            v => Ok(v),
        };
        Ok(Limits {
            memory: self
                .memory
                .as_ref()
                .map(|s| s.bytes("memory"))
                .transpose()?,
            open_files: positive("open_files", self.open_files)?,
            processes: positive("processes", self.processes)?,
            cpu_time: positive("cpu_time", self.cpu_time)?,
            core: self
                .core
                .as_ref()
                .map(|s| s.bytes("core"))
                .transpose()?
                .unwrap_or(0),
            idle_cpu: self.idle_cpu.unwrap_or(watcher && self.nice.is_none()),
            nice: match self.nice {
                None if watcher => super::WATCHER_NICE,
                None => 0,
                Some(n @ 0..=19) => n as u8,
                Some(n) => return Err(format!("key `limits.nice`: {n} is not 0-19 (a plugin may give up CPU priority, not take more)")),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_units_and_bad_ones_are_named() {
        let raw: RawLimits = toml::from_str("memory = \"512MiB\"\nopen_files = 64").unwrap();
        let l = raw.check(false).unwrap();
        assert_eq!(
            (l.memory, l.open_files, l.core),
            (Some(512 << 20), Some(64), 0)
        );
        let raw: RawLimits = toml::from_str("memory = \"lots\"").unwrap();
        assert!(raw
            .check(false)
            .unwrap_err()
            .contains("key `limits.memory`"));
        let raw: RawLimits = toml::from_str("cpu_time = 0").unwrap();
        assert!(raw.check(false).unwrap_err().contains("at least 1"));
        let raw: RawLimits = toml::from_str("nice = 19").unwrap();
        assert_eq!(raw.check(false).unwrap().nice, 19);
        for bad in ["nice = -1", "nice = 20"] {
            let raw: RawLimits = toml::from_str(bad).unwrap();
            assert!(
                raw.check(false).unwrap_err().contains("key `limits.nice`"),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_watcher_yields_the_cpu_unless_its_limits_say_otherwise() {
        let limits = |text: &str, watcher: bool| {
            let l = toml::from_str::<RawLimits>(text)
                .unwrap()
                .check(watcher)
                .unwrap();
            (l.nice, l.idle_cpu)
        };
        let watcher = super::super::WATCHER_NICE;
        assert_eq!(limits("", true), (watcher, true), "a watcher: idle CPU");
        assert_eq!(limits("", false), (0, false), "a task plugin: neither");
        assert_eq!(limits("nice = 0", true), (0, false), "a nice set rules");
        assert_eq!(limits("nice = 5", true), (5, false));
        assert_eq!(limits("idle_cpu = false", true), (watcher, false));
        assert_eq!(
            limits("idle_cpu = true", false),
            (0, true),
            "any plugin may ask"
        );
        assert_eq!(limits("idle_cpu = true\nnice = 3", true), (3, true));
    }
}
