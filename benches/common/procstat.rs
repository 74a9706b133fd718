//! What a process and its descendants cost, read from `/proc`: CPU time (utime + stime, as
//! the kernel accounts it) and resident memory. Shared by the AMQP and scale benches.

use std::time::Duration;

/// The ids of `pid`'s descendants (children hang off whichever thread spawned them).
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    let mut stack = vec![pid];
    while let Some(p) = stack.pop() {
        let threads = std::fs::read_dir(format!("/proc/{p}/task"))
            .into_iter()
            .flatten()
            .flatten();
        for t in threads {
            let list = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            for c in list.split_whitespace().filter_map(|c| c.parse().ok()) {
                found.push(c);
                stack.push(c);
            }
        }
    }
    found
}

/// Resident memory of `pid` in KiB (0 once it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// RSS in KiB of `pid`, and the sum of its descendants'.
pub fn tree_rss_kib(pid: u32) -> (u64, u64) {
    let children = descendants(pid).iter().map(|&c| rss_kib(c)).sum();
    (rss_kib(pid), children)
}

/// CPU time `pid` has used so far (user + system; 0 once it is gone).
pub fn cpu(pid: u32) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    // Fields after the command name (which may hold spaces) start at field 3 (state);
    // utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields
        .get(11..13)
        .map(|f| f.iter().filter_map(|v| v.parse::<u64>().ok()).sum())
        .unwrap_or(0);
    Duration::from_secs_f64(ticks as f64 / clock_ticks())
}

fn clock_ticks() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64
}

/// Time `pid`'s threads alive now have spent on a CPU (from `/proc/<pid>/task/*/schedstat`,
/// in nanoseconds, where `stat`'s CPU times count 10 ms ticks); 0 once it is gone.
pub fn on_cpu(pid: u32) -> Duration {
    let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten();
    let ns: u64 = threads
        .filter_map(|t| {
            let stat = std::fs::read_to_string(t.path().join("schedstat")).ok()?;
            stat.split_whitespace().next()?.parse::<u64>().ok()
        })
        .sum();
    Duration::from_nanos(ns)
}

/// Time on a CPU of this process and of some others (by [`on_cpu`]), added up over chosen
/// stretches, e.g. one side's throughput runs, and the tasks those ran.
#[derive(Debug)]
pub struct CpuTally {
    /// This process first.
    pids: Vec<u32>,
    spent: Vec<Duration>,
    tasks: usize,
}

impl CpuTally {
    pub fn new(others: &[u32]) -> CpuTally {
        let pids: Vec<u32> = std::iter::once(std::process::id())
            .chain(others.iter().copied())
            .collect();
        let spent = vec![Duration::ZERO; pids.len()];
        CpuTally {
            pids,
            spent,
            tasks: 0,
        }
    }

    /// The counters now: a stretch's start, for [`CpuTally::add`].
    pub fn mark(&self) -> Vec<Duration> {
        self.pids.iter().map(|&p| on_cpu(p)).collect()
    }

    /// Adds what was spent since `mark`, over which `tasks` ran.
    pub fn add(&mut self, mark: Vec<Duration>, tasks: usize) {
        let now = self.mark();
        for ((spent, now), then) in self.spent.iter_mut().zip(now).zip(mark) {
            *spent += now.saturating_sub(then);
        }
        self.tasks += tasks;
    }

    /// µs per task by process: `this process` first, then the others by command name.
    pub fn per_task(&self) -> Vec<(String, f64)> {
        let us = |d: &Duration| d.as_secs_f64() * 1e6 / self.tasks.max(1) as f64;
        let name = |(i, pid): (usize, &u32)| match i {
            0 => "this process".to_string(),
            _ => std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .map_or_else(|_| format!("pid {pid}"), |c| c.trim_end().to_string()),
        };
        self.pids
            .iter()
            .enumerate()
            .map(name)
            .zip(self.spent.iter().map(us))
            .collect()
    }
}

/// CPU used so far by `pid` itself and by its descendants alive now.
pub fn tree_cpu(pid: u32) -> (Duration, Duration) {
    let children = descendants(pid).iter().map(|&c| cpu(c)).sum();
    (cpu(pid), children)
}

/// Whether any thread of `pid` is running or waiting for a CPU (state `R`); false once it is
/// gone.
pub fn running(pid: u32) -> bool {
    let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten();
    threads.into_iter().any(|t| {
        std::fs::read_to_string(t.path().join("stat")).is_ok_and(|stat| {
            stat.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('R'))
        })
    })
}

/// The first process whose command name is `comm` (e.g. RabbitMQ's `beam.smp`).
pub fn find_process(comm: &str) -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim_end() == comm)
        })
}

/// A `/proc/<pid>/status` figure in KiB, e.g. `VmRSS` or `VmHWM` (the peak RSS); 0 once the
/// process is gone.
pub fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.split(':').next() == Some(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// The whole host's CPU time so far, in clock ticks, from the first line of `/proc/stat`:
/// what its CPUs spent busy, idle, and stolen by the hypervisor (time a virtual CPU wanted to
/// run and the host ran something else: on a VM, the noise no process here can see).
#[derive(Debug, Clone, Copy, Default)]
pub struct HostCpu {
    pub busy: u64,
    pub idle: u64,
    pub steal: u64,
}

impl HostCpu {
    pub fn now() -> HostCpu {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let f: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or("")
            .split_whitespace()
            .skip(1)
            .filter_map(|v| v.parse().ok())
            .collect();
        let at = |i: usize| f.get(i).copied().unwrap_or(0);
        // user nice system idle iowait irq softirq steal
        HostCpu {
            busy: at(0) + at(1) + at(2) + at(5) + at(6),
            idle: at(3) + at(4),
            steal: at(7),
        }
    }

    /// What was spent between `self` and `later`.
    pub fn until(&self, later: &HostCpu) -> HostCpu {
        HostCpu {
            busy: later.busy.saturating_sub(self.busy),
            idle: later.idle.saturating_sub(self.idle),
            steal: later.steal.saturating_sub(self.steal),
        }
    }

    /// `idle 3% steal 1%` of all the CPU time in the window.
    pub fn show(&self) -> String {
        let all = (self.busy + self.idle + self.steal).max(1) as f64;
        format!(
            "idle {:.0}% steal {:.0}%",
            100.0 * self.idle as f64 / all,
            100.0 * self.steal as f64 / all
        )
    }
}
