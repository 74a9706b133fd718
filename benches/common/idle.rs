//! How the machine's idle CPUs wait while a bench runs.
//!
//! Every task crosses between processes, so a bench's figures hang on how fast a sleeping CPU
//! wakes. On a virtual machine whose idle CPUs halt (this project's 2-core VMs boot with
//! `haltpoll.guest_halt_poll_ns=0`), each wake-up is a round trip through the host, 30-80 µs,
//! taken or not by luck: one run's per-round drain ratios for the same code spread from 0.19x to
//! 1.13x. So by default a bench holds `/dev/cpu_dma_latency` at 0 for its run, as cyclictest
//! does (tuned's `latency-performance` profile holds it at 1 µs): idle CPUs poll instead of
//! halting, a wake-up costs microseconds, and the figures measure the code on both sides of each
//! ratio rather than the host. Where a ratio hangs on wake-ups (the supervisor's batching against
//! a raw pipe's one line at a time), the two modes can judge it differently: run both.
//! `BENCH_IDLE=halt` leaves the machine's own idle alone (figures for a host run as it is).

use std::fs::File;
use std::io::Write;
use std::sync::OnceLock;

const POLLING: &str = "idle CPUs polling";
const MACHINES: &str = "the machine's own idle";

static MODE: OnceLock<&'static str> = OnceLock::new();

/// The idle mode held for a bench's run; dropping it gives the machine's own back.
pub struct Idle {
    _held: Option<File>,
}

/// How idle CPUs wait in this run, for the goal lines.
pub fn mode() -> &'static str {
    MODE.get().copied().unwrap_or(MACHINES)
}

/// Holds idle CPUs polling unless `BENCH_IDLE=halt`; says which mode the run has.
pub fn hold() -> Idle {
    if std::env::var("BENCH_IDLE").is_ok_and(|v| v == "halt") {
        println!("idle CPUs: the machine's own (BENCH_IDLE=halt)");
        return Idle { _held: None };
    }
    let held = File::options()
        .write(true)
        .open("/dev/cpu_dma_latency")
        .and_then(|mut f| f.write_all(&0i32.to_ne_bytes()).map(|()| f));
    match held {
        Ok(f) => {
            println!("idle CPUs: polling (/dev/cpu_dma_latency held at 0 for the run; BENCH_IDLE=halt for the machine's own idle)");
            MODE.get_or_init(|| POLLING);
            Idle { _held: Some(f) }
        }
        Err(e) => {
            println!("idle CPUs: the machine's own (cannot hold /dev/cpu_dma_latency: {e}; run as root to measure with polling idle)");
            Idle { _held: None }
        }
    }
}
