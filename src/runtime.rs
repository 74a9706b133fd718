//! The worker's async runtime, built the one way `serve`, the one-shot commands and the
//! benches share, so that what the benches measure is what the daemon runs.

/// A runtime of `threads` worker threads (`runtime_threads`; 1 by default) with I/O and
/// timers. The worker's own work per task is a few microseconds of bookkeeping between
/// processes; on one thread it is never handed from thread to thread, which costs more than it
/// shares, and every other core is left to the plugins. One thread is tokio's current-thread
/// scheduler, which runs everything on the thread that calls `block_on`: its polls and wake-ups
/// skip the work-stealing bookkeeping a pool of one still pays (about a fifth more tasks per
/// second through the supervisor here, `docs/src/benchmarks.md`).
pub fn build(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if threads <= 1 {
        return tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
}

#[cfg(test)]
mod tests {
    use tokio::runtime::RuntimeFlavor;

    #[test]
    fn one_thread_is_the_current_thread_scheduler_and_more_a_multi_thread_one() {
        for (threads, flavor) in [
            (0, RuntimeFlavor::CurrentThread),
            (1, RuntimeFlavor::CurrentThread),
            (2, RuntimeFlavor::MultiThread),
        ] {
            let rt = super::build(threads).unwrap();
            assert_eq!(rt.handle().runtime_flavor(), flavor, "{threads} threads");
            // Timers are on (a sleep ends), and a spawned task runs to its end.
            let ran = rt.block_on(async {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                tokio::spawn(async { 7 }).await.unwrap()
            });
            assert_eq!(ran, 7);
        }
    }
}
