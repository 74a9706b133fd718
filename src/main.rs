fn main() -> std::process::ExitCode {
    worker::cli::main()
}

/// glibc's allocator spends a fifth of the worker's CPU in arena bookkeeping under load
/// (measured with perf on the AMQP benchmark); mimalloc does not.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
