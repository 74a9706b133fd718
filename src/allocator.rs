//! The allocator of every program built on this crate (the worker, its tests and benches):
//! jemalloc. Against glibc's malloc, on this project's benches, it cut the worker's CPU per
//! AMQP task by a sixth, kept the drain of 100,000 queued tasks 10 % faster, and the idle
//! daemon with 100 plugin instances 20 % smaller (docs/src/benchmarks.md).
//!
//! Its settings: freed pages go back to the kernel within about a second of the last use
//! (`dirty_decay_ms`, then at once: `muzzy_decay_ms:0`), purged by jemalloc's own thread
//! (`background_thread`) even while the worker is idle, so memory a burst of tasks used is
//! not held for long after it.

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Read by jemalloc when it starts (its `malloc_conf`; the crate prefixes its symbols).
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8; 60] =
    b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

#[cfg(test)]
mod tests {
    /// jemalloc's option `name`, read back with mallctl.
    fn opt<T: Default>(name: &std::ffi::CStr) -> T {
        let mut value = T::default();
        let mut len = std::mem::size_of::<T>();
        // SAFETY: `value` is a `T` of `len` bytes, what the named option holds.
        let failed = unsafe {
            tikv_jemalloc_sys::mallctl(
                name.as_ptr(),
                (&mut value as *mut T).cast(),
                &mut len,
                std::ptr::null_mut(),
                0,
            )
        };
        assert_eq!(failed, 0, "mallctl {name:?}");
        value
    }

    #[test]
    fn jemalloc_runs_with_the_settings_written_here() {
        let _warm = vec![0u8; 1 << 20];
        assert!(opt::<bool>(c"opt.background_thread"));
        assert_eq!(opt::<isize>(c"opt.dirty_decay_ms"), 1000);
        assert_eq!(opt::<isize>(c"opt.muzzy_decay_ms"), 0);
    }
}
